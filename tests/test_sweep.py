"""`srcflow sweep` and `srcflow compare` on the smoke config: shared stages built once, reruns, new points, failures,
validation, parallel points (the lock, and the Prefect deployment against a real server).

Builds are counted by wrapping `Stage.run` (what the runner calls to build an output). The chain is the smoke
config at its smallest (a PCA SRC, 20 flow steps, one sample per class at one CFG scale); `evaluate` costs ~16 s
(two 2048-dim FID eigenproblems), so one module fixture runs the sweep through evaluate and the rest stop at
train_flow on the same store.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from srcflow.cli import app
from stages import Stage
from storage_schemas import SchemaError
from storage_schemas.sweep import read_runs, read_summary
from tests.conftest import REPO, SMOKE, smoke_overrides

runner = CliRunner()
FAST = ("runtime.device=cpu", "encode.rows_per_shard=16", "encode.rows_per_chunk=4", "decoder.hidden_size=32",
        "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64", "fit_decoder.steps=2",
        "fit_decoder.batch_size=8", "fit_decoder.report_images=4", "src.kind=pca", "src.report_images=4",
        "flow.width=32", "flow.heads=2", "train.steps=20", "train.batch_size=16", "reference.max_images=4",
        "reference.pr_images=4", "sample.per_class=1", "sample.cfg_scale=[1.0]", "evaluate.kid_subset_size=4",
        "evaluate.batch_size=4")


def sets_for(storage, tiny_root) -> list[str]:
    return smoke_overrides(storage, tiny_root) + list(FAST)


def sweep(sets: list[str], *args: str):
    flags = [a for s in sets for a in ("--set", s)]
    return runner.invoke(app, ["sweep", "--config", str(SMOKE), *flags, *args, "--json"])


@contextmanager
def counting(fail=None):
    """Count the outputs built per stage; `fail(stage, cfg)` True makes that build raise."""
    counts: Counter = Counter()
    original = Stage.run

    def run(self, cfg, upstream, out):
        counts[self.name] += 1
        if fail is not None and fail(self.name, cfg):
            raise RuntimeError(f"injected failure in {self.name}")
        return original(self, cfg, upstream, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Stage, "run", run)
        yield counts


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_root):
    root = tmp_path_factory.mktemp("sweep") / "artifacts"
    return SimpleNamespace(root=root, sets=sets_for(root, tiny_root))


@pytest.fixture(scope="module")
def evaluated(store):
    """`--grid src.dim=4,8 --seeds 2` through evaluate, on a fresh store."""
    with counting() as counts:
        result = sweep(store.sets, "--grid", "src.dim=4,8", "--seeds", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    return SimpleNamespace(counts=dict(counts), summary=summary, result=result,
                           dir=store.root / "sweeps" / summary["sweep"][:16])


def test_a_sweep_builds_each_shared_stage_once(evaluated):
    assert evaluated.counts == {"shard": 1, "encode": 1, "fit_decoder": 1, "reference": 1, "fit_src": 2,
                                "compress": 2, "train_flow": 4, "sample": 4, "evaluate": 4}
    points = evaluated.summary["points"]
    assert [(p["overrides"], p["seed"], p["state"]) for p in points] == [
        ({"src.dim": 4}, 0, "done"), ({"src.dim": 4}, 1, "done"), ({"src.dim": 8}, 0, "done"),
        ({"src.dim": 8}, 1, "done")]
    fps = [p["fingerprints"] for p in points]
    assert len({f["encode"] for f in fps}) == 1 and len({f["fit_src"] for f in fps}) == 2
    assert fps[0]["fit_src"] == fps[1]["fit_src"] != fps[2]["fit_src"]  # seeds share the SRC, not the flow
    assert len({f["train_flow"] for f in fps}) == len({f["evaluate"] for f in fps}) == 4
    runs = read_runs(evaluated.dir)
    assert len(runs) == 1 and [p.built for p in runs[0].points] == [["train_flow", "sample", "evaluate"]] * 4
    assert Counter(s.stage for s in runs[0].shared) == {"shard": 1, "encode": 1, "fit_decoder": 1, "reference": 1,
                                                        "fit_src": 2, "compress": 2}


def test_the_summary_holds_the_metrics_and_the_group_means_are_the_points_means(evaluated):
    summary = evaluated.summary
    metrics = summary["points"][0]["metrics"]
    for key in ("train_flow.val_bits_per_dim", "evaluate.fid_cfg1.0", "evaluate.is_cfg1.0", "evaluate.kid_cfg1.0",
                "evaluate.precision_cfg1.0", "evaluate.recall_cfg1.0", "evaluate.bayes_accuracy",
                "fit_src.src/feature_mse", "fit_src.src/psnr_vs_image", "fit_decoder.psnr_val"):
        assert isinstance(metrics[key], float), key
    assert [g["overrides"] for g in summary["groups"]] == [{"src.dim": 4}, {"src.dim": 8}]
    for group in summary["groups"]:
        members = [p for p in summary["points"] if p["overrides"] == group["overrides"]]
        assert group["n"] == len(members) == 2
        for key, mean in group["mean"].items():
            values = [p["metrics"][key] for p in members]
            assert mean == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert group["std"][key] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
    # the seeds differ (the flow and its samples), the SRC does not
    a, b = (p["metrics"] for p in summary["points"][:2])
    assert a["train_flow.val_bits_per_dim"] != b["train_flow.val_bits_per_dim"]
    assert a["fit_src.src/feature_mse"] == b["fit_src.src/feature_mse"]
    # the directory: the same summary through its reader, the tables, the plots
    assert read_summary(evaluated.dir).model_dump() == summary
    rows = (evaluated.dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("point,state,seed,src.dim,")
    assert "evaluate.fid" in (evaluated.dir / "summary.md").read_text()
    assert "plots/evaluate.fid-vs-src.dim.png" in summary["plots"]
    assert "plots/train_flow.val_bits_per_dim-vs-src.dim.png" in summary["plots"]
    for name in summary["plots"]:
        with Image.open(evaluated.dir / name) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_a_rerun_is_a_noop(evaluated, store):
    files = {p: p.stat().st_mtime_ns for p in evaluated.dir.rglob("*") if p.is_file()}
    with counting() as counts:
        again = sweep(store.sets, "--grid", "src.dim=4,8", "--seeds", "2")
    assert again.exit_code == 0, again.output
    assert counts == {}
    assert json.loads(again.stdout) == evaluated.summary
    assert "nothing to run" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in evaluated.dir.rglob("*") if p.is_file()} == files


def test_adding_a_value_or_a_seed_runs_only_the_new_points(evaluated, store):
    with counting() as counts:
        result = sweep(store.sets, "--grid", "src.dim=4,8,16", "--seeds", "2", "--until", "train_flow")
    assert result.exit_code == 0, result.output
    assert counts == {"fit_src": 1, "compress": 1, "train_flow": 2}
    points = json.loads(result.stdout)["points"]
    before = {(json.dumps(p["overrides"]), p["seed"]): p["fingerprints"]["train_flow"]
              for p in evaluated.summary["points"]}
    for p in points[:4]:  # the evaluate sweep's points, reused up to train_flow
        assert p["fingerprints"]["train_flow"] == before[(json.dumps(p["overrides"]), p["seed"])]
    with counting() as counts:
        result = sweep(store.sets, "--grid", "src.dim=4,8,16", "--seeds", "3", "--until", "train_flow")
    assert result.exit_code == 0, result.output
    assert counts == {"train_flow": 3}
    assert [g["n"] for g in json.loads(result.stdout)["groups"]] == [3, 3, 3]


def test_a_failing_point_does_not_stop_the_others(evaluated, store):
    """One shared output fails (fit_src at src.dim=12: both its points fail, it is tried once) and one point's own
    stage fails (train_flow at src.dim=4, lr 0.005); the last point still runs."""
    def fail(stage, cfg):
        return (stage == "fit_src" and cfg.src.dim == 12) or (stage == "train_flow" and cfg.train.lr == 0.005)

    with counting(fail) as counts:
        result = sweep(store.sets, "--grid", "src.dim=12,4", "--grid", "train.lr=0.005,0.004", "--until", "train_flow")
    assert result.exit_code == 1, result.output
    assert counts == {"fit_src": 1, "train_flow": 2}
    summary = json.loads(result.stdout)
    states = [(p["overrides"], p["state"], p["error"]) for p in summary["points"]]
    assert [s[:2] for s in states] == [({"src.dim": 12, "train.lr": 0.005}, "failed"),
                                       ({"src.dim": 12, "train.lr": 0.004}, "failed"),
                                       ({"src.dim": 4, "train.lr": 0.005}, "failed"),
                                       ({"src.dim": 4, "train.lr": 0.004}, "done")]
    assert states[0][2] == states[1][2] == "fit_src: RuntimeError: injected failure in fit_src (shared)"
    assert states[2][2] == "train_flow: RuntimeError: injected failure in train_flow"
    assert [g["n"] for g in summary["groups"]] == [0, 0, 0, 1]
    assert "train_flow.val_bits_per_dim" in summary["points"][3]["metrics"]
    assert "3 of 4 points failed" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--grid", "src.dims=4,8"], "--grid: unknown config key src.dims; known in src: kind, dim,"),
    (["--grid", "src=4"], "--grid: src is a section"),
    (["--grid", "src.dim=4,0"], "point src.dim=0 seed=0: "),
    (["--grid", "src.dim=4,100"], "src.dim=100 exceeds the encoder's 64 channels"),
    (["--grid", "src.dim=4,4"], "--grid src.dim: the value 4 is listed twice"),
    (["--seeds", "0"], "--seeds: 0; a sweep needs at least 1 seed"),
    (["--until", "decode"], "--until: unknown stage 'decode'"),
    (["--parallel", "0"], "--parallel: 0"),
    (["--seed-keys", "train.seed,train.sed"], "--seed-keys: unknown config key train.sed"),
    (["--grid", "train.seed=1,2"], "--seed-keys: train.seed is also a --grid key"),
    (["--grid", "encode.batch_size=8,16"], "--grid: encode.batch_size is operational"),
    (["--seeds", "2", "--seed-keys", ""], "--seed-keys: none given, so the 2 seeds would all be the same point"),
])
def test_a_bad_sweep_is_one_line_before_any_work(tmp_path, tiny_root, args, message):
    result = sweep(sets_for(tmp_path / "artifacts", tiny_root), *args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "artifacts").exists()


def point_in_process(cfg_json: str, fingerprints: dict, until: str) -> dict:
    """A point's run in a fresh process, as a process pool runs it, with its shard build slowed so that the other
    point reaches the shard lock meanwhile; returns what it built and whether it waited for another run."""
    from pipeline.config import validate_config
    from stages.sweep import run_point

    original = Stage.run

    def slow_shard(self, cfg, upstream, out):
        if self.name == "shard":
            time.sleep(3)
        return original(self, cfg, upstream, out)

    Stage.run = slow_shard
    waited = []
    handler = logging.Handler()
    handler.emit = lambda record: waited.extend([record.getMessage()] * ("waiting for it" in record.getMessage()))
    logging.getLogger("srcflow").addHandler(handler)
    logging.getLogger("srcflow").setLevel(logging.INFO)
    return {**run_point(validate_config(json.loads(cfg_json)), fingerprints, until), "waited": waited}


def test_points_that_run_at_once_and_share_a_stage_build_it_once(tmp_path, tiny_root):
    """Without the shared phase (e.g. two sweeps at once), the per-output lock still builds a shared stage once."""
    from pipeline.config import config_dict
    from stages.sweep import expand

    sw = expand(str(SMOKE), sets_for(tmp_path / "artifacts", tiny_root), ["src.dim=4,8"], until="fit_src")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(point_in_process, json.dumps(config_dict(pt.cfg)), pt.fingerprints, "fit_src")
                   for pt in sw.points]
        results = [f.result(timeout=300) for f in futures]
    assert Counter(s for r in results for s in r["built"]) == {"shard": 1, "encode": 1, "fit_decoder": 1, "fit_src": 2}
    assert sum(len(r["waited"]) for r in results) >= 1  # the two did meet on a lock


def test_each_process_of_the_pool_gets_its_own_gpu(monkeypatch):
    from flows import sweep as flow

    monkeypatch.setattr(flow, "_GPU", None)
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):  # what the pool's initializer does in each new process, then a task in it
        flow.pin_gpu(counter, ["0", "1"])
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the flow's environment, which Prefect applies per task
        flow.use_gpu()
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert flow.pool_gpus("auto") == ["2", "5"] and flow.pool_gpus("cpu") == []


def test_compare_two_configs_and_two_stage_outputs(evaluated, store):
    flags = [a for s in store.sets for a in ("--set", s)]
    result = runner.invoke(app, ["compare", "--config", str(SMOKE), *flags, "--a", "src.dim=4", "--b", "src.dim=8",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["differ"] == [{"key": "src.dim", "a": 4, "b": 8}]
    assert report["shared"] == ["shard", "encode", "fit_decoder", "reference"]
    fid = next(m for m in report["metrics"] if m["metric"] == "evaluate.fid_cfg1.0")
    by_point = {(p["overrides"]["src.dim"], p["seed"]): p["metrics"] for p in evaluated.summary["points"]}
    assert (fid["a"], fid["b"]) == (by_point[(4, 0)]["evaluate.fid_cfg1.0"], by_point[(8, 0)]["evaluate.fid_cfg1.0"])

    seed0, seed1 = (store.root / "train_flow" / p["fingerprints"]["train_flow"][:16]
                    for p in evaluated.summary["points"][:2])
    result = runner.invoke(app, ["compare", str(seed0), str(seed1), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["differ"] == [{"key": "train.seed", "a": 0, "b": 1}]
    assert report["shared"] == ["shard", "encode", "fit_decoder", "fit_src", "compress"]
    assert {m["metric"] for m in report["metrics"]} >= {"train_flow.val_bits_per_dim", "fit_src.src/feature_mse"}


def _point(index, seed, value, state="done", overrides=None):
    from storage_schemas.sweep import SweepPoint

    return SweepPoint(index=index, overrides=overrides or {"src.dim": 4}, seed=seed, fingerprints={},
                      metrics={} if state == "failed" else {"evaluate.fid_cfg1.0": value}, state=state)


def test_a_seed_with_a_nan_metric_is_counted_out_of_it_and_listed_and_the_interval_is_students_t():
    """[1.0, 1.2, NaN] over three seeds: n = 2 for that metric (not 3), seed 2 listed as dropped, the standard error
    and the 95% t-interval on 1 degree of freedom (t = 12.706); a group of one seed has no spread and no error bar."""
    from stages.sweep import (
        SweepSummary,
        dropped_lines,
        group_stats,
        groups_csv,
        mean_std,
        plot_lines,
        plot_specs,
        render_plot,
        summary_markdown,
    )

    points = [_point(0, 0, 1.0), _point(1, 1, 1.2), _point(2, 2, None),
              _point(3, 0, 2.0, overrides={"src.dim": 8}), _point(4, 1, None, "failed", {"src.dim": 8})]
    four, eight = group_stats(points)
    key = "evaluate.fid_cfg1.0"
    assert four.n == 3 and four.count == {key: 2} and four.dropped == {key: [2]} and four.failed_seeds == []
    assert four.mean[key] == pytest.approx(1.1) and four.std[key] == pytest.approx(statistics.stdev([1.0, 1.2]))
    assert four.sem[key] == pytest.approx(0.1)
    assert four.ci95[key] == pytest.approx([1.1 - 12.7062047 * 0.1, 1.1 + 12.7062047 * 0.1])
    assert eight.n == 1 and eight.failed_seeds == [1] and eight.count == {key: 1} and eight.dropped == {key: []}
    assert eight.mean == {key: 2.0} and eight.std == eight.sem == eight.ci95 == {key: None}
    assert mean_std(four, key) == "1.1 ± 0.14 (n=2 of 3)" and mean_std(eight, key) == "2 (n=1 of 2)"
    summary = SweepSummary(sweep="x" * 64, config="c", sets=[], grid={"src.dim": [4, 8]}, seeds=3,
                           seed_keys=["train.seed"], until=None, points=points, groups=[four, eight], plots=[])
    grids = [sweep_grid("src.dim=4,8")]
    assert dropped_lines(summary, grids) == ["- src.dim=4: evaluate.fid_cfg1.0: seeds 2 not finite",
                                             "- src.dim=8: seeds 1 failed"]
    rows = groups_csv(summary).splitlines()
    assert rows[0].split(",")[:3] == ["src.dim", "n", "evaluate.fid_cfg1.0_n"] and rows[1].endswith(",2")
    (spec,) = plot_specs(summary, grids)
    ((x4, _, low4, high4, n4), (x8, _, low8, high8, n8)), = plot_lines(spec, summary, grids).values()
    assert (x4, n4, x8, n8) == (4, 2, 8, 1) and low4 == pytest.approx(high4) == pytest.approx(12.7062047 * 0.1)
    assert math.isnan(low8) and math.isnan(high8)  # no error bar on a mean of one seed
    assert render_plot(spec, summary, grids, standin=False).startswith(b"\x89PNG")
    assert "## Seeds left out of the statistics\n\n- src.dim=4: evaluate.fid_cfg1.0: seeds 2 not finite" in (
        summary_markdown(summary, grids, standin=False))


def sweep_grid(text):
    from stages.sweep import parse_grid

    return parse_grid(text)


def test_the_summary_reader_refuses_another_version(evaluated, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(evaluated.dir, copy)
    raw = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        read_summary(copy)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_sweep_deployment_runs_points_in_parallel_on_a_real_server(tmp_path, tiny_root, prefect_home):
    """srcflow/srcflow-sweep with parallel=2: the shared stages as tasks (each once), the two points as tasks in a
    process pool, the group table and the report as artifacts."""
    from tests.test_prefect import PREFECT, free_port, stop, wait_healthy

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "srcflow", "PYTHONPATH": str(REPO), "SRCFLOW_HOME": str(REPO)}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, cwd=tmp_path,
                              start_new_session=True, stdout=open(tmp_path / "server.log", "w"),  # noqa: SIM115
                              stderr=subprocess.STDOUT)

    def run(*args):
        return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)

    worker = None
    try:
        wait_healthy(api, server)
        r = run("work-pool", "create", "srcflow", "--type", "process", "--overwrite")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--name", "srcflow-sweep")
        assert r.returncode == 0, r.stdout + r.stderr
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "srcflow"], env=env, cwd=REPO,
                                  start_new_session=True, stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        storage = tmp_path / "artifacts"
        r = run("deployment", "run", "srcflow/srcflow-sweep", "--watch",
                "--param", f"overrides={json.dumps(sets_for(storage, tiny_root))}",
                "--param", 'grid=["src.dim=4,8"]', "--param", "until=fit_src", "--param", "parallel=2")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
        q = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stderr
        states = json.loads(q.stdout)
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
    assert states["flow"] == "Completed"
    assert states["tasks"] == {"shard (shared)": "Completed", "encode (shared)": "Completed",
                               "fit_decoder (shared)": "Completed", "point 0: src.dim=4 seed=0": "Completed",
                               "point 1: src.dim=8 seed=0": "Completed"}
    assert {"srcflow-sweep-groups", "srcflow-sweep-report"} <= set(states["artifacts"])
    assert "data:image/png;base64," in states["artifacts"]["srcflow-sweep-report"]
    (sweep_dir,) = (storage / "sweeps").iterdir()
    (runs,) = read_runs(sweep_dir)
    assert runs.parallel == 2 and runs.prefect
    assert [s.stage for s in runs.shared] == ["shard", "encode", "fit_decoder"]
    assert [p.built for p in runs.points] == [["fit_src"], ["fit_src"]]
    assert [p.state for p in read_summary(sweep_dir).points] == ["done", "done"]


STATES = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
        artifacts = await c.read_artifacts()
        print(json.dumps({"flow": runs[0].state.name, "tasks": {t.name: t.state.name for t in tasks},
                          "artifacts": {a.key: str(a.data) for a in artifacts if a.key}}))
asyncio.run(main())
"""


