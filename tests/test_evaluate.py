"""Specification of stages `reference` and `evaluate`: Inception statistics as an artifact, metrics per CFG scale.

Every metric here comes from a seeded stand-in Inception: it proves the code path, never an FID.
The `sample` stage is faked: its output is committed into the store at the fingerprint the plan
gives it, with ADM-format `samples-cfg{w}.npz` made from the reference images themselves (w=1.0)
and a colour-shifted copy (w=0.0). Inception costs ~0.1-0.5 s per image on CPU and each FID a
2048 x 2048 eigenproblem (seconds), so the module runs the pipeline once on 4 reference images
(one per class) and 2 x 4 samples, and every test reads that run.
"""

from __future__ import annotations

import base64
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch_fidelity
from typer.testing import CliRunner

from pipeline.artifacts import ArtifactStore, now
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from pipeline.metrics.fidelity import (
    fid_statistics,
    inception_features,
    load_reference,
    make_standin_inception_weights,
)
from srcflow.cli import app, headline
from stages import evaluate, inputs, reference
from stages.runner import plan, run_pipeline
from storage_schemas.evaluation import INCEPTION_WEIGHTS_FILE, read_metrics
from storage_schemas.samples import open_samples
from tests.conftest import SMOKE

CLASSES = 4  # the tiny test dataset
# evaluate reads the codes and the flow (the flow as a classifier): a few steps of each stage up to train_flow
CHAIN = ("runtime.device=cpu", "encode.rows_per_shard=16", "encode.rows_per_chunk=4", "decoder.hidden_size=32",
         "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64", "fit_decoder.steps=2",
         "fit_decoder.batch_size=8", "fit_decoder.report_images=4", "src.kind=pca", "src.report_images=4",
         "flow.width=32", "flow.heads=2", "train.steps=20", "train.batch_size=16")
BASE = (*CHAIN, "reference.max_images=4", "reference.pr_images=4", "reference.loader_threads=1", "sample.per_class=1",
        "sample.cfg_scale=[0.0, 1.0]", "evaluate.kid_subset_size=4", "evaluate.batch_size=4",
        "evaluate.make_standin=false")
METRICS = ("fid", "sfid", "inception_score_mean", "inception_score_std", "kid_mean", "kid_std", "precision", "recall")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "standin-inception.pth"
    return SimpleNamespace(path=path, sha=make_standin_inception_weights(path, seed=0))


@pytest.fixture(scope="module")
def evaluated(module_config, weights):
    cfg = module_config(*BASE, f"evaluate.inception_weights={weights.path}")
    shard_dir = run_pipeline(cfg, until="train_flow")["shard"].dir
    crops, labels = first_train_crop_per_class(shard_dir, cfg.data.resolution)
    fake_sample_output(cfg, {0.0: colour_shift(crops), 1.0: crops}, labels, metrics={"bits_per_dim": 1.25})
    manifests = run_pipeline(cfg, only=["reference", "evaluate"])
    report = json.loads((manifests["evaluate"].dir / "metrics.json").read_text())
    return SimpleNamespace(cfg=cfg, crops=crops, labels=labels, manifests=manifests, report=report,
                           by_scale={e["cfg_scale"]: e for e in report["evaluations"]},
                           reference=load_reference(manifests["reference"].dir / "reference.npz"))


def first_train_crop_per_class(shard_dir, resolution):
    """The images a class-balanced selection of 4 must take: each class's first train image."""
    rows = manifest_rows(shard_dir, ("train",))
    firsts = {}
    for r in rows:
        firsts.setdefault(r["label"], r)
    picked = [firsts[c] for c in sorted(firsts)]
    tars = sorted({str(shard_dir / "shards" / r["shard"]) for r in picked})
    jpegs = dict(iter_jpegs(tars, {r["key"]: r["sha256"] for r in picked}))
    crops = np.stack([decode_crop(jpegs[r["key"]], resolution) for r in picked])
    return crops, np.array([r["label"] for r in picked])


def colour_shift(images):
    return np.clip(images.astype(np.int16) + np.array([60, -40, 0]), 0, 255).astype(np.uint8)


