"""`benchmarks/gpu.sh --cpu`: the GPU benchmark's scripts run end to end at smoke size and print their figures."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.e2e
def test_gpu_benchmark_script_runs_on_cpu_at_smoke_size(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "SRCFLOW_BENCH_OUT": str(tmp_path),
                               # the interpreter running the tests, where the repo has no .venv of its own
                               "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    results = report["results"]
    assert report["mode"] == "cpu" and set(results) == {"encode-cpu-smoke", "train_flow-cpu-smoke", "sample-cpu-smoke",
                                                        "rehearse-cpu-smoke"}
    for name, part in results.items():
        assert "error" not in part, (name, (tmp_path / f"{name}.log").read_text()[-2000:])
    encode = results["encode-cpu-smoke"]
    assert encode["encode_images_per_s"] > 0 and encode["forward_images_per_s"] > 0 and encode["ratio"] > 0
    assert encode["write"]["zarr_mb_per_s"] > 0 and encode["rss"]["ratio"] > 0
    assert encode["write"]["direct_mb_per_s"] > 0 and encode["write"]["features_zstd_ratio"] > 0
    decode = encode["decode"]
    assert decode["pil"]["images_per_s_per_core"] > 0 and decode["tensor_vs_pil"] > 0
    assert decode["tensor"]["vs_pil"]["max_level"] <= 2 and decode["nvjpeg"]["crop_on_cpu_vs_pil"]["max_level"] == 0
    assert set(encode["stage_by_decode"]) == {"pil", "tensor"} and encode["mfu"] is None
    assert encode["flops_per_image"] == 2 * encode["flops"]["per_view"] > 0
    train = results["train_flow-cpu-smoke"]
    assert train["steps_per_s"] > 0 and train["mfu"] is None and train["peak_source"] == "cpu: no peak"
    assert train["flops"]["step"] == 3 * train["flops"]["forward_per_sample"] * train["batch"]
    sample = results["sample-cpu-smoke"]["models"]["smoke"]
    for sampler in ("kv_cache", "naive", "kv_two_pass", "kv_static", "jacobi"):
        assert sample[sampler]["samples_per_s"] > 0, sampler
    assert sample["naive"]["max_abs_diff"] < 1e-4 and sample["kv_static"]["max_abs_diff"] < 1e-4
    assert sample["kv_two_pass"]["max_abs_diff"] < 1e-6  # batched CFG = two-pass CFG
    assert sample["jacobi"]["max_abs_diff"] < 1e-2 and sample["kv_vs_naive"] > 0
    assert set(sample["jacobi_per_block"]) == {"0", "1"} and sample["jacobi"]["passes_per_block"]["0"] >= 2
    rehearse = results["rehearse-cpu-smoke"]
    stages = list(rehearse["stages"])
    assert stages[0] == "shard" and stages[-1] == "evaluate"
    assert all(s["peak_rss_bytes"] > 0 and s["planned_peak_rss_bytes"] > 0 for s in rehearse["stages"].values())


@pytest.mark.e2e
def test_ddp_benchmark_times_both_bucket_layouts_and_a_ranks_window_read():
    proc = subprocess.run([sys.executable, "benchmarks/ddp.py", "--config", "configs/smoke.yaml", "--blocks", "1",
                           "--steps-per-block", "1", "--reader-images", "256", "--reader-worlds", "1", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["world_size"] == 2 and report["step_seconds_default"] > 0 and report["step_seconds_find_unused"] > 0
    reader = report["reader"]
    assert reader["window"] == 256 and [reader["per_world"][w]["rows"] for w in ("1", "4")] == [256, 64]
    assert all(w["whole_window_rows"] == 512 and w["seconds"] > 0 for w in reader["per_world"].values())
