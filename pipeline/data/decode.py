"""JPEG bytes -> the ADM center crop (`encode.decode`), three ways.

ADM's crop (guided-diffusion center_crop_arr, `pipeline.models.rae.center_crop_arr`): while the short side is
>= 2 R, halve the image with PIL's BOX filter; then BICUBIC so the short side is R; then cut the center R x R.

- `pil`: exactly that, on PIL (the reference, the default, and what `reference` and the decoder stages use).
- `tensor`: TorchCodec's decode_jpeg (libjpeg-turbo with PIL's settings: the same pixels as PIL, and as
  torchvision's deprecated decoder it replaces, on every JPEG tried; as fast, benchmarks/torchcodec_decode.py) and
  the crop on tensors, on CPU threads. The BOX halvings (images whose short side is >= 2 R)
  are PIL's own, on the decoded pixels. The bicubic is torch's antialiased uint8 kernel (a port of
  Pillow-SIMD's: 16-bit coefficients, its own pass order): within 2 levels of PIL on ~0.4% of the values of
  photo-like 500x375 JPEGs, the rest identical (tests/test_decode.py, benchmarks/encode.py measure it).
- `nvjpeg`: a batch decoded at once on the GPU (torchvision.io.decode_jpeg(list, device="cuda"), nvjpeg; not
  bit-identical to libjpeg-turbo), the crop on the GPU in PIL's own arithmetic, bit for bit (`pil_box_halve`,
  `pil_bicubic_crop`: Pillow's coefficients and rounding, its pass order). JPEGs nvjpeg is not given (not
  baseline or extended sequential, not 1 or 3 components) or refuses (whatever raises) are decoded on the CPU
  as `tensor` does and cropped beside the others, in their places.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DECODE_PATHS = ("pil", "tensor", "nvjpeg")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec's; nvjpeg's batches still go through
# torchvision's (TorchCodec's CUDA decode is not yet measured here), so say it once in the README, not on every
# image (a filter set once: catch_warnings is not thread-safe)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c: fixed-point coefficients of 8-bit images


# --- pil: the reference ---------------------------------------------------------------------------


def pil_crop(jpeg: bytes, resolution: int) -> np.ndarray:
    """JPEG bytes -> ADM center crop at `resolution`, uint8 HxWx3, on PIL."""
    from pipeline.models.rae import center_crop_arr

    with Image.open(io.BytesIO(jpeg)) as img:
        return center_crop_arr(img, resolution)


# --- tensor: torchvision's decode and the crop on tensors -----------------------------------------


def decode_rgb(jpeg: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB on the CPU: TorchCodec for YCbCr and grayscale JPEGs, PIL (as ADM's
    convert("RGB")) for the rest (CMYK, YCCK) and for anything TorchCodec refuses."""
    from torchcodec.decoders import decode_jpeg

    header = jpeg_header(jpeg)
    if header is not None and header[1] in (1, 3):
        try:
            return decode_jpeg(jpeg, mode="RGB")
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(jpeg)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def tensor_crop(jpeg: bytes, resolution: int) -> np.ndarray:
    """JPEG bytes -> ADM center crop at `resolution`, uint8 HxWx3: torchvision's decode, the crop on tensors."""
    return adm_crop(decode_rgb(jpeg), resolution).numpy()


def adm_crop(image: torch.Tensor, resolution: int, exact: bool | None = None) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> ADM center crop, uint8 (R, R, 3) on that device. The BOX halvings are
    PIL's bit for bit. The bicubic: `exact` (the default off the CPU) is PIL's bit for bit too (its fixed-point
    coefficients in two float64 matmuls, `pil_bicubic_crop`: a few kernels on a GPU, slow on a CPU core);
    otherwise torch's antialiased uint8 kernel (CPU only; within 2 levels of PIL, on ~0.4% of the pixels)."""
    exact = image.device.type != "cpu" if exact is None else exact
    x = image
    while min(x.shape[1:]) >= 2 * resolution:
        x = pil_box_halve(x) if exact else box_halve(x)
    h, w = x.shape[1:]
    scale = resolution / min(h, w)
    size = (round(h * scale), round(w * scale))  # PIL: tuple(round(x * scale) for x in size), the same floats
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    if exact:
        x = pil_bicubic_crop(x, size, (top, left, resolution))
    else:
        x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0] if size != (h, w) else x
        x = x[:, top:top + resolution, left:left + resolution]
    return x.permute(1, 2, 0).contiguous()


