"""The one Zarr writer: per-row arrays filled by writers that each own whole shards, with commit markers.

A store is created at its final size before any writer starts (STACK.md: resize once). Each
job writes one row range made of whole Zarr shards of every array, then writes its commit
marker `commits/{k:06d}.npz` (`pipeline.artifacts.Commits`: atomically, with the records of the
files `write_rows` returns, and any per-shard partial results such as statistics). A killed run
redoes exactly the shards without a marker, so the final store is bit-identical to an uninterrupted
run's; a damaged shard file costs only its shard. `read_rows` reads scattered rows of such a store back with
reads of exactly their bytes, each checked against its row CRC-32C (schema 3).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.artifacts import Commits
from pipeline.integrity import RowChecksumError
from pipeline.parallel import map_jobs
from storage_schemas.success import write_atomic
from storage_schemas.zarr_layouts import SCHEMA_VERSION, ZarrLayout, array_name, row_crc_name

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
                   job: Callable[[ShardRange], Job], write_shard: Callable[[Job], Any], runtime, threads: int = 1,
                   desc: str, report_progress: Callable[[int, int, str], None],
                   ran_on: Counter | None = None) -> list[Any]:
    """Fill a row store shard by shard: create it (unless a resumed run committed shards already), then run
    `write_shard(job(r))` for every shard range r without a commit marker (`write_shard` writes the rows and
    then the marker), where `runtime` says (pipeline.parallel.map_jobs: in this process, `runtime.workers`
    processes with one GPU each, or the cluster at `runtime.dask_address`; each job resolves `runtime.device` where
    it runs), `threads` jobs per worker. A job whose shard is committed by the time it starts (Dask running it again
    after a worker was lost) does nothing. Returns the results of the jobs run now, in completion order (`ran_on`
    counts where they ran); the caller reduces the commits and validates the store."""
    if not commits.any():
        create_row_store(store, layout, n_rows, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk,
                         row_shapes=row_shapes, attrs=attrs)
    ranges = shard_ranges(n_rows, rows_per_shard)
    todo = [r for r in ranges if not commits.done(r.index)]
    jobs = [(r.index, job(r)) for r in todo]
    rows = {r.index: r.stop - r.start for r in todo}  # the progress bar's unit
    done, results = len(ranges) - len(todo), []
    for result in map_jobs(UnlessCommitted(write_shard, str(commits.dir)), jobs, runtime=runtime,
                           device=runtime.device, threads=threads, desc=desc, unit="rows",
                           weights=lambda j: rows[j[0]], ran_on=ran_on):
        done += 1  # a job commits its shard before it returns: counted here, not re-read from disk every job
        report_progress(done, len(ranges), "shards")
        if result is not None:
            results.append(result)
    return results


@dataclass(frozen=True)
class UnlessCommitted:
    """`write_shard(job)` for a (shard index, job) pair, unless the shard's commit marker exists: the marker is the
    truth, not which futures Dask believes are done."""

    write_shard: Callable[[Any], Any]
    commits: str

    def __call__(self, indexed_job: tuple[int, Any]) -> Any:
        index, job = indexed_job
        return None if Commits(Path(self.commits)).done(index) else self.write_shard(job)


def create_row_store(path: Path, layout: ZarrLayout, n_rows: int, *, rows_per_shard: int, rows_per_chunk: int,
                     row_shapes: dict[str, tuple[tuple[int, ...], str]], attrs: dict,
                     schema: int = SCHEMA_VERSION) -> None:
    """A fresh group: `row_shapes[name] = (shape after the row axis, on-disk dtype)` for each per-row array.
    `schema`: an older layout (what benchmarks/integrity.py and the tests compare against): 1 without chunk
    CRC-32Cs, 2 without row CRC-32Cs."""
    if Path(path).exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", attributes={"srcflow_schema": layout.kind,
                                                               "schema_version": schema, **attrs})
    crc = [Crc32cCodec()] if schema >= 2 else []
    chunk = min(rows_per_chunk, rows_per_shard)
    for name, spec in layout.arrays_of(schema).items():
        if not spec.per_row:
            continue
        tail, dtype = row_shapes.get(name, ((), spec.dtype))
        big = len(tail) > 0
        group.create_array(
            array_name(group, name), shape=(n_rows, *tail), dtype=str if dtype == "str" else dtype,
            chunks=(chunk if big else rows_per_shard, *tail),
            # one chunk per shard needs no sharding codec (it would copy the whole shard once more)
            shards=(rows_per_shard, *tail) if big and chunk < rows_per_shard else None,
            # features and codes are incompressible float (STACK.md): spend no CPU on them; every chunk carries
            # its CRC-32C, which Zarr checks on every read (pipeline.integrity)
            compressors=(crc or None) if big else [BloscCodec(cname="zstd", clevel=3), *crc],
            dimension_names=spec.dims, fill_value="" if dtype == "str" else 0, attributes=spec.attributes,
            # every chunk is written: no per-chunk emptiness check (half the write time), predictable sizes
            config={"write_empty_chunks": True},
        )


def write_rows(path: Path, start: int, arrays: dict[str, np.ndarray], direct: bool = True) -> list[Path]:
    """Write whole shards starting at `start` (the caller owns these rows in every array), and the CRC-32C of each
    row of every array that has a row CRC array in this store (`<name>_crc32c`, schema 3; a store of an older
    schema, resumed or repaired, is written in its own layout). Returns the files written (one Zarr storage chunk
    per shard and array), for the shard's commit marker.
    Uncompressed arrays (features, codes) are written `direct`ly: each shard file as the bytes Zarr would
    write (`shard_file_parts`), in one pass, at the raw write rate; the rest (and `direct=False`) through Zarr."""
    group = zarr.open_group(str(path), mode="r+")
    crcs = {row_crc_name(name): row_crc32c(np.ascontiguousarray(values, dtype=group[name].dtype.newbyteorder("<")))
            for name, values in arrays.items() if row_crc_name(name) in group and row_crc_name(name) not in arrays}
    files = []
    for name, values in {**arrays, **crcs}.items():
        name = array_name(group, name)  # a version 1 or 2 store being resumed or repaired keeps its names
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
# chunks span every axis but the rows, a shard file is just its rows' bytes in inner chunks (zero rows up
# to the last one's end), each followed by its CRC-32C (schema 2; a schema-1 store's chunks have none), and
# the index of (offset, nbytes) pairs with its CRC-32C: written here in one pass, byte for byte what Zarr
# writes (tests/test_parallel.py compares the files), so every reader reads it unchanged.

PLAIN = [{"name": "bytes", "configuration": {"endian": "little"}}]
CRC32C = {"name": "crc32c"}


def raw_layout(arr) -> bool:
    """An array whose shard files `shard_file_parts` can write: fixed-size dtype, fill 0, no compressor or filter
    (a crc32c after the bytes, or nothing), chunks (and shards) spanning every axis but the rows, Zarr's default
    shard index (little-endian + CRC-32C, at the end)."""
    if arr.dtype.kind not in "fiub" or arr.metadata.fill_value != 0 or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return False
    if arr.shards is None:
        return chunk_codecs(arr) in (PLAIN, [*PLAIN, CRC32C])
    codecs = as_dicts(arr.metadata.to_dict().get("codecs", ()))
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    config = codecs[0]["configuration"]
    return (tuple(arr.shards[1:]) == tuple(arr.shape[1:]) and chunk_codecs(arr) in (PLAIN, [*PLAIN, CRC32C])
            and as_dicts(config["index_codecs"]) == [*PLAIN, CRC32C] and config.get("index_location", "end") == "end")


def as_dicts(codecs) -> list[dict]:
    return [c if isinstance(c, dict) else c.to_dict() for c in codecs]


def chunk_codecs(arr) -> list[dict]:
    """The codecs of one (inner) chunk, as dicts."""
    codecs = as_dicts(arr.metadata.to_dict().get("codecs", ()))
    if arr.shards is not None and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        return as_dicts(codecs[0]["configuration"]["codecs"])
    return codecs


def shard_file_parts(arr, rows: np.ndarray) -> list[memoryview | bytes]:
    """The bytes of the storage file holding `rows` (a whole shard, or the array's last rows), as Zarr writes
    them: unsharded, the chunk padded to its full row count; sharded, the inner chunks that hold rows (the
    last padded with zero rows), then the index (offset, nbytes per inner chunk; 2^64 - 1 for absent ones)
    and the CRC-32C of the index. With the crc32c codec, every (inner) chunk is followed by its CRC-32C."""
    import crc32c

    unit = (arr.shards or arr.chunks)[0]
    chunk = arr.chunks[0] if arr.shards is not None else unit
    checksummed = chunk_codecs(arr)[-1] == CRC32C
    row_bytes = rows[:1].nbytes if len(rows) else 0
    n_chunks = -(-len(rows) // chunk)
    data = memoryview(rows).cast("B")
    chunk_bytes = chunk * row_bytes
    parts: list[memoryview | bytes] = []
    for k in range(n_chunks):
        held = data[k * chunk_bytes:(k + 1) * chunk_bytes]
        padding = bytes(chunk_bytes - len(held))
        parts += [held, padding]
        if checksummed:
            parts.append(crc32c.crc32c(padding, crc32c.crc32c(held)).to_bytes(4, "little"))
    if arr.shards is None:
        return parts
    stored = chunk_bytes + 4 * checksummed
    index = np.full((unit // chunk, 2), np.iinfo(np.uint64).max, dtype="<u8")
    index[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * stored
    index[:n_chunks, 1] = stored
    index_bytes = index.tobytes()
    return [*parts, index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]


def row_crc32c(rows: np.ndarray) -> np.ndarray:
    """The CRC-32C of each row's bytes (the first axis; C-contiguous rows), uint32."""
    import crc32c

    return np.fromiter((crc32c.crc32c(row) for row in rows.reshape(len(rows), -1)), np.uint32, len(rows))


def read_rows(arr, rows: np.ndarray, row_crcs: np.ndarray | None = None) -> np.ndarray:
    """arr[rows] for sorted, unique rows of the first axis. An array in the raw layout (`raw_layout`: features,
    codes) on a local or mounted filesystem is read from its storage files: each run of consecutive rows is one read
    of exactly its bytes (its inner chunk's offset from the shard's index), so a reader of scattered rows (a DDP
    rank's share of a shuffle window) reads those rows, not the inner chunks around them (Zarr's unit of a read,
    encode.rows_per_chunk rows), and checks each against its CRC-32C in `row_crcs` (the store's `<name>_crc32c` at
    those rows; RowChecksumError names the file). Any other array is read through Zarr (which checks its chunks)."""
    rows = np.asarray(rows, dtype=np.int64)
    root = getattr(arr.store, "root", None)
    if root is None or not raw_layout(arr):
        return arr.get_orthogonal_selection((rows,))
    out = np.zeros((len(rows), *arr.shape[1:]), arr.dtype.newbyteorder("<"))  # zeros: the fill of absent chunks
    flat = out.reshape(len(rows), out[:1].size).view(np.uint8)
    row_bytes, unit, chunk = flat.shape[1], (arr.shards or arr.chunks)[0], arr.chunks[0]
    for k in np.unique(rows // unit).tolist():
        lo, hi = np.searchsorted(rows, [k * unit, (k + 1) * unit])
        path = Path(root) / arr.path / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
        if not path.is_file():  # never written: the fill value
            continue
        with open(path, "rb") as f:
            inner = (rows[lo:hi] - k * unit) // chunk
            if arr.shards is None:
                offsets = np.zeros(1, np.uint64)
            else:  # the shard index at the end: (offset, nbytes) per inner chunk, then its CRC-32C
                n_inner = unit // chunk
                f.seek(-(16 * n_inner + 4), os.SEEK_END)
                index = np.frombuffer(f.read(16 * n_inner), "<u8").reshape(n_inner, 2)
                offsets = index[:, 0]
            present = offsets[inner] != np.iinfo(np.uint64).max
            start = offsets[inner].astype(np.int64) + (rows[lo:hi] - k * unit) % chunk * row_bytes
            for run in np.split(np.arange(hi - lo), np.flatnonzero(np.diff(start) != row_bytes) + 1):
                if not present[run[0]]:
                    continue
                f.seek(int(start[run[0]]))
                target = memoryview(flat[lo + run[0]:lo + run[-1] + 1]).cast("B")
                if f.readinto(target) != len(target):
                    raise OSError(f"{path}: shorter than its shard index says (row {rows[lo + run[0]]})")
        if row_crcs is not None:  # the rows read (an absent inner chunk is the fill value: nothing to check)
            bad = np.flatnonzero(present & (row_crc32c(flat[lo:hi]) != row_crcs[lo:hi]))
            if len(bad):
                raise RowChecksumError(path, int(rows[lo + bad[0]]))
    return out.astype(arr.dtype, copy=False)


def write_file(path: Path, parts: list[memoryview | bytes]) -> None:
    """`parts` into `path` atomically, not fsynced (as Zarr's own writes: the shard's commit marker is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.writelines(parts), fsync=False)


def write_small_array(path: Path, name: str, values: np.ndarray, dims: tuple[str, ...],
                      attributes: dict | None = None) -> None:
    group = zarr.open_group(str(path), mode="r+")
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                             compressors=[Crc32cCodec()], dimension_names=dims, overwrite=True,
                             attributes=attributes)
    arr[...] = values


def consolidate(path: Path) -> None:
    """Consolidated metadata, written when the store is complete, so `xarray.open_zarr(path)` opens it with its
    defaults and without a warning. (Zarr warns that v3 does not specify it yet: known, not for the user.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))
