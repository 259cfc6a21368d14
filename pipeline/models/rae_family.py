"""The RAE encoder family and the weights folders it is published in; torch-free, so planning reads them.

RAE (bytetriper/RAE configs/stage1/pretrained/*.yaml; diffusers AutoencoderRAE) puts a ViT-XL decoder (patch 16)
behind each of these frozen encoders; `encoder.name` is the timm architecture srcflow builds for each:

    type     timm name                          patch  channels  RAE input  pixels normalized by
    dinov2   vit_{small,base,large}_patch14_reg4_dinov2   14  384/768/1024  224  ImageNet mean/std
    siglip2  vit_base_patch16_siglip_256           16  768       256        mean = std = 0.5
    mae      vit_base_patch16_224.mae              16  768       256        ImageNet mean/std

The tokens are the encoder's last hidden states without the CLS and register tokens, through the final LayerNorm
without its affine (RAE's *wNorm encoders). Position embeddings are resampled to the configured grid as transformers
does at run time for each type (bicubic; DINOv2-with-registers with antialias, SigLIP and ViT-MAE without).

Two folder forms are accepted for `encoder.weights`, `decoder.weights` and `encode.stats_file`:
- a diffusers AutoencoderRAE folder: config.json (`_class_name` AutoencoderRAE) + diffusion_pytorch_model.safetensors
  holding `encoder.*` (the transformers model), `decoder.*`, `encoder_mean/std` and `_latents_mean/_latents_std`;
- a transformers folder: config.json (`model_type` dinov2_with_registers, siglip(_vision_model) or vit_mae) +
  model.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderType:
    """What RAE's encoder of one type needs beyond the timm architecture."""

    name: str  # diffusers' encoder_type
    prefix_tokens: int  # dropped before the tokens leave the encoder: CLS (+ registers)
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    pos_antialias: bool  # transformers' interpolate_pos_encoding of this type
    hf_model_types: tuple[str, ...]  # a transformers config.json's model_type
    norm_eps: float  # the LayerNorms' eps in transformers' config (timm's default is 1e-6)


TYPES = {
    "dinov2": EncoderType("dinov2", 5, IMAGENET_MEAN, IMAGENET_STD, True, ("dinov2_with_registers",), 1e-6),
    "siglip2": EncoderType("siglip2", 0, HALF, HALF, False, ("siglip", "siglip_vision_model"), 1e-6),
    "mae": EncoderType("mae", 1, IMAGENET_MEAN, IMAGENET_STD, False, ("vit_mae",), 1e-12),
}


@dataclass(frozen=True)
class EncoderShape:
    type: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    input_size: int  # what RAE feeds it (configs/stage1/pretrained)


ENCODERS = {  # timm name -> the architecture's defaults (encoder.arch overrides them for small test models)
    "vit_small_patch14_reg4_dinov2": EncoderShape("dinov2", 14, 384, 12, 6, 224),
    "vit_base_patch14_reg4_dinov2": EncoderShape("dinov2", 14, 768, 12, 12, 224),
    "vit_large_patch14_reg4_dinov2": EncoderShape("dinov2", 14, 1024, 24, 16, 224),
    "vit_base_patch16_siglip_256": EncoderShape("siglip2", 16, 768, 12, 12, 256),
    "vit_base_patch16_224.mae": EncoderShape("mae", 16, 768, 12, 12, 256),
}


def encoder_shape(name: str) -> EncoderShape:
    if name not in ENCODERS:
        raise ValueError(f"encoder.name: {name!r} is not an RAE encoder; known: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def encoder_type(name: str) -> EncoderType:
    return TYPES[encoder_shape(name).type]


# --- weights folders ------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class WeightsFolder:
    kind: str  # "diffusers" (an AutoencoderRAE) or "transformers" (an encoder alone)
    config: dict
    weights: Path  # the safetensors file
    config_path: Path


def read_weights_folder(path: str | Path, key: str) -> WeightsFolder:
    """The folder's config and weights file; a one-line error naming `key` when it is neither form."""
    folder = Path(path)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: {folder} holds no readable config.json ({type(e).__name__}); expected a diffusers "
                         f"AutoencoderRAE or a transformers encoder folder") from None
    if config.get("_class_name") == "AutoencoderRAE":
        kind, weights = "diffusers", folder / DIFFUSERS_WEIGHTS
    elif any(config.get("model_type") in t.hf_model_types for t in TYPES.values()):
        kind, weights = "transformers", folder / TRANSFORMERS_WEIGHTS
    else:
        raise ValueError(f"{key}: {config_path} is neither a diffusers AutoencoderRAE (_class_name) nor a transformers "
                         f"DINOv2-with-registers, SigLIP or ViT-MAE (model_type {config.get('model_type')!r})")
    if not weights.is_file():
        raise ValueError(f"{key}: {folder} has no {weights.name} (a {kind} folder keeps its weights there)")
    return WeightsFolder(kind, config, weights, config_path)


def weights_file(path: str | Path, key: str) -> Path:
    """The file that holds a weights source's tensors, whose sha256 the fingerprint holds: the file itself, or a
    folder's safetensors."""
    return read_weights_folder(path, key).weights if Path(path).is_dir() else Path(path)


_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4"}


