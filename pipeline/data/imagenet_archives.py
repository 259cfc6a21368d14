"""ImageNet in the archive forms researchers download, listed and read in place: nothing is unpacked to disk.

- `hf-parquet`: the Hugging Face hub's ILSVRC/imagenet-1k, `data/{train,validation}-NNNNN-of-NNNNN.parquet` with
  columns `image` {bytes, path} and `label` (the index among the sorted 1,000 synsets). HF named its files
  `<ILSVRC name>_<synset>.JPEG`; that suffix is dropped, so an image's key is the same as in every other form.
- `wds`: timm/imagenet-1k-wds, `imagenet1k-{train,validation}-NNNN.tar`; per sample `<key>.jpg`, `<key>.cls` (the
  label index) and optionally `<key>.json`, whose "filename" (when present) names the original file.
- `ilsvrc-tar`: the original `ILSVRC2012_img_train.tar` (one tar per synset inside it), `ILSVRC2012_img_val.tar`
  (flat) and the devkit `ILSVRC2012_devkit_t12.tar.gz` (or its unpacked folder): the val ground truth holds
  ILSVRC2012 IDs, which are NOT the sorted-synset order; they map to synsets through the devkit's data/meta.mat
  (the leaf synsets, num_children == 0), as torchvision's ImageNet does.

Each image is a SourceImage whose `container` is its archive (relative to the root) and whose `offset`/`size` say
where its bytes are: a tar member's data span, or the row of a parquet file (`size` -1). `SourceReader` reads them
back keeping the current archive open, so a shard job that reads its images in listing order reads each archive
sequentially. Listing order: ilsvrc-tar by synset then file name (as ImageFolder); parquet and wds in the order of
their files and rows (members); labels never depend on it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path

from pipeline.data.imagenet import ILSVRC_LABELS, ILSVRC_SYNSETS, SourceImage

ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
ILSVRC_VAL_TAR = "ILSVRC2012_img_val.tar"
ILSVRC_DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_META = "data/meta.mat"
DEVKIT_VAL_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
# HF and timm call the val split "validation"; the ILSVRC files "val"
_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val")}
_IMAGE_EXTENSIONS = frozenset({"jpeg", "jpg", "png", "bmp", "webp", "tif", "tiff"})

EXPECTED = {
    "hf-parquet": "data/{train,validation}-NNNNN-of-NNNNN.parquet with columns image {bytes, path} and label",
    "wds": "*-{train,validation}-NNNN.tar WebDataset shards with <key>.jpg and <key>.cls members",
    "ilsvrc-tar": f"{ILSVRC_TRAIN_TAR} and/or {ILSVRC_VAL_TAR} beside {ILSVRC_DEVKIT}.tar.gz",
}


def detect_archive_layout(root: Path) -> str | None:
    """The archive form `root` holds, or None."""
    if (root / ILSVRC_TRAIN_TAR).is_file() or (root / ILSVRC_VAL_TAR).is_file():
        return "ilsvrc-tar"
    if any(split_files(root, "hf-parquet", s) for s in _SPLIT_NAMES):
        return "hf-parquet"
    if any(split_files(root, "wds", s) for s in _SPLIT_NAMES):
        return "wds"
    return None


def split_files(root: Path, layout: str, split: str) -> list[Path]:
    """A split's parquet files or WebDataset shards, sorted, from `root` or `root/data`."""
    found = []
    for folder in (root, root / "data"):
        if not folder.is_dir():
            continue
        patterns = [rf"{s}-\d+-of-\d+\.parquet" if layout == "hf-parquet" else rf".*-{s}-\d+\.tar"
                    for s in _SPLIT_NAMES[split]]
        found = [folder / name for name in sorted(os.listdir(folder)) if any(re.fullmatch(p, name) for p in patterns)]
        if found:
            return found
    return found


def scan_archive_split(root: str | os.PathLike, split: str, layout: str):
    """Every image of one split of an archive form, in listing order: (images, ignored counts by reason).
    Cached per process: listing a 150 GB tar reads 1.3M headers, and the synsets and each split come from it."""
    return _scan(str(Path(root).absolute()), split, layout)


