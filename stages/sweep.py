"""Ablations and seeds: a grid of config overrides x seeds over one artifact store, and what it measured.

`expand` turns a sweep definition (config, --set, --grid, --seeds, --seed-keys, --until) into points, each a
validated Config planned against the store, and checks all of it before any work. `execute` runs them: first
every output that two or more points share and that is not done (in stage order, each built once), then the
points, each running its remaining stages with `stages.runner.run_stage` (whose per-output lock keeps two
runs that meet on one output from building it twice). `write_results` reads each point's headline metrics
from its stages' `_SUCCESS.json` and writes `<storage.root>/sweeps/<id>/` (storage_schemas/sweep.py).

How points run is the caller's: `in_process` here (one point at a time), or the Prefect flow in flows/sweep.py
(points in a process pool). No Prefect import here.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.artifacts import ArtifactStore, fingerprint, now
from pipeline.config import Config, ConfigError, load_config, semantic_values
from pipeline.progress import progress, set_mode
from stages import STAGE_NAMES
from stages.runner import PlannedStage, check_stage_names, last_needed, plan, preflight, run_stage, select_stages
from storage_schemas.success import read_manifest
from storage_schemas.sweep import (
    SUMMARY,
    PointRun,
    SharedBuild,
    SweepGroup,
    SweepPoint,
    SweepRun,
    SweepSummary,
    append_run,
    sweep_dir,
    write_if_changed,
    write_summary,
)

CODE_VERSION = "1"  # enters the sweep id
DEFAULT_SEED_KEYS = ("train.seed", "sample.seed")  # the flow and its samples: upstream stages shared across seeds
# the headline metrics of each stage's `_SUCCESS.json`; evaluate's PER_CFG ones come once per CFG scale (`fid_cfg1.0`)
HEADLINE = {"fit_decoder": ("psnr_val",),
            "fit_src": ("src/feature_mse", "src/psnr_vs_rae", "src/psnr_vs_image"),
            "train_flow": ("val_bits_per_dim",),
            "evaluate": ("bayes_accuracy",)}
PER_CFG = ("fid", "sfid", "is", "kid", "precision", "recall")
CFG_KEY = re.compile(r"^(?P<name>[a-z]+)_cfg(?P<w>.+)$")
# a stage stopped by SIGTERM / SIGINT (it checkpointed): the whole sweep stops, and resumes when run again
STOPS = ("pipeline.training.TrainingStopped", "pipeline.distributed.LaunchStopped")


# --- the definition -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """One --grid: keys that move together, and their values (as written, and parsed as YAML)."""

    keys: tuple[str, ...]
    texts: tuple[str, ...]
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return ",".join(self.keys)

    @property
    def numeric(self) -> bool:
        """Worth a plot against: two or more values, all numbers."""
        return len(self.values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in self.values)


def split_values(text: str) -> list[str]:
    """`4,8` -> ['4', '8']; a comma inside [], {} or quotes stays: `[0.0,1.0],[2.0]` -> ['[0.0,1.0]', '[2.0]']."""
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)  # as `--set` does (pipeline.config.apply_override)
    except yaml.YAMLError:
        return text


def parse_grid(text: str) -> Grid:
    """`src.dim=4,8` or `src.noise_sigma,flow.noise_sigma=0.1,0.2` (each value given to every key)."""
    if "=" not in text:
        raise ValueError(f"--grid {text!r} must look like KEY=V1,V2 (or K1,K2=V1,V2 for keys that move together)")
    keys_text, _, values_text = text.partition("=")
    keys = tuple(k.strip() for k in keys_text.split(","))
    texts = tuple(split_values(values_text))
    if not all(keys) or not all(texts):
        raise ValueError(f"--grid {text!r}: an empty key or value; write KEY=V1,V2")
    values = tuple(parse_value(t) for t in texts)
    seen = set()
    for t, v in zip(texts, values, strict=True):
        if (canonical := json.dumps(jsonable(v), sort_keys=True)) in seen:
            raise ValueError(f"--grid {keys_text}: the value {t} is listed twice")
        seen.add(canonical)
    return Grid(keys, texts, values)


def check_key(dotted: str, option: str) -> None:
    """A semantic config key (a value, not a section), or a one-line error naming it and the keys its section has.
    An operational key changes no output: every point would be the same one."""
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        known = {f.alias or name: f for name, f in model.model_fields.items()}
        fields = {**known, **model.model_fields}  # `compress.from` or `compress.source`
        where = ".".join(parts[:i])
        if part not in fields:
            raise ValueError(f"{option}: unknown config key {dotted}; known{' in ' + where if where else ''}: "
                             f"{', '.join(known)}")
        annotation = fields[part].annotation
        sections = [a for a in getattr(annotation, "__args__", (annotation,))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if i < len(parts) - 1 and not sections:
            raise ValueError(f"{option}: {'.'.join(parts[:i + 1])} is a value, so {dotted} is not a config key")
        if i == len(parts) - 1 and sections:
            raise ValueError(f"{option}: {dotted} is a section; name one of its keys: "
                             f"{', '.join(f.alias or n for n, f in sections[0].model_fields.items())}")
        if (fields[part].json_schema_extra or {}).get("operational") or parts[0] in ("storage", "runtime"):
            raise ValueError(f"{option}: {dotted} is operational: it changes no stage's output, so every point would "
                             "be the same; use --set for it")
        model = sections[0] if sections else model


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass
class Point:
    index: int
    choice: dict[str, str]  # grid name ("k" or "k1,k2") -> the value as written
    overrides: dict[str, Any]  # each grid key -> its value
    seed: int
    seed_keys: tuple[str, ...]
    cfg: Config
    planned: list[PlannedStage]  # the stages it uses, up to --until

    @property
    def sets(self) -> list[str]:
        texts = {k: t for name, t in self.choice.items() for k in name.split(",")}
        return [f"{k}={t}" for k, t in texts.items()] + [f"{k}={self.seed}" for k in self.seed_keys]

    @property
    def label(self) -> str:
        return " ".join([f"{name}={t}" for name, t in self.choice.items()] + [f"seed={self.seed}"])

    @property
    def fingerprints(self) -> dict[str, str]:
        return {p.name: p.fingerprint for p in self.planned}

    def stage(self, name: str) -> PlannedStage:
        return next(p for p in self.planned if p.name == name)


@dataclass
class Sweep:
    id: str
    config: str
    sets: list[str]
    grids: list[Grid]
    seeds: int
    seed_keys: tuple[str, ...]
    until: str | None
    base: Config
    points: list[Point] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return sweep_dir(self.base.storage.root, self.id)

    @property
    def todo(self) -> bool:
        """Whether any point has a stage that is not done."""
        return any(p.state != "done" for pt in self.points for p in pt.planned)


def expand(config: str, sets: Iterable[str] = (), grids: Iterable[str] = (), seeds: int = 1,
           seed_keys: Iterable[str] | str = DEFAULT_SEED_KEYS, until: str | None = None, parallel: int = 1) -> Sweep:
    """Every point of the sweep, each config loaded and planned (with `preflight`'s checks), before any work: a bad
    option, key or value is a one-line error naming it."""
    if seeds < 1:
        raise ValueError(f"--seeds: {seeds}; a sweep needs at least 1 seed")
    if parallel < 1:
        raise ValueError(f"--parallel: {parallel}; at least 1 point runs at a time")
    if until is not None:
        check_stage_names([until], "--until")
    if isinstance(seed_keys, str):
        seed_keys = seed_keys.split(",")
    seed_keys = tuple(dict.fromkeys(k.strip() for k in seed_keys if k.strip()))
    if seeds > 1 and not seed_keys:
        raise ValueError(f"--seed-keys: none given, so the {seeds} seeds would all be the same point")
    for key in seed_keys:
        check_key(key, "--seed-keys")
    sets, parsed = list(sets), [parse_grid(g) for g in grids]
    swept: set[str] = set()
    for g in parsed:
        for key in g.keys:
            check_key(key, "--grid")
            if key in swept:
                raise ValueError(f"--grid: {key} is in two grids; tie keys in one grid (K1,K2=V1,V2) instead")
            if key in seed_keys:
                raise ValueError(f"--seed-keys: {key} is also a --grid key; drop it from one of them")
            swept.add(key)
    base = load_config(config, sets)
    definition = {"base": semantic_values(base), "grid": [[list(g.keys), jsonable(list(g.values))] for g in parsed],
                  "seeds": seeds, "seed_keys": list(seed_keys), "until": until}
    sweep = Sweep(fingerprint("sweep", CODE_VERSION, definition, {}, {}), str(config), sets, parsed, seeds, seed_keys,
                  until, base)
    for combo in itertools.product(*[range(len(g.values)) for g in parsed]):
        choice = {g.name: g.texts[i] for g, i in zip(parsed, combo, strict=True)}
        overrides = {k: jsonable(g.values[i]) for g, i in zip(parsed, combo, strict=True) for k in g.keys}
        for seed in range(seeds):
            pt = Point(len(sweep.points), choice, overrides, seed, seed_keys, base, [])
            try:
                pt.cfg = load_config(config, sets + pt.sets)
            except ConfigError as e:
                raise ConfigError(f"point {pt.label}: {e}") from None
            try:
                pt.planned = select_stages(plan(pt.cfg, last_needed(None, until)), None, until)
                preflight(pt.planned, pt.cfg)
            except ValueError as e:
                raise ValueError(f"point {pt.label}: {e}") from None
            except OSError as e:
                raise type(e)(f"point {pt.label}: {e}") from None
            sweep.points.append(pt)
    return sweep


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """An output two or more points need and that is not done: built once, before the points run."""

    stage: str
    fingerprint: str
    point: int  # the first point that needs it: its config builds it
    points: tuple[int, ...]


class PointsFailed(RuntimeError):
    """The end of a sweep in which points failed (the others ran; the summary lists the failures)."""


class PointError(RuntimeError):
    """A point that failed, in one line naming the stage; `built`: what it had built before (picklable, so it
    crosses a process pool)."""

    def __init__(self, message: str, built: list[str] | tuple[str, ...] = ()):
        super().__init__(message, list(built))

    def __str__(self) -> str:
        return self.args[0]

    @property
    def built(self) -> list[str]:
        return self.args[1]


def one_line(e: BaseException) -> str:
    text = next((line for line in str(e).strip().splitlines() if line.strip()), "")
    if isinstance(e, (ValueError, OSError, PointError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def stopped(e: BaseException) -> bool:
    return f"{type(e).__module__}.{type(e).__qualname__}" in STOPS


def shared_builds(sweep: Sweep) -> list[list[Build]]:
    """The outputs two or more points need that are not done, in waves of one stage each, in run order (an
    output's upstream is shared by the same points, so it is done or in an earlier wave)."""
    needs: dict[tuple[str, str], list[int]] = {}
    for pt in sweep.points:
        for p in pt.planned:
            if p.state != "done":
                needs.setdefault((p.name, p.fingerprint), []).append(pt.index)
    waves: dict[str, list[Build]] = {}
    for (stage, fp), points in needs.items():
        if len(points) > 1:
            waves.setdefault(stage, []).append(Build(stage, fp, points[0], tuple(points)))
    return [waves[s] for s in STAGE_NAMES if s in waves]


def run_point(cfg: Config, fingerprints: dict[str, str], until: str | None) -> dict:
    """One point's stages, in this process (planned again: what is done now is skipped). Returns {"built": the
    stages this call built, "seconds"}; a failure is a PointError naming the stage."""
    started, built = time.perf_counter(), []
    try:
        selected = select_stages(plan(cfg, last_needed(None, until)), None, until)
    except Exception as e:
        raise PointError(f"plan: {one_line(e)}") from e
    for p in selected:
        try:
            if p.fingerprint != fingerprints.get(p.name):
                raise RuntimeError(f"fingerprint changed between planning and running "
                                   f"({fingerprints.get(p.name, '')[:16]} -> {p.fingerprint[:16]}): an input changed")
            run_stage(p, cfg, built=built)
        except Exception as e:
            if stopped(e):
                raise
            raise PointError(f"{p.name}: {one_line(e)}", built) from e
    return {"built": built, "seconds": time.perf_counter() - started}


# yields (build, seconds, error, whether this run built it: another run may have, meanwhile)
BuildWave = Callable[[list[Build]], Iterator[tuple[Build, float, str | None, bool]]]
RunPoints = Callable[[list[Point]], Iterator[PointRun]]  # yields each point's run as it finishes


def in_process(sweep: Sweep) -> tuple[BuildWave, RunPoints]:
    """Shared outputs and points one at a time in this process (`srcflow sweep` without --parallel)."""

    def build_wave(wave: list[Build]) -> Iterator[tuple[Build, float, str | None, bool]]:
        for b in wave:
            pt, started, built = sweep.points[b.point], time.perf_counter(), []
            try:
                run_stage(pt.stage(b.stage), pt.cfg, built=built)
                yield b, time.perf_counter() - started, None, bool(built)
            except Exception as e:
                if stopped(e):
                    raise
                yield b, time.perf_counter() - started, one_line(e), False

    def run_points(points: list[Point]) -> Iterator[PointRun]:
        for pt in points:
            started = time.perf_counter()
            try:
                result = run_point(pt.cfg, pt.fingerprints, sweep.until)
                yield PointRun(index=pt.index, state="done", built=result["built"], seconds=result["seconds"])
            except PointError as e:
                yield PointRun(index=pt.index, state="failed", built=e.built, seconds=time.perf_counter() - started,
                               error=str(e))

    return build_wave, run_points


def execute(sweep: Sweep, build_wave: BuildWave, run_points: RunPoints, report: Callable[[str], None] = print,
            parallel: int = 1, prefect: bool = False) -> SweepRun:
    """The shared outputs (each once), then the points that still have work (upstream-first: in grid order), with
    one line per point as it finishes and a bar over the points. A failure fails its point (and, for a shared
    output, every point that needs it); the others go on."""
    started_at, started = now(), time.perf_counter()
    shared: list[SharedBuild] = []  # what this run built (or failed to): another run's builds are not claimed
    failed: dict[tuple[str, str], str] = {}
    built_shared: set[tuple[str, str]] = set()  # done now, by this run or another
    for wave in shared_builds(sweep):
        for b, seconds, error, built in build_wave(wave):
            if error or built:
                shared.append(SharedBuild(stage=b.stage, fingerprint=b.fingerprint, points=list(b.points),
                                          error=error))
            if error:
                failed[(b.stage, b.fingerprint)] = error
            else:
                built_shared.add((b.stage, b.fingerprint))
            report(f"{b.stage} ({b.fingerprint[:16]}, shared by {len(b.points)} points): "
                   + (f"failed: {error}" if error else f"built in {seconds:.1f} s" if built
                      else "done, built by another run meanwhile"))
    runs: dict[int, PointRun] = {}
    todo = []
    for pt in sweep.points:
        blocked = next((p.name for p in pt.planned if (p.name, p.fingerprint) in failed), None)
        if blocked:
            runs[pt.index] = PointRun(index=pt.index, state="failed", built=[], seconds=0.0,
                                      error=f"{blocked}: {failed[(blocked, pt.stage(blocked).fingerprint)]} (shared)")
        elif any(p.state != "done" and (p.name, p.fingerprint) not in built_shared for p in pt.planned):
            todo.append(pt)
        else:
            runs[pt.index] = PointRun(index=pt.index, state="done", built=[], seconds=0.0)
    store, finished = ArtifactStore(sweep.base.storage.root), 0
    with progress("sweep", len(sweep.points), "points") as meter:
        set_mode(False)  # one live display at a time: the stages log their throughput instead of drawing bars
        try:
            def finish(run: PointRun) -> None:
                nonlocal finished
                runs[run.index], finished = run, finished + 1
                meter.advance()
                report(f"[{finished}/{len(sweep.points)}] {point_line(sweep.points[run.index], run, store)}")

            for index in sorted(runs):
                finish(runs[index])
            for run in run_points(todo):
                finish(run)
        finally:
            set_mode(sweep.base.runtime.progress)
    return SweepRun(started=started_at.isoformat(), seconds=round(time.perf_counter() - started, 3),
                    parallel=parallel, prefect=prefect, shared=shared, points=[runs[i] for i in sorted(runs)])


def point_line(pt: Point, run: PointRun, store: ArtifactStore) -> str:
    if run.state == "failed":
        return f"{pt.label}: failed: {run.error}"
    what = f"done in {run.seconds:.1f} s, built {', '.join(run.built)}" if run.built else "done (nothing to run)"
    metrics = point_metrics(store, pt)
    shown = [f"{k.split('.', 1)[1]}={v:.4g}" for k, v in metrics.items() if v is not None and (
        k in ("train_flow.val_bits_per_dim", "evaluate.bayes_accuracy") or k.startswith("evaluate.fid_cfg"))]
    return f"{pt.label}: {what}" + (f" ({', '.join(shown)})" if shown else "")


# --- what the points measured -----------------------------------------------------------------------


def headline_metrics(stage: str, metrics: dict) -> dict[str, float | None]:
    """`<stage>.<key>` -> value for the stage's headline metrics (null when not finite)."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        per_cfg = CFG_KEY.match(key)
        headline = key in HEADLINE.get(stage, ()) or (stage == "evaluate" and per_cfg and per_cfg["name"] in PER_CFG)
        if headline and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{stage}.{key}"] = float(value) if math.isfinite(value) else None
    return out


def done_manifests(store: ArtifactStore, pt: Point, cache: dict | None = None) -> dict[str, Any]:
    """stage -> manifest of each of the point's outputs that is done (`cache`: one fast check per output)."""
    cache = {} if cache is None else cache
    for p in pt.planned:
        if (p.name, p.fingerprint) not in cache:
            done = store.check(p.name, p.fingerprint).state == "done"
            cache[(p.name, p.fingerprint)] = read_manifest(p.path) if done else None
    return {p.name: cache[(p.name, p.fingerprint)] for p in pt.planned if cache[(p.name, p.fingerprint)]}


def point_metrics(store: ArtifactStore, pt: Point) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, manifest in done_manifests(store, pt).items():
        out.update(headline_metrics(name, manifest.metrics))
    return out


def summarize(sweep: Sweep, errors: dict[int, str] | None = None, cache: dict | None = None) -> SweepSummary:
    """The summary of what the store holds for every point (a point is done when all its stages are)."""
    store, points = ArtifactStore(sweep.base.storage.root), []
    for pt in sweep.points:
        manifests = done_manifests(store, pt, cache)
        metrics: dict[str, float | None] = {}
        for name, manifest in manifests.items():
            metrics.update(headline_metrics(name, manifest.metrics))
        missing = next((p for p in pt.planned if p.name not in manifests), None)
        error = (errors or {}).get(pt.index)
        if missing is not None and error is None:
            error = f"{missing.name}: {store.check(missing.name, missing.fingerprint).state}"
        points.append(SweepPoint(index=pt.index, overrides=pt.overrides, seed=pt.seed, fingerprints=pt.fingerprints,
                                 metrics=metrics, state="done" if missing is None else "failed", error=error))
    return SweepSummary(sweep=sweep.id, config=sweep.config, sets=sweep.sets,
                        grid={g.name: jsonable(list(g.values)) for g in sweep.grids}, seeds=sweep.seeds,
                        seed_keys=list(sweep.seed_keys), until=sweep.until, points=points,
                        groups=group_stats(points), plots=[])


def group_stats(points: list[SweepPoint]) -> list[SweepGroup]:
    """Per group (the same overrides, all seeds): n done points and the failed seeds; per metric, over the done seeds
    with a finite value (its own n, the others listed as dropped): mean, sample std, standard error and the 95%
    Student-t interval of the mean (std, sem and interval null for one value)."""
    groups: dict[str, list[SweepPoint]] = {}
    for p in points:
        groups.setdefault(json.dumps(p.overrides, sort_keys=True), []).append(p)
    out = []
    for members in groups.values():
        done = [p for p in members if p.state == "done"]
        names = list(dict.fromkeys(k for p in done for k in p.metrics))
        stats: dict[str, dict] = {key: {} for key in ("count", "dropped", "mean", "std", "sem", "ci95")}
        for k in names:
            values = [p.metrics[k] for p in done if p.metrics.get(k) is not None]
            stats["count"][k] = len(values)
            stats["dropped"][k] = [p.seed for p in done if p.metrics.get(k) is None]
            if values:
                stats["mean"][k], stats["std"][k], stats["sem"][k], stats["ci95"][k] = mean_interval(values)
        out.append(SweepGroup(overrides=members[0].overrides, n=len(done),
                              failed_seeds=[p.seed for p in members if p.state == "failed"], **stats))
    return out


def mean_interval(values: list[float]) -> tuple[float, float | None, float | None, list[float] | None]:
    """(mean, sample std, standard error, 95% Student-t interval of the mean) of the values; all but the mean are
    None for one value (no spread is known)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None, None
    from scipy.stats import t

    std = statistics.stdev(values)
    sem = std / math.sqrt(len(values))
    half = float(t.ppf(0.975, len(values) - 1)) * sem
    return mean, std, sem, [mean - half, mean + half]


def group_label(overrides: dict[str, Any], grids: list[Grid], empty: str = "base config") -> str:
    text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    return " ".join(f"{g.name}={text(overrides[g.keys[0]])}" for g in grids) or empty


# --- the sweep directory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotSpec:
    name: str  # relative to the sweep directory
    metric: str  # e.g. evaluate.fid (its lines: one per CFG scale) or train_flow.val_bits_per_dim
    grid: Grid
    series: tuple[tuple[str | None, str], ...]  # (CFG scale or None, the metric's full name)


def plot_specs(summary: SweepSummary, grids: list[Grid]) -> list[PlotSpec]:
    """Each headline metric against each numeric grid (no matplotlib: the names are known before plotting)."""
    metrics: dict[str, list[tuple[str | None, str]]] = {}
    for name in dict.fromkeys(k for g in summary.groups for k in g.count):
        stage, _, key = name.partition(".")
        per_cfg = CFG_KEY.match(key)
        if per_cfg and per_cfg["name"] in PER_CFG:
            metrics.setdefault(f"{stage}.{per_cfg['name']}", []).append((per_cfg["w"], name))
        else:
            metrics.setdefault(name, []).append((None, name))
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]", "_", s)  # noqa: E731
    return [PlotSpec(f"plots/{safe(metric)}-vs-{safe(g.keys[0])}.png", metric, g, tuple(series))
            for g in grids if g.numeric for metric, series in metrics.items()]


def plot_lines(spec: PlotSpec, summary: SweepSummary, grids: list[Grid]) -> dict[str, list[tuple]]:
    """label -> sorted (grid value, mean, error below, error above, n) of each group: the 95% t-interval of the mean,
    NaN (no error bar) where a mean rests on one seed."""
    lines: dict[str, list[tuple]] = {}
    for group in summary.groups:
        others = group_label(group.overrides, [g for g in grids if g is not spec.grid], empty="")
        for cfg_scale, name in spec.series:
            if name in group.mean:
                label = ", ".join([others] * bool(others) + [f"cfg {cfg_scale}"] * (cfg_scale is not None))
                mean, ci = group.mean[name], group.ci95.get(name)
                low, high = (mean - ci[0], ci[1] - mean) if ci is not None else (math.nan, math.nan)
                lines.setdefault(label, []).append((group.overrides[spec.grid.keys[0]], mean, low, high,
                                                    group.count[name]))
    return {label: sorted(values) for label, values in lines.items()}


def render_plot(spec: PlotSpec, summary: SweepSummary, grids: list[Grid], standin: bool) -> bytes:
    """PNG (Agg): mean and 95% t-interval over seeds against the grid's values (no error bar on a mean of one seed),
    one line per CFG scale and per value of the other grids."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = plot_lines(spec, summary, grids)
    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, values in lines.items():
        x, y, low, high, _ = zip(*values, strict=True)
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=label or None)
    if all(isinstance(v, int) for v in spec.grid.values):
        ax.set_xticks(sorted(spec.grid.values))
    ax.set_xlabel(spec.grid.name)
    ax.set_ylabel(spec.metric)
    n = sorted({v[4] for values in lines.values() for v in values})
    ax.set_title(f"{spec.metric} vs {spec.grid.keys[0]}: mean, 95% t-interval over seeds (n = {', '.join(map(str, n))})"
                 + ("\nstand-in Inception: not an FID of the method" if standin and spec.metric.startswith(
                     ("evaluate.fid", "evaluate.sfid", "evaluate.is", "evaluate.kid", "evaluate.precision",
                      "evaluate.recall")) else ""), fontsize=8)
    if any(lines):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def uses_standin(sweep: Sweep, cache: dict | None = None) -> bool:
    """Whether any point's evaluate ran with stand-in Inception weights (its numbers are labelled so)."""
    store = ArtifactStore(sweep.base.storage.root)
    return any(m.metrics.get("inception_weights") == "stand-in" for pt in sweep.points
               for name, m in done_manifests(store, pt, cache).items() if name == "evaluate")


def points_csv(summary: SweepSummary) -> str:
    keys = list(dict.fromkeys(k for p in summary.points for k in p.overrides))
    metrics = list(dict.fromkeys(k for p in summary.points for k in p.metrics))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["point", "state", "seed", *keys, *metrics, "error"])
    for p in summary.points:
        writer.writerow([p.index, p.state, p.seed, *[json.dumps(p.overrides.get(k)) for k in keys],
                         *["" if p.metrics.get(m) is None else p.metrics[m] for m in metrics], p.error or ""])
    return buf.getvalue()


