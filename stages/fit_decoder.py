"""Stage `fit_decoder`: train the RAE decoder on (features, images) when no released decoder is given.

Also where every later stage gets "the RAE decoder" from: the released checkpoint named by
`decoder.weights`, or this stage's EMA weights (`decoder.safetensors`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.artifacts import ArtifactStore, StageOutput, file_sha256
from pipeline.config import Config
from stages.encode import encoder_geometry

CODE_VERSION = "1"
WEIGHTS = "decoder.safetensors"


def run(cfg: Config, upstream: dict, out: StageOutput) -> dict:
    raise NotImplementedError("stage fit_decoder is not implemented yet")


def enabled(cfg: Config) -> bool:
    return cfg.decoder.weights is None


def decoder_arch(cfg: Config) -> dict:
    grid, channels = encoder_geometry(cfg)
    d = cfg.decoder
    return {"in_channels": channels, "num_tokens": grid * grid, "hidden_size": d.hidden_size, "depth": d.depth,
            "num_heads": d.num_heads, "intermediate_size": d.intermediate_size, "patch_size": d.patch_size}


def external_inputs(cfg: Config) -> dict[str, str]:
    """For the stages that decode: the released decoder's digest (a trained one enters as upstream)."""
    if cfg.decoder.weights is None:
        return {}
    path = Path(cfg.decoder.weights)
    if not path.is_file():
        raise FileNotFoundError(f"decoder.weights: {path} does not exist (expected a released RAE decoder "
                                f"checkpoint: a state_dict .pt or a dict with 'ema'/'model')")
    return {"decoder_weights": file_sha256(path, ArtifactStore(cfg.storage.root).digest_cache)}


def load_decoder(cfg: Config, upstream: dict, device: torch.device | str = "cpu"):
    """The frozen RAE decoder: released weights, or the EMA weights fit_decoder trained."""
    from pipeline.models.rae import build_rae_decoder
    from pipeline.training import load_safetensors

    if cfg.decoder.weights is not None:
        decoder = build_rae_decoder(cfg.decoder.weights, **decoder_arch(cfg))
    else:
        decoder = build_rae_decoder(None, **decoder_arch(cfg))
        load_safetensors(decoder, upstream["fit_decoder"].dir / WEIGHTS)
    return decoder.to(device).eval().requires_grad_(False)
