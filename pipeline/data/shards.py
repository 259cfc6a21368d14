"""Reading the shard set: manifest rows in store order, and samples streamed from the tars."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from storage_schemas.shards import MANIFEST_SCHEMA, read_table, validate_shard_set


def manifest_rows(shard_dir: Path, splits: Iterable[str] = ("train", "val"), subset_per_class: int | None = None,
                  ) -> list[dict]:
    """Manifest rows of `splits` in shard order; `subset_per_class` keeps the first K train images per class."""
    validate_shard_set(shard_dir)
    rows = read_table(Path(shard_dir) / "manifest.parquet", MANIFEST_SCHEMA).select(
        ["key", "split", "label", "shard"]).to_pylist()
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


def iter_jpegs(tar_paths: list[str], keys: set[str]) -> Iterator[tuple[str, bytes]]:
    """(key, jpeg bytes) for the wanted keys, in tar order; fixed shard order, no shuffling."""
    # this job was handed exactly these shards: no node or worker splitting on top
    dataset = wds.WebDataset(tar_paths, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for sample in dataset:
        if sample["__key__"] in keys:
            yield sample["__key__"], sample["jpg"]


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