GROUP_COLUMNS = ("n", "mean", "std", "sem", "ci95_low", "ci95_high", "dropped_seeds")


def groups_csv(summary: SweepSummary) -> str:
    keys = list(dict.fromkeys(k for g in summary.groups for k in g.overrides))
    metrics = list(dict.fromkeys(k for g in summary.groups for k in g.count))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "n", *[f"{m}_{s}" for m in metrics for s in GROUP_COLUMNS]])
    for g in summary.groups:
        cells = []
        for m in metrics:
            ci = g.ci95.get(m) or ("", "")
            cells += [g.count.get(m, 0), g.mean.get(m, ""), _blank(g.std.get(m)), _blank(g.sem.get(m)), *ci,
                      " ".join(map(str, g.dropped.get(m, [])))]
        writer.writerow([*[json.dumps(g.overrides.get(k)) for k in keys], g.n, *cells])
    return buf.getvalue()


def _blank(value: float | None) -> float | str:
    return "" if value is None else value


def mean_std(group: SweepGroup, metric: str) -> str:
    """`mean ± std`, with `(n of N)` where seeds were dropped from the metric (its NaN ones, or failed points)."""
    if metric not in group.count:
        return ""
    seeds = group.n + len(group.failed_seeds)
    n = group.count[metric]
    cell = "n/a" if metric not in group.mean else f"{group.mean[metric]:.4g}"
    std = group.std.get(metric)
    return cell + (f" ± {std:.2g}" if std is not None else "") + (f" (n={n} of {seeds})" if n < seeds else "")


