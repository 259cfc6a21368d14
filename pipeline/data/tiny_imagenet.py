"""A tiny procedural stand-in for ImageNet, for tests and smoke runs.

Real ImageNet synset ids and file names, the ImageFolder or Kaggle layout, and classes that
a small generative model can visibly learn: class k draws one shape (disc, square,
triangle, ring, cross, diamond, bars, X) in its own saturated hue on a dark background of
the same hue, with per-image jitter of position, size and brightness plus mild noise.
Hues are handed out so the first classes are furthest apart on the colour wheel, hence
the class mean colours differ clearly. Output is byte-identical for the same arguments
(numpy Generator seeded from (seed, split, class, index); baseline JPEG at quality 95).

kind "shapes" (configs/learn.yaml): classes differ ONLY by shape (disc, square, triangle, cross),
scaled to equal area; every image draws its foreground and background colours, size and position
from one distribution shared by all classes, so neither a class's mean colour nor its mean ink
tells it apart: a model must learn the shape.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# The first 16 ImageNet-1k synsets in sorted order: their labels are 0..15 in ImageNet too.
SYNSETS = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
    "n01498041", "n01514668", "n01514859", "n01518878", "n01530575", "n01531178",
    "n01532829", "n01534433", "n01537544", "n01558993",
)
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bars", "x")
KIND_SHAPES = ("disc", "square", "triangle", "cross")
# Radius factors giving every shape of kind "shapes" the disc's area pi r^2 (areas of _shape_mask:
# square 2.89 r^2, triangle 2 r^2, cross 2.04 r^2).
_EQUAL_AREA = {"disc": 1.0, "square": math.sqrt(math.pi / 2.89), "triangle": math.sqrt(math.pi / 2.0),
               "cross": math.sqrt(math.pi / 2.04)}
KINDS = ("colours", "shapes")
MARKER = "tiny_imagenet.json"
FORMAT_VERSION = 1
_SPLIT_CODE = {"train": 0, "val": 1}


def make_tiny_imagenet(
    out: str | os.PathLike,
    *,
    classes: int = 4,
    per_class: int = 32,
    val_per_class: int = 8,
    size: int = 64,
    seed: int = 0,
    layout: str = "imagefolder",
    kind: str = "colours",
) -> dict:
    """Write the dataset to `out` and return its summary (the marker's content plus
    `created`). A no-op when `out` already holds a complete dataset made with the same
    arguments. The dataset is built in a sibling `.<name>.partial-<pid>` folder, marker
    written last, then renamed into place, so `out` is either complete or absent.
    kind: "colours" (one shape and hue per class) or "shapes" (shape only, see the module doc)."""
    args = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class,
            "size": size, "seed": seed, "layout": layout}
    if kind != "colours":  # the default kind keeps the marker (and the sets made before kinds) unchanged
        args["kind"] = kind
    _check_args(args)
    out = Path(out)
    existing = _read_marker(out)
    if existing is not None:
        if existing.get("args") != args or existing.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{out} already holds a tiny ImageNet made with "
                             f"{existing.get('args')}; asked for {args}: use another folder")
        return {**existing, "root": str(out), "created": False}
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and has no {MARKER}; refusing to write "
                         f"a tiny ImageNet over it")

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = _write_dataset(partial, args)
    try:
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except OSError:
        # Another process finished the same dataset first: keep theirs if it matches.
        shutil.rmtree(partial)
        if _read_marker(out) != summary:
            raise
        return {**summary, "root": str(out), "created": False}
    return {**summary, "root": str(out), "created": True}


def class_style(k: int) -> tuple[str, tuple[int, int, int], tuple[int, int, int]]:
    """(shape, foreground RGB, background RGB) of class k."""
    # Bit-reversed order over 16 hue slots: classes 0..3 sit at 0, 180, 90, 270 degrees.
    # Classes 8..15 take the hue next to class k - 8's, so they get a light background
    # (classes 0..7 a dark one) to keep their mean colours apart.
    slot = int(f"{k:04b}"[::-1], 2)
    hue = slot / 16
    fg = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    saturation, value = (0.8, 0.25) if k < 8 else (0.25, 0.9)
    bg = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    return SHAPES[k % len(SHAPES)], fg, bg


def render_image(k: int, split: str, index: int, *, size: int, seed: int, kind: str = "colours") -> np.ndarray:
    """One uint8 HxWx3 image of class k; depends only on its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], k, index])
    if kind == "shapes":
        return _render_shape_only(k, rng, size)
    shape, fg, bg = class_style(k)
    r = size * rng.uniform(0.24, 0.34)
    cx, cy = size * rng.uniform(0.38, 0.62, size=2)
    gain = rng.uniform(0.85, 1.0)  # brightness jitter of the shape
    y, x = np.mgrid[0:size, 0:size] + 0.5
    mask = _shape_mask(shape, x - cx, y - cy, r)
    img = np.empty((size, size, 3), np.float64)
    img[:] = bg
    img[mask] = np.asarray(fg, np.float64) * gain
    img += rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _render_shape_only(k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    # Every draw below has the same distribution for every class; only the mask's shape depends on k.
    shape = KIND_SHAPES[k]
    fg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.35))
    r = size * rng.uniform(0.18, 0.25) * _EQUAL_AREA[shape]
    cx, cy = size * rng.uniform(0.42, 0.58, size=2)  # the shape's centroid; every shape stays inside
    y, x = np.mgrid[0:size, 0:size] + 0.5
    # _shape_mask centres the triangle's bounding box; its centroid lies r / 3 below that
    dy = y - cy + (r / 3 if shape == "triangle" else 0.0)
    mask = _shape_mask(shape, x - cx, dy, r)
    img = np.empty((size, size, 3), np.float64)
    img[:] = np.asarray(bg) * 255
    img[mask] = np.asarray(fg) * 255
    img += rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # apex up, base at dy = r
        return (dy <= r) & (ax <= 0.5 * (dy + r))
    if shape == "ring":
        d = np.sqrt(dx**2 + dy**2)
        return (d <= r) & (d >= 0.6 * r)
    if shape == "cross":
        arm = 0.3 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "diamond":
        return ax + ay <= 1.2 * r
    if shape == "bars":  # three horizontal bars
        return (np.maximum(ax, ay) <= 0.9 * r) & (np.floor((dy + r) / (0.4 * r)) % 2 == 0)
    if shape == "x":
        return (np.maximum(ax, ay) <= 0.8 * r) & ((np.abs(dx - dy) <= 0.3 * r)
                                                 | (np.abs(dx + dy) <= 0.3 * r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _write_dataset(root: Path, args: dict) -> dict:
    classes, size, seed = args["classes"], args["size"], args["seed"]
    kind = args.get("kind", "colours")
    kaggle = args["layout"] == "kaggle"
    data_dir = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    synsets = list(SYNSETS[:classes])
    for k, synset in enumerate(synsets):
        folder = data_dir / "train" / synset
        folder.mkdir(parents=True)
        for i in range(args["per_class"]):
            _save_jpeg(render_image(k, "train", i, size=size, seed=seed, kind=kind),
                       folder / f"{synset}_{i}.JPEG")

    # Val ids interleave classes (round robin) like the real, shuffled val set.
    solution = []
    (data_dir / "val").mkdir(parents=True)
    for k, synset in enumerate(synsets):
        folder = data_dir / "val" if kaggle else data_dir / "val" / synset
        folder.mkdir(exist_ok=True)
        for i in range(args["val_per_class"]):
            image_id = f"ILSVRC2012_val_{i * classes + k + 1:08d}"
            _save_jpeg(render_image(k, "val", i, size=size, seed=seed, kind=kind),
                       folder / f"{image_id}.JPEG")
            solution.append(f"{image_id},{synset} 0 0 {size - 1} {size - 1}")
    if kaggle:
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(line + "\n" for line in solution))

    summary = {
        "format_version": FORMAT_VERSION,
        "args": args,
        "synsets": synsets,
        "styles": {s: _style_json(k, kind) for k, s in enumerate(synsets)},
        "train_images": classes * args["per_class"],
        "val_images": classes * args["val_per_class"],
    }
    (root / "README.txt").write_text(
        "Procedural tiny ImageNet made by pipeline.data.tiny_imagenet.make_tiny_imagenet.\n"
        f"Arguments: {json.dumps(args, sort_keys=True)}\n"
        + ("Class k = synset k of the sorted ImageNet-1k list; one shape and hue per class.\n" if kind == "colours"
           else "Class k = synset k of the sorted ImageNet-1k list; classes differ only by shape.\n"))
    (root / MARKER).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")  # last
    return summary


def _style_json(k: int, kind: str) -> dict:
    if kind == "shapes":
        return {"shape": KIND_SHAPES[k], "foreground": "random", "background": "random"}
    shape, fg, bg = class_style(k)
    return {"shape": shape, "foreground": list(fg), "background": list(bg)}


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=95, subsampling=0,
                                        optimize=False, progressive=False)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None


