"""The one Zarr writer: per-row arrays filled by writers that each own whole shards, with commit markers.

A store is created at its final size before any writer starts (STACK.md: resize once). Each
job writes one row range made of whole Zarr shards of every array, then writes its commit
marker `commits/{k:06d}.npz` (`pipeline.artifacts.Commits`: atomically, with the records of the
files `write_rows` returns, and any per-shard partial results such as statistics). A killed run
redoes exactly the shards without a marker, so the final store is bit-identical to an uninterrupted
run's; a damaged shard file costs only its shard.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from storage_schemas.zarr_layouts import SCHEMA_VERSION, ZarrLayout


@dataclass(frozen=True)
class ShardRange:
    index: int
    start: int
    stop: int


def shard_ranges(n_rows: int, rows_per_shard: int) -> list[ShardRange]:
    return [ShardRange(k, s, min(s + rows_per_shard, n_rows)) for k, s in enumerate(range(0, n_rows, rows_per_shard))]


def create_row_store(path: Path, layout: ZarrLayout, n_rows: int, *, rows_per_shard: int, rows_per_chunk: int,
                     row_shapes: dict[str, tuple[tuple[int, ...], str]], attrs: dict) -> None:
    """A fresh group: `row_shapes[name] = (shape after the row axis, on-disk dtype)` for each per-row array."""
    if Path(path).exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", attributes={"srcflow_schema": layout.kind,
                                                               "schema_version": SCHEMA_VERSION, **attrs})
    chunk = min(rows_per_chunk, rows_per_shard)
    for name, spec in layout.arrays.items():
        if not spec.per_row:
            continue
        tail, dtype = row_shapes.get(name, ((), spec.dtype))
        big = len(tail) > 0
        group.create_array(
            name, shape=(n_rows, *tail), dtype=str if dtype == "str" else dtype,
            chunks=(chunk if big else rows_per_shard, *tail),
            # one chunk per shard needs no sharding codec (it would copy the whole shard once more)
            shards=(rows_per_shard, *tail) if big and chunk < rows_per_shard else None,
            # features and codes are incompressible float (STACK.md): spend no CPU on them
            compressors=None if big else BloscCodec(cname="zstd", clevel=3),
            dimension_names=spec.dims, fill_value="" if dtype == "str" else 0,
            # every chunk is written: no per-chunk emptiness check (half the write time), predictable sizes
            config={"write_empty_chunks": True},
        )


def write_rows(path: Path, start: int, arrays: dict[str, np.ndarray]) -> list[Path]:
    """Write whole shards starting at `start` (the caller owns these rows in every array). Returns the files
    written (one Zarr storage chunk per shard and array), for the shard's commit marker."""
    group = zarr.open_group(str(path), mode="r+")
    files = []
    for name, values in arrays.items():
        # the runtime config is not stored with the array: say again that no chunk is checked for emptiness
        arr = group[name].with_config({"write_empty_chunks": True})
        arr[start:start + len(values)] = values
        unit = (arr.shards or arr.chunks)[0]
        for k in range(start // unit, (start + len(values) - 1) // unit + 1):
            files.append(Path(path) / name / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1)))
    return files


def write_small_array(path: Path, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
    group = zarr.open_group(str(path), mode="r+")
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                             dimension_names=dims, overwrite=True)
    arr[...] = values


def consolidate(path: Path) -> None:
    """Consolidated metadata, written when the store is complete, so `xarray.open_zarr(path)` opens it with its
    defaults and without a warning. (Zarr warns that v3 does not specify it yet: known, not for the user.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))
