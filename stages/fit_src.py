"""Stage `fit_src`: fit the Semantic Representation Compressor (PCA or learned) on the normalized features."""

from __future__ import annotations

from pipeline.artifacts import StageOutput
from pipeline.config import Config

CODE_VERSION = "1"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage fit_src is not implemented yet")