def box_halve(x: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) on the CPU -> (3, H // 2, W // 2): PIL's own `resize((W // 2, H // 2), Image.BOX)` on the
    decoded pixels (torchvision's decode is HWC underneath: no copy into numpy; PIL's C loop is as fast as any
    numpy or torch halving, and its pass order is its own, see `pil_vertical_first`)."""
    h, w = x.shape[1:]
    image = Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.array(image.resize((w // 2, h // 2), resample=Image.BOX))).permute(2, 0, 1)


# --- Pillow's resampling, bit for bit, in torch (libImaging/Resample.c, 8-bit images) -------------
# Coefficients in double as precompute_coeffs computes them, normalized to 22-bit fixed point
# (normalize_coeffs_8bpc); each pass sums pixel x coefficient with half a unit added and shifts right
# (clip8), and the second pass works on the first one's uint8 result. Which pass goes first is PIL's
# choice (`pil_vertical_first`).


def pil_vertical_first(size: tuple[int, int], out: tuple[int, int], name: str) -> bool:
    """Whether this PIL resizes (W, H) -> out with its vertical pass first. Pillow up to 12 always starts with the
    horizontal pass; Pillow 13 picks the order by the sizes, by a rule it does not document (about a third of
    random size pairs go vertical first). Asked of PIL itself, once per (size, out, filter): its resize of a random
    image against both orders of one-axis resizes."""
    (w, h), (ow, oh) = size, out
    if ow == w or oh == h:  # one pass or none: no order
        return False
    return _vertical_first(w, h, ow, oh, name)


@lru_cache(maxsize=8192)
def _vertical_first(w: int, h: int, ow: int, oh: int, name: str) -> bool:
    resample = {"box": Image.BOX, "bicubic": Image.BICUBIC}[name]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    both = np.asarray(image.resize((ow, oh), resample))
    if np.array_equal(both, np.asarray(image.resize((ow, h), resample).resize((ow, oh), resample))):
        return False
    # vertical first when that is PIL's result; when neither is (another resampler), horizontal first, as
    # Resample.c: then the crop is no longer PIL's bit for bit (tests/test_decode.py would say so)
    return np.array_equal(both, np.asarray(image.resize((w, oh), resample).resize((ow, oh), resample)))


def pil_box_halve(x: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) on any device -> (C, H // 2, W // 2), PIL's `resize((W // 2, H // 2), Image.BOX)` bit for
    bit (odd sides too): per pass, one gather and multiply-add per tap (at most 3): cheap on a GPU."""
    h, w = x.shape[1:]
    if pil_vertical_first((w, h), (w // 2, h // 2), "box"):
        return _box_axis(_box_axis(x, 1, h // 2), 2, w // 2)
    return _box_axis(_box_axis(x, 2, w // 2), 1, h // 2)


def _box_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    start, weights = pil_coefficients(in_size, out_size, "box")
    weights = weights[:, :max(1, int((weights != 0).sum(1).max()))]  # taps past every window are zero
    start, weights = torch.from_numpy(start).to(x.device), torch.from_numpy(weights).to(x.device)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = torch.full((*x.shape[:axis], out_size, *x.shape[axis + 1:]), 1 << (PRECISION_BITS - 1),
                     dtype=torch.int32, device=x.device)
    for k in range(weights.shape[1]):
        taps = x.index_select(axis, (start + k).clamp_(max=in_size - 1)).to(torch.int32)
        acc += taps * weights[:, k].view(shape)
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def pil_bicubic_crop(x: torch.Tensor, size: tuple[int, int], window: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> the (top, left, side) `window` of PIL's `resize((size[1], size[0]), Image.BICUBIC)`,
    uint8 (C, side, side), bit for bit: each pass one float64 matmul of the pixels with the fixed-point
    coefficients (integers below 2^33: exact), the window's columns and rows only."""
    top, left, side = window
    h, w = x.shape[1:]
    device = str(x.device)
    t = x.double()
    across = _pass_matrix(w, size[1], left, side, device) if size[1] != w else None  # (side, W)
    down = _pass_matrix(h, size[0], top, side, device) if size[0] != h else None  # (side, H)
    if across is not None and down is not None and pil_vertical_first((w, h), (size[1], size[0]), "bicubic"):
        return _clip8(_clip8(down @ t) @ across.T).to(torch.uint8)
    t = _clip8(t @ across.T) if across is not None else t[:, :, left:left + side]  # PIL leaves an equal side
    t = _clip8(down @ t) if down is not None else t[:, top:top + side]
    return t.to(torch.uint8)


@lru_cache(maxsize=128)
def _pass_matrix(in_size: int, out_size: int, first: int, count: int, device: str) -> torch.Tensor:
    """Outputs first..first+count of a bicubic pass in_size -> out_size as a float64 (count, in_size) matrix on
    `device` (kept for the next image of that size: ImageNet's sizes repeat)."""
    start, weights = pil_coefficients(in_size, out_size, "bicubic")
    start, weights = start[first:first + count], weights[first:first + count]
    matrix = np.zeros((count, in_size))
    index = np.minimum(start[:, None] + np.arange(weights.shape[1]), in_size - 1)
    np.add.at(matrix, (np.arange(count)[:, None], index), weights)  # zero weights past a window add nothing
    return torch.from_numpy(matrix).to(device)


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a pass: (acc + 2^21) >> 22, clipped to 0..255 (exact in float64)."""
    return torch.floor_divide(acc + float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)).clamp_(0, 255)


def _box(t: np.ndarray) -> np.ndarray:
    return np.where((t > -0.5) & (t <= 0.5), 1.0, 0.0)


def _bicubic(t: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(t)  # Pillow's bicubic_filter, operation for operation
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}


@lru_cache(maxsize=1024)
def pil_coefficients(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: the first input index of each output and its
    fixed-point weights (int64, zero past the window), in Pillow's double arithmetic and summation order."""
    filter_, support = FILTERS[name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    ss = 1.0 / filterscale
    w = np.zeros((out_size, ksize))
    for k in range(ksize):
        w[:, k] = np.where(k < xmax, filter_(((k + xmin) - center + 0.5) * ss), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # Pillow sums the weights in order
        total = total + w[:, k]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0)
    fixed = w * (1 << PRECISION_BITS)
    return xmin, np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)


# --- nvjpeg: a batch decoded on the GPU, with a CPU fallback --------------------------------------


def jpeg_header(jpeg: bytes) -> tuple[int, int] | None:
    """(frame marker, components) of a JPEG: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive, ...;
    None when the bytes hold no frame header before the first scan (not a JPEG, or a damaged one)."""
    if jpeg[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(jpeg)
    while i + 4 <= n:
        if jpeg[i] != 0xFF:
            return None
        marker = jpeg[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return (marker, jpeg[i + 9]) if i + 9 < n else None
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return None


def nvjpeg_eligible(jpeg: bytes) -> bool:
    """What is handed to nvjpeg: baseline or extended sequential Huffman JPEGs of 1 or 3 components (shard
    stores RGB baseline JPEGs; everything else it converts, so in practice every image)."""
    header = jpeg_header(jpeg)
    return header is not None and header[0] in (0xC0, 0xC1) and header[1] in (1, 3)


def nvjpeg_decode(jpegs: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """One batched GPU decode: uint8 (3, H, W) RGB tensors on `device`. Raises when nvjpeg refuses any image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def nvjpeg_crops(jpegs: Sequence[bytes], resolution: int, device: torch.device | str,
                 gpu_decode: Callable[[list[bytes]], list[torch.Tensor]] | None = None,
                 cpu_decode: Callable[[bytes], torch.Tensor] = decode_rgb) -> tuple[torch.Tensor, list[int]]:
    """JPEG bytes -> ADM center crops (B, R, R, 3) uint8 on `device`, in the order given, cropped in PIL's own
    arithmetic (`adm_crop(exact=True)`), and the indices of the images decoded on the CPU. `gpu_decode(batch)`
    decodes a list at once (default: nvjpeg on `device`) and raises if it refuses any: then each image is tried
    alone, and those it refuses go to `cpu_decode`. What `nvjpeg_eligible` rejects goes there directly."""
    device = torch.device(device)
    gpu_decode = gpu_decode or (lambda batch: nvjpeg_decode(batch, device))
    images: list[torch.Tensor | None] = [None] * len(jpegs)
    eligible = [i for i, j in enumerate(jpegs) if nvjpeg_eligible(j)]
    if eligible:
        try:
            for i, image in zip(eligible, gpu_decode([jpegs[i] for i in eligible]), strict=True):
                images[i] = image
        except Exception:  # whatever nvjpeg raises: one refused image fails the batch, so find it
            for i in eligible:
                try:
                    images[i] = gpu_decode([jpegs[i]])[0]
                except Exception:
                    images[i] = None
    on_cpu = [i for i, image in enumerate(images) if image is None]
    for i in on_cpu:
        images[i] = cpu_decode(jpegs[i]).to(device, non_blocking=True)
    return torch.stack([adm_crop(image, resolution, exact=True) for image in images]), on_cpu


def decode_crop_with(method: str) -> Callable[[bytes, int], np.ndarray]:
    """The one-image CPU crop of a decode path: `pil` or `tensor` (nvjpeg works on batches: `nvjpeg_crops`)."""
    if method == "pil":
        return pil_crop
    if method == "tensor":
        return tensor_crop
    raise ValueError(f"encode.decode: {method!r} has no one-image CPU crop; known: pil, tensor")
