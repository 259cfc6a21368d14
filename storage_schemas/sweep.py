"""`<storage.root>/sweeps/<sweep-id[:16]>/`: what `srcflow sweep` measured over a grid of overrides x seeds.

Layout, schema_version 2 (every file written with `success.write_atomic`; `summary.json` last, so its presence
means the others are whole; 2: per-metric n, dropped seeds, standard error and 95% t-interval):

    summary.json   SweepSummary: the definition (config, --set, grid, seeds, seed keys, until), one entry per
                   point (its overrides, seed, the fingerprint of every stage it used, its headline metrics from
                   those stages' `_SUCCESS.json`, state done|failed and the error) and per group (the points of
                   one grid value, all seeds: n done, the failed seeds, and per metric: its own n (the done
                   seeds with a finite value), the done seeds dropped from it (NaN / inf or missing), mean,
                   std, standard error and the 95% Student-t interval of the mean);
    summary.csv    one row per point: index, state, seed, each grid key, each metric, error;
    groups.csv     one row per group: each grid key, n, per metric <metric>_n, _mean, _std, _sem, _ci95_low,
                   _ci95_high, _dropped_seeds;
    summary.md     the group table, the seeds dropped from it, the point table and the plots;
    plots/<metric>-vs-<grid key>.png   mean and 95% t-interval over seeds against each numeric grid key (one
                   line per CFG scale and per value of the other grid keys; no error bar where n = 1);
    runs.jsonl     one SweepRun line per sweep run that built anything or had a failure: what the shared phase
                   and each point built (never rewritten by a run that built nothing; appended under
                   `.runs.jsonl.lock`).

Metric names are `<stage>.<key of the stage's metrics>`, e.g. `train_flow.val_bits_per_dim`,
`evaluate.fid_cfg1.0`, `fit_src.src/feature_mse`. std is the sample standard deviation (n - 1), sem = std / sqrt(n),
ci95 = mean -+ t(0.975, n - 1) sem; all three null for n < 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from storage_schemas import SchemaError, check_version, read_json_model
from storage_schemas.success import write_atomic

SCHEMA_VERSION = 2
SWEEPS_DIR = "sweeps"  # under storage.root
SUMMARY = "summary.json"
RUNS = "runs.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SweepPoint(_Strict):
    index: int
    overrides: dict[str, Any]  # grid key -> value (tied keys each get the value)
    seed: int
    fingerprints: dict[str, str]  # stage -> full fingerprint
    metrics: dict[str, float | None]  # null: not finite
    state: Literal["done", "failed"]
    error: str | None = None


class SweepGroup(_Strict):
    overrides: dict[str, Any]
    n: int  # done points
    failed_seeds: list[int]  # seeds whose point failed
    count: dict[str, int]  # per metric: the n of its statistics (done seeds with a finite value)
    dropped: dict[str, list[int]]  # per metric: done seeds without a finite value (NaN / inf, or not reported)
    mean: dict[str, float]
    std: dict[str, float | None]  # null for n < 2
    sem: dict[str, float | None]  # standard error of the mean, std / sqrt(n); null for n < 2
    ci95: dict[str, list[float] | None]  # [low, high]: the 95% Student-t interval of the mean; null for n < 2


class SweepSummary(_Strict):
    schema_version: int = SCHEMA_VERSION
    sweep: str  # the sweep id (full fingerprint of the definition)
    config: str
    sets: list[str]
    grid: dict[str, list[Any]]  # "k" or "k1,k2" (tied keys) -> values
    seeds: int
    seed_keys: list[str]
    until: str | None
    points: list[SweepPoint]
    groups: list[SweepGroup]
    plots: list[str]  # paths relative to the sweep directory


class SharedBuild(_Strict):
    stage: str
    fingerprint: str
    points: list[int]
    error: str | None = None


class PointRun(_Strict):
    index: int
    state: Literal["done", "failed"]
    built: list[str]  # the stages this point's run built (shared ones are in SweepRun.shared)
    seconds: float
    error: str | None = None


class SweepRun(_Strict):
    schema_version: int = SCHEMA_VERSION
    started: str
    seconds: float
    parallel: int
    prefect: bool
    shared: list[SharedBuild]
    points: list[PointRun]


def sweep_dir(root: str | Path, sweep_id: str) -> Path:
    return Path(root).absolute() / SWEEPS_DIR / sweep_id[:16]


def write_summary(directory: Path, summary: SweepSummary) -> bool:
    """Write summary.json atomically unless it already holds these bytes; returns whether it wrote."""
    text = summary.model_dump_json(indent=2)
    return write_if_changed(Path(directory) / SUMMARY, text)


def write_if_changed(path: Path, data: str | bytes) -> bool:
    data = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return True


def read_summary(directory: Path) -> SweepSummary:
    """summary.json of a sweep directory; SchemaError (one line naming the file) for another layout or version."""
    path = Path(directory) / SUMMARY
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the sweep has not been summarised (run it)")
    return read_json_model(path, SweepSummary, SCHEMA_VERSION, "sweep summary")


def append_run(directory: Path, run: SweepRun) -> None:
    """Add one line to runs.jsonl (the whole file rewritten atomically), holding `.runs.jsonl.lock` from the read to
    the rename, so two sweeps that end at once both keep their line."""
    from filelock import FileLock

    path = Path(directory) / RUNS
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{RUNS}.lock")):
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = ""
        write_atomic(path, old + run.model_dump_json() + "\n")


def read_runs(directory: Path) -> list[SweepRun]:
    path = Path(directory) / RUNS
    if not path.exists():
        return []
    runs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            raw = json.loads(line)
            check_version(f"{path}:{i}", raw.get("schema_version"), SCHEMA_VERSION)
            runs.append(SweepRun.model_validate(raw))
        except (json.JSONDecodeError, AttributeError, ValidationError) as e:
            raise SchemaError(f"{path}:{i}: unreadable sweep run ({type(e).__name__})") from None
    return runs
