"""Each model's constructor arguments from a config: the one place where config sections become architectures,
shared by the stages that build the models, the weight-file checks and the planner's parameter counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.models.rae_family import encoder_shape, encoder_type

if TYPE_CHECKING:  # torch only when a model is built: the stage table imports this module
    from torch import nn


def encoder_geometry(cfg: Config) -> tuple[int, int]:
    """(grid size, channels) of the configured encoder, without building it (DINOv2-B: patch 14, 768)."""
    arch, shape = cfg.encoder.arch, encoder_shape(cfg.encoder.name)
    return cfg.encoder.input_size // (arch.patch_size or shape.patch_size), arch.embed_dim or shape.embed_dim


def encoder_depth(cfg: Config) -> int:
    return cfg.encoder.arch.depth or encoder_shape(cfg.encoder.name).depth


def pixel_norm(cfg: Config) -> tuple[tuple, tuple]:
    """(mean, std) the configured encoder's input pixels are normalized by, and its decoder's outputs are in."""
    etype = encoder_type(cfg.encoder.name)
    return etype.pixel_mean, etype.pixel_std


def encoder_arch(cfg: Config) -> dict:
    """build_rae_encoder's keyword arguments for the configured encoder."""
    arch = {k: v for k, v in cfg.encoder.arch.model_dump().items() if v is not None}
    return {"model_name": cfg.encoder.name, "input_size": cfg.encoder.input_size, "arch": arch}


def decoder_arch(cfg: Config) -> dict:
    """RAEDecoder's keyword arguments: it reads the encoder's token grid and channels."""
    grid, channels = encoder_geometry(cfg)
    d = cfg.decoder
    mean, std = pixel_norm(cfg)
    return {"in_channels": channels, "num_tokens": grid * grid, "hidden_size": d.hidden_size, "depth": d.depth,
            "num_heads": d.num_heads, "intermediate_size": d.intermediate_size, "patch_size": d.patch_size,
            "pixel_mean": list(mean), "pixel_std": list(std)}


def src_arch(cfg: Config) -> dict:
    """SRC's keyword arguments besides channels, dim and num_tokens: `src.kind: pca` is the linear map alone."""
    s = cfg.src
    if s.kind == "pca":
        return {"arch": "linear"}
    return {"arch": s.arch, "hidden": s.hidden, "depth": s.depth, "heads": s.heads}


def flow_arch(cfg: Config, tokens: int, channels: int, num_classes: int) -> dict:
    """TARFlow's keyword arguments for codes of (tokens, channels)."""
    f = cfg.flow
    return {"in_channels": channels, "num_tokens": tokens, "num_classes": num_classes, "width": f.width,
            "heads": f.heads, "num_blocks": f.num_blocks, "layers_per_block": f.layers_per_block,
            "deep_layers": f.deep_layers, "cond": f.cond, "scale": f.scale, "start_token": f.start_token,
            "soft_clip": f.soft_clip, "label_drop": f.label_drop}


def build(model: str, cfg: Config, num_classes: int = 1000, device: str = "meta") -> nn.Module:
    """A randomly initialized `model` ("encoder", "decoder", "src" or "flow") of this config on `device`; on the
    meta device (the default) it holds no memory: the planner counts parameters this way."""
    import torch

    grid, channels = encoder_geometry(cfg)
    tokens = grid * grid
    if model == "encoder":
        from pipeline.models.rae import build_rae_encoder

        return build_rae_encoder("random", device=device, **encoder_arch(cfg))
    with torch.device(device):
        if model == "decoder":
            from pipeline.models.rae import RAEDecoder

            return RAEDecoder(**decoder_arch(cfg))
        if model == "src":
            from pipeline.models.src import SRC

            return SRC(channels, cfg.src.dim, num_tokens=tokens, **src_arch(cfg))
        if model == "flow":
            from pipeline.models.flow import TARFlow

            return TARFlow(**flow_arch(cfg, tokens, cfg.src.dim, num_classes))
    raise ValueError(f"unknown model {model!r}: encoder, decoder, src or flow")