@lru_cache(maxsize=8)
def _scan(root: str, split: str, layout: str):
    root_path = Path(root)
    ignored: dict[str, int] = {}
    if layout == "ilsvrc-tar":
        rows = _ilsvrc_train(root_path, ignored) if split == "train" else _ilsvrc_val(root_path, ignored)
    elif layout == "hf-parquet":
        rows = [r for path in split_files(root_path, layout, split) for r in _parquet_rows(root_path, path, ignored)]
    elif layout == "wds":
        rows = [r for path in split_files(root_path, layout, split) for r in _wds_samples(root_path, path, ignored)]
    else:
        raise ValueError(f"{layout!r} is not an archive layout; expected one of {sorted(EXPECTED)}")
    images = [SourceImage(split, f"{container}/{name}", synset, ILSVRC_LABELS[synset], container, offset, size)
              for container, name, synset, offset, size in rows]
    return images, ignored


# --- ilsvrc-tar ------------------------------------------------------------------------------------


def _ilsvrc_train(root: Path, ignored: dict) -> list[tuple]:
    """Class tars in synset order, each one's images by file name; their data spans in the outer tar."""
    path = root / ILSVRC_TRAIN_TAR
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    rows = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
        class_tars = sorted((m for m in outer.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in class_tars:
            synset = Path(member.name).name.removesuffix(".tar")
            if not member.name.endswith(".tar") or synset not in ILSVRC_LABELS:
                _count(ignored, "not_a_class_tar")
                continue
            f.seek(member.offset_data)  # the inner tar's offsets are positions in the outer file
            with tarfile.open(fileobj=f, mode="r:") as inner:
                images = sorted(inner.getmembers(), key=lambda m: m.name)
            end = member.offset_data + member.size
            for m in images:
                name = Path(m.name).name
                if reason := _member_skip_reason(m, name):
                    _count(ignored, reason)
                elif m.offset_data + m.size > end:
                    _count(ignored, "outside_class_tar")
                else:
                    rows.append((ILSVRC_TRAIN_TAR, name, synset, m.offset_data, m.size))
    return rows


def _ilsvrc_val(root: Path, ignored: dict) -> list[tuple]:
    """The flat val tar by file name; ILSVRC2012_val_%08d's synset from the devkit's ground truth and meta.mat."""
    path = root / ILSVRC_VAL_TAR
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    truth = devkit_val_synsets(root)
    rows = []
    with tarfile.open(path, mode="r:") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(m.name).name
            if reason := _member_skip_reason(m, name):
                _count(ignored, reason)
                continue
            number = re.fullmatch(r"ILSVRC2012_val_(\d+)\.[A-Za-z]+", name)
            synset = truth[int(number[1]) - 1] if number and 0 < int(number[1]) <= len(truth) else None
            if synset is None:
                _count(ignored, "no_label_in_devkit")
            else:
                rows.append((ILSVRC_VAL_TAR, name, synset, m.offset_data, m.size))
    return rows


def devkit_val_synsets(root: Path) -> list[str]:
    """The synset of val image i (1-based) at index i - 1: the ground truth's ILSVRC2012 IDs through meta.mat."""
    import scipy.io

    meta, truth = _devkit_files(root)
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        id_to_synset = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        return [id_to_synset[int(line)] for line in truth.decode().split()]
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{root / ILSVRC_DEVKIT}: unreadable devkit ({type(e).__name__}: {e}); expected "
                         f"{DEVKIT_META} with the 'synsets' struct and {DEVKIT_VAL_TRUTH}") from None


def _devkit_files(root: Path) -> tuple[bytes, bytes]:
    """(meta.mat, ground truth) bytes from the devkit's .tar.gz or its unpacked folder."""
    folder, archive = root / ILSVRC_DEVKIT, root / f"{ILSVRC_DEVKIT}.tar.gz"
    if (folder / DEVKIT_META).is_file():
        return (folder / DEVKIT_META).read_bytes(), (folder / DEVKIT_VAL_TRUTH).read_bytes()
    if not archive.is_file():
        raise ValueError(f"{root}: {ILSVRC_VAL_TAR} needs the devkit for its labels: {archive.name} (or the folder "
                         f"{ILSVRC_DEVKIT}/ holding {DEVKIT_META})")
    with tarfile.open(archive, "r:gz") as tar:
        files = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        missing = [n for n in (DEVKIT_META, DEVKIT_VAL_TRUTH) if n not in files]
        if missing:
            raise ValueError(f"{archive}: no {missing[0]} inside (expected the ILSVRC2012 devkit t12)")
        return tar.extractfile(files[DEVKIT_META]).read(), tar.extractfile(files[DEVKIT_VAL_TRUTH]).read()


# --- hf-parquet ------------------------------------------------------------------------------------


def _parquet_rows(root: Path, path: Path, ignored: dict) -> list[tuple]:
    import pyarrow.parquet as pq

    container = path.relative_to(root).as_posix()
    try:
        table = pq.read_table(path, columns=["image.path", "label"])  # not the bytes
    except Exception as e:
        raise ValueError(f"{path}: not an ImageNet parquet file ({type(e).__name__}: {str(e)[:120]}); expected "
                         f"{EXPECTED['hf-parquet']}") from None
    rows = []
    for row, (name, label) in enumerate(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)):
        if label is None or not 0 <= label < len(ILSVRC_SYNSETS):
            _count(ignored, "label_out_of_range")  # the test split's -1
            continue
        synset = ILSVRC_SYNSETS[label]
        stem, ext = os.path.splitext(Path(name).name) if name else (f"{path.stem}_{row:07d}", ".JPEG")
        rows.append((container, stem.removesuffix(f"_{synset}") + ext, synset, row, -1))
    return rows


