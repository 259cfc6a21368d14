"""`srcflow plan`: the byte counts equal what the stages write; paper configs plan without a dataset."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import load_config
from srcflow.cli import app
from stages.plan import capacity_plan
from stages.plan.measured import device_hours, identity, load_measurements
from stages.runner import run_pipeline
from tests.conftest import REPO

# The test dataset (4 classes x 12 train + 4 val at 32 px) through the smoke encoder (8x8 tokens x 64),
# with uneven shards (the last Zarr shard and the last tar are partial) and tiny decoder / PCA SRC fits.
SMALL = ("encode.rows_per_shard=12", "encode.rows_per_chunk=4", "runtime.device=cpu", "decoder.hidden_size=32",
         "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64", "decoder.patch_size=4",
         "fit_decoder.steps=2", "fit_decoder.batch_size=8", "fit_decoder.report_images=4",
         "fit_decoder.eval_batch_size=4", "src.kind=pca", "src.dim=6", "src.steps=2", "src.report_images=4",
         "src.eval_batch_size=4", "shard.samples_per_shard=20")


@pytest.fixture(scope="module")
def built(module_config, tmp_path_factory):
    """(config, plan before running, plan after shard -> encode ran, the stage manifests)."""
    cfg = module_config(*SMALL)
    empty = tmp_path_factory.mktemp("no-results")
    before = capacity_plan(cfg, results_dir=empty)
    manifests = run_pipeline(cfg, until="encode")
    return cfg, before, capacity_plan(cfg, results_dir=empty), manifests


@pytest.fixture(scope="module")
def compressed(built, tmp_path_factory):
    """The same store carried on through fit_decoder, fit_src (PCA) and compress."""
    cfg, before, _, _ = built
    manifests = run_pipeline(cfg, until="compress")
    return cfg, before, capacity_plan(cfg, results_dir=tmp_path_factory.mktemp("no-results")), manifests


def _output(report: dict, stage: str, path: str) -> dict:
    s = next(s for s in report["stages"] if s["stage"] == stage)
    return next(o for o in s["outputs"] if o["path"] == path)


def _files(folder: Path) -> list[Path]:
    return [Path(root) / f for root, _, files in os.walk(folder) for f in files]


def _check_row_store(report: dict, stage: str, out_dir: Path, store: str, array: str) -> None:
    """The planned array bytes, shard files and commit bytes are the ones on disk, byte for byte."""
    folder = out_dir / store / array / "c"
    shard_files = _files(folder)
    planned = _output(report, stage, f"{store}/{array}")
    assert planned["exact"] and planned["bytes"] == sum(p.stat().st_size for p in shard_files), stage
    assert planned["files"] == len(shard_files) == len(os.listdir(folder)) == planned["per_dir"]  # c/<i>/0/0
    commits = _files(out_dir / "commits")  # their file records' lengths vary: within 5 %
    assert _output(report, stage, "commits/*.npz")["bytes"] == pytest.approx(sum(p.stat().st_size for p in commits),
                                                                              rel=0.05), stage


def test_plan_bytes_equal_what_shard_and_encode_write(built):
    _, _, after, manifests = built
    tars = _files(manifests["shard"].dir / "shards")
    planned = _output(after, "shard", "shards/*.tar")
    assert planned["exact"] and planned["files"] == len(tars)
    assert planned["bytes"] == sum(p.stat().st_size for p in tars)
    _check_row_store(after, "encode", manifests["encode"].dir, "features.zarr", "features")
    # 64 images x 2 views = 128 rows in 11 shards of 12 rows (the last holds 8): uneven on purpose
    assert len(os.listdir(manifests["encode"].dir / "features.zarr" / "features" / "c")) == 11


def test_plan_codes_bytes_equal_what_compress_writes(compressed):
    _, before, after, manifests = compressed
    _check_row_store(after, "compress", manifests["compress"].dir, "codes.zarr", "codes")
    assert _output(before, "compress", "codes.zarr/codes") == _output(after, "compress", "codes.zarr/codes")
    assert {s["stage"]: s["state"] for s in after["stages"]}["compress"] == "done"


def test_plan_before_running_counts_the_listing_and_estimates_the_tars(built):
    _, before, after, manifests = built
    assert {s["stage"]: s["state"] for s in before["stages"]}["encode"] == "missing"
    assert {s["stage"]: s["state"] for s in after["stages"]}["encode"] == "done"
    assert before["dataset"]["train"] == 48 and before["dataset"]["val"] == 16
    planned = "features.zarr/features"
    assert _output(before, "encode", planned)["bytes"] == _output(after, "encode", planned)["bytes"]  # exact up front
    estimate, actual = _output(before, "shard", "shards/*.tar"), _output(after, "shard", "shards/*.tar")
    assert not estimate["exact"] and estimate["files"] == actual["files"]
    assert abs(estimate["bytes"] - actual["bytes"]) <= 0.05 * actual["bytes"]
    done = next(s for s in after["stages"] if s["stage"] == "encode")
    assert done["written_bytes"] == manifests["encode"].bytes


@pytest.mark.parametrize("name", ["imagenet256.yaml", "imagenet512.yaml"])
def test_paper_configs_plan_without_the_dataset_or_weights(name):
    cfg = load_config(REPO / "configs" / name)
    if Path(cfg.data.root).exists():
        pytest.skip(f"{cfg.data.root} exists here: this test is about planning without the dataset")
    report = capacity_plan(cfg)
    assert report["dataset"]["train"] == 1_281_167 and report["dataset"]["val"] == 50_000
    stages = {s["stage"]: s for s in report["stages"]}
    assert "fit_decoder" not in stages  # a released decoder is configured
    assert all(s["memory"]["device_bytes"] > 0 and s["outputs"] for s in stages.values() if s["stage"] != "shard")
    for s in stages.values():
        assert s["hours"] is not None or s["hours_note"].startswith("not measured")


def test_feature_store_at_256_is_504_gb_per_view_and_codes_are_float32():
    path = REPO / "configs" / "imagenet256.yaml"
    flips = capacity_plan(load_config(path, ["shard.splits=[train]"]))
    plain = capacity_plan(load_config(path, ["shard.splits=[train]", "encode.views=[plain]"]))
    per_view = 1_281_167 * 256 * 768 * 2  # SRC-FLOW.md: ~504 GB per view
    assert abs(_output(flips, "encode", "features.zarr/features")["bytes"] / (2 * per_view) - 1) < 0.01
    assert abs(_output(plain, "encode", "features.zarr/features")["bytes"] / per_view - 1) < 0.01
    # codes are float32 in codes.zarr: twice SRC-FLOW.md's ~21 GB per view, which assumes 2-byte codes
    assert abs(_output(plain, "compress", "codes.zarr/codes")["bytes"] / (1_281_167 * 256 * 32 * 4) - 1) < 0.01


def test_device_hours_come_only_from_a_matching_measurement(make_config, tmp_path):
    cfg = make_config(*SMALL)
    expect = identity(cfg, "encode")
    (tmp_path / "encode-cuda.json").write_text(json.dumps(
        {"device": "cuda", "device_name": "Test GPU", "records": [
            {"stage": "encode", "rows_per_s": 64.0, **expect},
            {"stage": "encode", "rows_per_s": 1e6, **expect, "tokens": 256},  # another encoder: ignored
        ]}))
    measured = load_measurements(tmp_path)
    hours, note = device_hours("encode", {"rows": 128}, expect, measured)
    assert note == "" and hours["device"] == "Test GPU" and hours["hours"] == pytest.approx(128 / 64.0 / 3600)
    hours, note = device_hours("train_flow", {"samples": 10}, identity(cfg, "train_flow"), measured)
    assert hours is None and note == "not measured"

    # benchmarks/train_flow.py's layout: a per-device rate at its own batch, timed in samples
    flow = identity(cfg, "train_flow")
    (tmp_path / "train_flow-cuda.json").write_text(json.dumps(
        {"benchmark": "train_flow", "device": "Test GPU", "batch": 8, "steps_per_s": 2.0, "samples_per_s": 16.0,
         **flow}))
    (tmp_path / "train_flow-other.json").write_text(json.dumps(
        {"benchmark": "train_flow", "device": "Test GPU", "samples_per_s": 1e6, **flow, "params_m": 999.0}))
    plan = capacity_plan(cfg, results_dir=tmp_path)
    train = next(s for s in plan["stages"] if s["stage"] == "train_flow")
    steps, batch = cfg.train.steps, cfg.train.batch_size
    assert train["hours"]["hours"] == pytest.approx(steps * batch / 16.0 / 3600)

    # benchmarks/sample.py's layout: models.<name>.kv_cache.samples_per_s, model fields one level up
    f = cfg.flow
    (tmp_path / "sample-cpu.json").write_text(json.dumps(
        {"device": "cpu", "tokens": 64, "channels": cfg.src.dim, "models": {"smoke": {
            "width": f.width, "heads": f.heads, "num_blocks": f.num_blocks, "layers_per_block": f.layers_per_block,
            "kv_cache": {"samples_per_s": 2.0}, "naive": {"samples_per_s": 0.5}}}}))  # deep_layers: None, absent
    hours, _ = device_hours("sample", {"samples": 100}, identity(cfg, "sample"), load_measurements(tmp_path))
    assert hours["rate"] == 2.0 and hours["device"] == "cpu"


def test_cli_plan_prints_a_table_and_json():
    runner = CliRunner()
    for name in ("imagenet256.yaml", "imagenet512.yaml"):
        result = runner.invoke(app, ["plan", "--config", str(REPO / "configs" / name)])
        assert result.exit_code == 0, result.output
        assert "features.zarr/features" in result.output
    result = runner.invoke(app, ["plan", "--config", str(REPO / "configs" / "imagenet256.yaml"), "--set",
                                 "src.dim=16", "--json"])
    assert result.exit_code == 0
    assert "16 x 4 B" in _output(json.loads(result.stdout), "compress", "codes.zarr/codes")["basis"]
    bad = runner.invoke(app, ["plan", "--config", str(REPO / "configs" / "imagenet256.yaml"), "--set", "src.dim=x"])
    assert bad.exit_code == 2