def dropped_lines(summary: SweepSummary, grids: list[Grid]) -> list[str]:
    """One line per group that lost seeds: the failed points, and per metric the done seeds without a finite value."""
    lines = []
    for g in summary.groups:
        parts = [f"seeds {', '.join(map(str, g.failed_seeds))} failed"] if g.failed_seeds else []
        parts += [f"{m}: seeds {', '.join(map(str, seeds))} not finite" for m, seeds in g.dropped.items() if seeds]
        if parts:
            lines.append(f"- {group_label(g.overrides, grids)}: " + "; ".join(parts))
    return lines


def group_table(summary: SweepSummary, grids: list[Grid]) -> list[dict]:
    """One row per group, each metric as `mean ± std` (the Prefect table artifact)."""
    metrics = list(dict.fromkeys(k for g in summary.groups for k in g.count))
    return [{"group": group_label(g.overrides, grids), "n": g.n, **{m: mean_std(g, m) for m in metrics}}
            for g in summary.groups]


def summary_markdown(summary: SweepSummary, grids: list[Grid], standin: bool) -> str:
    """The report: definition, the groups (one column each: mean ± std over seeds), the points, the plots (linked
    relative to the sweep directory)."""
    grid = "; ".join(f"`{k}` = {', '.join(json.dumps(v) for v in values)}" for k, values in summary.grid.items())
    lines = [f"# srcflow sweep {summary.sweep[:16]}", "",
             f"Config `{summary.config}`" + (f", `--set {' '.join(summary.sets)}`" if summary.sets else "")
             + f"; grid {grid or '(none)'}; {summary.seeds} seed(s) on {', '.join(summary.seed_keys) or '(no key)'}"
             + f"; up to {summary.until or STAGE_NAMES[-1]}.", ""]
    if standin:
        lines += ["**Stand-in Inception weights**: the FID / IS / KID / precision / recall here check the code path "
                  "and are not FIDs of the method.", ""]
    metrics = list(dict.fromkeys(k for g in summary.groups for k in g.count))
    lines += ["## Groups (mean ± std over seeds)", "",
              "| metric | " + " | ".join(f"{group_label(g.overrides, grids)} (n={g.n})" for g in summary.groups) + " |",
              "|---|" + "---|" * len(summary.groups)]
    lines += [f"| {m} | " + " | ".join(mean_std(g, m) for g in summary.groups) + " |" for m in metrics]
    lines += ["", "Standard errors and 95% Student-t intervals of the means: `groups.csv`, `summary.json`."]
    dropped = dropped_lines(summary, grids)
    if dropped:
        lines += ["", "## Seeds left out of the statistics", "", *dropped]
    lines += ["", "## Points", "", "| # | overrides | seed | state | error |", "|---|---|---|---|---|"]
    lines += [f"| {p.index} | {group_label(p.overrides, grids)} | {p.seed} | {p.state} | {p.error or ''} |"
              for p in summary.points]
    if summary.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in summary.plots]
    return "\n".join(lines) + "\n"


