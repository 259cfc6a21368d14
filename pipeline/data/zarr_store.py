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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.artifacts import Commits
from pipeline.parallel import gpu_worker_env, map_jobs
from storage_schemas.success import write_atomic
from storage_schemas.zarr_layouts import SCHEMA_VERSION, ZarrLayout, array_name

Job = TypeVar("Job")


@dataclass(frozen=True)
class ShardRange:
    index: int
    start: int
    stop: int


def shard_ranges(n_rows: int, rows_per_shard: int) -> list[ShardRange]:
    return [ShardRange(k, s, min(s + rows_per_shard, n_rows)) for k, s in enumerate(range(0, n_rows, rows_per_shard))]


def fill_row_store(store: Path, commits: Commits, layout: ZarrLayout, n_rows: int, *, rows_per_shard: int,
                   rows_per_chunk: int, row_shapes: dict[str, tuple[tuple[int, ...], str]], attrs: dict,
                   job: Callable[[ShardRange], Job], write_shard: Callable[[Job], Any], runtime, device: str,
                   threads: int = 1, desc: str, report_progress: Callable[[int, int, str], None]) -> list[Any]:
    """Fill a row store shard by shard: create it (unless a resumed run committed shards already), then run
    `write_shard(job(r))` for every shard range r without a commit marker (`write_shard` writes the rows and
    then the marker), over `runtime.workers` processes (one GPU each, round robin) and `threads` jobs per
    worker. Returns the results of the jobs run now, in completion order; the caller reduces the commits and
    validates the store."""
    if not commits.any():
        create_row_store(store, layout, n_rows, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk,
                         row_shapes=row_shapes, attrs=attrs)
    ranges = shard_ranges(n_rows, rows_per_shard)
    todo = [r for r in ranges if not commits.done(r.index)]
    jobs = [job(r) for r in todo]
    rows = {id(j): r.stop - r.start for j, r in zip(jobs, todo, strict=True)}  # the progress bar's unit
    done, results = len(ranges) - len(todo), []
    for result in map_jobs(write_shard, jobs, workers=runtime.workers, dask_address=runtime.dask_address,
                           worker_env=gpu_worker_env(device, runtime.workers, runtime.dask_address),
                           threads=threads, desc=desc, unit="rows", weights=lambda j: rows[id(j)]):
        done += 1  # a job commits its shard before it returns: counted here, not re-read from disk every job
        report_progress(done, len(ranges), "shards")
        results.append(result)
    return results


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
            dimension_names=spec.dims, fill_value="" if dtype == "str" else 0, attributes=spec.attributes,
            # every chunk is written: no per-chunk emptiness check (half the write time), predictable sizes
            config={"write_empty_chunks": True},
        )


