"""The Prefect flow `srcflow`: runs the stages in order, each as a task cached on its fingerprint.

Only wiring lives here; what a stage does is in `stages/`, how it is planned and committed in
`stages/runner.py`. A stage whose output is complete on disk shows as Cached; one whose
output is missing or partial is (re)run with `refresh_cache`, so a deleted artifact is rebuilt.

The file is not named srcflow.py: a deployment run loads its entrypoint file as the module of its stem
(prefect.utilities.importtools.load_script_as_module), which would shadow the `srcflow` application package.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image
from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect_dask import DaskTaskRunner

from pipeline.artifacts import ArtifactStore
from pipeline.config import config_dict, load_config, validate_config
from pipeline.progress import Meter, set_mode, set_reporter
from stages.runner import last_needed, plan, preflight, run_stage, select_stages
from storage_schemas.success import Manifest

# 2: stage_task returns None. The manifests that version 1 returned and cached, Prefect links (a Cached one too) to
# later tasks' arguments by id(), even once freed: a new key never loads them.
RESULT_VERSION = 2


def fingerprint_key(context, parameters) -> str:
    return f"{parameters['stage']}-{parameters['fingerprint']}-r{RESULT_VERSION}"


@task(cache_key_fn=fingerprint_key, persist_result=True)
def stage_task(stage: str, fingerprint: str, config: dict, upstream: dict[str, str], force: bool = False,
               built: list[str] | None = None) -> None:
    """Runs one stage (`upstream`: the fingerprints it reads, found through this root). `built` (called as a
    function) gets the stage appended when this call built it. It returns nothing: Prefect links the objects a task
    returns to later tasks' arguments by their id() (and by ids Python has reused since), which drew an edge from
    nearly every stage to every later one; the flow passes the real edges as `wait_for`."""
    cfg = validate_config(config)
    (p,) = [p for p in plan(cfg, last=stage) if p.name == stage]
    if p.fingerprint != fingerprint:
        raise RuntimeError(f"{stage}: fingerprint changed between planning and running ({fingerprint[:16]} -> "
                           f"{p.fingerprint[:16]}); an input changed during the run")
    set_reporter(progress_artifact)
    try:
        run_stage(p, cfg, force=force, built=built)
    finally:
        set_reporter(None)


def progress_artifact(meter: Meter) -> None:
    """A long loop's progress in the Prefect UI: a progress artifact per meter (its percentage), whose description is
    the done/total, rate and ETA; keyed by the meter, so the Artifacts page keeps each one's history."""
    percent = 100.0 * min(meter.done, meter.total) / max(meter.total, 1)
    description = f"{meter.desc}: {meter.summary()}"
    if "artifact" not in meter.state:
        key = "srcflow-progress-" + re.sub(r"[^a-z0-9]+", "-", meter.desc.lower()).strip("-")
        meter.state["artifact"] = create_progress_artifact(percent, key=key, description=description)
    else:
        update_progress_artifact(meter.state["artifact"], percent, description=description)


@flow(name="srcflow", log_prints=True)
def srcflow(config: str = "configs/smoke.yaml", overrides: list[str] | None = None, stages: list[str] | None = None,
            until: str | None = None, force: list[str] | None = None) -> dict[str, dict]:
    """shard -> encode -> (fit_decoder) -> fit_src -> compress -> train_flow -> sample -> evaluate, in this process
    (deployment srcflow-full; `srcflow run`)."""
    return run_stages(config, overrides, stages, until, force)


def dask_task_runner() -> DaskTaskRunner:
    """The run's Dask cluster: SRCFLOW_DASK_ADDRESS names an existing scheduler (`dask scheduler`, dask-jobqueue's
    SLURMCluster); without it, a LocalCluster of SRCFLOW_DASK_WORKERS single-threaded processes on 127.0.0.1 (workers
    named 0..n-1: each job computes on GPU i mod the node's GPUs, pipeline.device.worker_gpu)."""
    address = os.environ.get("SRCFLOW_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": int(os.environ.get("SRCFLOW_DASK_WORKERS", "1")),
                                          "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
                                          "dashboard_address": None})


@flow(name="srcflow", log_prints=True, task_runner=dask_task_runner())
def srcflow_dask(config: str = "configs/smoke.yaml", overrides: list[str] | None = None,
                 stages: list[str] | None = None, until: str | None = None,
                 force: list[str] | None = None) -> dict[str, dict]:
    """The same pipeline with the data-parallel jobs (shard, encode, compress, sample) on the task runner's Dask
    cluster (deployment srcflow-dask): the stages run in the flow-run process, as in srcflow-full, and submit their
    jobs to that cluster's scheduler (runtime.dask_address is set to it, whatever the config says). A stage never
    runs inside a Dask worker: a daemonic worker cannot start the LocalCluster of `runtime.workers`, a training
    stage there would get one worker's GPU, memory limit and no signals, and a lost worker would rerun a whole stage.
    No Prefect task runs in a worker, so ephemeral mode works too (no worker starts a server of its own)."""
    address = FlowRunContext.get().task_runner.client.scheduler.address  # started (or connected) here
    return run_stages(config, [*(overrides or []), f"runtime.dask_address={address}"], stages, until, force)


