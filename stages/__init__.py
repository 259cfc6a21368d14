"""The stage table: what each stage reads, what determines its output, in run order.

A stage is a plain function `run(cfg, upstream, out) -> metrics`:
- `cfg`: the whole validated Config (the stage reads the sections listed below);
- `upstream`: stage name -> Manifest of each upstream artifact it reads (`.dir` is its folder);
- `out`: a StageOutput whose `.path` it writes into. It must be safe to call again on a partial
  output directory (resume or rebuild); the runner writes `_SUCCESS.json` after it returns.

`sections` are the config sections or dotted fields whose semantic values enter the fingerprint;
`external` returns digests of inputs outside the store (weights, the dataset listing); a stage
whose `enabled` is false is left out, and so is it from its consumers' upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config
from stages import compress, encode, evaluate, fit_decoder, fit_src, reference, sample, shard, train_flow


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
    Stage("encode", encode.run, encode.CODE_VERSION,
          sections=("data.resolution", "encoder", "encode.views", "encode.precision", "encode.dtype", "encode.rows_per_shard",
                    "encode.rows_per_chunk", "encode.subset_per_class"),
          upstream=("shard",), external=encode.external_inputs),
    Stage("fit_decoder", fit_decoder.run, fit_decoder.CODE_VERSION,
          sections=("decoder", "fit_decoder"),
          upstream=("shard", "encode"), external=fit_decoder.training_inputs, enabled=fit_decoder.enabled),
    Stage("fit_src", fit_src.run, fit_src.CODE_VERSION,
          sections=("src", "encode.stats"),
          upstream=("shard", "encode", "fit_decoder"), external=lambda cfg: {**fit_decoder.external_inputs(cfg),
                                                                              **encode.stats_inputs(cfg)}),
    Stage("compress", compress.run, compress.CODE_VERSION,
          sections=("compress",),
          upstream=("shard", "encode", "fit_src")),
    Stage("train_flow", train_flow.run, train_flow.CODE_VERSION,
          sections=("flow", "train"),
          upstream=("compress",)),
    Stage("sample", sample.run, sample.CODE_VERSION,
          sections=("sample", "decoder"),
          upstream=("encode", "fit_src", "compress", "train_flow", "fit_decoder"), external=fit_decoder.external_inputs),
    Stage("reference", reference.run, reference.CODE_VERSION,
          sections=("reference", "data.resolution"),
          upstream=("shard",), external=reference.external_inputs),
    Stage("evaluate", evaluate.run, evaluate.CODE_VERSION,
          sections=("evaluate.kid_subset_size",),
          upstream=("sample", "reference"), external=evaluate.external_inputs),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
