"""The frozen RAE pieces SRC-Flow stands on (SRC-FLOW.md, "RAE"; Zheng et al. 2025, "Diffusion
Transformers with Representation Autoencoders").

    image --center_crop_arr--> uint8 R x R --to_encoder_input--> ImageNet-normalised 224 x 224
          --RAEEncoder--> (B, 256, 768) tokens, final LayerNorm without affine
          ... SRC / flow ...
    tokens --RAEDecoder--> (B, 3, 256, 256) ImageNet-normalised pixels --to_uint8_pixels--> uint8

Reference code checked (public RAE release, github bytetriper/RAE, commit 0fbcd59; src/stage1/rae.py at
34b0679 is the same):
  stage1/encoders/dinov2.py  Dinov2withNorm: HF Dinov2WithRegistersModel, final layernorm with
                             elementwise_affine=False, drop 5 tokens (CLS + 4 registers).
  stage1/rae.py              encode: bicubic resize to 224, then (x - mean) / std; decode: unpatchify,
                             then x * std + mean; decoder loaded with load_state_dict(strict=True).
  stage1/decoders/decoder.py GeneralDecoder + ViTMAELayer: the decoder below and its key names.
The encoder family (DINOv2-S/B/L with registers, SigLIP2-B, MAE-B) and the diffusers / transformers folders its
weights come in: rae_family.py. Checked against diffusers' AutoencoderRAE and transformers' models in
tests/test_oracle.py.
Plain torch + timm + PIL + safetensors: no storage, orchestration or config objects in here.
"""

import inspect
import io
import math
import re
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from pipeline.models.rae_family import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsFolder,
    check_decoder_folder,
    check_encoder_folder,
    encoder_type,
    read_weights_folder,
)

ENCODER_WEIGHTS_EXPECTED = ("a local encoder checkpoint: .safetensors or .pth (timm, transformers or original DINOv2 "
                            "names), a transformers folder or a diffusers AutoencoderRAE folder")
DECODER_WEIGHTS_EXPECTED = (
    "an RAE decoder checkpoint, .pt/.pth or .safetensors, e.g. decoders/dinov2/wReg_base/ViTXL_n08/model.pt, or a "
    "diffusers AutoencoderRAE folder"
)


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the model. The message is one line."""


# ----------------------------------------------------------------------------------------------
# Pixels in and out (SRC-FLOW.md "RAE": ADM center crop, ImageNet mean/std).


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion image_datasets.py center_crop_arr): BOX-halve while the short
    side >= 2 * image_size, BICUBIC so the short side == image_size, then crop the center.
    Returns uint8 (image_size, image_size, 3). ADM converts to RGB before cropping (CMYK, L, RGBA)."""
    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def resize_random_crop(pil_image: Image.Image, image_size: int, position: tuple[float, float]) -> np.ndarray:
    """RAE's decoder-training augmentation (src/train_stage1.py stage1_transform): torchvision
    Resize(1.5 * image_size, BICUBIC) of the short side (384 at 256 px), then RandomCrop(image_size).
    `position` (two numbers in [0, 1)) places the crop: top = floor(position[0] * (H - image_size + 1)),
    left likewise, as RandomCrop's randint(0, H - size + 1). Returns uint8 (image_size, image_size, 3)."""
    pil_image = pil_image.convert("RGB")  # ImageFolder's loader
    short = int(image_size * 1.5)  # RAE: 384 if image_size == 256 else int(image_size * 1.5)
    w, h = pil_image.size
    if min(w, h) != short:  # torchvision: the long side is int(short * long / short_side)
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = int(position[0] * (arr.shape[0] - image_size + 1))
    left = int(position[1] * (arr.shape[1] - image_size + 1))
    return arr[top : top + image_size, left : left + image_size]