def run_stages(config: str, overrides: list[str] | None, stages: list[str] | None, until: str | None,
               force: list[str] | None) -> dict[str, dict]:
    cfg = load_config(config, overrides or [])
    set_mode(cfg.runtime.progress)
    force = force or []
    store = ArtifactStore(cfg.storage.root)
    results_dir = store.root / ".prefect-results"
    manifests: dict[str, Manifest] = {}
    selected = select_stages(plan(cfg, last_needed(stages, until)), stages, until)
    todo = preflight(selected, cfg, force)
    runs = {}  # stage -> its task run's future or final state: what a later stage waits for (the graph's edges)
    for p in selected:
        # checked again: a stage rebuilt above with other bytes makes the outputs built from it stale
        rerun = p in todo or store.state(p.name, p.fingerprint) != "done"
        task_fn = stage_task.with_options(name=p.name, task_run_name=p.name, refresh_cache=rerun,
                                          result_storage=results_dir)
        # in this process: signals reach the stage (SIGTERM checkpoints); jobs fan out as runtime says
        runs[p.name] = state = task_fn(p.name, p.fingerprint, config_dict(cfg), p.upstream, force=p.name in force,
                                       wait_for=[runs[u] for u in p.upstream if u in runs], return_state=True)
        if not state.is_completed():  # (Cached is completed) and never load a result: Prefect would link it by id
            state.result()  # raises the stage's exception
        # what is on disk under this root, not a cached task result (which may name another root's output)
        manifests[p.name] = store.manifest(p.name, p.fingerprint)
    create_table_artifact(key="srcflow-stages", table=[
        {"stage": name, "output": m.path, "metrics": short_metrics(m.metrics)} for name, m in manifests.items()],
        description=f"srcflow stage outputs under {store.root}")
    if "evaluate" in manifests:
        publish_evaluation(manifests["evaluate"].dir)
    return {name: m.model_dump() for name, m in manifests.items()}


def short_metrics(metrics: dict, count: int = 3) -> str:
    """A stage's first `count` numbers as `k=v` to 4 digits: a table cell that fits the Prefect UI's artifact pane."""
    numbers = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" for k, v in numbers[:count])


def publish_evaluation(out_dir: Path) -> None:
    """The metrics per CFG scale as a table, and the evaluation report as markdown, in the Prefect UI."""
    from stages.evaluate import metrics_table
    from storage_schemas.evaluation import read_metrics

    evaluations = read_metrics(out_dir / "metrics.json")["evaluations"]
    create_table_artifact(key="srcflow-metrics", table=metrics_table(evaluations),
                          description="FID / IS / KID / precision / recall per CFG scale")
    publish_report("srcflow-report", out_dir / "report.md", f"evaluation report ({out_dir})")


def publish_report(key: str, report: Path, description: str) -> None:
    """A markdown report on disk as a Prefect markdown artifact, with the images it links embedded."""
    create_markdown_artifact(key=key, markdown=inline_images(report.read_text(), report.parent),
                             description=description)


IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")  # ![alt](target)
# An image file up to this size is embedded as it is (a sweep's plots, small grids). A larger one, as a JPEG
# preview at most PREVIEW_SIDE px on its long side: a 256-px evaluation grid is ~3.4 MB of PNG, a 512-px one ~10 MB,
# and one per CFG scale would make a report artifact of tens of MB in the server's database.
EMBED_AS_IS_BYTES = 1 << 20
PREVIEW_SIDE = 2048


def inline_images(markdown: str, folder: Path) -> str:
    """Each `![alt](path)` relative to `folder` becomes a base64 data URI. The Prefect UI cannot reach the files
    (a relative link resolves against the UI's own address), and its markdown renderer keeps `data:image/` sources
    (Prefect 3.9 ui-v2: urlTransform and rehype-sanitize allow them for img src). The report on disk keeps its
    relative links, which are right there."""
    def embed(link: re.Match) -> str:
        alt, target = link.groups()
        if urlparse(target).scheme:  # already a URL (http:, data:, ...)
            return link.group(0)
        return f"![{alt}]({data_uri(folder / target)})"

    return IMAGE_LINK.sub(embed, markdown)


def data_uri(path: Path) -> str:
    data, mime = path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if len(data) > EMBED_AS_IS_BYTES:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data, mime = buffer.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
