"""Plan and run stages against the artifact store, without Prefect (the flow wraps these calls)."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ArtifactStore, DamagedError, content_digest, fingerprint, now
from pipeline.config import Config, select, semantic_of
from stages import STAGE_NAMES, STAGES, Stage
from storage_schemas.success import Manifest

log = logging.getLogger("srcflow")
STOPPED_NOTE = "stopped stage: "  # the note run_stage adds to a KeyboardInterrupt that stopped a stage


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    fingerprint: str
    semantic: dict
    upstream: dict[str, str]  # upstream stage -> its fingerprint
    external: dict[str, str]
    state: str  # done | damaged | partial | stale | missing
    path: Path
    problem: str | None = None  # damaged: the first bad file and why

    @property
    def name(self) -> str:
        return self.stage.name


def plan(cfg: Config, last: str | None = None) -> list[PlannedStage]:
    """Every enabled stage (up to `last`) with its fingerprint and state. Reads the store; runs nothing.

    External inputs are checked here, so a missing weights file fails before any work; stages after
    `last` are not planned, so `--until encode` does not need the Inception weights.
    """
    store = ArtifactStore(cfg.storage.root)
    fingerprints: dict[str, str] = {}
    planned = []
    for stage in STAGES[: STAGE_NAMES.index(last) + 1] if last in STAGE_NAMES else STAGES:
        if not stage.enabled(cfg):
            continue
        semantic = semantic_of(cfg, stage.sections)
        upstream = {u: fingerprints[u] for u in stage.upstream if u in fingerprints}  # disabled ones drop out
        external = stage.external(cfg)
        fp = fingerprint(stage.name, stage.code_version, semantic, upstream, external)
        fingerprints[stage.name] = fp
        health, path = store.check(stage.name, fp), store.stage_dir(stage.name, fp)
        planned.append(PlannedStage(stage, fp, semantic, upstream, external, health.state, path,
                                    health.first(path) if health.problems else None))
    return planned


def check_stage_names(names: list[str], option: str = "--stage/--until") -> None:
    for name in names:
        if name not in STAGE_NAMES:
            raise ValueError(f"{option}: unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def select_stages(planned: list[PlannedStage], only: list[str] | None = None,
                  until: str | None = None) -> list[PlannedStage]:
    """`only`: exactly these stages (their upstream must be done); `until`: everything up to it."""
    names = [p.name for p in planned]
    check_stage_names((only or []) + ([until] if until else []))
    for name in (only or []) + ([until] if until else []):
        if name not in names:
            raise ValueError(f"stage {name!r} is disabled by the config (e.g. fit_decoder when decoder.weights is set)")
    if only:
        chosen = [p for p in planned if p.name in only]
        by_name = {p.name: p for p in planned}
        for p in chosen:
            for u in p.upstream:
                if u not in only and by_name[u].state != "done":
                    raise ValueError(f"stage {p.name!r} needs {u!r}, which is {by_name[u].state}: run it first "
                                     f"(srcflow run --until {p.name})")
        return chosen
    if until:
        return planned[: names.index(until) + 1]
    return planned


def run_stage(p: PlannedStage, cfg: Config, force: bool = False, built: list[str] | None = None) -> Manifest:
    """Skip a complete output; else run the stage and commit it, holding the output's lock (`built`, when given,
    gets the stage's name appended when this call built or repaired the output).

    - Another run writing the same output: wait for it, then use what it built.
    - A damaged row store (shard, encode, compress): redo only its damaged shards, in place.
      Any other damaged output is refused, naming the file and `--force`.
    - `force`: build a fresh output beside the old one, which stays until the new one is committed.
    Upstream artifacts are read through this root, after their fast check.
    """
    store = ArtifactStore(cfg.storage.root)
    with store.lock(p.name, p.fingerprint) as waited:
        health = store.check(p.name, p.fingerprint)
        if health.state == "done" and (not force or waited):
            log.info("%s: done, %s (%s)", p.name, "built by another run" if waited else "skipped", p.path)
            return store.manifest(p.name, p.fingerprint)
        # forced, or built from other upstream bytes than those there now: a fresh output replaces the old one
        rebuild = (force and health.state in ("done", "damaged")) or (health.state == "stale" and bool(health.problems))
        if rebuild and not force:
            log.warning("%s: %s", p.name, health.first(p.path))
        if health.state == "damaged" and not rebuild:
            shards = store.prepare_repair(p.name, p.fingerprint, health.problems)
            if shards is None:
                raise DamagedError(f"{p.name}: damaged: {health.first(p.path)}; rebuild it with "
                                   f"`srcflow run --force {p.name}`")
            log.warning("%s: damaged (%s); rebuilding %d of its shards", p.name, health.first(p.path), shards)
        upstream = {u: store.manifest(u, fp) for u, fp in p.upstream.items()}
        content = {u: content_digest(m) for u, m in upstream.items()}
        out = store.open_output(p.name, p.fingerprint, rebuild=rebuild)
        store.begin(out, content)  # a partial begun from other upstream bytes starts again
        log.info("%s: running -> %s", p.name, out.path)
        name_training_runs(p, store)
        started = now()
        from pipeline.device import fresh_numerics  # imports torch: only when a stage runs

        try:
            with fresh_numerics():  # the stage computes as in a fresh process, whatever ran before it in this one
                metrics = p.stage.run(cfg, upstream, out)
        except OSError as e:  # e.g. a full disk: name the stage, and the file (or the output) being written
            if e.errno is None or (e.filename is not None and e.errno not in (errno.ENOSPC, errno.EDQUOT)):
                raise
            raise OSError(e.errno, f"{p.name}: {e.strerror} (writing {e.filename or f'into {out.path}'})") from e
        except BaseException as e:  # a signal that stopped no training loop (KeyboardInterrupt, SystemExit, ...)
            if not isinstance(e, Exception):
                e.add_note(STOPPED_NOTE + p.name)  # which stage it stopped
            raise
        manifest = store.commit(out, code_version=p.stage.code_version, semantic=p.semantic, upstream=p.upstream,
                                external=p.external, started=started, metrics=metrics or {},
                                upstream_content=content)
    name_training_runs(p, store)
    if built is not None:
        built.append(p.name)
    log.info("%s: done in %.1f s", p.name, (now() - started).total_seconds())
    return manifest


def name_training_runs(p: PlannedStage, store: ArtifactStore) -> None:
    """The TensorBoard names of a training stage's outputs (pipeline.curves.name_runs), this one's included; a store
    where the links cannot be made loses only the names."""
    if p.name not in TRAINING_BATCHES:
        return
    from pipeline.config import flatten
    from pipeline.curves import name_runs, semantic_chain

    try:
        chain: dict = {}
        for name, fp in p.upstream.items():
            chain |= semantic_chain(store.root, name, fp)
        name_runs(store.root, p.name, running=(p.fingerprint, chain | flatten(p.semantic)))
    except OSError as e:
        log.warning("%s: no readable TensorBoard run names (%s)", p.name, e)


def refuse_damaged(selected: list[PlannedStage], cfg: Config, force: list[str] | tuple[str, ...] = ()) -> None:
    """Before any work: a damaged output that `run` would not repair in place (not a row store) and that is not
    forced stops the run, naming the file and the repair."""
    check_stage_names(list(force), "--force")
    store = ArtifactStore(cfg.storage.root)
    for p in selected:
        if p.state == "damaged" and p.name not in force and not store.repairable(p.name, p.fingerprint):
            raise DamagedError(f"{p.name}: damaged: {p.problem}; rebuild it with `srcflow run --force {p.name}`")


TRAINING_BATCHES = {"fit_decoder": "fit_decoder.batch_size", "fit_src": "src.batch_size",
                    "train_flow": "train.batch_size"}  # images (rows) per step, from the train rows
# the key that sets how many processes a stage runs (the planner's `processes`); the others: runtime.workers
PROCESS_KEYS = {"shard": "shard.workers", "fit_decoder": "runtime.nproc", "fit_src": "runtime.nproc",
                "train_flow": "runtime.nproc"}


def check_resources(todo: list[PlannedStage], cfg: Config) -> None:
    """Before any work, for the stages about to run: a training batch larger than the training rows, or a planned
    peak memory (stages.plan's estimate) above this machine's, is a one-line error naming the batch key; the
    node is never driven out of memory."""
    if not todo:
        return
    from pipeline.progress import human_bytes
    from stages.plan import capacity_plan
    from stages.plan.dataset import dataset_counts

    names = {p.name for p in todo}
    data = dataset_counts(cfg)
    rows = data.encoded_train(cfg.encode.subset_per_class) * len(cfg.encode.views)
    for name, key in TRAINING_BATCHES.items():
        batch = select(cfg, key)
        if name in names and batch > rows:
            raise ValueError(f"{key}: {batch} is more than the {rows} training rows ({rows // len(cfg.encode.views)} "
                             f"images x {len(cfg.encode.views)} views, {data.source}); use at most {rows}")
    if not cfg.runtime.memory_check:
        return
    host, device = machine_memory(cfg.runtime.device)
    for s in capacity_plan(cfg)["stages"]:
        name = s["stage"]
        if name not in names:
            continue
        need = s["memory"]["host_bytes"] + (s["memory"]["device_bytes"] if device is None else 0)
        processes = s["processes"]
        if processes > 1 and need * processes > host >= need:  # one process fits: too many of them is the cause
            key = PROCESS_KEYS.get(name, "runtime.workers")
            raise ValueError(f"{key}: {processes} {name} processes would need ~{human_bytes(need * processes)} of host "
                             f"memory (~{human_bytes(need)} each: {s['memory']['basis']}), more than this machine's "
                             f"{human_bytes(host)}; use at most {host // need} (or set runtime.memory_check=false)")
        for what, needed, have in (("host", need * processes, host),
                                   ("GPU", s["memory"]["device_bytes"], device)):
            if have is not None and needed > have:
                key = s["batch_key"]
                raise ValueError(f"{key}: {name} would need ~"
                                 f"{human_bytes(needed)} of {what} memory ({s['memory']['basis']}), more than this "
                                 f"machine's {human_bytes(have)}; lower {key} or the model size (or set "
                                 f"runtime.memory_check=false)")


def machine_memory(device: str) -> tuple[int, int | None]:
    """(host RAM, memory of one GPU or None when the stages run on the CPU) in bytes."""
    import psutil

    from pipeline.device import resolve_device

    resolved = resolve_device(device)
    gpu = None
    if resolved.type == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(resolved).total_memory
    return psutil.virtual_memory().total, gpu


def preflight(selected: list[PlannedStage], cfg: Config, force: list[str] | tuple[str, ...] = ()) -> list[PlannedStage]:
    """What every entry point (CLI, flow, run_pipeline) checks before any work; returns the stages that will run
    (not done, or forced)."""
    refuse_damaged(selected, cfg, force)
    todo = [p for p in selected if p.state != "done" or p.name in force]
    check_resources(todo, cfg)
    return todo


def last_needed(only: list[str] | None, until: str | None) -> str | None:
    """The last stage a selection runs: nothing after it needs planning."""
    names = [n for n in (only or []) + ([until] if until else []) if n in STAGE_NAMES]
    return max(names, key=STAGE_NAMES.index) if names else None


def run_pipeline(cfg: Config, only: list[str] | None = None, until: str | None = None,
                 force: list[str] | tuple[str, ...] = ()) -> dict[str, Manifest]:
    """The whole pipeline in this process, no Prefect: what tests and the flow's tasks share."""
    selected = select_stages(plan(cfg, last_needed(only, until)), only, until)
    preflight(selected, cfg, force)
    return {p.name: run_stage(p, cfg, force=p.name in force) for p in selected}