def write_results(sweep: Sweep, run: SweepRun | None = None) -> SweepSummary:
    """Write `<storage.root>/sweeps/<id>/`: plots, summary.csv, groups.csv, summary.md, then summary.json (each
    atomically, and only when its bytes change: a rerun with nothing to do writes nothing); and a runs.jsonl line
    when `run` built anything or failed."""
    cache: dict = {}
    summary = summarize(sweep, {p.index: p.error for p in run.points if p.error} if run else None, cache)
    specs = plot_specs(summary, sweep.grids)
    summary.plots = [s.name for s in specs]
    d = sweep.dir
    text = summary.model_dump_json(indent=2)
    whole = all((d / name).is_file() for name in (SUMMARY, "summary.csv", "groups.csv", "summary.md", *summary.plots))
    if not (whole and (d / SUMMARY).read_text() == text):
        standin = uses_standin(sweep, cache)
        for spec in specs:
            write_if_changed(d / spec.name, render_plot(spec, summary, sweep.grids, standin))
        write_if_changed(d / "summary.csv", points_csv(summary))
        write_if_changed(d / "groups.csv", groups_csv(summary))
        write_if_changed(d / "summary.md", summary_markdown(summary, sweep.grids, standin))
        write_summary(d, summary)
    if run is not None and (run.shared or any(p.built or p.error for p in run.points)):
        append_run(d, run)
    return summary


