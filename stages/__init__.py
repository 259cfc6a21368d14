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
    Stage("fit_src", "2",  # 2: src.json decoder_noise_sigma (0 for PCA); strict fp32 after encode's TF32 forward
          sections=("src", "encode.stats"),
          upstream=("shard", "encode", "fit_decoder"),
          external=lambda cfg: {**inputs.decoder_inputs(cfg), **inputs.stats_inputs(cfg)}),
    Stage("compress", "2",  # 2: the SRC encode in strict fp32 on CUDA, never in the TF32 an encode left behind
          sections=("compress",),
          upstream=("shard", "encode", "fit_src")),
    Stage("train_flow", "2",  # 2: flow.json classes (the trained labels); held-out bits/dim in strict fp32
          sections=("flow", "train"),
          upstream=("compress",)),
    Stage("sample", "3",  # 2: labels in a seeded order, arr_1 (samples schema 2); 3: the trained classes only,
          # denoise auto, Jacobi passes in fp32, pixels truncated, the sampling record (samples schema 3)
          sections=("sample", "decoder"),
          upstream=("encode", "fit_src", "compress", "train_flow", "fit_decoder"), external=inputs.decoder_inputs),
    Stage("reference", "2",  # 2: mu_s/sigma_s (reference schema 2)
          sections=("reference", "data.resolution", "evaluate.dinov2_weights", "evaluate.inception_dtype"),
          upstream=("shard",), external=inputs.reference_inputs),
    Stage("evaluate", "4",  # 2: sfid (metrics.json schema 2); 3: the flow as a classifier (schema 3);
          # 4: how the samples were made (schema 4), the Bayes rule over the trained classes
          sections=("evaluate.kid_subset_size", "evaluate.bayes_max_images", "evaluate.dinov2_weights",
                    "evaluate.inception_dtype"),
          upstream=("compress", "train_flow", "sample", "reference"), external=inputs.evaluate_inputs),
)

STAGE_NAMES = tuple(s.name for s in STAGES)
