"""Stage `train_flow`: train the class-conditional TARFlow on the codes under constant noise."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage train_flow is not implemented yet")