# --- compare ----------------------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[dict]:
    return [{"key": k, "a": a.get(k), "b": b.get(k)} for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def compare_configs(cfg_a: Config, cfg_b: Config) -> dict:
    """Two configs against one store: the semantic fields that differ, every stage's fingerprint and state on each
    side (shared: the same output), and the headline metrics of the done ones. Runs nothing."""
    pa, pb = {p.name: p for p in plan(cfg_a)}, {p.name: p for p in plan(cfg_b)}
    stages = []
    for name in STAGE_NAMES:
        a, b = pa.get(name), pb.get(name)
        if a or b:
            stages.append({"stage": name, "a": a.fingerprint if a else None, "b": b.fingerprint if b else None,
                           "a_state": a.state if a else "disabled", "b_state": b.state if b else "disabled",
                           "shared": bool(a and b and a.fingerprint == b.fingerprint)})
    side = lambda planned: {k: v for p in planned.values() if p.state == "done"  # noqa: E731
                            for k, v in headline_metrics(p.name, read_manifest(p.path).metrics).items()}
    return {"differ": differences(flatten(semantic_values(cfg_a)), flatten(semantic_values(cfg_b))),
            "shared": [s["stage"] for s in stages if s["shared"]], "stages": stages,
            "metrics": metric_rows(side(pa), side(pb))}


def lineage(out_dir: Path) -> dict[str, Any]:
    """stage -> manifest of a stage output and every upstream output it read (those still in its root)."""
    manifest = read_manifest(find_output(out_dir))
    root, found, todo = manifest.dir.parents[1], {}, [manifest]
    while todo:
        m = todo.pop()
        found[m.stage] = m
        for stage, fp in m.upstream.items():
            path = ArtifactStore(root).stage_dir(stage, fp)
            if stage not in found and (path / "_SUCCESS.json").is_file():
                todo.append(read_manifest(path))
    return found


def find_output(path: Path) -> Path:
    path = Path(path).absolute()
    for d in (path, *path.parents):
        if (d / "_SUCCESS.json").is_file():
            return d
    raise FileNotFoundError(f"{path}: not inside a complete stage output (no _SUCCESS.json in it or above it)")


def compare_outputs(path_a: Path, path_b: Path) -> dict:
    """Two stage outputs: the semantic fields of their lineages that differ, the stages they share (the same
    fingerprint), and their headline metrics (every numeric metric of the two outputs themselves)."""
    la, lb = lineage(path_a), lineage(path_b)
    fields = lambda lin: {k: v for m in lin.values() for k, v in flatten(m.semantic_config).items()}  # noqa: E731
    stages = [{"stage": s, "a": la[s].fingerprint if s in la else None, "b": lb[s].fingerprint if s in lb else None,
               "a_state": "done" if s in la else "-", "b_state": "done" if s in lb else "-",
               "shared": s in la and s in lb and la[s].fingerprint == lb[s].fingerprint}
              for s in STAGE_NAMES if s in la or s in lb]
    a_out, b_out = read_manifest(find_output(path_a)), read_manifest(find_output(path_b))

    def side(lin: dict, out) -> dict:
        values = {k: v for m in lin.values() for k, v in headline_metrics(m.stage, m.metrics).items()}
        values.update({f"{out.stage}.{k}": v for k, v in out.metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return values

    return {"differ": differences(fields(la), fields(lb)), "shared": [s["stage"] for s in stages if s["shared"]],
            "stages": stages, "metrics": metric_rows(side(la, a_out), side(lb, b_out))}


def metric_rows(a: dict, b: dict) -> list[dict]:
    return [{"metric": k, "a": a.get(k), "b": b.get(k)} for k in dict.fromkeys([*a, *b])]
