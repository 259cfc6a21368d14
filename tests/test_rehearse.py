"""`srcflow rehearse`: every stage at the config's shapes in a scratch store, measured beside the plan; shapes that do
not fit each other are refused before anything runs, in `rehearse` as in `run` and `plan`."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.config import load_config
from pipeline.data.tiny_imagenet import SYNSETS
from srcflow.cli import app
from stages.plan.compute import cpu_target
from stages.rehearse import Amounts, fit_batches, rehearsal_config
from stages.rehearse.measure import main as measure_main
from stages.rehearse.standin import make_standin_imagenet, spread, standin_synsets
from tests.conftest import REPO, SMOKE

PAPER = REPO / "configs" / "imagenet256.yaml"

# A small config laid out like the paper configs: a released decoder, ADM's reference batch, a DINOv2 file, the
# Inception file, data.root: none of them on this machine (so every stand-in is written), small shapes.
SMALL = ["data.root={missing}/imagenet", "data.generate_tiny=null", "data.resolution=32", "decoder.patch_size=4",
         "encoder.weights={missing}/dinov2.safetensors", "decoder.weights={missing}/model.pt",
         "decoder.hidden_size=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64",
         "reference.kind=adm_npz", "reference.path={missing}/VIRTUAL_imagenet32.npz",
         "evaluate.inception_weights={missing}/inception.pth", "evaluate.make_standin=false",
         "src.hidden=32", "src.depth=1", "sample.cfg_scale=[1.0]", "storage.root={missing}/store",
         "runtime.nproc=2", "train.batch_size=8", "train.torchrun_args=[--nnodes=2, --node-rank=0]"]


def _sets(tmp_path: Path) -> list[str]:
    return [a for s in SMALL for a in ("--set", s.format(missing=tmp_path / "not-here"))]


@pytest.mark.e2e
def test_a_rehearsal_runs_every_stage_in_a_scratch_store_and_reports_each_beside_the_plan(tmp_path):
    scratch = tmp_path / "scratch"
    args = ["rehearse", "--config", str(SMOKE), *_sets(tmp_path), "--scratch", str(scratch), "--classes", "3",
            "--images-per-class", "2", "--steps", "2", "--sample-classes", "4", "--reference-images", "8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(result.stdout)

    stages = report["stages"]
    assert list(stages) == ["shard", "encode", "fit_src", "compress", "train_flow", "sample", "reference", "evaluate"]
    for name, s in stages.items():  # fit_decoder: the (stand-in) released decoder is configured
        assert s["seconds"] > 0 and s["rate"] > 0 and s["planned_seconds"] > 0, name
        assert s["bytes_written"] > 0 and s["peak_rss_bytes"] > s["rss_before_bytes"] > 0, name
        assert s["peak_rss_ratio"] == pytest.approx(s["peak_rss_bytes"] / s["planned_peak_rss_bytes"]), name
        assert 0.67 <= s["peak_rss_ratio"] <= 1.5, (name, s["peak_rss_bytes"], s["planned_peak_rss_bytes"])
        assert s["hours_terms"] and all(t["source"] for t in s["hours_terms"]), name
    assert report["within_bounds"]["peak_rss"]
    # the training batch: the config's global 8 over 2 nodes x 2 processes = 2 per process, as planned
    assert stages["train_flow"]["batch"] == {"key": "train.batch_size", "config": 2, "used": 2,
                                             "why": "as configured"}
    # random weights in the released forms, and every figure resting on them is labelled
    weights = report["weights"]
    assert report["random_weights"] and all(w["random"] for w in weights.values())
    assert set(weights) == {"encoder.weights", "decoder.weights", "evaluate.inception_weights", "reference.path"}
    assert weights["decoder.weights"]["path"].endswith("model.pt") and "timm" in weights["encoder.weights"]["form"]
    assert all(s["random_weights"] for n, s in stages.items() if n != "shard")
    # the stand-in ImageNet has all 1,000 classes and the shard stage's quirks; 3 classes were read
    data = report["data"]
    assert data["classes"] == 1000 and data["classes_read"] == 3
    assert len(list((scratch / "imagenet" / "train").iterdir())) == 1000
    assert set(data["quirks"]) >= {"cmyk_jpeg", "grayscale_jpeg", "png_named_jpeg", "empty_file"}
    shard = json.loads(next((scratch / "store" / "shard").glob("*/_SUCCESS.json")).read_text())["metrics"]
    assert shard["rejected"] == 1 and shard["converted"] == 3 and shard["samples"] == 3 * (2 + 1)
    # the flow keeps the real label range: the first and the last of the 1,000 classes were read
    flow = json.loads(next((scratch / "store" / "train_flow").glob("*/flow.json")).read_text())
    assert flow["arch"]["num_classes"] == 1000
    # it samples the classes it was trained on (all 3 read, fewer than --sample-classes 4), 2 each: > PR_K in all
    assert len(flow["classes"]) == 3 and flow["classes"][0] == 0 and flow["classes"][-1] == 999
    with np.load(next((scratch / "store" / "sample").glob("*/samples-cfg1.0.npz"))) as npz:
        assert npz["arr_0"].shape == (6, 32, 32, 3) and sorted(npz["arr_1"]) == sorted(flow["classes"] * 2)
    # the whole run, re-estimated from the rates measured here
    whole = report["whole_run"]
    assert set(whole["stages"]) == set(stages) and whole["recomputed_wall_hours"] > 0
    for name, w in whole["stages"].items():
        assert w["factor"] == stages[name]["seconds_ratio"], name
        comm = w["communication_hours"]  # DDP's all-reduce: not compute, kept as planned
        assert w["recomputed_device_hours"] == pytest.approx((w["planned_device_hours"] - comm) * w["factor"] + comm)
    assert not (tmp_path / "not-here").exists()  # never the config's storage.root, data or weights paths

    table = CliRunner().invoke(app, [a for a in args if a != "--json"])  # the same again, as a table
    assert table.exit_code == 0, table.output[-3000:]
    assert "measured vs planned" in table.output and "RANDOM" in table.output and "recomputed" in table.output


@pytest.mark.parametrize("override, key", [
    ("decoder.patch_size=15", "decoder.patch_size"), ("flow.heads=7", "flow.heads"), ("src.dim=1024", "src.dim"),
    ("encoder.input_size=230", "encoder.input_size"), ("decoder.num_heads=5", "decoder.num_heads"),
])
@pytest.mark.parametrize("command", ["rehearse", "run", "plan"])
def test_shapes_that_do_not_fit_are_refused_in_one_line_before_anything_runs(tmp_path, command, override, key):
    scratch = tmp_path / "scratch"
    args = [command, "--config", str(PAPER), "--set", override, "--set", f"storage.root={tmp_path / 'store'}"]
    result = CliRunner().invoke(app, args + (["--scratch", str(scratch)] if command == "rehearse" else []))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.output, result.output
    assert not scratch.exists() and not (tmp_path / "store").exists()


def test_weights_real_needs_the_configs_files_and_names_the_missing_one(tmp_path):
    result = CliRunner().invoke(app, ["rehearse", "--config", str(PAPER), "--weights", "real", "--scratch",
                                      str(tmp_path / "scratch"), "--set", f"data.root={tmp_path / 'none'}"])
    assert result.exit_code == 2 and "encoder.weights: data/weights/dinov2_vitb14_reg4.safetensors does not " \
                                      "exist (--weights real" in result.output


def test_the_scratch_is_never_the_real_store(tmp_path):
    result = CliRunner().invoke(app, ["rehearse", "--config", str(PAPER), "--scratch", str(tmp_path / "store" / "x"),
                                      "--set", f"storage.root={tmp_path / 'store'}"])
    assert result.exit_code == 2 and "overlaps storage.root" in result.output


def test_a_stage_that_cannot_fit_the_budget_stops_the_rehearsal_with_its_plan_and_one_line(tmp_path):
    """Below the planned peak of one worker process (its imports alone), not even shard fits: nothing runs, the
    report says what each stage would have needed, and the last line names the stage."""
    result = CliRunner().invoke(app, ["rehearse", "--config", str(SMOKE), *_sets(tmp_path), "--scratch",
                                      str(tmp_path / "scratch"), "--memory-gb", "0.25", "--json"])
    assert result.exit_code == 2, result.output[-2000:]
    report = json.loads(result.stdout)
    assert report["stages"] == {} and report["stopped"]["stage"] == "shard"
    assert list(report["not_run"]) == ["shard", "encode", "fit_src", "compress", "train_flow", "sample", "reference",
                                       "evaluate"]
    assert all(s["planned_peak_rss_bytes"] > 0.25 * 2**30 for s in report["not_run"].values())
    last = result.stderr.strip().splitlines()[-1]
    assert "shard: cannot fit this machine: the planner predicts" in last and "0.2 GiB budget" in last
    assert not (tmp_path / "scratch" / "store" / "shard").exists()


def test_too_few_samples_for_precision_recall_is_one_line():
    with pytest.raises(ValueError, match="must exceed 3"):
        Amounts(sample_classes=3).check()


def test_a_stage_that_fails_in_its_process_is_one_line_naming_the_stage(tmp_path, make_config):
    """encode without its upstream shard: the measuring process reports the stage's one-line error."""
    from pipeline.config import config_dict

    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"config": config_dict(make_config()), "stage": "encode"}))
    assert measure_main(str(request), str(result)) == 1
    error = json.loads(result.read_text())["error"]
    assert error.startswith("encode: ") and "\n" not in error and "shard" in error