def sampling_record(cfg_scale: float) -> dict:
    """A samples file's record of how its samples were made (stages/sample.py sampling_record, per scale)."""
    return {"classes": CLASSES, "per_class": 1, "seed": 0, "cfg_rule": "starflow", "cfg_scale": cfg_scale,
            "cfg_anneal": False, "solver": "jacobi", "jacobi_chunk": 16, "jacobi_tol": 1e-3, "jacobi_max_iters": 8,
            "jacobi_precision": "fp32", "network_precision": "fp32", "cuda_graph": False,
            "solver_stats": [{"block": 0, "chunks": 4, "passes": 20, "mean_passes_per_chunk": 5.0,
                              "max_passes_per_chunk": 8, "capped_chunks": 1}],
            "denoise": "tweedie", "denoise_setting": "auto", "flow_noise_sigma": 0.2, "decoder_noise_sigma": 0.0,
            "pixel_rounding": "truncate", "warnings": [f"a warning at cfg {cfg_scale}"]}


def fake_sample_output(cfg, sample_sets: dict, labels, metrics: dict) -> None:
    """Commit what the sample stage writes (ADM npz per CFG scale) at the fingerprint the plan expects."""
    p = {p.name: p for p in plan(cfg)}["sample"]
    store = ArtifactStore(cfg.storage.root)
    out = store.open_output("sample", p.fingerprint)
    for cfg_scale, images in sample_sets.items():
        np.savez(out.path / f"samples-cfg{cfg_scale}.npz", arr_0=images, labels=labels,
                 nonfinite=np.zeros(len(images), bool), sampling=json.dumps(sampling_record(cfg_scale)))
    store.commit(out, code_version=p.stage.code_version, semantic=p.semantic, upstream=p.upstream,
                 external=p.external, started=now(), metrics=metrics)


def test_fid_of_samples_against_their_own_reference_is_zero(evaluated):
    own = evaluated.by_scale[1.0]
    assert abs(own["fid"]) < 1e-3 * np.trace(evaluated.reference["sigma"])
    assert abs(own["sfid"]) < 1e-3 * np.trace(evaluated.reference["sigma_s"])
    assert (own["precision"], own["recall"]) == (1.0, 1.0)
    assert all(math.isfinite(own[k]) for k in METRICS)


def test_fid_rises_when_the_samples_shift(evaluated):
    shifted, own = evaluated.by_scale[0.0], evaluated.by_scale[1.0]
    assert shifted["fid"] > own["fid"] + 0.1 * np.trace(evaluated.reference["sigma"])
    assert shifted["sfid"] > own["sfid"] + 0.1 * np.trace(evaluated.reference["sigma_s"])
    assert all(math.isfinite(shifted[k]) for k in METRICS)


