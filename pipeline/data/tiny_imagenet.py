"""A tiny procedural stand-in for ImageNet, for tests and smoke runs.

Real ImageNet synset ids and file names, in any `data.layout` form (ImageFolder, Kaggle, the HF
hub's parquet files, WebDataset shards, the original ILSVRC2012 tars with a devkit), and classes
that a small generative model can visibly learn: class k draws one shape (disc, square,
triangle, ring, cross, diamond, bars, X) in its own saturated hue on a dark background of
the same hue, with per-image jitter of position, size and brightness plus mild noise.
Hues are handed out so the first classes are furthest apart on the colour wheel, hence
the class mean colours differ clearly. Output is byte-identical for the same arguments
(numpy Generator seeded from (seed, split, class, index); baseline JPEG at quality 95).

kind "shapes" (configs/learn.yaml): classes differ ONLY by shape (disc, square, triangle, cross),
scaled to equal area; every image draws its foreground and background colours, size and position
from one distribution shared by all classes, so neither a class's mean colour nor its mean ink
tells it apart: a model must learn the shape.

quirks: adds the files a real ImageNet holds (SRC-FLOW.md "ImageNet facts"): a CMYK JPEG, a
grayscale JPEG and a PNG named .JPEG in train, a truncated JPEG in val; `write_imagenet_form`
writes any list of images in any form, so tests hold every form to the same images.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import math
import os
import shutil
import tarfile
from dataclasses import dataclass
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
    quirks: bool = False,
) -> dict:
    """Write the dataset to `out` and return its summary (the marker's content plus
    `created`). A no-op when `out` already holds a complete dataset made with the same
    arguments. The dataset is built in a sibling `.<name>.partial-<pid>` folder, marker
    written last, then renamed into place, so `out` is either complete or absent.
    kind: "colours" (one shape and hue per class) or "shapes" (shape only, see the module doc);
    quirks: add a CMYK, a grayscale and a PNG-named-.JPEG train file and a truncated val file."""
    args = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class,
            "size": size, "seed": seed, "layout": layout}
    if kind != "colours":  # the default kind keeps the marker (and the sets made before kinds) unchanged
        args["kind"] = kind
    if quirks:
        args["quirks"] = True
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


@dataclass(frozen=True)
class TinyImage:
    """One image file of a dataset to write: its ILSVRC-style file name and bytes."""

    split: str  # "train" | "val"
    synset: str
    name: str  # e.g. n01440764_3.JPEG, ILSVRC2012_val_00000007.JPEG
    data: bytes


def _write_dataset(root: Path, args: dict) -> dict:
    classes, size, seed = args["classes"], args["size"], args["seed"]
    kind = args.get("kind", "colours")
    synsets = list(SYNSETS[:classes])
    images = [TinyImage("train", synset, f"{synset}_{i}.JPEG",
                        _jpeg_bytes(render_image(k, "train", i, size=size, seed=seed, kind=kind)))
              for k, synset in enumerate(synsets) for i in range(args["per_class"])]
    # Val ids interleave classes (round robin) like the real, shuffled val set.
    images += [TinyImage("val", synset, f"ILSVRC2012_val_{i * classes + k + 1:08d}.JPEG",
                         _jpeg_bytes(render_image(k, "val", i, size=size, seed=seed, kind=kind)))
               for k, synset in enumerate(synsets) for i in range(args["val_per_class"])]
    if args.get("quirks"):
        images += _quirk_images(synsets, args)
    write_imagenet_form(root, images, args["layout"], seed=seed, box=size)

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
           else "Class k = synset k of the sorted ImageNet-1k list; classes differ only by shape.\n")
        + (QUIRKS_README if args.get("quirks") else "") + FORM_README.get(args["layout"], ""))
    (root / MARKER).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")  # last
    return summary


def _style_json(k: int, kind: str) -> dict:
    if kind == "shapes":
        return {"shape": KIND_SHAPES[k], "foreground": "random", "background": "random"}
    shape, fg, bg = class_style(k)
    return {"shape": shape, "foreground": list(fg), "background": list(bg)}


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=95, subsampling=0, optimize=False,
                                        progressive=False)
    return buf.getvalue()


QUIRKS_README = ("Quirks, as in the real ImageNet: train/<synset 0>/<synset>_900001.JPEG is CMYK, "
                 "<synset 1>_900002.JPEG grayscale, <synset 0>_900003.JPEG a PNG named .JPEG; the last val image "
                 "is a truncated JPEG (shard rejects it).\n")
FORM_README = {
    "hf-parquet": "Form hf-parquet (the HF hub's ILSVRC/imagenet-1k): data/{train,validation}-NNNNN-of-NNNNN.parquet,"
                  " columns image {bytes, path: <name>_<synset>.JPEG} and label (index among the sorted 1,000 "
                  "synsets), rows in a shuffled order.\n",
    "wds": "Form wds (timm/imagenet-1k-wds): imagenet1k-{train,validation}-NNNN.tar, per sample <key>.cls (label "
           "index), <key>.jpg and <key>.json {filename, label}, samples shuffled across shards.\n",
    "ilsvrc-tar": "Form ilsvrc-tar (image-net.org): ILSVRC2012_img_train.tar holding <synset>.tar per class, "
                  "ILSVRC2012_img_val.tar (flat), ILSVRC2012_devkit_t12.tar.gz (data/meta.mat: ILSVRC2012_ID -> WNID "
                  "in a permuted order, like the real one's; data/ILSVRC2012_validation_ground_truth.txt).\n",
}


def _quirk_images(synsets: list[str], args: dict) -> list[TinyImage]:
    """A CMYK JPEG, a grayscale JPEG and a PNG named .JPEG in train; a truncated JPEG as the next val image."""
    size, seed, kind = args["size"], args["seed"], args.get("kind", "colours")
    pixels = render_image(0, "train", 900_000, size=size, seed=seed, kind=kind)
    out = []
    for n, (k, mode, fmt) in enumerate(((0, "CMYK", "JPEG"), (min(1, len(synsets) - 1), "L", "JPEG"),
                                        (0, "RGB", "PNG")), start=1):
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").convert(mode).save(buf, format=fmt)
        out.append(TinyImage("train", synsets[k], f"{synsets[k]}_{900_000 + n}.JPEG", buf.getvalue()))
    whole = _jpeg_bytes(render_image(0, "val", 900_000, size=size, seed=seed, kind=kind))
    number = len(synsets) * args["val_per_class"] + 1
    out.append(TinyImage("val", synsets[0], f"ILSVRC2012_val_{number:08d}.JPEG", whole[: len(whole) // 2]))
    return out


def write_imagenet_form(root: str | os.PathLike, images: list[TinyImage], layout: str, *, seed: int = 0,
                        box: int = 64) -> None:
    """Write `images` (every one with an ILSVRC synset) under `root` in the `data.layout` form `layout`, as the
    real dataset is laid out in that form; `box` is the Kaggle csv's box side. The archive forms put their rows
    and samples in a seeded, shuffled order, so no reader may rely on the order of a source."""
    root = Path(root)
    rng = np.random.default_rng([seed, 27])
    if layout in ("imagefolder", "kaggle"):
        _write_folders(root, images, layout == "kaggle", box)
    elif layout == "hf-parquet":
        _write_hf_parquet(root / "data", images, rng)
    elif layout == "wds":
        _write_wds(root, images, rng)
    elif layout == "ilsvrc-tar":
        _write_ilsvrc_tars(root, images, rng)
    else:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")


LAYOUTS = ("imagefolder", "kaggle", "hf-parquet", "wds", "ilsvrc-tar")


def _write_folders(root: Path, images: list[TinyImage], kaggle: bool, box: int) -> None:
    data_dir = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    solution = []
    for im in images:
        folder = data_dir / im.split if kaggle and im.split == "val" else data_dir / im.split / im.synset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / im.name).write_bytes(im.data)
        if im.split == "val":
            solution.append(f"{Path(im.name).stem},{im.synset} 0 0 {box - 1} {box - 1}")
    if kaggle:
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(line + "\n" for line in solution))


def _shuffled(images: list[TinyImage], split: str, rng: np.random.Generator) -> list[TinyImage]:
    chosen = [im for im in images if im.split == split]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _write_hf_parquet(data_dir: Path, images: list[TinyImage], rng: np.random.Generator) -> None:
    """Two files per split (train: the rows cut in two), row groups of 5 rows; HF's <name>_<synset>.JPEG paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.imagenet import ILSVRC_LABELS

    data_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    for split, name in (("train", "train"), ("val", "validation")):
        rows = _shuffled(images, split, rng)
        parts = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
        for i, part in enumerate(parts):
            table = pa.Table.from_pylist(
                [{"image": {"bytes": im.data, "path": f"{Path(im.name).stem}_{im.synset}{Path(im.name).suffix}"},
                  "label": ILSVRC_LABELS[im.synset]} for im in part], schema=schema)
            pq.write_table(table, data_dir / f"{name}-{i:05d}-of-{len(parts):05d}.parquet", row_group_size=5)


