"""The stage table: what each stage reads, what determines its output, in run order.

A stage is a plain function `run(cfg, upstream, out) -> metrics`:
- `cfg`: the whole validated Config (the stage reads the sections listed below);
- `upstream`: stage name -> Manifest of each upstream artifact it reads (`.dir` is its folder);
- `out`: a StageOutput whose `.path` it writes into. It must be safe to call again on a partial
  output directory (resume or rebuild); the runner writes `_SUCCESS.json` after it returns.

`sections` are the config sections or dotted fields whose semantic values enter the fingerprint;
a field declared `added(...)` in pipeline/config.py (a key that came after outputs were stored) enters
only when it differs from its default, so stored outputs keep their fingerprints (pipeline.config.semantic_of);
`external` returns digests of inputs outside the store (weights, the dataset listing); a stage
whose `enabled` is false is left out, and so is it from its consumers' upstream.

`code_version` enters the fingerprint: bump it when a stage's code computes a different output, so
stored outputs rebuild. The table imports no stage module (they import torch): `Stage.run` imports
`stages.<name>` when the stage runs, and the external inputs come from the torch-free `stages.inputs`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.artifacts import StageOutput
from pipeline.config import Config
from stages import inputs
from storage_schemas.success import Manifest


@dataclass(frozen=True)
class Stage:
    name: str
    code_version: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    external: Callable[[Config], dict[str, str]] = field(default=lambda cfg: {})
    enabled: Callable[[Config], bool] = field(default=lambda cfg: True)

    def run(self, cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
        return importlib.import_module(f"stages.{self.name}").run(cfg, upstream, out)


STAGES: tuple[Stage, ...] = (
    Stage("shard", "1",
          sections=("data.layout", "data.classes", "data.max_per_class", "shard"),
          external=inputs.dataset_inputs),
    Stage("encode", "1",
          sections=("data.resolution", "encoder", "encode.views", "encode.precision", "encode.dtype",
                    "encode.rows_per_shard",
                    "encode.rows_per_chunk", "encode.subset_per_class", "encode.decode"),
          upstream=("shard",), external=inputs.encoder_inputs),
    Stage("fit_decoder", "2",  # 2: L1 on [0, 1] pixels, RAE's warmup + cosine to a floor
          sections=("decoder", "fit_decoder"),
          upstream=("shard", "encode"), external=inputs.lpips_inputs, enabled=inputs.decoder_enabled),
    Stage("fit_src", "1",
          sections=("src", "encode.stats"),
          upstream=("shard", "encode", "fit_decoder"),
          external=lambda cfg: {**inputs.decoder_inputs(cfg), **inputs.stats_inputs(cfg)}),
    Stage("compress", "1",
          sections=("compress",),
          upstream=("shard", "encode", "fit_src")),
    Stage("train_flow", "1",
          sections=("flow", "train"),
          upstream=("compress",)),
    Stage("sample", "2",  # 2: labels in a seeded order, arr_1 (samples schema 2)
          sections=("sample", "decoder"),
          upstream=("encode", "fit_src", "compress", "train_flow", "fit_decoder"), external=inputs.decoder_inputs),
    Stage("reference", "2",  # 2: mu_s/sigma_s (reference schema 2)
          sections=("reference", "data.resolution", "evaluate.inception_dtype"),
          upstream=("shard",), external=inputs.reference_inputs),
    Stage("evaluate", "3",  # 2: sfid (metrics.json schema 2); 3: the flow as a classifier (schema 3)
          sections=("evaluate.kid_subset_size", "evaluate.bayes_max_images", "evaluate.inception_dtype"),
          upstream=("compress", "train_flow", "sample", "reference"), external=inputs.evaluate_inputs),
)

STAGE_NAMES = tuple(s.name for s in STAGES)
