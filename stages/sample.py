"""Stage `sample`: class-balanced samples: flow inverse (CFG) -> SRC decoder -> RAE decoder -> pixels."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage sample is not implemented yet")