def to_encoder_input(images_uint8: torch.Tensor, input_size: int, antialias: bool = False,
                     mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> torch.Tensor:
    """uint8 images, (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, input_size, input_size): [0, 1] pixels,
    bicubic resize (256 -> 224 in RAE), then the encoder's pixel mean/std (ImageNet's but for SigLIP2: 0.5, as
    RAE reads them from each encoder's image processor). RAE's own encode (stage1/rae.py) calls
    F.interpolate(mode='bicubic') WITHOUT antialias, and the released decoder and statistics were made
    that way, so that is the default here too."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(f"expected uint8 images (B, H, W, 3) or (B, 3, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    x = images_uint8
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False,
                          antialias=antialias)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_unit_pixels(x_normalized: torch.Tensor, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
                   ) -> torch.Tensor:
    """Decoder output (B, 3, H, W), normalized by the encoder's pixel mean/std -> [0, 1] pixels x * std + mean,
    unclamped: what RAE's decode returns, and where its L1 is computed (src/train_stage1.py)."""
    mean = torch.tensor(mean, device=x_normalized.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x_normalized.device).view(1, 3, 1, 1)
    return x_normalized.float() * std + mean


def to_uint8_pixels(x_normalized: torch.Tensor, rounding: str = "round", mean: tuple = IMAGENET_MEAN,
                    std: tuple = IMAGENET_STD) -> torch.Tensor:
    """Decoder output (B, 3, H, W), normalized by the encoder's pixel mean/std -> uint8 (B, H, W, 3): x * std + mean
    (as RAE decode), clamp to [0, 1], times 255, then to 0..255 by `rounding`:
      round:    to the nearest level (reconstructions measured against images: PSNR);
      truncate: towards zero, as RAE's sample_ddp.py (clamp(0, 1).mul(255).to(uint8)) and ADM's samplers
                (((x + 1) * 127.5).clamp(0, 255).to(uint8)) write the samples that FIDs are reported on: on
                average half a level darker than `round` (the `sample` stage's default, sample.pixel_rounding)."""
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    x = to_unit_pixels(x_normalized, mean, std).clamp(0, 1) * 255
    return (x.round() if rounding == "round" else x).to(torch.uint8).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# RAE encoder: frozen DINOv2-B with 4 registers (SRC-FLOW.md "RAE", feature normalization step 1), or another of
# RAE's encoders (rae_family.py): DINOv2-S/L, SigLIP2-B, MAE-B.


class RAEEncoder(nn.Module):
    """Patch tokens of a frozen timm ViT, (B, 3, S, S) -> (B, (S/patch)^2, C), without its prefix tokens (CLS,
    registers), each token LayerNorm-ed over its C channels WITHOUT the final norm's affine weight/bias (RAE
    Dinov2withNorm, SigLIP2wNorm, MAEwNorm)."""

    def __init__(self, vit: nn.Module, input_size: int, pixel_mean: tuple = IMAGENET_MEAN,
                 pixel_std: tuple = IMAGENET_STD):
        super().__init__()
        # timm's forward_features ends with the affine model.norm; RAE uses that LayerNorm without
        # weight/bias. Keep its eps, make the module an Identity, and apply F.layer_norm in forward.
        self.norm_eps = vit.norm.eps
        vit.norm = nn.Identity()
        self.vit = vit
        self.input_size = input_size
        self.grid_size = vit.patch_embed.grid_size[0]
        self.num_tokens = self.grid_size * self.grid_size
        self.channels = vit.embed_dim
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std  # what to_encoder_input must normalize by
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]  # drop CLS + registers
        return F.layer_norm(tokens, (self.channels,), eps=self.norm_eps)


