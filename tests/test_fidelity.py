"""Specification of pipeline/metrics/fidelity.py: torch-fidelity's Inception metrics, offline.

Every test runs on a seeded stand-in Inception (Kaiming-initialised, never a reportable number):
it proves the code path. Inception costs ~0.1-0.5 s per image on CPU whatever the input size
(torch-fidelity resizes to 299), so features of one small set are computed once per module.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.metrics.fidelity import (
    FIDELITY_FEATURES,
    SPATIAL_DIM,
    UInt8Images,
    check_inception_weights,
    compute_metrics,
    fid_statistics,
    import_adm_reference_npz,
    inception_features,
    load_reference,
    make_standin_inception_weights,
    metrics_from_features,
    reference_from_features,
    save_reference,
)
from storage_schemas.evaluation import INCEPTION_WEIGHTS_FILE, check_adm_reference

N = 16  # images in the shared set; halves of it serve as "samples" and "reference images"
METRICS = ("fid", "sfid", "inception_score_mean", "inception_score_std", "kid_mean", "kid_std", "precision", "recall")


def make_images(n, seed, size=32):
    """Blocky random colour images with pixel noise: distinct enough for a random Inception."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (n, 4, 4, 3)), np.ones((1, size // 4, size // 4, 1)))
    return np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)


