"""Stage `reference`: reference Inception statistics (train shards or an ADM reference batch)."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage reference is not implemented yet")


def external_inputs(cfg: Config) -> dict[str, str]:
    return {}