def build_rae_encoder(
    weights: str,
    *,
    model_name: str = "vit_base_patch14_reg4_dinov2",
    input_size: int = 224,
    arch: dict | None = None,
    seed: int = 0,
    device: str | None = None,
    data: bytes | None = None,
) -> RAEEncoder:
    """weights: "random" (init under torch.manual_seed(seed)) or a local checkpoint: timm names
    (.safetensors/.pth), transformers names (Dinov2WithRegistersModel, SiglipVisionModel, ViTMAEModel), the
    original facebookresearch dinov2_vitb14_reg4_pretrain.pth layout (timm converts it), a transformers folder or
    a diffusers AutoencoderRAE folder (its `encoder.*`). Never downloads. model_name: an RAE encoder of
    rae_family.ENCODERS. input_size 224 -> 16x16 tokens, 448 -> 32x32; arch: timm kwargs (embed_dim, depth,
    num_heads, patch_size, mlp_ratio) for small test models. pos_embed is resampled to the grid by timm's
    checkpoint_filter_fn with the antialias transformers uses for this type at run time (bicubic, DINOv2:
    antialiased), so the tokens are RAE's. device "meta": only check that the file fits the architecture (its
    tensors' shapes; no weights read). data: the weights file's bytes (a folder's: its safetensors), already read
    and checked by the caller, parsed instead of opening the file."""
    meta = device == "meta"
    etype = encoder_type(model_name)
    state = None
    if weights != "random":
        if Path(weights).is_dir():
            folder = read_weights_folder(weights, "encoder.weights")
            check_encoder_folder(folder, "encoder.weights", model_name, arch or {}, input_size)
            state = _folder_state(folder, "encoder.", "encoder.weights", meta, data)
        else:
            state = read_state_dict(weights, "encoder.weights", ENCODER_WEIGHTS_EXPECTED, meta, data)  # before building
        state = hf_to_timm(_unwrap(state, ("state_dict", "model")))
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        vit = timm.create_model(model_name, pretrained=False, img_size=input_size, num_classes=0,
                                **{**_TIMM_KWARGS[etype.name], **(arch or {})})
    for module in vit.modules():  # timm's default, made sure of (TIMM_FUSED_ATTN=0 would turn it off):
        if hasattr(module, "fused_attn"):  # F.scaled_dot_product_attention, flash / memory-efficient on CUDA
            module.fused_attn = True
    if state is not None:
        try:  # timm: original-DINOv2 layout (mask_token, register_tokens), pos_embed resampled to this grid
            state = checkpoint_filter_fn(state, vit, antialias=etype.pos_antialias)
        except Exception as e:
            raise WeightsError(f"encoder.weights: {weights} is not a DINOv2 checkpoint: timm could not adapt it "
                               f"({type(e).__name__}) (expected {ENCODER_WEIGHTS_EXPECTED})") from e
        # norm.weight/bias are optional: RAE drops the final LN affine (diffusers' RAE port strips them)
        check_state_dict(state, vit.state_dict(), "encoder.weights", weights, "a DINOv2 checkpoint",
                          optional=("norm.weight", "norm.bias"))
        if not meta:
            vit.load_state_dict(state, strict=False)  # strict in substance: check_state_dict above
    return RAEEncoder(vit, input_size, etype.pixel_mean, etype.pixel_std)


# timm's arguments that make its ViT the transformers model RAE runs: SigLIP's tanh GELU and no pooling head,
# ViT-MAE's LayerNorm eps of 1e-12
_TIMM_KWARGS = {"dinov2": {}, "siglip2": {"global_pool": "", "act_layer": "gelu_tanh"},
                "mae": {"norm_layer": partial(nn.LayerNorm, eps=1e-12)}}
_UNUSED_HEADS = ("head.", "attn_pool.", "fc_norm.", "vision_model.head.", "pooler.")