def test_reference_is_class_balanced_train_statistics_at_the_data_resolution(evaluated, weights):
    meta = evaluated.reference["meta"]
    assert meta | {"source": "train-shards", "num_images": CLASSES, "pr_images": CLASSES, "resolution": 32,
                   "shard_fingerprint": evaluated.manifests["reference"].upstream["shard"]} == meta
    # the samples at w=1.0 are exactly each class's first train image: their features are the reference's
    assert evaluated.by_scale[1.0]["fid"] == pytest.approx(0, abs=1e-3 * np.trace(evaluated.reference["sigma"]))
    assert evaluated.manifests["reference"].metrics["inception_weights"] == "stand-in"
    # mu_s/sigma_s: the streamed statistics of the same images' spatial features
    expected = fid_statistics(inception_features(evaluated.crops, weights.path, "cpu", batch_size=4,
                                                 dtype=evaluated.cfg.evaluate.inception_dtype)["spatial"])
    np.testing.assert_allclose(evaluated.reference["mu_s"], expected["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(evaluated.reference["sigma_s"], expected["sigma"], rtol=1e-5, atol=1e-9)


def test_metrics_json_labels_every_number_and_marks_the_stand_in(evaluated, weights):
    report = read_metrics(evaluated.manifests["evaluate"].dir / "metrics.json")  # the schema's validator
    assert report == evaluated.report and report["schema_version"] == 4
    assert report["inception_weights"] == "stand-in" and report["inception_weights_sha256"] == weights.sha
    assert [e["cfg_scale"] for e in report["evaluations"]] == [0.0, 1.0]
    flow = evaluated.manifests["evaluate"].upstream["train_flow"]
    store = ArtifactStore(evaluated.cfg.storage.root)
    flow_bits = {f"train_flow.{k}": v for k, v in store.manifest("train_flow", flow).metrics.items() if "bits" in k}
    assert "train_flow.val_bits_per_dim" in flow_bits
    for e in report["evaluations"]:
        assert e | {"evaluator": "torch-fidelity", "evaluator_version": torch_fidelity.__version__,
                    "feature_extractor": "inception-v3-compat", "inception_weights": "stand-in",
                    "inception_weights_sha256": weights.sha, "inception_weights_official": False,
                    "num_samples": CLASSES, "num_reference": CLASSES, "pr_k": 3, "num_classes": CLASSES,
                    "samples_per_class": 1, "samples_file": f"samples-cfg{e['cfg_scale']}.npz", "nonfinite_samples": 0,
                    "flow": {"sample.bits_per_dim": 1.25, **flow_bits}} == e
        assert e["sampling"] == sampling_record(e["cfg_scale"])  # how the samples were made, from their file
        assert e["reference"] | {"source": "train-shards", "num_images": CLASSES, "pr_images": CLASSES,
                                 "fingerprint": evaluated.manifests["reference"].fingerprint} == e["reference"]
    report = (evaluated.manifests["evaluate"].dir / "report.md").read_text()
    assert ("- cfg 1.0: starflow CFG, jacobi solver (block 0: 5 passes per chunk (most 8, 1 capped)), denoise "
            "tweedie (auto), pixels truncate\n  - warning: a warning at cfg 1.0") in report


def test_the_flow_as_a_classifier_is_reported_beside_the_fid_and_labelled(evaluated):
    classifier = evaluated.report["flow_classifier"]
    assert classifier["images"] == CLASSES * 4 and classifier["classes"] == CLASSES  # every val image, plain view
    assert 0 <= classifier["accuracy"] <= 1 and classifier["split"] == "val" and classifier["view"] == "plain"
    assert "not a published metric of the paper" in classifier["note"]
    metrics = evaluated.manifests["evaluate"].metrics
    assert metrics["bayes_accuracy"] == classifier["accuracy"] and metrics["bayes_images"] == CLASSES * 4
    assert metrics["bayes_bits_per_dim"] == classifier["mean_bits_per_dim"] > 0
    line = headline(metrics)
    assert line.startswith("fid_cfg0.0=") and "(stand-in Inception)" in line
    assert line.endswith(f"bayes_accuracy={classifier['accuracy']:.3f} ({CLASSES * 4} val)")
    report = (evaluated.manifests["evaluate"].dir / "report.md").read_text()
    assert "## The flow as a classifier" in report and "not a published metric of the paper" in report
    # evaluate reads the codes and the flow: both are upstream, and bayes_max_images enters its fingerprint
    assert set(evaluated.manifests["evaluate"].upstream) == {"compress", "train_flow", "sample", "reference"}
    capped_cfg = module_config_of(evaluated, "evaluate.bayes_max_images=4")
    assert {p.name: p for p in plan(capped_cfg)}["evaluate"].fingerprint != evaluated.manifests["evaluate"].fingerprint
    store = ArtifactStore(evaluated.cfg.storage.root)
    upstream = {name: store.manifest(name, fp) for name, fp in evaluated.manifests["evaluate"].upstream.items()}
    capped = evaluate.flow_classifier(capped_cfg, upstream, capped_cfg.evaluate.bayes_max_images)
    assert capped["images"] == 4 and capped["classes"] == CLASSES  # one image per class: class-balanced


def module_config_of(evaluated, *overrides):
    from pipeline.config import apply_override, config_dict, validate_config

    raw = config_dict(evaluated.cfg)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def test_stage_metrics_are_flat_per_cfg_scale_and_status_shows_the_fid(evaluated):
    metrics, out = evaluated.manifests["evaluate"].metrics, evaluated.manifests["evaluate"].dir
    for w, e in evaluated.by_scale.items():
        assert metrics[f"fid_cfg{w}"] == e["fid"] and metrics[f"is_cfg{w}"] == e["inception_score_mean"]
        assert metrics[f"kid_cfg{w}"] == e["kid_mean"] and metrics[f"precision_cfg{w}"] == e["precision"]
        assert metrics[f"sfid_cfg{w}"] == e["sfid"] and (out / f"grid-cfg{w}.png").is_file()
    assert metrics["inception_weights"] == "stand-in" and metrics["sample.bits_per_dim"] == 1.25
    assert headline(metrics).startswith("fid_cfg0.0=")
    report = (out / "report.md").read_text()
    assert "Stand-in Inception weights" in report and "| sFID |" in report
    assert f"| metric | {' | '.join(f'cfg {w}' for w in evaluated.by_scale)} |" in report  # a column per scale
    lines = report.splitlines()
    for i in [i for i, line in enumerate(lines) if line.startswith("![")]:  # a caption under every grid
        assert lines[i + 1] == "" and lines[i + 2].startswith("*Samples at CFG scale"), lines[i:i + 3]
    rows = evaluate.metrics_table(evaluated.report["evaluations"])
    assert [(r["sfid"], r["inception_weights"]) for r in rows] == [(e["sfid"], "stand-in")
                                                                  for e in evaluated.report["evaluations"]]


def test_the_report_published_to_prefect_embeds_every_grid_and_the_file_keeps_relative_links(evaluated,
                                                                                             monkeypatch):
    import flows.full as prefect_flow

    published = {}
    monkeypatch.setattr(prefect_flow, "create_table_artifact", lambda **kwargs: None)
    monkeypatch.setattr(prefect_flow, "create_markdown_artifact",
                        lambda key, markdown, description: published.update({key: markdown}))
    out = evaluated.manifests["evaluate"].dir
    prefect_flow.publish_evaluation(out)
    on_disk, markdown = (out / "report.md").read_text(), published["srcflow-report"]

    def images(text: str) -> list[str]:
        return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)

    assert images(on_disk) == ["grid-cfg0.0.png", "grid-cfg1.0.png"]  # relative to report.md: right locally
    embedded = images(markdown)
    assert all(src.startswith("data:image/png;base64,") for src in embedded)  # renders without the files
    assert [base64.b64decode(src.split(",", 1)[1]) for src in embedded] == [(out / n).read_bytes()
                                                                           for n in images(on_disk)]
    assert prefect_flow.IMAGE_LINK.sub("", markdown) == prefect_flow.IMAGE_LINK.sub("", on_disk)  # the rest as is


def test_reference_is_reused_on_a_second_run(evaluated):
    def files(name):  # path -> (inode, mtime_ns): what a rerun rewrote, if anything
        out = evaluated.manifests[name].dir
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    before = {name: files(name) for name in ("reference", "evaluate")}
    again = run_pipeline(evaluated.cfg, only=["reference", "evaluate"])
    for name in ("reference", "evaluate"):
        assert again[name] == evaluated.manifests[name]  # the committed manifest, read back: same `ended`
        assert files(name) == before[name]


def test_other_inception_weights_invalidate_the_reference_and_the_metrics(evaluated, module_config, tmp_path):
    other = tmp_path / "other-inception.pth"
    other_sha = make_standin_inception_weights(other, seed=1)
    planned = {p.name: p for p in plan(module_config(*BASE, f"evaluate.inception_weights={other}"))}
    assert planned["shard"].state == "done"
    for name in ("reference", "evaluate"):
        assert planned[name].external["inception_weights"] == other_sha
        assert planned[name].fingerprint != evaluated.manifests[name].fingerprint
        assert planned[name].state == "stale"  # the old output stays; the new weights need a new one


def test_missing_weights_fail_at_plan_time_with_one_line(make_config, tiny_root, tmp_path):
    absent = tmp_path / "absent" / INCEPTION_WEIGHTS_FILE
    cfg = make_config(f"evaluate.inception_weights={absent}", "evaluate.make_standin=false")
    with pytest.raises(FileNotFoundError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"evaluate.inception_weights: {absent} does not exist")
    assert INCEPTION_WEIGHTS_FILE in message and "place it locally" in message
    assert not any((tmp_path / "artifacts").glob("*/*/"))  # no stage ran: no sampling work wasted

    overrides = [f"storage.root={tmp_path / 'cli'}", f"data.root={tiny_root}", "data.generate_tiny=null",
                 f"evaluate.inception_weights={absent}", "evaluate.make_standin=false"]
    result = CliRunner().invoke(app, ["run", "--config", str(SMOKE), *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 2 and INCEPTION_WEIGHTS_FILE in result.output
    assert not (tmp_path / "cli").exists()


def test_make_standin_writes_seeded_weights_at_plan_time(make_config, tmp_path, weights):
    path = tmp_path / "weights" / "standin-inception.pth"
    cfg = make_config(f"evaluate.inception_weights={path}", "evaluate.make_standin=true")
    assert inputs.evaluate_inputs(cfg) == {"inception_weights": weights.sha}  # seed 0: the same bytes
    assert path.is_file() and inputs.reference_inputs(cfg)["inception_weights"] == weights.sha


def test_adm_npz_reference_gives_the_same_fid_as_train_statistics_of_the_same_images(
        evaluated, module_config, weights, tmp_path):
    # ADM's layout: mu/sigma of the images' pool features, mu_s/sigma_s of their spatial ones, arr_0 for P/R.
    train = evaluated.reference
    stats = fid_statistics(train["pr_features"])  # np.cov over the same 4 images' features
    np.testing.assert_allclose(train["mu"], stats["mu"], rtol=1e-12)
    np.testing.assert_allclose(train["sigma"], stats["sigma"], rtol=1e-9, atol=1e-12)
    npz = tmp_path / "VIRTUAL_fake_labeled.npz"
    np.savez(npz, mu=stats["mu"], sigma=stats["sigma"], mu_s=train["mu_s"], sigma_s=train["sigma_s"],
             arr_0=evaluated.crops)

    cfg = module_config(*BASE, f"evaluate.inception_weights={weights.path}", "sample.cfg_scale=[0.0]",
                        "reference.kind=adm_npz", f"reference.path={npz}")
    fake_sample_output(cfg, {0.0: colour_shift(evaluated.crops)}, evaluated.labels, metrics={})
    manifests = run_pipeline(cfg, only=["reference", "evaluate"])
    assert manifests["reference"].external_inputs["adm_reference"] == inputs.adm_reference_digest(cfg)
    (adm_eval,) = json.loads((manifests["evaluate"].dir / "metrics.json").read_text())["evaluations"]
    assert adm_eval["fid"] == pytest.approx(evaluated.by_scale[0.0]["fid"], rel=1e-6)
    assert adm_eval["sfid"] == pytest.approx(evaluated.by_scale[0.0]["sfid"], rel=1e-6)
    assert adm_eval["reference"]["source"] == "adm-npz" and adm_eval["reference"]["file"] == npz.name
    # arr_0's features (through fidelity's Dataset path) are those the train stream computed
    adm = load_reference(manifests["reference"].dir / "reference.npz")
    np.testing.assert_allclose(adm["pr_features"], train["pr_features"], rtol=1e-5)
    assert adm_eval["precision"] == evaluated.by_scale[0.0]["precision"]
    assert adm["meta"]["resolution"] == 32 == evaluated.cfg.data.resolution  # arr_0.shape[1], recorded


def test_adm_reference_of_another_resolution_fails_at_plan_time_naming_both(evaluated, make_config, weights, tmp_path):
    npz = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    ref = evaluated.reference
    np.savez(npz, mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"], sigma_s=ref["sigma_s"],
             arr_0=np.zeros((2, 64, 64, 3), np.uint8))  # 64 px, data.resolution is 32
    cfg = make_config(f"evaluate.inception_weights={weights.path}", "reference.kind=adm_npz", f"reference.path={npz}")
    with pytest.raises(ValueError) as err:
        plan(cfg)  # before any stage works: no sampling wasted on a reference that cannot score it
    message = str(err.value)
    assert "\n" not in message and str(npz) in message
    assert "holds 64x64 images but data.resolution is 32" in message


def test_adm_reference_path_is_checked_at_plan_time(make_config, weights, tmp_path):
    cfg = make_config(f"evaluate.inception_weights={weights.path}", "reference.kind=adm_npz",
                      f"reference.path={tmp_path / 'VIRTUAL_imagenet256_labeled.npz'}")
    with pytest.raises(FileNotFoundError, match=r"^reference.path: .*VIRTUAL_imagenet256_labeled.npz does not exist"):
        plan(cfg)


def test_a_missing_cfg_scale_file_fails_with_one_line(tmp_path):
    np.savez(tmp_path / "samples-cfg1.0.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert evaluate.find_samples(tmp_path, [1]) == [(1.0, tmp_path / "samples-cfg1.0.npz")]
    with pytest.raises(FileNotFoundError, match=r"no samples-cfg2.5.npz for sample.cfg_scale 2.5 \(has: "
                                                r"samples-cfg1.0.npz\)"):
        evaluate.find_samples(tmp_path, [1.0, 2.5])


def test_samples_without_a_record_of_how_they_were_made_fail_with_one_line(tmp_path):
    np.savez(tmp_path / "samples-cfg1.0.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"samples-cfg1.0.npz: no `sampling` record of how the samples were made"):
        evaluate.sampling_of(tmp_path / "samples-cfg1.0.npz")
    np.savez(tmp_path / "partial.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), sampling=json.dumps({"solver": "x"}))
    with pytest.raises(ValueError, match=r"partial.npz: its sampling record lacks cfg_scale, cfg_rule"):
        evaluate.sampling_of(tmp_path / "partial.npz")


def test_uncompressed_samples_are_memory_mapped_and_compressed_ones_read(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, labels=np.arange(3))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images, labels=np.arange(3))
    mapped, labels, nonfinite = open_samples(tmp_path / "plain.npz")
    assert isinstance(mapped, np.memmap) and (labels == np.arange(3)).all() and nonfinite is None
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(open_samples(tmp_path / "packed.npz")[0], images)
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"arr_0 must be \(N, H, W, 3\) uint8"):
        open_samples(tmp_path / "bad.npz")


def test_samples_labels_are_read_from_arr_1_as_adm_writes_them(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "adm.npz", images, np.array([2, 0, 1]))  # ADM's sampler: arr_0, arr_1
    assert open_samples(tmp_path / "adm.npz")[1].tolist() == [2, 0, 1]
    np.savez(tmp_path / "differ.npz", arr_0=images, arr_1=np.array([2, 0, 1]), labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="arr_1 and labels differ"):
        open_samples(tmp_path / "differ.npz")
    np.savez(tmp_path / "future.npz", arr_0=images, arr_1=np.arange(3), schema_version=np.int64(9))
    with pytest.raises(ValueError, match="schema version 9 is not supported"):
        open_samples(tmp_path / "future.npz")


def test_class_balanced_order_takes_classes_round_robin():
    rows = [{"label": label} for label in (0, 0, 0, 1, 1, 2)]
    assert reference.class_balanced_order(rows) == [0, 3, 5, 1, 4, 2]


def test_streamed_statistics_equal_np_cov_and_survive_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    features = {"2048": rng.gamma(2.0, 0.3, (23, 2048)).astype(np.float32),  # post-ReLU-like, non-negative
                "spatial": rng.gamma(2.0, 0.3, (23, 2023)).astype(np.float32)}
    keep = np.arange(23) % 3 == 0
    acc = reference.Accumulator()
    acc.add({k: f[:10] for k, f in features.items()}, keep[:10])
    acc.save(tmp_path / "accumulator.npz")
    resumed = reference.Accumulator.load(tmp_path / "accumulator.npz")
    resumed.add({k: f[10:] for k, f in features.items()}, keep[10:])
    for name in ("2048", "spatial"):
        mu, sigma = resumed.statistics(name)
        expected = fid_statistics(features[name])
        np.testing.assert_allclose(mu, expected["mu"], rtol=1e-12)
        np.testing.assert_allclose(sigma, expected["sigma"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(resumed.pr_features, features["2048"][keep])
    assert resumed.count == 23