def _check_args(args: dict) -> None:
    if not 1 <= args["classes"] <= len(SYNSETS):
        raise ValueError(f"classes={args['classes']}: tiny ImageNet has 1..{len(SYNSETS)} classes")
    for name in ("per_class", "val_per_class"):
        if args[name] < 1:
            raise ValueError(f"{name}={args[name]}: expected >= 1")
    if args["size"] < 16:
        raise ValueError(f"size={args['size']}: expected >= 16 pixels")
    kind = args.get("kind", "colours")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if kind == "shapes" and args["classes"] > len(KIND_SHAPES):
        raise ValueError(f"classes={args['classes']}: kind 'shapes' has 1..{len(KIND_SHAPES)} classes")
    if args["layout"] not in ("imagefolder", "kaggle"):
        raise ValueError(f"layout={args['layout']!r}: expected 'imagefolder' or 'kaggle'")


def photo_like_jpeg(seed: int, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A JPEG with the statistics that make photos slow to decode and hard to resize exactly: smooth colour
    gradients, band-limited texture at three scales (foliage, fur), flat objects with hard edges, sensor-like
    noise; ~100 KB at 500x375 and quality 90 (ImageNet's are ~110 KB at ~400x350). For decode benchmarks and
    pixel-difference tests; the same bytes for the same arguments."""
    import io

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        img[..., c] = 120 + 50 * np.sin(a * x / 40 + b * y / 50 + phase) + 30 * np.cos((x * b - y * a) / 90)
    for scale, amplitude in ((2, 30), (6, 18), (20, 12)):
        noise = rng.standard_normal((height // scale + 2, width // scale + 2, 3)) * 40 + 128
        noise = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize(
            (width + 2 * scale, height + 2 * scale), Image.BICUBIC)
        img += (np.asarray(noise, np.float32)[:height, :width] - 128) / 40 * amplitude
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 110)
        disc = rng.random() < 0.5
        mask = ((x - cx) ** 2 + (y - cy) ** 2 < r * r) if disc else ((abs(x - cx) < r) & (abs(y - cy) < r * 0.6))
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 9, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