def hf_to_timm(state: dict) -> dict:
    """A transformers state dict (Dinov2WithRegistersModel, SiglipVisionModel, ViTMAEModel; the names of the released
    checkpoints and those transformers 5 saves) -> timm names; timm and original-DINOv2 state dicts pass through.
    With registers, DINOv2's CLS position row is folded into cls_token (timm's reg4 models embed no prefix token), as
    transformers' convert_dinov2_with_registers_to_hf.py inverted and timm's _convert_dinov2 do; without (DINOv2,
    ViT-MAE) it stays (timm adds it to the CLS token as transformers does); mask_token is unused. Heads RAE never
    runs are dropped."""
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}  # SigLIP under transformers 4
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_HEADS)}
    if not any(k.startswith("embeddings.") for k in state):
        return state
    registers = "embeddings.register_tokens" in state
    out, qkv = {}, {}
    for k, v in state.items():
        if k == "embeddings.cls_token":
            pos = state.get("embeddings.position_embeddings")
            out["cls_token"] = v + pos[:, :1] if registers and pos is not None else v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v[:, 1:] if registers else v
        elif k == "embeddings.position_embedding.weight":  # SigLIP: no CLS token, an nn.Embedding
            out["pos_embed"] = v[None]
        elif k == "embeddings.register_tokens":
            out["reg_token"] = v
        elif k in ("embeddings.mask_token", "embeddings.position_ids"):
            continue
        elif m := re.match(r"embeddings\.(?:patch_embeddings\.projection|patch_embedding)\.(weight|bias)$", k):
            out[f"patch_embed.proj.{m[1]}"] = v
        elif m := re.match(r"(?:layernorm|post_layernorm)\.(weight|bias)$", k):
            out[f"norm.{m[1]}"] = v
        elif m := re.match(r"(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k):
            block, part, kind = m[1], m[2], m[3]
            if part in _HF_QKV:
                qkv.setdefault((block, kind), {})[_HF_QKV[part]] = v
            else:
                out[f"blocks.{block}.{_HF_BLOCK.get(part, part)}.{'gamma' if kind == 'lambda1' else kind}"] = v
        else:
            out[k] = v  # unknown: reported as unexpected by the caller
    for (i, kind), parts in qkv.items():
        if len(parts) == 3:  # timm packs q, k, v into one Linear, in that order
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# transformers' per-layer names (released checkpoints, transformers 5, SigLIP) -> timm's Block
_HF_QKV = {f"{prefix}{name}": name[0] for prefix in ("attention.", "self_attn.") for name in ("q_proj", "k_proj",
                                                                                              "v_proj")}
_HF_QKV |= {f"attention.attention.{name}": name[0] for name in ("query", "key", "value")}
_HF_BLOCK = {"attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj", "self_attn.out_proj": "attn.proj",
             "layernorm_before": "norm1", "layer_norm1": "norm1", "layernorm_after": "norm2", "layer_norm2": "norm2",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "layer_scale1": "ls1", "layer_scale2": "ls2"}


# ----------------------------------------------------------------------------------------------
# RAE decoder: MAE-style ViT (SRC-FLOW.md "RAE", Decoder). Module and parameter names follow RAE's
# stage1/decoders/decoder.py (GeneralDecoder, ViTMAELayer, checked at bytetriper/RAE commit 0fbcd59)
# so a released checkpoint loads with strict=True:
#   decoder_embed.{weight,bias}                      Linear(in_channels -> hidden)
#   decoder_pos_embed                                (1, 1 + T, hidden), fixed 2-D sin-cos, CLS row 0
#   trainable_cls_token                              (1, 1, hidden)
#   decoder_layers.{i}.layernorm_before.{weight,bias}
#   decoder_layers.{i}.attention.attention.{query,key,value}.{weight,bias}
#   decoder_layers.{i}.attention.output.dense.{weight,bias}
#   decoder_layers.{i}.layernorm_after.{weight,bias}
#   decoder_layers.{i}.intermediate.dense.{weight,bias}   Linear(hidden -> intermediate), exact GELU
#   decoder_layers.{i}.output.dense.{weight,bias}         Linear(intermediate -> hidden)
#   decoder_norm.{weight,bias}, decoder_pred.{weight,bias}  Linear(hidden -> patch * patch * 3)
# RAE's decoder config (configs/decoder/ViTXL/config.json, a ViTMAEConfig): hidden_act "gelu",
# layer_norm_eps 1e-12, qkv_bias true, dropout 0.

DECODER_SIZES = {  # RAE paper / diffusers convert_rae_to_diffusers.py DECODER_CONFIGS
    "ViT-B": {"hidden_size": 768, "depth": 12, "num_heads": 12, "intermediate_size": 3072},
    "ViT-L": {"hidden_size": 1024, "depth": 24, "num_heads": 16, "intermediate_size": 4096},
    "ViT-XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16, "intermediate_size": 4096},  # ~415M params
}


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE get_2d_sincos_pos_embed(dim, grid, add_cls_token=True) -> (1 + grid^2, dim), float32. The first
    dim/2 channels encode the column (MAE's meshgrid puts w first), the rest the row; each half is
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim/4)). Row 0 (CLS) is zeros. float64 as MAE."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        out = np.einsum("m,d->md", pos, omega)
        halves += [np.sin(out), np.cos(out)]
    emb = np.concatenate([np.zeros([1, dim]), np.concatenate(halves, axis=1)], axis=0)
    return torch.from_numpy(emb).float()


def _named(**children: nn.Module) -> nn.Module:
    """An empty module holding children under these names, to mirror HF's nesting (so keys match)."""
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