def test_a_shared_output_built_by_another_run_meanwhile_is_not_claimed(tmp_path, tiny_root):
    """Two sweeps at once: the one that waits on an output's lock finds it done; it reports so, and its runs.jsonl
    line does not list it among what it built (main: both claimed to have built it)."""
    from stages.runner import run_pipeline
    from stages.sweep import execute, expand, in_process

    sw = expand(str(SMOKE), sets_for(tmp_path / "artifacts", tiny_root), ["src.dim=4,8"], until="encode")
    run_pipeline(sw.points[0].cfg, until="encode")  # the other sweep, between this one's plan and its build
    lines: list[str] = []
    run = execute(sw, *in_process(sw), report=lines.append)
    assert run.shared == [] and all(p.built == [] for p in run.points)
    assert sum("done, built by another run meanwhile" in line for line in lines) == 2, lines  # shard and encode


def append_runs(directory: str, n: int) -> None:
    from storage_schemas.sweep import SweepRun, append_run

    for i in range(n):
        append_run(Path(directory), SweepRun(started=str(i), seconds=0.0, parallel=1, prefect=False, shared=[],
                                             points=[]))


def test_runs_jsonl_keeps_every_line_when_sweeps_append_at_once(tmp_path):
    """runs.jsonl is rewritten whole (atomically) per line: without a lock, two sweeps ending together lost one."""
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(append_runs, str(tmp_path), 25) for _ in range(4)]:
            f.result(timeout=120)
    assert len(read_runs(tmp_path)) == 100
