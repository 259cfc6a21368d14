"""Stage `evaluate`: FID, IS, KID, precision/recall of the samples against the reference statistics."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage evaluate is not implemented yet")


def external_inputs(cfg: Config) -> dict[str, str]:
    return {}