def colour_shift(images):
    return np.clip(images.astype(np.int16) + np.array([60, -40, 0]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    weights = root / "standin-inception.pth"
    sha = make_standin_inception_weights(weights, seed=0)
    images = make_images(N, seed=0)
    features = inception_features(images, weights, "cpu", batch_size=8)
    reference = reference_from_features(features["2048"], sha, spatial=features["spatial"])
    # Each FID solves a 2048 x 2048 eigenproblem (~5-10 s on CPU): the shared ones are computed here.
    self_metrics = metrics_from_features(features, reference, sha, kid_subset_size=1000)
    half_metrics = metrics_from_features(first_half(features), reference, sha)
    return SimpleNamespace(weights=weights, sha=sha, images=images, features=features, reference=reference,
                           self_metrics=self_metrics, half_metrics=half_metrics)


def first_half(features):
    return {name: f[: N // 2] for name, f in features.items()}


def test_standin_weights_are_reproducible_from_the_seed(inception, tmp_path):
    assert check_inception_weights(inception.weights) == inception.sha
    assert make_standin_inception_weights(tmp_path / "elsewhere.pth", seed=0) == inception.sha


def test_standin_features_are_not_degenerate(inception):
    pool, logits = inception.features["2048"], inception.features["logits_unbiased"]
    assert pool.shape == (N, 2048) and logits.shape == (N, 1008)
    assert np.isfinite(pool).all() and np.isfinite(logits).all()
    assert pool.std(axis=0).mean() > 1e-3 * np.abs(pool).mean()  # default init collapses to ~1e-9
    assert logits.std(axis=0).mean() > 0


def test_fid_of_a_set_against_its_own_statistics_is_zero(inception):
    assert abs(inception.self_metrics["fid"]) < 1e-3 * np.trace(inception.reference["sigma"])
    assert abs(inception.self_metrics["sfid"]) < 1e-3 * np.trace(inception.reference["sigma_s"])
    assert inception.half_metrics["sfid"] > 1e-2 * np.trace(inception.reference["sigma_s"])  # a subset: not zero


def test_spatial_features_are_adm_mixed_6_conv_first_7_channels_in_nhwc_order(inception):
    """ADM's `mixed_6/conv:0`[..., :7] is torch-fidelity's Mixed_6d.branch1x1 output (after BN + ReLU),
    channels 0-6, flattened as (h, w, c): a hook on a plain torch-fidelity extractor gives the same."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    spatial = inception.features["spatial"]
    assert spatial.shape == (N, SPATIAL_DIM) == (N, 2023) and np.isfinite(spatial).all()
    assert spatial.std(axis=0).mean() > 0 and (spatial >= 0).all()  # post-ReLU, not degenerate

    plain = FeatureExtractorInceptionV3("inception-v3-compat", list(FIDELITY_FEATURES),
                                        feature_extractor_weights_path=str(inception.weights))
    plain.feature_extractor_internal_dtype = torch.float64
    plain.to(torch.float64)
    tapped = []
    plain.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: tapped.append(output.clone()))
    with torch.no_grad():
        pool, logits = plain(torch.from_numpy(inception.images[:5]).permute(0, 3, 1, 2).contiguous())
    (maps,) = tapped
    assert tuple(maps.shape) == (5, 192, 17, 17)
    manual = maps[:, :7].permute(0, 2, 3, 1).numpy().reshape(5, -1).astype(np.float32)
    np.testing.assert_allclose(spatial[:5], manual, rtol=1e-6, atol=1e-6)
    # the tap changes nothing else: pool features and logits are torch-fidelity's own
    np.testing.assert_allclose(inception.features["2048"][:5], pool.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inception.features["logits_unbiased"][:5], logits.numpy(), rtol=1e-6, atol=1e-5)


def test_spatial_features_are_deterministic_across_runs_and_batch_sizes(inception):
    again = inception_features(inception.images[:6], inception.weights, "cpu", batch_size=4)["spatial"]
    np.testing.assert_allclose(again, inception.features["spatial"][:6], rtol=1e-6, atol=1e-7)


def test_all_metrics_are_finite_and_pr_of_a_set_against_itself_is_one(inception):
    metrics = inception.self_metrics
    assert all(math.isfinite(metrics[k]) for k in METRICS)
    assert (metrics["precision"], metrics["recall"]) == (1.0, 1.0)
    assert metrics["inception_score_mean"] >= 1.0
    assert metrics["kid_subset_size"] == N  # clamped to min(N, N_ref)
    assert metrics | {
        "evaluator": "torch-fidelity", "evaluator_version": "0.4.0", "feature_extractor": "inception-v3-compat",
        "inception_weights_sha256": inception.sha, "inception_weights_official": False,
        "num_samples": N, "num_reference": N,
    } == metrics
    json.dumps(metrics)  # plain Python values only


def test_fid_rises_when_samples_shift_colour(inception):
    reference, samples = inception.reference, inception.images[: N // 2]
    unshifted = inception.half_metrics
    shifted = compute_metrics(colour_shift(samples), reference, inception.weights, "cpu", batch_size=5)
    # stand-in seed 0: unshifted ~0.2 x trace(sigma), shifted ~2.4 x trace(sigma)
    assert shifted["fid"] > unshifted["fid"] + 0.5 * np.trace(reference["sigma"])
    assert shifted["precision"] < 1.0 and shifted["num_samples"] == N // 2
    assert all(math.isfinite(shifted[k]) for k in METRICS)


def test_adm_reference_npz_gives_the_same_fid_as_statistics_of_the_same_images(inception, tmp_path):
    # ADM layout: mu/sigma of the reference set (mu in float32, as np.mean of float32 activations
    # gives), mu_s/sigma_s for sFID, and arr_0 images for precision/recall.
    stats = fid_statistics(inception.features["2048"])
    spatial = fid_statistics(inception.features["spatial"])
    arr_0 = inception.images[4:8]
    npz = tmp_path / "VIRTUAL_fake_labeled.npz"
    np.savez(npz, mu=stats["mu"].astype(np.float32), sigma=stats["sigma"], mu_s=spatial["mu"].astype(np.float32),
             sigma_s=spatial["sigma"], arr_0=arr_0)
    adm = import_adm_reference_npz(npz, inception.weights, "cpu", batch_size=3, resolution=32)
    adm_metrics = metrics_from_features(first_half(inception.features), adm, inception.sha)
    ours = inception.half_metrics  # the same samples against statistics of the same images
    assert ours["fid"] > 1e-2 * np.trace(inception.reference["sigma"])  # a subset: a non-trivial distance
    assert adm_metrics["fid"] == pytest.approx(ours["fid"], rel=1e-5)
    assert adm_metrics["sfid"] == pytest.approx(ours["sfid"], rel=1e-5)  # ADM's mu_s/sigma_s, used as they are
    # arr_0's features, computed at another batch size, are those of the same images
    np.testing.assert_allclose(adm["pr_features"], inception.features["2048"][4:8], rtol=1e-5)
    assert adm["meta"]["num_images"] == 4 and adm["meta"]["inception_weights_sha256"] == inception.sha
    assert adm["meta"]["resolution"] == 32  # arr_0.shape[1]


def test_adm_reference_of_another_resolution_is_refused_in_one_line(inception, tmp_path):
    stats = fid_statistics(inception.features["2048"][:4])
    npz = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez_compressed(npz, mu=stats["mu"], sigma=stats["sigma"], mu_s=np.zeros(SPATIAL_DIM),
                        sigma_s=np.eye(SPATIAL_DIM), arr_0=make_images(2, seed=3, size=16))
    assert check_adm_reference(npz) == 16 and check_adm_reference(npz, 16) == 16  # headers only, even compressed
    with pytest.raises(ValueError) as err:
        import_adm_reference_npz(npz, inception.weights, "cpu", resolution=32)
    message = str(err.value)
    assert "\n" not in message and str(npz) in message
    assert "holds 16x16 images but data.resolution is 32" in message
    np.savez(tmp_path / "no_spatial.npz", mu=stats["mu"], sigma=stats["sigma"], arr_0=make_images(2, seed=3))
    with pytest.raises(ValueError, match=r"lacks mu_s, sigma_s"):
        check_adm_reference(tmp_path / "no_spatial.npz", 32)


def test_missing_weights_fail_with_one_line_naming_the_key_and_file(inception, tmp_path):
    absent = tmp_path / "absent" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as err:
        compute_metrics(inception.images[:2], inception.reference, absent)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"evaluate.inception_weights: {absent} does not exist")
    assert INCEPTION_WEIGHTS_FILE in message and "place it locally" in message


def test_reference_from_other_inception_weights_is_refused(inception):
    reference = reference_from_features(inception.features["2048"], "0" * 64)
    with pytest.raises(ValueError, match=r"rebuild the reference with evaluate.inception_weights"):
        metrics_from_features(inception.features, reference, inception.sha)


def test_reference_round_trips_and_unknown_versions_are_refused(inception, tmp_path):
    reference = inception.reference | {"meta": inception.reference["meta"] | {"split": "val"}}
    path = save_reference(tmp_path / "ref.npz", reference["mu"], reference["sigma"], reference["pr_features"],
                          reference["meta"], mu_s=reference["mu_s"], sigma_s=reference["sigma_s"])
    loaded = load_reference(path)
    np.testing.assert_array_equal(loaded["mu"], reference["mu"])
    np.testing.assert_array_equal(loaded["sigma"], reference["sigma"])
    np.testing.assert_array_equal(loaded["pr_features"], reference["pr_features"])
    assert loaded["meta"] == reference["meta"] and loaded["meta"]["split"] == "val"
    assert loaded["mu_s"].shape == (2023,) and loaded["sigma_s"].shape == (2023, 2023)
    stats_only = save_reference(tmp_path / "stats_only.npz", loaded["mu"], loaded["sigma"])
    assert load_reference(stats_only)["pr_features"] is None and load_reference(stats_only)["mu_s"] is None
    without_spatial = metrics_from_features(inception.features, load_reference(stats_only), inception.sha)
    assert without_spatial["sfid"] is None and math.isfinite(without_spatial["fid"])

    future = tmp_path / "future.npz"
    np.savez(future, schema_version=np.int64(99), mu=loaded["mu"], sigma=loaded["sigma"], meta=np.array("{}"))
    with pytest.raises(ValueError, match="schema_version 99") as err:
        load_reference(future)
    assert "\n" not in str(err.value)
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=loaded["mu"], sigma=loaded["sigma"], arr_0=inception.images[:1])
    with pytest.raises(ValueError, match="import_adm_reference_npz"):
        load_reference(adm)


def test_uint8_images_serves_chw_tensors_from_a_memory_map(tmp_path):
    images = make_images(3, seed=1, size=8)
    np.save(tmp_path / "arr_0.npy", images)
    dataset = UInt8Images(np.load(tmp_path / "arr_0.npy", mmap_mode="r"))
    assert len(dataset) == 3
    item = dataset[2]
    assert item.dtype.is_floating_point is False and tuple(item.shape) == (3, 8, 8)
    np.testing.assert_array_equal(item.permute(1, 2, 0).numpy(), images[2])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        UInt8Images(images.astype(np.float32))


def test_the_inception_is_read_once_from_the_bytes_of_the_planned_digest(inception, tmp_path, monkeypatch):
    """torch-fidelity reopened the checked file by path with torch.load(weights_only=False): a pickle swapped in
    between ran code. Now the file is read once, its bytes checked against the digest the fingerprint holds, and
    torch-fidelity gets tensors; bytes changed in place after planning (size and mtime kept) are refused."""
    import shutil

    import torch

    from pipeline.artifacts import DamagedError
    from pipeline.metrics.fidelity import load_inception
    from tests.conftest import flip_byte

    monkeypatch.setenv("SRCFLOW_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "inception.pth"
    shutil.copyfile(inception.weights, weights)
    assert check_inception_weights(weights) == inception.sha  # planned: the digest a fingerprint holds
    loads, real = [], torch.load

    def spy(f, *args, **kwargs):
        loads.append((f, kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    extractor = load_inception(weights)
    assert loads and not [f for f, _ in loads if isinstance(f, (str, type(weights)))], loads  # never by path
    pool = extractor(torch.from_numpy(inception.images[:2]).permute(0, 3, 1, 2).contiguous())[0]
    np.testing.assert_allclose(pool.numpy(), inception.features["2048"][:2], rtol=0, atol=1e-6)

    flip_byte(weights, weights.stat().st_size // 2)
    with pytest.raises(DamagedError, match=r"evaluate\.inception_weights: .* has sha256 .* not the") as e:
        load_inception(weights)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
