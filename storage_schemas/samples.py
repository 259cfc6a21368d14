"""Sample sets written by `sample`: `samples-cfg{w}.npz` in the ADM format, the exchange format of the ADM suite.

schema_version 3:
    arr_0           (N, H, W, 3) uint8   the images (stored uncompressed, so readers can memory-map them)
    arr_1           (N,) int64           class labels, as ADM's sampler writes them
    labels          (N,) int64           the same labels (an alias, for readers by name)
    nonfinite       (N,) bool            samples whose code or pixels were NaN / inf (written black, counted)
    sampling        () str               JSON: how the samples were made (stages/sample.py sampling_record: the
                                         CFG rule and scale, annealing, the solver and its statistics per flow
                                         block, the denoising, the pixel rounding, the warnings raised)
    schema_version  () int64             3

Every trained class holds the same count, in a seeded random order (sample.seed): ADM's evaluator takes its
Inception Score over contiguous 5,000-sample splits, so a class-sorted file would score low. Version 1
(no schema_version entry) was class-sorted and had no arr_1; version 2 had no `sampling`.

The layout is ADM's (their evaluator reads `arr_0` and ignores the rest). `open_samples` reads any
ADM-format file (other tools' files carry no schema_version): it refuses a file without a
(N, H, W, 3) uint8 `arr_0`, with labels of another length or arr_1 and labels that differ, or with a
schema_version it does not know.
"""

from __future__ import annotations

import json
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from storage_schemas import check_version

SCHEMA_VERSION = 3
SAMPLING_KEYS = ("cfg_scale", "cfg_rule", "cfg_anneal", "solver", "solver_stats", "denoise", "pixel_rounding",
                 "warnings")


@contextmanager
def _complete_npz(path: Path):
    """A truncated or damaged .npz is a one-line error naming it (zipfile's own names no file)."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a complete .npz ({type(e).__name__}: {e}); it is truncated or damaged") from None


def open_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """ADM-format samples: `arr_0` (N, H, W, 3) uint8 (memory-mapped when stored uncompressed), the labels
    (`arr_1`, else `labels`, else None), and the count of `nonfinite` ones (NaN / inf samples the sample stage
    wrote as black images)."""
    with _complete_npz(path):
        return _open_samples(path)


def _open_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    images = open_npz_array(path, "arr_0")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be (N, H, W, 3) uint8 (ADM sample format), "
                         f"got {tuple(images.shape)} {images.dtype}")
    with np.load(path, allow_pickle=False) as npz:
        if "schema_version" in npz.files:
            check_version(str(path), int(npz["schema_version"]), SCHEMA_VERSION)
        named = {k: np.asarray(npz[k]) for k in ("arr_1", "labels") if k in npz.files}
        nonfinite = int(npz["nonfinite"].sum()) if "nonfinite" in npz.files else None
    if len(named) == 2 and not np.array_equal(named["arr_1"], named["labels"]):
        raise ValueError(f"{path}: arr_1 and labels differ (both are the class labels)")
    labels = next(iter(named.values()), None)
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: labels has shape {labels.shape}, arr_0 holds {len(images)} images")
    return images, labels, nonfinite


def read_sampling(path: Path) -> dict | None:
    """The `sampling` record of a samples file (None for another tool's ADM-format file, which has none); a one-line
    error for a record that lacks a key of SAMPLING_KEYS."""
    with _complete_npz(path), np.load(path, allow_pickle=False) as npz:
        if "sampling" not in npz.files:
            return None
        record = json.loads(str(npz["sampling"]))
    missing = [k for k in SAMPLING_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: its sampling record lacks {', '.join(missing)}")
    return record


def npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    """The shape of one array of an .npz from its .npy header alone (stored or compressed): no data is read."""
    with _complete_npz(path), zipfile.ZipFile(path) as zf:
        try:
            fh = zf.open(f"{name}.npy")
        except KeyError:
            raise ValueError(f"{path} has no array {name!r} (has {', '.join(zf.namelist())})") from None
        with fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{path}: {name}.npy has .npy format version {version}, expected 1.0 or 2.0")
            return tuple(read_header(fh)[0])


def open_npz_array(path: Path, name: str) -> np.ndarray:
    """One array of an .npz, memory-mapped when stored uncompressed (np.savez), else read (np.savez_compressed).

    50,000 samples at 512 px are 39 GB: a memory map lets the Inception read them batch by batch.
    """
    with _complete_npz(path), zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            raise ValueError(f"{path} has no array {name!r} (has {', '.join(zf.namelist())})") from None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the zip local file header; its name and extra field lengths vary
            if local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is not None:
                    shape, fortran, dtype = read_header(f)
                    if not dtype.hasobject:
                        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                         order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as npz:
        return npz[name]
