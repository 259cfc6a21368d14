"""Stage `compress`: features (or images) -> `codes.zarr`, the compact codes the flow learns."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage compress is not implemented yet")
