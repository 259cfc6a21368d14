"""Reading the shard set: manifest rows in store order, and the JPEGs of the tars, each checked against its
sha256 in the manifest."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.integrity import check_file, damage_in
from storage_schemas.shards import INDEX, MANIFEST_SCHEMA, read_table, validate_shard_set


def manifest_rows(shard_dir: Path, splits: Iterable[str] = ("train", "val"), subset_per_class: int | None = None,
                  ) -> list[dict]:
    """Manifest rows (key, split, label, shard, sha256) of `splits` in shard order; `subset_per_class` keeps the
    first K train images per class."""
    for name in (INDEX, "manifest.parquet"):  # the labels, keys and digests every reader trusts: checked first
        check_file(Path(shard_dir) / name)
    validate_shard_set(shard_dir)
    rows = read_table(Path(shard_dir) / "manifest.parquet", MANIFEST_SCHEMA).select(
        ["key", "split", "label", "shard", "sha256"]).to_pylist()
    out = []
    for split in splits:
        seen: dict[int, int] = {}
        for r in rows:
            if r["split"] != split:
                continue
            if split == "train" and subset_per_class is not None:
                seen[r["label"]] = seen.get(r["label"], 0) + 1
                if seen[r["label"]] > subset_per_class:
                    continue
            out.append(r)
    return out


def jpeg_members(tar_path: str | Path) -> dict[str, tuple[int, int]]:
    """key -> (data offset, size) of every `<key>.jpg` member of a shard tar, from its headers alone. The one rule
    of every tar reader (encode, fit_decoder, fit_src, reference), WebDataset's: a member's key is its full name
    up to the first dot of its file name, directories included. A key with two JPEGs is a damaged tar: refused
    in one line (the shard stage never writes one)."""
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = base_plus_ext(m.name)
                if not m.isfile() or ext is None or ext.lower() != "jpg":
                    continue
                if key in members:
                    raise tarfile.TarError(f"holds the key {key!r} twice (a shard names each image once)")
                members[key] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError) as e:
        raise damage_in([Path(tar_path)], f"unreadable tar ({e})") from None
    return members


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name, as WebDataset splits it: at the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


def read_jpeg(tar_path: str | Path, key: str, location: tuple[int, int], sha256: str) -> bytes:
    """The JPEG of `key` at `location` (data offset, size) in a shard tar, checked against its manifest sha256: a
    mismatch is one line naming the tar and the repair (pipeline.integrity), never bytes handed on."""
    offset, size = location
    with open(tar_path, "rb") as f:
        data = os.pread(f.fileno(), int(size), int(offset))
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise damage_in([Path(tar_path)], f"image {key} differs from its sha256 in manifest.parquet")
    return data


def iter_jpegs(tar_paths: list[str], wanted: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    """(key, jpeg bytes) of the `wanted` keys (key -> manifest sha256), tar by tar in member order, each checked
    against its sha256; a wanted key in none of the tars is a damaged shard set (one line)."""
    found: set[str] = set()
    for tar in tar_paths:
        members = jpeg_members(tar)
        for key in sorted(members.keys() & wanted.keys() - found, key=lambda k: members[k][0]):
            found.add(key)
            yield key, read_jpeg(tar, key, members[key], wanted[key])
    if missing := sorted(wanted.keys() - found):
        raise damage_in([Path(t) for t in tar_paths], f"{len(missing)} images of manifest.parquet are not in the "
                                                      f"tars (e.g. {missing[0]})")


def decode_crop(jpeg: bytes, resolution: int, method: str = "pil", device: str | None = None) -> np.ndarray:
    """JPEG bytes -> ADM center crop at `resolution`, uint8 HxWx3 (RAE / ADM preprocessing), by the decode path
    `method` (`encode.decode`, pipeline.data.decode): pil (the reference), tensor, or nvjpeg on CUDA `device`."""
    from pipeline.data import decode

    if method != "nvjpeg":
        return decode.decode_crop_with(method)(jpeg, resolution)
    if device is None or not str(device).startswith("cuda"):
        raise ValueError(f"encode.decode: nvjpeg decodes on a CUDA device, not on {device}; use tensor or pil")
    crops, _ = decode.nvjpeg_crops([jpeg], resolution, device)
    return crops[0].cpu().numpy()


def decode_random_crop(jpeg: bytes, resolution: int, position: tuple[float, float]) -> np.ndarray:
    """JPEG bytes -> RAE's decoder-training crop at `resolution` (resize the short side to 1.5x, crop at
    `position`), uint8 HxWx3."""
    from pipeline.models.rae import resize_random_crop

    with Image.open(io.BytesIO(jpeg)) as img:
        return resize_random_crop(img, resolution, position)
