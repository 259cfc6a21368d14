"""`srcflow plan`: the byte counts equal what the stages write; paper configs plan without a dataset."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import load_config
from srcflow.cli import app
from stages.plan import capacity_plan
from stages.plan.compute import cpu_name, cpu_target, gpu_target
from stages.plan.measured import device_hours, identity, load_measurements
from stages.plan.scale import Scale, scale_of
from stages.runner import run_pipeline
from tests.conftest import REPO

PAPER = REPO / "configs" / "imagenet256.yaml"

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
    for s in stages.values():  # every stage has hours, each term measured or a labelled estimate with its source
        h = s["hours"]
        assert h["device_hours"] > 0 and h["wall_hours"] > 0 and h["terms"], s["stage"]
        assert all(t["kind"] in ("measured", "estimate") and t["source"] and t["hours"] >= 0 for t in h["terms"])
        assert h["estimate"] == any(t["kind"] == "estimate" for t in h["terms"] if t["hours"] > 0)


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
    plan = capacity_plan(cfg, results_dir=tmp_path, target=gpu_target(load_measurements(tmp_path)))
    train = next(s for s in plan["stages"] if s["stage"] == "train_flow")["hours"]
    steps, batch = cfg.train.steps, cfg.train.batch_size
    once = sum(t["hours"] for t in train["terms"][2:])  # the grids and the held-out bits/dim, once per run
    assert train["device_hours"] == pytest.approx(steps * batch / 16.0 / 3600 + once)  # one process: no all-reduce
    assert [t["kind"] for t in train["terms"][:2]] == ["measured", "estimate"] and train["allreduce_seconds"] == 0
    assert [t["term"].split()[1:3] for t in train["terms"][2:]] == [["sample", "grid(s):"]] * 2 + [["bits/dim:", "val"]]
    # the same records do not time a CPU run: its hours are estimates
    on_cpu = next(s for s in capacity_plan(cfg, results_dir=tmp_path)["stages"] if s["stage"] == "train_flow")
    assert on_cpu["hours"]["terms"][0]["kind"] == "estimate" and on_cpu["hours"]["device"] == cpu_name()

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


# --- the plan at scale (issue #23) ----------------------------------------------------------------------------


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def test_the_per_process_batch_is_the_global_batch_over_every_process_of_every_node():
    path = REPO / "configs" / "imagenet512.yaml"
    cfg = load_config(path)
    one_node = _stage(capacity_plan(cfg), "train_flow")  # runtime.nproc 8 on one node: 512 / 8
    eight = _stage(capacity_plan(cfg, scale=scale_of(cfg, gpus=64, nodes=8)), "train_flow")
    assert one_node["hours"]["per_process_batch"] == 64 and eight["hours"]["per_process_batch"] == 8
    # issue #23: 98 GB per process planned at 64 samples, ~22 GB at the true 8
    assert 80e9 < one_node["memory"]["device_bytes"] < 120e9 and 15e9 < eight["memory"]["device_bytes"] < 30e9
    assert eight["memory"]["node_host_bytes"] == 8 * eight["memory"]["host_bytes"]
    # torchrun's --nnodes in the config is the same scale as --nodes
    nnodes = load_config(path, ["train.torchrun_args=[--nnodes=8, --node-rank=0, --rdzv-endpoint=head:29500]"])
    assert scale_of(nnodes) == Scale(8, 8, scale_of(nnodes).source)
    assert _stage(capacity_plan(nnodes), "train_flow")["memory"] == eight["memory"]


def test_the_memory_check_plans_the_per_process_batch_of_all_nodes(monkeypatch):
    """At 512 px on 80 GB GPUs train_flow is refused on one node (64 per process) and passes on eight (8)."""
    from types import SimpleNamespace

    from stages.runner import check_resources

    monkeypatch.setattr("stages.runner.machine_memory", lambda device: (2**40, 80 * 10**9))
    todo = [SimpleNamespace(name="train_flow")]
    path = REPO / "configs" / "imagenet512.yaml"
    with pytest.raises(ValueError, match=r"train.batch_size: train_flow would need ~\d+\.\d GB of GPU memory"):
        check_resources(todo, load_config(path))
    check_resources(todo, load_config(path, ["train.torchrun_args=[--nnodes=8, --node-rank=3]"]))


def test_the_allreduce_moves_twice_the_gradients_at_the_slowest_link():
    grads = 4 * 545_580_000
    assert Scale(1, 1, "").allreduce_seconds(grads)[0] == 0
    one_node, how = Scale(1, 8, "").allreduce_seconds(grads)
    assert one_node == pytest.approx(2 * 7 / 8 * grads / 360e9) and "within a node" in how
    eight, how = Scale(8, 8, "").allreduce_seconds(grads)
    assert eight == pytest.approx(2 * 63 / 64 * grads / 45e9) and "across nodes" in how
    # at 64 GPUs each gets 16 of train_flow's 1,024 samples: the all-reduce outweighs the compute (issue #23)
    cfg = load_config(REPO / "configs" / "imagenet256.yaml")
    h = _stage(capacity_plan(cfg, scale=scale_of(cfg, 64, 8)), "train_flow")["hours"]
    assert h["per_process_batch"] == 16 and h["allreduce_seconds"] > h["compute_seconds"]
    assert h["step_seconds"] == pytest.approx(h["compute_seconds"] + h["allreduce_seconds"])
    once = sum(t["hours"] for t in h["terms"][2:])  # one process: the grids, the held-out bits/dim
    assert h["wall_hours"] == pytest.approx(cfg.train.steps * h["step_seconds"] / 3600 + once)
    assert h["device_hours"] == pytest.approx(cfg.train.steps * h["step_seconds"] * 64 / 3600 + once)
    assert [t["term"].split()[0] for t in h["terms"][:2]] == ["compute", "DDP"]


def test_encode_is_timed_by_the_device_and_precision_it_runs_at():
    """fp32 on a GPU is not the 2-core CPU record (issue #23: 165 h "on Intel Xeon"): the GPU record at bf16,
    whose rate the JPEG decode bounds, is the estimate; on the CPU the CPU record at fp32 is measured."""
    path = REPO / "configs" / "imagenet256.yaml"
    gpu = _stage(capacity_plan(load_config(path)), "encode")["hours"]
    assert gpu["device"] == "NVIDIA H200" and gpu["estimate"] and 2 < gpu["device_hours"] < 4
    assert "encode-cuda.json at another encode.precision" in gpu["terms"][0]["source"]
    xeon = cpu_target(name="Intel(R) Xeon(R) Processor (2 cores)")  # the CPU benchmarks/results measured
    cpu = _stage(capacity_plan(load_config(path, ["runtime.device=cpu"]), target=xeon), "encode")["hours"]
    assert not cpu["estimate"] and "encode-cpu-dinov2-b.json" in cpu["terms"][0]["source"] and cpu["device_hours"] > 100
    other = _stage(capacity_plan(load_config(path, ["runtime.device=cpu"]), target=cpu_target(name="AMD EPYC")),
                   "encode")["hours"]
    assert other["estimate"]  # another CPU model: the record does not time it
    bf16 = _stage(capacity_plan(load_config(path, ["encode.precision=bf16"])), "encode")["hours"]
    assert not bf16["estimate"] and bf16["terms"][0]["source"] == "benchmarks/results/encode-cuda.json"


def test_cli_plan_at_scale_prints_wall_clock_gpu_hours_and_each_term():
    runner = CliRunner()
    args = ["plan", "--config", str(REPO / "configs" / "imagenet256.yaml"), "--gpus", "64", "--nodes", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "64 processes = 8 node(s) x 8" in result.output and "wall-clock" in result.output
    assert "DDP all-reduce" in result.output and "ring all-reduce" in result.output
    report = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert report["total"]["wall_hours"] == pytest.approx(sum(s["hours"]["wall_hours"] for s in report["stages"]))
    bad = runner.invoke(app, [*args[:-4], "--gpus", "63", "--nodes", "8"])
    assert bad.exit_code == 2 and "--gpus 63 must be a positive multiple of --nodes 8" in bad.output


def test_the_sampler_is_bound_by_weight_reads_at_small_batches_and_by_flops_at_large_ones():
    """Token by token, each step of the inverse reads every weight of its block: at batch 1 those reads bound it
    (1000 classes x 50 x 5 scales batches x 257 steps x 2.2 GB), at 250 per batch the FLOPs do."""
    large = _stage(capacity_plan(load_config(PAPER)), "sample")["hours"]["terms"][0]
    small = _stage(capacity_plan(load_config(PAPER, ["sample.batch_size=1"])), "sample")["hours"]["terms"][0]
    assert "bound by the reads" not in large["source"] and "bound by the reads" in small["source"]
    assert small["hours"] > 10 * large["hours"]