class ViTMAELayer(nn.Module):
    """Pre-LN transformer block, HF ViTMAELayer semantics and names:
    x += attn(layernorm_before(x)); x += mlp(layernorm_after(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = _named(
            attention=_named(query=nn.Linear(hidden_size, hidden_size), key=nn.Linear(hidden_size, hidden_size),
                             value=nn.Linear(hidden_size, hidden_size)),
            output=_named(dense=nn.Linear(hidden_size, hidden_size)))
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=eps)
        self.intermediate = _named(dense=nn.Linear(hidden_size, intermediate_size))
        self.output = _named(dense=nn.Linear(intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        h = self.layernorm_before(x)
        sa = self.attention.attention
        q, k, v = (lin(h).view(B, N, self.num_heads, -1).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)
        x = x + self.attention.output.dense(a)
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class RAEDecoder(nn.Module):
    """RAE GeneralDecoder: tokens (B, T, in_channels), T = g*g -> pixels (B, 3, g*patch, g*patch) in
    ImageNet-normalised space. Linear embed, prepend learned CLS, add fixed sin-cos positions,
    transformer layers, LayerNorm, Linear to patch pixels, drop CLS, unpatchify. Defaults: ViT-XL."""

    def __init__(self, in_channels: int = 768, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 intermediate_size: int = 4096, patch_size: int = 16, num_tokens: int = 256,
                 layer_norm_eps: float = 1e-12, pixel_mean: tuple = IMAGENET_MEAN, pixel_std: tuple = IMAGENET_STD):
        super().__init__()
        # the space of its output pixels: its encoder's input normalization (to_uint8_pixels takes them)
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.grid_size = math.isqrt(num_tokens)
        if self.grid_size ** 2 != num_tokens:
            raise ValueError(f"num_tokens must be a square, got {num_tokens}")
        self.patch_size, self.num_tokens, self.in_channels = patch_size, num_tokens, in_channels
        self.decoder_embed = nn.Linear(in_channels, hidden_size)
        # RAE holds this as a frozen nn.Parameter; a persistent buffer has the same state-dict key.
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None])
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))  # RAE: zeros at init
        self.decoder_layers = nn.ModuleList(
            [ViTMAELayer(hidden_size, num_heads, intermediate_size, layer_norm_eps) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T, C = tokens.shape
        if self.num_tokens != T or self.in_channels != C:
            raise ValueError(f"expected tokens (B, {self.num_tokens}, {self.in_channels}), got {tuple(tokens.shape)}")
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(B, -1, -1), x], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return self.unpatchify(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, g*g, p*p*3) -> (B, 3, g*p, g*p); each token's vector is laid out (p_row, p_col, channel),
        as RAE's einsum 'nhwpqc->nchpwq'."""
        g, p = self.grid_size, self.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, g * p, g * p)


def build_rae_decoder(weights: str | None = None, *, seed: int = 0, device: str | None = None,
                      data: bytes | None = None, **arch) -> RAEDecoder:
    """weights: None / "random" (init under torch.manual_seed(seed): PyTorch defaults, zero CLS, as
    RAE's GeneralDecoder) or a released / training checkpoint, loaded strictly. arch: RAEDecoder kwargs
    (see DECODER_SIZES). Returned in eval mode; freezing is the caller's choice. device "meta": only check
    that the file fits the architecture (its tensors' shapes; no weights read). data: the file's bytes, already
    read (and checked) by the caller."""
    state = None
    if weights not in (None, "random") and Path(weights).is_dir():
        folder = read_weights_folder(weights, "decoder.weights")
        defaults = {k: p.default for k, p in inspect.signature(RAEDecoder).parameters.items()}
        check_decoder_folder(folder, "decoder.weights", {**defaults, **arch})
        state = diffusers_decoder_to_rae(_folder_state(folder, "decoder.", "decoder.weights", device == "meta",
                                                              data))
    elif weights not in (None, "random"):
        state = load_rae_decoder_state(weights, meta=device == "meta", data=data)  # before building
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        decoder = RAEDecoder(**arch)
    if state is not None:
        check_state_dict(state, decoder.state_dict(), "decoder.weights", weights, "an RAE decoder checkpoint",
                          optional=("decoder_pos_embed",))
        if device != "meta":
            state.setdefault("decoder_pos_embed", decoder.decoder_pos_embed)  # recomputed, identical sin-cos
            decoder.load_state_dict(state, strict=True)
    return decoder.eval()


def diffusers_decoder_to_rae(state: dict) -> dict:
    """diffusers' RAEDecoder names (attention.to_q/to_k/to_v/to_out.0) -> RAE's (attention.attention.query/key/value,
    attention.output.dense); the rest are RAE's names already (diffusers' convert_rae_to_diffusers.py, inverted)."""
    names = {".attention.to_q.": ".attention.attention.query.", ".attention.to_k.": ".attention.attention.key.",
             ".attention.to_v.": ".attention.attention.value.", ".attention.to_out.0.": ".attention.output.dense."}
    out = {}
    for k, v in state.items():
        for theirs, ours in names.items():
            k = k.replace(theirs, ours)
        out[k] = v
    return out