def write_rows(path: Path, start: int, arrays: dict[str, np.ndarray], direct: bool = True) -> list[Path]:
    """Write whole shards starting at `start` (the caller owns these rows in every array). Returns the files
    written (one Zarr storage chunk per shard and array), for the shard's commit marker.
    Uncompressed arrays (features, codes) are written `direct`ly: each shard file as the bytes Zarr would
    write (`shard_file_parts`), in one pass, at the raw write rate; the rest (and `direct=False`) through Zarr."""
    group = zarr.open_group(str(path), mode="r+")
    files = []
    for name, values in arrays.items():
        name = array_name(group, name)  # a version 1 store being resumed or repaired keeps its names
        # the runtime config is not stored with the array: say again that no chunk is checked for emptiness
        arr = group[name].with_config({"write_empty_chunks": True})
        unit = (arr.shards or arr.chunks)[0]
        stop = start + len(values)
        keys = [arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
                for k in range(start // unit, (stop - 1) // unit + 1)]
        whole = start % unit == 0 and (stop % unit == 0 or stop == arr.shape[0])
        if direct and whole and raw_layout(arr):
            values = np.ascontiguousarray(values, dtype=arr.dtype.newbyteorder("<"))
            for key, off in zip(keys, range(0, len(values), unit), strict=True):
                write_file(Path(path) / name / key, shard_file_parts(arr, values[off:off + unit]))
        else:
            arr[start:stop] = values
        files += [Path(path) / name / key for key in keys]
    return files


# --- whole shard files without the sharding codec -------------------------------------------------
# Zarr 3.1's sharding codec copies every inner chunk and concatenates the shard on one event-loop thread
# per process (0.27-0.48 of the raw write rate, benchmarks/encode.py). For an uncompressed array whose
# chunks span every axis but the rows, a shard file is just its rows' bytes, zero rows up to its last inner
# chunk, and the index of (offset, nbytes) pairs with its CRC-32C: written here in one pass, byte for byte
# what Zarr writes (tests/test_parallel.py compares the files), so every reader reads it unchanged.


def raw_layout(arr) -> bool:
    """An array whose shard files `shard_file_parts` can write: fixed-size dtype, fill 0, no compressor or filter,
    chunks (and shards) spanning every axis but the rows, Zarr's default shard index (little-endian + CRC-32C,
    at the end)."""
    meta = arr.metadata.to_dict()
    plain = [{"name": "bytes", "configuration": {"endian": "little"}}]
    codecs = [c if isinstance(c, dict) else c.to_dict() for c in meta.get("codecs", ())]
    if arr.dtype.kind not in "fiub" or arr.metadata.fill_value != 0 or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return False
    if arr.shards is None:
        return codecs == plain
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    config = codecs[0]["configuration"]

    def as_list(items) -> list[dict]:
        return [i if isinstance(i, dict) else i.to_dict() for i in items]

    return (tuple(arr.shards[1:]) == tuple(arr.shape[1:]) and as_list(config["codecs"]) == plain
            and as_list(config["index_codecs"]) == [*plain, {"name": "crc32c"}]
            and config.get("index_location", "end") == "end")


def shard_file_parts(arr, rows: np.ndarray) -> list[memoryview | bytes]:
    """The bytes of the storage file holding `rows` (a whole shard, or the array's last rows), as Zarr writes
    them: unsharded, the chunk padded to its full row count; sharded, the inner chunks that hold rows (the
    last padded with zero rows), then the index (offset, nbytes per inner chunk; 2^64 - 1 for absent ones)
    and the CRC-32C of the index."""
    import crc32c

    unit = (arr.shards or arr.chunks)[0]
    chunk = arr.chunks[0] if arr.shards is not None else unit
    row_bytes = rows[:1].nbytes if len(rows) else 0
    n_chunks = -(-len(rows) // chunk)
    parts: list[memoryview | bytes] = [memoryview(rows).cast("B"), bytes((n_chunks * chunk - len(rows)) * row_bytes)]
    if arr.shards is None:
        return parts
    chunk_bytes = chunk * row_bytes
    index = np.full((unit // chunk, 2), np.iinfo(np.uint64).max, dtype="<u8")
    index[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    index[:n_chunks, 1] = chunk_bytes
    index_bytes = index.tobytes()
    return [*parts, index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]


def write_file(path: Path, parts: list[memoryview | bytes]) -> None:
    """`parts` into `path` atomically, not fsynced (as Zarr's own writes: the shard's commit marker is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.writelines(parts), fsync=False)


def write_small_array(path: Path, name: str, values: np.ndarray, dims: tuple[str, ...],
                      attributes: dict | None = None) -> None:
    group = zarr.open_group(str(path), mode="r+")
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                             dimension_names=dims, overwrite=True, attributes=attributes)
    arr[...] = values


def consolidate(path: Path) -> None:
    """Consolidated metadata, written when the store is complete, so `xarray.open_zarr(path)` opens it with its
    defaults and without a warning. (Zarr warns that v3 does not specify it yet: known, not for the user.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))
