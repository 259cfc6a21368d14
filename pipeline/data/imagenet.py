"""ImageNet on disk: find the layout, list the images with their labels, and turn each
file's bytes into a JPEG the rest of the pipeline can trust.

Facts handled (SRC-FLOW.md, "ImageNet facts a loader must handle"):
- label = index of the synset among the sorted 1,000 ILSVRC-2012 synsets (n01440764 = 0,
  `imagenet_synsets.txt`), the same for train and val and for every layout; a folder dataset
  whose class folders are not all ILSVRC synsets is labelled by its own sorted train synsets;
- five layouts: three archive forms read in place (`imagenet_archives.py`: hf-parquet, wds,
  ilsvrc-tar) and two folder forms: ImageFolder (train/<synset>/*, val/<synset>/*) and Kaggle ILSVRC (train as
  ImageFolder, val/ flat + LOC_val_solution.csv whose PredictionString starts with the
  synset); the Kaggle download root (ILSVRC/Data/CLS-LOC/{train,val}, csv at the root) is
  accepted as is;
- 22 CMYK JPEGs, one PNG named .JPEG and some grayscale images in train: converted once to
  an RGB JPEG; every RGB JPEG is kept byte for byte.

`SourceImage.rel_path` is always relative to the `root` the caller passed, so
`Path(root) / rel_path` opens the file whichever layout or nesting `root` has.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

Layout = Literal["imagefolder", "kaggle", "hf-parquet", "wds", "ilsvrc-tar"]
LAYOUTS = ("imagefolder", "kaggle", "hf-parquet", "wds", "ilsvrc-tar")
ARCHIVE_LAYOUTS = ("hf-parquet", "wds", "ilsvrc-tar")
# The 1,000 ILSVRC-2012 synsets, sorted: a label is an index into this list (package data: the parquet and
# WebDataset forms carry only the index)
ILSVRC_SYNSETS = tuple(resources.files("pipeline.data").joinpath("imagenet_synsets.txt").read_text().split())
ILSVRC_LABELS = {s: i for i, s in enumerate(ILSVRC_SYNSETS)}

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VAL_SOLUTION_CSV = "LOC_val_solution.csv"
KAGGLE_DATA_DIR = Path("ILSVRC", "Data", "CLS-LOC")

# One fixed encoder setting for every converted image, so conversion is deterministic
# (for a given libjpeg build): baseline, 4:4:4, quality 95, no metadata carried over.
JPEG_QUALITY = 95
_JPEG_SAVE_ARGS = dict(format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False,
                       progressive=False)


@dataclass(frozen=True)
class SourceImage:
    """One image file of the source dataset."""

    split: str  # "train" | "val"
    rel_path: str  # posix path relative to the root passed to scan_split (an archive's: <container>/<file name>)
    synset: str  # WordNet id, e.g. "n01440764"
    label: int  # index of `synset` among the sorted ILSVRC synsets (see synset_labels)
    container: str = ""  # the archive holding the image, relative to the root; "" for a file
    offset: int = -1  # a tar member's data offset in `container`, or a parquet row's index
    size: int = -1  # a tar member's byte size (-1: a file, or a parquet row)


class RejectedImage(Exception):
    """The bytes are not a decodable image; `.reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Layout and listing


def detect_layout(root: str | os.PathLike) -> Layout:
    """'imagefolder' when val/ holds one folder per synset, 'kaggle' when val/ is flat and
    LOC_val_solution.csv sits at `root` or next to val/; without train/ and val/ folders, the
    archive form `root` holds (ILSVRC tars, HF parquet files or WebDataset shards)."""
    from pipeline.data.imagenet_archives import EXPECTED, detect_archive_layout

    if not _has_split_folders(root):
        if layout := detect_archive_layout(Path(root)):
            return layout
        raise ValueError(f"{Path(root)} holds neither train/ and val/ (ImageFolder or Kaggle) nor an archive form: "
                         + "; ".join(f"{k}: {v}" for k, v in EXPECTED.items()))
    data_dir = _data_dir(root)
    val_dir = data_dir / "val"
    has_class_dirs = has_images = False
    with os.scandir(val_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                has_class_dirs = True
            elif _is_image_name(entry.name):
                has_images = True
    if has_class_dirs and not has_images:
        return "imagefolder"
    if has_images and not has_class_dirs:
        if _val_solution_csv(root) is None:
            raise ValueError(f"{val_dir} is flat (Kaggle layout) but no {VAL_SOLUTION_CSV} "
                             f"was found in {Path(root)} or {data_dir}")
        return "kaggle"
    found = "both synset folders and image files" if has_class_dirs else "no images"
    raise ValueError(f"cannot tell the layout of {val_dir}: it holds {found}; expected either "
                     f"val/<synset>/<images> (ImageFolder) or flat val/<images> + "
                     f"{VAL_SOLUTION_CSV} (Kaggle)")


def list_synsets(root: str | os.PathLike, layout: Layout) -> list[str]:
    """Sorted train synsets (their labels: synset_labels). A train synset folder without an image is refused, as
    torchvision's ImageFolder refuses it: it would be a class with a label and no data."""
    _check_layout(layout)
    if layout in ARCHIVE_LAYOUTS:
        from pipeline.data.imagenet_archives import scan_archive_split

        synsets = sorted({im.synset for im in scan_archive_split(root, "train", layout)[0]})
        if not synsets:
            raise ValueError(f"{root} has no train images in {layout} form")
        return synsets
    train_dir = _data_dir(root) / "train"
    with os.scandir(train_dir) as entries:
        synsets = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not synsets:
        raise ValueError(f"{train_dir} has no synset folders; expected train/<synset>/<images>")
    empty = [s for s in synsets if not _holds_an_image(train_dir / s)]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{train_dir / empty[0]}{more} holds no train images: an empty class folder would be a class "
                         f"with a label and no data; remove it or add its images")
    return synsets


def synset_labels(synsets: list[str]) -> dict[str, int]:
    """synset -> label: its index among the sorted ILSVRC synsets, whatever subset or form holds it; a folder
    dataset with any other class name is labelled by its own sorted list instead."""
    if all(s in ILSVRC_LABELS for s in synsets):
        return {s: ILSVRC_LABELS[s] for s in synsets}
    return {s: i for i, s in enumerate(sorted(synsets))}


def _holds_an_image(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(_skip_reason(e) is None for e in entries)


def scan_split(
    root: str | os.PathLike,
    split: str,
    layout: Layout,
    *,
    classes: list[str] | int | None = None,
    max_per_class: int | None = None,
) -> tuple[list[SourceImage], dict[str, int]]:
    """List one split's images in a deterministic order, with labels.

    Order: by synset then file name (Kaggle and ilsvrc-tar val: by file name, label from the
    csv or the devkit; hf-parquet and wds: the order of their files and rows).
    `classes`: explicit synsets, or a count N for the first N sorted synsets; labels stay
    the full-dataset indices either way. `max_per_class`: the first K file names per class
    in sorted order, in every layout (so every form selects the same images).
    Returns (images, ignored) where ignored counts skipped files by reason: hidden,
    not_an_image_extension, no_label_in_csv, not_a_file (a folder where an image was
    expected), outside_class_folder, synset_not_in_train (and the archive forms' own:
    label_out_of_range, no_image_in_sample, no_label_in_devkit, not_a_class_tar). Files of
    synsets outside the selection are skipped without being counted.
    """
    _check_layout(layout)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    root = Path(root)
    synsets = list_synsets(root, layout)
    labels = synset_labels(synsets)
    selected = _select_classes(synsets, classes, root)
    ignored: dict[str, int] = {}
    if layout in ARCHIVE_LAYOUTS:
        return _select_archive_images(root, split, layout, labels, set(selected), max_per_class, ignored), ignored
    data_dir = _data_dir(root)
    rel_split = (data_dir / split).relative_to(root).as_posix()

    if split == "val" and layout == "kaggle":
        images = _scan_flat_val(root, data_dir / "val", rel_split, labels, set(selected),
                                max_per_class, ignored)
    else:
        images = _scan_class_folders(data_dir / split, rel_split, labels, selected,
                                     max_per_class, ignored)
    return images, ignored


def listing_digest(images: list[SourceImage], root: str | os.PathLike) -> str:
    """sha256 over one line per image, in the given order: split, rel_path, label and file
    size. The dataset's identity for fingerprints: a renamed, relabelled, added, removed or
    resized file changes it."""
    root = Path(root)
    h = hashlib.sha256()
    containers = set()
    for im in images:
        size = im.size if im.container else source_size(root / im.rel_path)
        h.update(f"{im.split}\t{im.rel_path}\t{im.label}\t{size}\n".encode())
        containers.add(im.container)
    for container in sorted(containers - {""}):  # a parquet row's size is its file's business
        h.update(f"{container}\t{os.stat(root / container).st_size}\n".encode())
    return h.hexdigest()


def source_size(path: Path) -> int:
    """A listed file's size; -1 for one that cannot be read (a symlink loop, a dangling symlink): `shard` lists it
    in rejected.parquet with the reason, it never stops planning."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def source_file_size(root: str | os.PathLike, im: SourceImage) -> int:
    """The image's stored bytes (a parquet row: its file's size over its rows, estimated from the file); -1 for a
    file that cannot be read (source_size)."""
    if not im.container:
        return source_size(Path(root) / im.rel_path)
    if im.size >= 0:
        return im.size
    path = Path(root) / im.container
    return os.stat(path).st_size // max(_parquet_rows(str(path)), 1)


@lru_cache(maxsize=64)
def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ---------------------------------------------------------------------------------------
# Bytes -> trusted JPEG


def prepare_image_bytes(raw: bytes) -> tuple[bytes, dict]:
    """Decode `raw` fully and return (jpeg_bytes, info).

    An RGB JPEG (baseline or progressive) comes back byte for byte, so decoding the stored
    bytes gives exactly what a reference loader reading the original gets. Anything else
    (CMYK or grayscale JPEG, PNG or another format under a .JPEG name, alpha or palette
    images composited on white, 16-bit images) is converted once to an RGB baseline JPEG
    with fixed settings (quality 95, 4:4:4). info = {orig_format, orig_mode, width, height,
    converted}. Raises RejectedImage for empty, truncated or undecodable bytes.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; "
                           "prepare_image_bytes needs it False to reject truncated files")
    if not raw:
        raise RejectedImage("empty file")
    img = _decode(raw)
    info = {"orig_format": img.format, "orig_mode": img.mode, "width": img.width,
            "height": img.height, "converted": False}
    if img.format == "JPEG" and img.mode == "RGB":
        return bytes(raw), info
    rgb = _to_rgb(img)
    buf = io.BytesIO()
    rgb.save(buf, **_JPEG_SAVE_ARGS)
    info["converted"] = True
    return buf.getvalue(), info


# ---------------------------------------------------------------------------------------
# Helpers


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _has_split_folders(root: str | os.PathLike) -> bool:
    root = Path(root)
    return any((c / "train").is_dir() and (c / "val").is_dir() for c in (root, root / KAGGLE_DATA_DIR))


def _select_archive_images(root: Path, split: str, layout: str, labels: dict[str, int], wanted: set[str],
                           max_per_class: int | None, ignored: dict[str, int]) -> list[SourceImage]:
    """An archive split's images of the wanted synsets, in listing order; max_per_class keeps the first K file
    names of each synset in sorted order, as the folder layouts do."""
    from pipeline.data.imagenet_archives import scan_archive_split

    images, skipped = scan_archive_split(root, split, layout)
    for reason, n in skipped.items():
        ignored[reason] = ignored.get(reason, 0) + n
    for im in images:
        if im.synset not in labels:  # a val image of a synset without train images, as in the folder forms
            _count(ignored, "synset_not_in_train")
    images = [im for im in images if im.synset in wanted]
    if max_per_class is not None:
        names: dict[str, list[str]] = {}
        for im in images:
            names.setdefault(im.synset, []).append(im.rel_path.rsplit("/", 1)[1])
        kept = {(s, n) for s, ns in names.items() for n in sorted(ns)[:max_per_class]}
        images = [im for im in images if (im.synset, im.rel_path.rsplit("/", 1)[1]) in kept]
    return images


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _data_dir(root: str | os.PathLike) -> Path:
    """The folder holding train/ and val/: `root` itself, or ILSVRC/Data/CLS-LOC below a
    Kaggle download root."""
    root = Path(root)
    for candidate in (root, root / KAGGLE_DATA_DIR):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise ValueError(f"{root} holds neither train/ and val/ nor {KAGGLE_DATA_DIR.as_posix()}"
                     f"/{{train,val}}; expected an ImageNet root in ImageFolder or Kaggle layout")


def _val_solution_csv(root: str | os.PathLike) -> Path | None:
    for candidate in (Path(root) / VAL_SOLUTION_CSV, _data_dir(root) / VAL_SOLUTION_CSV):
        if candidate.is_file():
            return candidate
    return None


def _read_val_solution(path: Path) -> dict[str, str]:
    """ImageId -> synset (first token of PredictionString)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise ValueError(f"{path} must have columns ImageId,PredictionString; "
                             f"found {reader.fieldnames}")
        solution = {}
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if tokens:
                solution[row["ImageId"]] = tokens[0]
    return solution


def _select_classes(synsets: list[str], classes: list[str] | int | None, root: Path) -> list[str]:
    if classes is None:
        return synsets
    if isinstance(classes, bool) or not isinstance(classes, (int, list, tuple)):
        raise ValueError(f"classes must be a list of synsets, a count or None, got {classes!r}")
    if isinstance(classes, int):
        if not 1 <= classes <= len(synsets):
            raise ValueError(f"classes={classes} but {root} has {len(synsets)} train synsets; "
                             f"expected 1..{len(synsets)}")
        return synsets[:classes]
    known = set(synsets)
    unknown = [s for s in classes if s not in known]
    if unknown:
        raise ValueError(f"classes {unknown[:5]} are not train synsets of {root}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes lists a synset more than once: {list(classes)}")
    return sorted(classes)


def _count(ignored: dict[str, int], reason: str) -> None:
    ignored[reason] = ignored.get(reason, 0) + 1


def _skip_reason(entry: os.DirEntry) -> str | None:
    """Why a folder entry is not an image to list, or None. A symlink that leads nowhere (dangling, or a loop) is
    listed, so that `shard` rejects it with its reason, like any other unreadable file."""
    if entry.name.startswith("."):
        return "hidden"
    try:
        is_file = entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:  # a symlink loop
        is_file = True
    if not is_file:
        return "not_a_file"
    if not _is_image_name(entry.name):
        return "not_an_image_extension"
    return None


def _scan_class_folders(split_dir: Path, rel_split: str, labels: dict[str, int],
                        selected: list[str], max_per_class: int | None,
                        ignored: dict[str, int]) -> list[SourceImage]:
    split = split_dir.name
    wanted = set(selected)
    present = set()
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                _count(ignored, "hidden")
            elif not entry.is_dir():
                _count(ignored, "outside_class_folder")
            elif entry.name in wanted:
                present.add(entry.name)
            elif entry.name not in labels:
                # A val folder whose synset has no train folder: no label to give it.
                with os.scandir(entry.path) as files:
                    for _ in files:
                        _count(ignored, "synset_not_in_train")
    images = []
    for synset in selected:
        if synset not in present:
            continue
        names = _image_names(split_dir / synset, ignored)
        if max_per_class is not None:
            names = names[:max_per_class]
        label = labels[synset]
        images += [SourceImage(split, f"{rel_split}/{synset}/{n}", synset, label) for n in names]
    return images


def _image_names(directory: Path, ignored: dict[str, int]) -> list[str]:
    """Sorted image file names of a folder; everything else is counted in `ignored` by reason."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            reason = _skip_reason(entry)
            if reason:
                _count(ignored, reason)
            else:
                names.append(entry.name)
    return sorted(names)


def _scan_flat_val(root: Path, val_dir: Path, rel_split: str, labels: dict[str, int],
                   wanted: set[str], max_per_class: int | None,
                   ignored: dict[str, int]) -> list[SourceImage]:
    csv_path = _val_solution_csv(root)
    if csv_path is None:
        raise ValueError(f"{val_dir} is flat (Kaggle layout) but no {VAL_SOLUTION_CSV} was "
                         f"found in {root} or {val_dir.parent}")
    solution = _read_val_solution(csv_path)
    names = _image_names(val_dir, ignored)
    images, taken = [], {}
    for name in names:
        synset = solution.get(os.path.splitext(name)[0])
        if synset is None:
            _count(ignored, "no_label_in_csv")
            continue
        if synset not in labels:
            _count(ignored, "synset_not_in_train")
            continue
        if synset not in wanted:
            continue
        if max_per_class is not None and taken.get(synset, 0) >= max_per_class:
            continue
        taken[synset] = taken.get(synset, 0) + 1
        images.append(SourceImage("val", f"{rel_split}/{name}", synset, labels[synset]))
    return images


_KNOWN_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _decode(raw: bytes) -> Image.Image:
    """Open and fully decode (img.load()), mapping failures to RejectedImage."""
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:
        if raw.startswith(_KNOWN_SIGNATURES):  # a header PIL cannot get past: cut short
            raise RejectedImage("truncated: image header incomplete") from None
        raise RejectedImage("not an image: no image format recognised") from None
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e)
        if "truncated" in message.lower() or isinstance(e, EOFError):
            raise RejectedImage(f"truncated: {message}") from None
        raise RejectedImage(f"undecodable: {message}") from None
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any decoded image: alpha composited on white, 16/32-bit scaled to 8-bit."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _scale_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (I;16*, or I/F holding values above 255) -> 8-bit, 65535 -> 255."""
    a = np.asarray(img).astype(np.float64)
    high = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    a = np.clip(np.rint(a * (255.0 / high)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L")