# --- wds ---------------------------------------------------------------------------------------------


def _wds_samples(root: Path, path: Path, ignored: dict) -> list[tuple]:
    """Members grouped by WebDataset key (the name up to the first dot of its basename)."""
    container = path.relative_to(root).as_posix()
    samples: dict[str, dict] = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            folder, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            sample = samples.setdefault(f"{folder}/{stem}", {"stem": stem})
            if ext.lower() in _IMAGE_EXTENSIONS:
                sample["image"] = (m, ext)
            elif ext in ("cls", "json"):
                sample[ext] = tar.extractfile(m).read()
    rows = []
    for sample in samples.values():
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label = int(sample["cls"]) if "cls" in sample else meta.get("label")
        if "image" not in sample:
            _count(ignored, "no_image_in_sample")
        elif not isinstance(label, int) or not 0 <= label < len(ILSVRC_SYNSETS):
            _count(ignored, "label_out_of_range")
        else:
            member, ext = sample["image"]
            name = Path(meta["filename"]).name if meta.get("filename") else f"{sample['stem']}.{ext}"
            rows.append((container, name, ILSVRC_SYNSETS[label], member.offset_data, member.size))
    return rows


# --- reading ---------------------------------------------------------------------------------------


class SourceReader:
    """The bytes of SourceImages under one root: files, tar members (a seek and a read in the open archive) and
    parquet rows (their row group read once and held while the next rows come from it)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._file: tuple[str, object] | None = None
        self._row_group: tuple[str, int, int, list] | None = None  # container, group, first row, images

    def read(self, im) -> bytes:
        if not im.container:
            return (self.root / im.rel_path).read_bytes()
        if im.container.endswith(".parquet"):
            return self._parquet_image(im.container, im.offset)
        f = self._open(im.container)
        f.seek(im.offset)
        data = f.read(im.size)
        if len(data) != im.size:
            raise OSError(0, f"{im.container} ends inside {im.rel_path}")
        return data

    def _open(self, container: str):
        if self._file is None or self._file[0] != container:
            self.close()
            self._file = (container, open(self.root / container, "rb"))  # noqa: SIM115 (closed by close())
        return self._file[1]

    def _parquet_image(self, container: str, row: int) -> bytes:
        held = self._row_group
        if held is None or held[0] != container or not held[2] <= row < held[2] + len(held[3]):
            import pyarrow.parquet as pq

            pf = self._open_parquet(container, pq)
            first = 0
            for group in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if row < first + n:
                    images = pf.read_row_group(group, columns=["image.bytes"]).flatten().column("image.bytes")
                    held = self._row_group = (container, group, first, images.to_pylist())
                    break
                first += n
            else:
                raise OSError(0, f"{container} has no row {row}")
        return held[3][row - held[2]] or b""

    def _open_parquet(self, container: str, pq):
        if self._file is None or self._file[0] != container:
            self.close()
            self._file = (container, pq.ParquetFile(self.root / container))
        return self._file[1]

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _member_skip_reason(m: tarfile.TarInfo, name: str) -> str | None:
    if not m.isfile():
        return "not_a_file"
    if name.startswith("."):
        return "hidden"
    if os.path.splitext(name)[1].lower().lstrip(".") not in _IMAGE_EXTENSIONS:
        return "not_an_image_extension"
    return None


def _count(ignored: dict[str, int], reason: str) -> None:
    ignored[reason] = ignored.get(reason, 0) + 1