def safetensors_tensors(data: bytes, names: tuple[str, ...]) -> dict:
    """name -> numpy array of the named tensors of a safetensors file's bytes (8-byte header length, JSON header,
    data), without decoding the others; bf16 widened to float32."""
    import numpy as np

    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    found = {}
    for name in names:
        if name not in header:
            continue
        info = header[name]
        start, stop = (8 + size + k for k in info["data_offsets"])
        values = np.frombuffer(data, _NUMPY_DTYPES[info["dtype"]], offset=start, count=(stop - start) //
                               np.dtype(_NUMPY_DTYPES[info["dtype"]]).itemsize).reshape(info["shape"])
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        found[name] = values.copy()
    return found


def check_encoder_folder(folder: WeightsFolder, key: str, name: str, arch: dict, input_size: int) -> None:
    """The folder's config against the configured encoder (encoder.name, encoder.arch, encoder.input_size): a
    one-line error naming the first key that disagrees."""
    shape, etype = encoder_shape(name), encoder_type(name)
    ours = {"type": shape.type, "embed_dim": arch.get("embed_dim") or shape.embed_dim,
            "depth": arch.get("depth") or shape.depth, "num_heads": arch.get("num_heads") or shape.num_heads,
            "patch_size": arch.get("patch_size") or shape.patch_size, "input_size": input_size}
    c = folder.config
    if folder.kind == "diffusers":
        theirs = {"encoder_type": ("type", c.get("encoder_type", "dinov2")),
                  "encoder_hidden_size": ("embed_dim", c.get("encoder_hidden_size", 768)),
                  "encoder_num_hidden_layers": ("depth", c.get("encoder_num_hidden_layers", 12)),
                  # diffusers builds every encoder with 64-channel heads
                  "encoder_hidden_size / 64": ("num_heads", c.get("encoder_hidden_size", 768) // 64),
                  "encoder_patch_size": ("patch_size", c.get("encoder_patch_size", 14)),
                  "encoder_input_size": ("input_size", c.get("encoder_input_size", 224))}
    else:
        hf_type = next(t for t in TYPES.values() if c.get("model_type") in t.hf_model_types).name
        vision = c.get("vision_config", c)  # a whole SigLIP folder nests its vision tower's config
        theirs = {"model_type": ("type", hf_type), "hidden_size": ("embed_dim", vision.get("hidden_size")),
                  "num_hidden_layers": ("depth", vision.get("num_hidden_layers")),
                  "num_attention_heads": ("num_heads", vision.get("num_attention_heads")),
                  "patch_size": ("patch_size", vision.get("patch_size"))}
        if hf_type == "dinov2" and vision.get("num_register_tokens", 4) != 4:
            theirs["num_register_tokens"] = ("registers", vision["num_register_tokens"])
            ours["registers"] = 4
    for field, (mine, value) in theirs.items():
        if value != ours[mine]:
            where = {"type": "encoder.name", "input_size": "encoder.input_size"}.get(mine, f"encoder.arch.{mine}")
            raise ValueError(f"{key}: {folder.config_path} has {field}={value!r} but the configured encoder has "
                             f"{mine} {ours[mine]!r} ({where}; encoder.name {name})")
    if folder.kind == "diffusers":  # RAE normalizes each encoder's pixels by its image processor's mean/std
        for field, expected in (("encoder_norm_mean", etype.pixel_mean), ("encoder_norm_std", etype.pixel_std)):
            value = c.get(field) or list(IMAGENET_MEAN if field.endswith("mean") else IMAGENET_STD)
            if any(abs(a - b) > 1e-6 for a, b in zip(value, expected, strict=True)):
                raise ValueError(f"{key}: {folder.config_path} has {field}={value} but a {shape.type} encoder's "
                                 f"pixels are normalized by {list(expected)}")


def check_decoder_folder(folder: WeightsFolder, key: str, decoder: dict) -> None:
    """A diffusers folder's decoder config against decoder.* (RAEDecoder kwargs); one line naming the key."""
    if folder.kind != "diffusers":
        raise ValueError(f"{key}: {folder.config_path.parent} is a transformers encoder folder; a decoder needs a "
                         f"diffusers AutoencoderRAE folder")
    c = folder.config
    pairs = {"decoder_hidden_size": ("hidden_size", c.get("decoder_hidden_size", 512)),
             "decoder_num_hidden_layers": ("depth", c.get("decoder_num_hidden_layers", 8)),
             "decoder_num_attention_heads": ("num_heads", c.get("decoder_num_attention_heads", 16)),
             "decoder_intermediate_size": ("intermediate_size", c.get("decoder_intermediate_size", 2048)),
             "patch_size": ("patch_size", c.get("patch_size", 16)),
             "encoder_hidden_size": ("in_channels", c.get("encoder_hidden_size", 768)),
             "(encoder_input_size / encoder_patch_size)^2": (
                 "num_tokens", (c.get("encoder_input_size", 224) // c.get("encoder_patch_size", 14)) ** 2)}
    for field, (mine, value) in pairs.items():
        if value != decoder[mine]:
            where = f"decoder.{mine}" if mine not in ("in_channels", "num_tokens") else "the encoder's tokens"
            raise ValueError(f"{key}: {folder.config_path} has {field}={value!r} but the configured decoder has "
                             f"{mine} {decoder[mine]!r} ({where})")