def load_rae_decoder_state(path: str, meta: bool = False, data: bytes | None = None) -> dict:
    """A decoder state dict from .pt/.pth (torch.load weights_only=True) or .safetensors: a plain
    state_dict (the release's model.pt) or a training checkpoint {ema (preferred), model, state_dict,
    ...}; 'module.' / '_orig_mod.' prefixes (DDP, torch.compile) are stripped; of a whole RAE stage-1
    model (`encoder.*` and `decoder.*` keys, RAE's train_stage1.py) the `decoder.` subset is taken;
    'n_averaged' (torch AveragedModel EMA counter) is dropped."""
    state = _unwrap(read_state_dict(path, "decoder.weights", DECODER_WEIGHTS_EXPECTED, meta, data),
                    ("ema", "model", "state_dict"))
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    out.pop("n_averaged", None)
    if any(k.startswith("decoder.") for k in out):  # a whole RAE (encoder.*, decoder.*): its decoder
        out = {k[len("decoder."):]: v for k, v in out.items() if k.startswith("decoder.")}
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoint files.


def _folder_state(folder: WeightsFolder, prefix: str, key: str, meta: bool, data: bytes | None = None) -> dict:
    """The state dict of a weights folder; of a diffusers AutoencoderRAE, the tensors under `prefix` (encoder. or
    decoder.) without it."""
    state = read_state_dict(str(folder.weights), key, ENCODER_WEIGHTS_EXPECTED if key.startswith("encoder")
                             else DECODER_WEIGHTS_EXPECTED, meta, data)
    if folder.kind == "diffusers":
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_state_dict(path: str, key: str, expected: str, meta: bool = False, data: bytes | None = None) -> dict:
    """Read a checkpoint without executing code: safetensors, or torch.load(weights_only=True). meta: tensors
    with the file's shapes and dtypes but no data (the safetensors header; a memory-mapped torch file). data: the
    file's bytes, read by the caller, parsed instead of the file."""
    if data is None and not Path(path).is_file():
        raise WeightsError(f"{key}: {path} does not exist (expected {expected})")
    try:
        if data is not None:
            obj = (safetensors.torch.load(data) if str(path).endswith(".safetensors")
                   else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        elif str(path).endswith(".safetensors") and meta:
            with safetensors.safe_open(path, framework="pt") as f:
                obj = {}
                for name in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                    part = f.get_slice(name)
                    obj[name] = torch.empty(part.get_shape(), dtype=_SAFETENSORS_DTYPES[part.get_dtype()],
                                            device="meta")
        elif str(path).endswith(".safetensors"):
            obj = safetensors.torch.load_file(path, device="cpu")
        elif meta:
            obj = _to_meta(load_state_mmap(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise WeightsError(
            f"{key}: {path} could not be read ({type(e).__name__}: {reason}) (expected {expected})") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{key}: {path} holds a {type(obj).__name__}, not a state dict (expected {expected})")
    return obj


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def load_state_mmap(path: str):
    """torch.load(weights_only=True) with the tensors memory-mapped, not read (a legacy, non-zip file cannot be
    mapped: it is read whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _unwrap(obj: dict, wrappers: tuple) -> dict:
    """The first wrapper key holding a dict (e.g. training checkpoints' 'ema'), else obj itself."""
    for name in wrappers:
        if isinstance(obj.get(name), dict):
            return obj[name]
    return obj


def check_state_dict(state: dict, model_state: dict, key: str, path: str, what: str, optional=()) -> None:
    """One-line WeightsError for missing / unexpected keys, non-tensors and shape mismatches."""
    def fail(problem, names):
        raise WeightsError(f"{key}: {path} is not {what}: {len(names)} {problem} (e.g. {', '.join(names[:3])})")
    if missing := [k for k in model_state if k not in state and k not in optional]:
        fail("expected keys missing", missing)
    if unexpected := [k for k in state if k not in model_state]:
        fail("unexpected keys", unexpected)
    if not_tensors := [k for k, v in state.items() if not isinstance(v, torch.Tensor)]:
        fail("values are not tensors", not_tensors)
    if bad := [k for k in state if state[k].shape != model_state[k].shape]:
        k = bad[0]
        raise WeightsError(f"{key}: {path} does not fit the configured architecture: {len(bad)} shape mismatches "
                           f"(e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)})")
