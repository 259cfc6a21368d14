"""Stage `fit_src`: PCA out of core, the learned SRC under constant noise, exact resume, the report."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.data.features import load_normalizer, read_features
from pipeline.images import label_width
from pipeline.training import TrainingStopped
from stages import fit_src
from stages.fit_src import load_pca, load_src
from stages.runner import plan, run_pipeline


@pytest.fixture(scope="module")
def learned(stores):
    """One learned fit without code noise (150 steps), shared by the tests that only read it. Noise trades
    clean fidelity for noisy fidelity; at sigma 0 the learned SRC must beat the PCA (4-11% over seeds 0-2)."""
    cfg = stores("learned", "src.noise_sigma=0", "src.steps=150", "src.hidden=128", "src.depth=2", "src.lr=1e-3",
                 "src.ema_decay=0.95", "src.report_images=16")
    return cfg, run_pipeline(cfg, until="fit_src")


def _train_features(manifests):
    from pipeline.data.features import open_features

    store = manifests["encode"].dir / "features.zarr"
    group, attrs = open_features(store)
    return group, attrs, load_normalizer(store)


def test_pca_equals_numpy_eigendecomposition_of_the_normalized_features(stores):
    cfg = stores("pca", "src.kind=pca")
    manifests = run_pipeline(cfg, until="fit_src")
    out = manifests["fit_src"].dir
    group, attrs, normalizer = _train_features(manifests)
    x = normalizer(read_features(group, slice(*attrs["splits"]["train"]))).double().reshape(-1, 64).numpy()
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    values, vectors = values[::-1], vectors[:, ::-1]

    pca = load_pca(out / "pca.safetensors")
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(0), atol=1e-12)
    np.testing.assert_allclose(pca.eigenvalues.numpy(), values, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(np.abs(pca.components.numpy()[:6] @ vectors[:, :6]), np.eye(6), atol=1e-6)
    assert pca.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-12)
    curve = json.loads((out / "explained_variance.json").read_text())
    assert curve["cumulative"][-1] == pytest.approx(1.0, abs=1e-12)
    assert curve["cumulative_at_dim"] == pytest.approx(values[:6].sum() / values.sum(), rel=1e-9)
    assert (out / "explained_variance.png").stat().st_size > 0

    # kind pca: the SRC is that projection, whitened; the report's SRC and PCA rows are the same numbers
    src = load_src(manifests["fit_src"], "cpu")
    assert src.arch == "linear" and torch.allclose(src.components.double(), pca.components[:6], atol=1e-7)
    m = manifests["fit_src"].metrics
    assert m["src/feature_mse"] == m["pca/feature_mse"] and m["src/noisy_feature_mse"] == m["pca/noisy_feature_mse"]
    assert not (out / "checkpoints").exists()
    # the PCA decoder never trained under noise: it records sigma 0 beside the configured src.noise_sigma (0.2)
    info = json.loads((out / "src.json").read_text())
    assert m["decoder_noise_sigma"] == info["decoder_noise_sigma"] == 0.0 and m["noise_sigma"] == 0.2


def test_learned_src_beats_pca_at_the_same_dim_and_reports_everything(learned):
    _, manifests = learned
    m = manifests["fit_src"].metrics
    assert m["kind"] == "learned" and m["dim"] == 6 and m["report_split"] == "val" and m["report_images"] == 16
    assert m["src/feature_mse"] < 0.98 * m["pca/feature_mse"]
    assert m["src/feature_cosine"] > m["pca/feature_cosine"]
    for model in ("src", "pca"):
        assert 0 < m[f"{model}/feature_cosine"] <= 1
        for key in ("psnr_vs_rae", "psnr_vs_image", "noisy_psnr_vs_rae", "noisy_psnr_vs_image"):
            assert np.isfinite(m[f"{model}/{key}"])
    out = manifests["fit_src"].dir
    from PIL import Image

    with Image.open(out / "recon_grid.png") as grid:  # 4 labelled rows of 8 images of 32 px, 2 px padding
        assert grid.size == (label_width(list(fit_src.GRID_ROWS)) + 8 * 34 + 2, 4 * 34 + 2)
    info = json.loads((out / "src.json").read_text())
    assert info["kind"] == "learned" and info["model"]["arch"] == "mlp" and info["model"]["dim"] == 6

    # the saved SRC reproduces the reported feature MSE on the report rows
    group, attrs, normalizer = _train_features(manifests)
    rows, _ = fit_src.report_rows(group, attrs, 16)
    z = normalizer(read_features(group, rows))
    src = load_src(out)
    assert not src.training and not any(p.requires_grad for p in src.parameters())
    with torch.no_grad():
        mse = (src.decode(src.encode(z)) - z).double().square().mean().item()
    assert mse == pytest.approx(m["src/feature_mse"], rel=1e-5)


def test_noise_is_applied_in_training_at_the_configured_sigma_only(stores, monkeypatch):
    import pipeline.models.src as src_module

    seen = []
    real = src_module.add_code_noise
    monkeypatch.setattr(src_module, "add_code_noise",
                        lambda c, sigma, g=None, eps=None: seen.append(sigma) or real(c, sigma, g, eps))
    m = run_pipeline(stores("noise", "src.noise_sigma=0.25", "src.steps=4"), until="fit_src")["fit_src"].metrics
    assert seen == [0.25] * 4  # every training step, at sigma (the report draws its own noise)
    assert m["decoder_noise_sigma"] == 0.25  # the learned SRC decoder trained at that sigma
    for model in ("src", "pca"):  # the report's noisy rows: codes + 0.25 * eps decode worse
        assert m[f"{model}/noisy_feature_mse"] > m[f"{model}/feature_mse"]
        assert m[f"{model}/noisy_psnr_vs_rae"] < m[f"{model}/psnr_vs_rae"]

    seen.clear()
    m = run_pipeline(stores("no-noise", "src.noise_sigma=0", "src.steps=4"), until="fit_src")["fit_src"].metrics
    assert seen == [0.0] * 4
    for model in ("src", "pca"):  # sigma 0: the "noisy" report rows are the clean ones
        assert m[f"{model}/noisy_feature_mse"] == m[f"{model}/feature_mse"]
        assert m[f"{model}/noisy_psnr_vs_rae"] == m[f"{model}/psnr_vs_rae"]


def test_pixel_loss_goes_through_the_frozen_decoder_in_eval_mode(stores, monkeypatch):
    calls = []
    real = fit_src.pixel_loss

    def spy(decoder, normalizer, z, z_hat):
        loss = real(decoder, normalizer, z, z_hat)
        frozen = not decoder.training and not any(p.requires_grad for p in decoder.parameters())
        calls.append((frozen, z_hat.requires_grad, loss.requires_grad, loss.item()))
        return loss

    monkeypatch.setattr(fit_src, "pixel_loss", spy)
    run_pipeline(stores("pixel", "src.pixel_loss_weight=0.5", "src.steps=3"), until="fit_src")
    assert len(calls) == 3 and all(frozen and grad_in and grad_out and loss > 0
                                   for frozen, grad_in, grad_out, loss in calls)


class Killed(BaseException):
    """A crash that nothing in the stage catches (stands in for SIGKILL)."""


def test_resume_after_a_crash_and_a_sigterm_equals_an_uninterrupted_run(stores, monkeypatch):
    reference = run_pipeline(stores("uninterrupted"), until="fit_src")["fit_src"]

    cfg = stores("interrupted")
    real = fit_src.code_noise

    def interrupt_at(crash_step, term_step):
        def noise(seed, step, shape, device):
            if step == crash_step:
                raise Killed  # mid-training, 3 steps after the checkpoint of step 5
            if step == term_step:
                os.kill(os.getpid(), signal.SIGTERM)  # StopSignal: checkpoint after this step, then stop
            return real(seed, step, shape, device)
        return noise

    monkeypatch.setattr(fit_src, "code_noise", interrupt_at(8, None))
    with pytest.raises(Killed):
        run_pipeline(cfg, until="fit_src")
    (p,) = [p for p in plan(cfg) if p.name == "fit_src"]
    assert p.state == "partial" and sorted(f.name for f in (p.path / "checkpoints").iterdir()) == [
        "ckpt-00000005.pt", "ckpt-00000005.pt.json"]  # the checkpoint and its record

    monkeypatch.setattr(fit_src, "code_noise", interrupt_at(None, 9))
    with pytest.raises(TrainingStopped, match="fit_src: stopped by signal 15 at step 10/12"):
        run_pipeline(cfg, until="fit_src")
    assert (p.path / "checkpoints" / "ckpt-00000010.pt").is_file()

    monkeypatch.setattr(fit_src, "code_noise", real)
    resumed = run_pipeline(cfg, until="fit_src")["fit_src"]
    a = (resumed.dir / "src.safetensors").read_bytes()
    assert a == (reference.dir / "src.safetensors").read_bytes()
    assert resumed.metrics["src/feature_mse"] == reference.metrics["src/feature_mse"]
    assert (resumed.dir / "loss.png").is_file() and "loss.png" in {f.path for f in resumed.files}
    events = EventAccumulator(str(resumed.dir / "tensorboard")).Reload()
    assert {"train/loss", "train/mse", "train/cosine", "train/lr", "train/grad_norm",
            "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert events.Scalars("train/loss")[-1].step == 12


@pytest.mark.parametrize("world", [1, 2])
def test_each_rank_reads_only_its_rows_of_the_features(tmp_path, monkeypatch, world):
    """fit_src's reader under DDP: rank r reads exactly its slice of each step's global batch (a resumed range of
    steps, across epochs and shuffle windows); together the ranks' batches are the one-process batches."""
    import zarr

    from pipeline.data.features import FeatureNormalizer, TrainFeatures
    from pipeline.integrity import open_checked
    from tests.test_train_flow import spy_rows_read

    rows, first, batch = 40, 6, 8  # train rows [6, 46) of a store of 50
    store = tmp_path / "features.zarr"
    zarr.open_group(str(store), mode="w").create_array("features", shape=(50, 3, 4), chunks=(4, 3, 4),
                                                        dtype="float16")[...] = \
        np.random.default_rng(0).normal(size=(50, 3, 4)).astype(np.float16)
    group = open_checked(store)
    normalizer = FeatureNormalizer(None, torch.ones(4, 1, 3))
    steps = range(2, 13)
    one = list(TrainFeatures(group, (first, first + rows), normalizer, batch, 5, 2).batches(steps))
    read = spy_rows_read(monkeypatch, "features")
    parts = []
    for rank in range(world):
        data = TrainFeatures(group, (first, first + rows), normalizer, batch, 5, 2, rank, world)
        read.clear()
        parts.append(list(data.batches(steps)))
        assert sorted(read) == sorted(first + data.schedule.indices(s)[i] for s in steps for i in range(batch // world))
        assert data.rows_read == len(steps) * batch // world
    for step, together in enumerate(zip(*parts, strict=True)):
        assert torch.equal(torch.cat(together), one[step])


def test_a_missing_src_is_a_one_line_error(tmp_path):
    from storage_schemas import SchemaError

    with pytest.raises(SchemaError) as e:
        load_src(tmp_path)
    assert "\n" not in str(e.value) and "src.json" in str(e.value) and "fit_src" in str(e.value)
