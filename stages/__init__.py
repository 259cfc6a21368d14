"""The stage table: what each stage reads, what determines its output, in run order.

A stage is a plain function `run(cfg, upstream, out) -> metrics`:
- `cfg`: the whole validated Config (the stage reads the sections listed below);
- `upstream`: stage name -> Manifest of each upstream artifact it reads (`.dir` is its folder);
- `out`: a StageOutput whose `.path` it writes into. It must be safe to call again on a partial
  output directory (resume or rebuild); the runner writes `_SUCCESS.json` after it returns.

`sections` are the config sections or dotted fields whose semantic values enter the fingerprint;
`external` returns digests of inputs outside the store (weights, the dataset listing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config
from stages import shard


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    code_version: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    external: Callable[[Config], dict[str, str]] = field(default=lambda cfg: {})
    enabled: Callable[[Config], bool] = field(default=lambda cfg: True)


STAGES: tuple[Stage, ...] = (
    Stage("shard", shard.run, shard.CODE_VERSION,
          sections=("data.layout", "data.classes", "data.max_per_class", "shard"),
          external=shard.external_inputs),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
