"""The Prefect flow of `srcflow sweep` (deployment srcflow/srcflow-sweep): a parent flow over the sweep's points.

Wiring only; the sweep is `stages/sweep.py`. The outputs two or more points share are built first, each once, as
the stage tasks of flows/full.py (cached on their fingerprint); then each point is one task that runs its
remaining stages. With `parallel` > 1 the tasks run in a process pool of that many processes (Prefect's
ProcessPoolTaskRunner): the stages seed and draw from process-global RNGs, so two points must never share a
process, and a stage with `runtime.workers` > 1 can still start its own Dask cluster from a pool process (a Dask
worker, being daemonic, could not). The k-th process of the pool sees GPU k mod the node's GPU count
(CUDA_VISIBLE_DEVICES, as `encode` pins its Dask workers). The pool's processes report to the flow's API:
PREFECT_API_URL, which `srcflow sweep` sets to a temporary server it starts when none is configured.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from contextlib import nullcontext

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner

from flows.full import publish_report, stage_task
from pipeline.config import config_dict, validate_config
from pipeline.progress import set_mode
from stages import sweep as sweeps
from storage_schemas.sweep import PointRun

log = logging.getLogger("srcflow")
_GPU: str | None = None  # the GPU of this pool process (pin_gpu)


def pool_gpus(device: str) -> list[str]:
    """The GPUs to spread the pool's processes over: none on the CPU; CUDA_VISIBLE_DEVICES's, else the node's
    (counted without starting CUDA here)."""
    if device == "cpu":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def pin_gpu(counter, gpus: list[str]) -> None:
    """Process pool initializer: the k-th process started gets GPU k mod len(gpus)."""
    global _GPU
    with counter.get_lock():
        slot, counter.value = counter.value, counter.value + 1
    _GPU = gpus[slot % len(gpus)] if gpus else None


def use_gpu() -> None:
    """In a task, after Prefect has applied the flow's environment and before torch starts CUDA (once per process)."""
    if _GPU is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _GPU


@task
def build_task(stage: str, fingerprint: str, config: dict, upstream: dict[str, str]) -> bool:
    """An output several points share (flows/full.py's stage task, on this process's GPU); whether this task built
    it (another run may have, meanwhile)."""
    use_gpu()
    set_mode(False)  # bars from several processes would overwrite each other: the stages log their throughput
    built: list[str] = []
    stage_task.fn(stage, fingerprint, config, upstream, built=built)
    return bool(built)


@task
def point_task(config: dict, fingerprints: dict[str, str], until: str | None) -> dict:
    """One point's stages (those done are skipped); returns {"built", "seconds"}; fails with the point's one line."""
    use_gpu()
    set_mode(False)
    return sweeps.run_point(validate_config(config), fingerprints, until)


@flow(name="srcflow", log_prints=True)
def srcflow_sweep(config: str = "configs/smoke.yaml", overrides: list[str] | None = None,
                  grid: list[str] | None = None, seeds: int = 1, seed_keys: list[str] | None = None,
                  until: str | None = None, parallel: int = 1) -> dict:
    """`srcflow sweep`: the Cartesian product of the grids (`["src.dim=4,8", "src.noise_sigma,flow.noise_sigma=0.1,
    0.2"]`) x seeds 0..seeds-1 on `seed_keys` (default train.seed, sample.seed), up to `until`, `parallel` points at
    once. Writes <storage.root>/sweeps/<id>/ and the group table and report as artifacts; fails (after writing them)
    when a point failed."""
    sweep = sweeps.expand(config, overrides or [], grid or [], seeds,
                          sweeps.DEFAULT_SEED_KEYS if seed_keys is None else seed_keys, until, parallel)
    set_mode(sweep.base.runtime.progress)
    runner = None
    if parallel > 1:
        counter = multiprocessing.get_context("spawn").Value("i", 0)
        runner = ProcessPoolTaskRunner(max_workers=parallel, initializer=pin_gpu,
                                       initargs=(counter, pool_gpus(sweep.base.runtime.device)))

    def build_wave(wave: list[sweeps.Build]):
        pending = []
        for b in wave:
            pt = sweep.points[b.point]
            fn = build_task.with_options(name=b.stage, task_run_name=f"{b.stage} (shared)")
            args = {"stage": b.stage, "fingerprint": b.fingerprint, "config": config_dict(pt.cfg),
                    "upstream": pt.stage(b.stage).upstream}
            started = time.perf_counter()
            if runner is None:  # in the flow's thread: signals reach the stage (SIGTERM checkpoints)
                state = fn(**args, return_state=True)
                yield b, time.perf_counter() - started, failure(state), built_it(state)
            else:
                pending.append((b, started, runner.submit(fn, args)))
        for b, started, future in pending:
            future.wait()
            yield b, time.perf_counter() - started, failure(future.state), built_it(future.state)

    def run_points(points: list[sweeps.Point]):
        def outcome(pt, state, started):
            error = failure(state)
            if error is None:
                result = state.result()
                return PointRun(index=pt.index, state="done", built=result["built"], seconds=result["seconds"])
            return PointRun(index=pt.index, state="failed", built=getattr(exception(state), "built", []),
                            seconds=time.perf_counter() - started, error=error)

        options = lambda pt: point_task.with_options(  # noqa: E731
            name="point", task_run_name=f"point {pt.index}: {pt.label}")
        args = lambda pt: {"config": config_dict(pt.cfg), "fingerprints": pt.fingerprints, "until": until}  # noqa: E731
        if runner is None:
            for pt in points:
                started = time.perf_counter()
                yield outcome(pt, options(pt)(**args(pt), return_state=True), started)
            return
        started = time.perf_counter()
        futures = {runner.submit(options(pt), args(pt)): pt for pt in points}
        for future in as_completed(list(futures)):
            future.wait()
            yield outcome(futures[future], future.state, started)

    with runner or nullcontext():
        run = sweeps.execute(sweep, build_wave, run_points, report=log.info, parallel=parallel, prefect=True)
    summary = sweeps.write_results(sweep, run)
    publish(sweep, summary)
    failed = [p for p in summary.points if p.state == "failed"]
    if failed:
        raise sweeps.PointsFailed(f"{len(failed)} of {len(summary.points)} points failed, e.g. point "
                                  f"{failed[0].index}: {failed[0].error} (summary: {sweep.dir})")
    return summary.model_dump()


def built_it(state) -> bool:
    return failure(state) is None and bool(state.result())


def failure(state) -> str | None:
    """The one line of a failed task state (None when it completed)."""
    if not state.is_failed() and not state.is_crashed():
        return None
    exc = exception(state)
    return sweeps.one_line(exc) if exc is not None else (state.message or state.name)


def exception(state) -> BaseException | None:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # e.g. a crashed process left no result
        return e
    return exc if isinstance(exc, BaseException) else None


def publish(sweep: sweeps.Sweep, summary) -> None:
    """The group table, and the report (summary.md, its plots embedded), in the Prefect UI."""
    create_table_artifact(key="srcflow-sweep-groups", table=sweeps.group_table(summary, sweep.grids),
                          description=f"srcflow sweep {sweep.id[:16]}: mean ± std over seeds per group")
    publish_report("srcflow-sweep-report", sweep.dir / "summary.md", f"srcflow sweep report ({sweep.dir})")