def _write_wds(root: Path, images: list[TinyImage], rng: np.random.Generator) -> None:
    """Three shards per split, samples shuffled across them: <key>.cls, <key>.jpg, <key>.json."""
    from pipeline.data.imagenet import ILSVRC_LABELS

    root.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation")):
        samples = _shuffled(images, split, rng)
        for shard in range(3):
            with tarfile.open(root / f"imagenet1k-{name}-{shard:04d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
                for im in samples[shard::3]:
                    key, label = Path(im.name).stem, ILSVRC_LABELS[im.synset]
                    meta = json.dumps({"filename": im.name, "label": label}).encode()
                    for ext, data in (("cls", str(label).encode()), ("jpg", im.data), ("json", meta)):
                        _add_member(tar, f"{key}.{ext}", data)


def _write_ilsvrc_tars(root: Path, images: list[TinyImage], rng: np.random.Generator) -> None:
    """The train tar of per-synset tars (members in a shuffled order), the flat val tar, and the devkit whose
    meta.mat numbers the 1,000 synsets in a permuted order, plus internal WordNet nodes (num_children > 0)."""
    import scipy.io

    from pipeline.data.imagenet import ILSVRC_SYNSETS

    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for synset in sorted({im.synset for im in images if im.split == "train"}):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for im in _shuffled([im for im in images if im.synset == synset], "train", rng):
                    _add_member(inner, im.name, im.data)
            _add_member(outer, f"{synset}.tar", buf.getvalue())
    val = sorted((im for im in images if im.split == "val"), key=lambda im: im.name)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for im in val:
            _add_member(tar, im.name, im.data)

    ids = rng.permutation(len(ILSVRC_SYNSETS)) + 1  # ILSVRC2012_ID of sorted synset i: NOT i + 1
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    nodes = [(int(ids[i]), s, s, "", 0, np.zeros((1, 0)), 0, 1300) for i, s in enumerate(ILSVRC_SYNSETS)]
    nodes += [(1001, "n00001740", "entity", "", 2, np.array([1002, 1003]), 19, 0),
              (1002, "n00001930", "physical entity", "", 1, np.array([1]), 18, 0),
              (1003, "n00002137", "abstraction", "", 1, np.array([2]), 18, 0)]
    synsets = np.zeros((1, len(nodes)), dtype=[(f, "O") for f in fields])
    for j, node in enumerate(nodes):
        synsets[0, j] = node
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    id_of = {s: int(ids[i]) for i, s in enumerate(ILSVRC_SYNSETS)}
    numbers = sorted(int(im.name.split("_")[-1].split(".")[0]) for im in val)
    if numbers != list(range(1, len(val) + 1)):
        raise ValueError("ilsvrc-tar val images must be ILSVRC2012_val_00000001 .. in order")
    truth = "".join(f"{id_of[im.synset]}\n" for im in val).encode()
    with (open(root / "ILSVRC2012_devkit_t12.tar.gz", "wb") as f,
          gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz,  # mtime 0: the same bytes every time
          tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar):
        _add_member(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add_member(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


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
    if args["layout"] not in LAYOUTS:
        raise ValueError(f"layout={args['layout']!r}: expected one of {', '.join(LAYOUTS)}")


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