def test_the_rehearsal_batch_is_the_per_process_batch_halved_until_the_plan_fits(tmp_path, tiny_root):
    """train.batch_size 64 over 2 nodes x 2 processes is 16 per process; a small budget halves it (and says so)."""
    full = load_config(SMOKE, [f"data.root={tiny_root}", "data.generate_tiny=null", "data.resolution=32",
                               "decoder.patch_size=4", "runtime.nproc=2", "train.batch_size=64",
                               "train.torchrun_args=[--nnodes=2]", "flow.width=512", "flow.heads=8"])
    cfg = rehearsal_config(full, tmp_path / "store", "cpu", tiny_root, list(SYNSETS[:4]), {},
                           Amounts(classes=4, images_per_class=12), flow_classes=4)
    target = cpu_target(100.0)
    roomy, batches = fit_batches(cfg, full, 2**40, target, tmp_path)
    assert batches["train_flow"] == {"key": "train.batch_size", "config": 16, "used": 16, "why": "as configured"}
    from stages.rehearse import _plan, planned_peak

    one = {s["stage"]: s for s in _plan(roomy, target, tmp_path)["stages"]}["train_flow"]
    budget = planned_peak(one, target) - 1  # 1 byte short of batch 16: batch 8 fits
    tight, batches = fit_batches(cfg, full, budget, target, tmp_path)
    assert batches["train_flow"]["used"] == 8 and "memory" in batches["train_flow"]["why"]
    assert tight.train.batch_size == 8


def test_the_standin_has_every_class_and_reads_a_spread_of_them(tmp_path):
    synsets = standin_synsets(1000)
    assert len(set(synsets)) == 1000 and synsets == sorted(synsets) and synsets[0] == "n01440764"
    read = spread(synsets, 4)
    assert read[0] == synsets[0] and read[-1] == synsets[-1] and len(read) == 4
    made = make_standin_imagenet(tmp_path / "imagenet", synsets[:20], spread(synsets[:20], 3), 2, 1)
    train = tmp_path / "imagenet" / "train"
    assert len(list(train.iterdir())) == 20 and made["rendered_jpegs"] == 3 * 3
    # classes not read hold links to a small pool: every folder looks like ImageNet's, for the cost of 8 images
    unread = train / synsets[1] / f"{synsets[1]}_0.JPEG"
    assert unread.stat().st_nlink > 1 and (tmp_path / "imagenet" / "val" / synsets[1]).is_dir()
    assert (train / synsets[19] / f"{synsets[19]}_empty.JPEG").stat().st_size == 0
