"""pipeline.parallel.map_jobs in-process with threads, and pipeline.data.zarr_store's row writer."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data.zarr_store import create_row_store, write_rows
from pipeline.parallel import map_jobs
from stages.plan.layouts import sharded_array
from storage_schemas.zarr_layouts import FEATURES


def test_threads_run_that_many_jobs_at_once_and_yield_every_result():
    running, peak, lock = [0], [0], threading.Lock()

    def job(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i * i

    assert sorted(map_jobs(job, range(9), threads=3)) == [i * i for i in range(9)]
    assert peak[0] == 3


def test_a_failing_job_is_raised_and_no_job_starts_after_it():
    started = []

    def job(i):
        started.append(i)
        if i == 1:
            raise ValueError("job 1 failed")
        time.sleep(0.05)
        return i

    with pytest.raises(ValueError, match="job 1 failed"):
        list(map_jobs(job, range(40), threads=2))
    assert len(started) < 10


def _store(path: Path, rows_per_chunk: int) -> Path:
    create_row_store(path, FEATURES, 16, rows_per_shard=8, rows_per_chunk=rows_per_chunk,
                     row_shapes={"features": ((3, 4), "float16")}, attrs={})
    return path


def test_a_shard_of_zeros_is_written_not_skipped_as_empty(tmp_path):
    # the store's runtime config is not saved with it: write_rows must ask again for no emptiness check
    store = _store(tmp_path / "f.zarr", rows_per_chunk=4)
    write_rows(store, 0, {"features": np.zeros((8, 3, 4), np.float16), "labels": np.zeros(8, np.int32)})
    assert (store / "features" / "c" / "0" / "0" / "0").is_file()
    assert (store / "labels" / "c" / "0").is_file()


@pytest.mark.parametrize("rows_per_chunk", [4, 8])
def test_rows_round_trip_with_inner_chunks_or_one_chunk_per_shard(tmp_path, rows_per_chunk):
    store = _store(tmp_path / "f.zarr", rows_per_chunk)
    values = np.random.default_rng(0).standard_normal((16, 3, 4)).astype(np.float16)
    write_rows(store, 8, {"features": values[8:]})
    write_rows(store, 0, {"features": values[:8]})
    on_disk = sum(p.stat().st_size for p in (store / "features" / "c").rglob("*") if p.is_file())
    assert (on_disk, 2) == sharded_array(16, 3 * 4 * 2, 8, rows_per_chunk)  # what `srcflow plan` predicts
    arr = zarr.open_group(str(store), mode="r")["features"]
    assert np.array_equal(arr[...], values)
    sharded = any(type(c).__name__ == "ShardingCodec" for c in arr.metadata.codecs)
    assert sharded == (rows_per_chunk < 8)  # one chunk per shard needs no sharding codec
    assert arr.chunks == (rows_per_chunk, 3, 4)


def test_jobs_in_threads_share_one_encoder_built_once():
    from stages import encode

    built = []

    def build(spec, device):  # the encoder factory a benchmark passes in: here a slow one that counts
        built.append(1)
        time.sleep(0.05)  # the other threads arrive while it runs
        return encode.rae_encoder(spec, device)

    spec = encode.EncoderSpec("vit_base_patch14_reg4_dinov2", "random", 28, (("depth", 1), ("embed_dim", 16),
                              ("num_heads", 2), ("patch_size", 7)), 0, build)
    encoders = list(map_jobs(lambda _: encode.load_encoder(spec, "cpu"), range(4), threads=4))
    assert len(built) == 1 and all(e is encoders[0] for e in encoders)


class Killed(BaseException):
    """A crash that nothing in the stage catches."""


def test_a_resumed_fill_runs_only_the_uncommitted_shards_and_counts_progress_without_rereading(tmp_path):
    from types import SimpleNamespace

    from pipeline.artifacts import Commits
    from pipeline.data.zarr_store import fill_row_store

    store, commits = tmp_path / "f.zarr", Commits(tmp_path / "commits")
    values = np.random.default_rng(0).standard_normal((40, 3, 4)).astype(np.float16)
    ran, progress = [], []

    def write_shard(r, die_at=None):
        if r.index == die_at:
            raise Killed
        ran.append(r.index)
        files = write_rows(store, r.start, {"features": values[r.start:r.stop],
                                            "labels": np.arange(r.start, r.stop, dtype=np.int32)})
        commits.write(r.index, files)
        return r.stop - r.start

    def fill(write):
        return fill_row_store(store, commits, FEATURES, 40, rows_per_shard=8, rows_per_chunk=4,
                              row_shapes={"features": ((3, 4), "float16")}, attrs={}, job=lambda r: r,
                              write_shard=write, runtime=SimpleNamespace(workers=1, dask_address=None, device="cpu"),
                              desc="test", report_progress=lambda *a: progress.append(a))

    with pytest.raises(Killed):
        fill(lambda r: write_shard(r, die_at=3))
    assert ran == [0, 1, 2]
    ran.clear(), progress.clear()
    assert fill(write_shard) == [8, 8]  # the store is kept, not created again
    assert ran == [3, 4] and progress == [(4, 5, "shards"), (5, 5, "shards")]
    assert np.array_equal(zarr.open_group(str(store), mode="r")["features"][...], values)


@pytest.mark.parametrize("n_rows, rows_per_chunk", [(40, 4), (38, 4), (38, 16), (3, 4)],
                         ids=["partial-last-shard", "partial-inner-chunk", "one-chunk-per-shard", "one-short-shard"])
def test_the_direct_writer_writes_the_very_files_zarr_writes(tmp_path, n_rows, rows_per_chunk):
    from pipeline.data.zarr_store import raw_layout

    values = np.random.default_rng(0).standard_normal((n_rows, 3, 5)).astype(np.float16)
    stores = {}
    for direct in (True, False):
        store = tmp_path / f"direct-{direct}.zarr"
        create_row_store(store, FEATURES, n_rows, rows_per_shard=16, rows_per_chunk=rows_per_chunk,
                         row_shapes={"features": ((3, 5), "float16")}, attrs={})
        for start in range(0, n_rows, 16):
            files = write_rows(store, start, {"features": values[start:start + 16],
                                              "labels": np.arange(start, min(n_rows, start + 16), dtype=np.int32)},
                               direct=direct)
            assert all(f.is_file() for f in files) and len(files) == 3  # features, features_crc32c, labels
        stores[direct] = store
    group = zarr.open_group(str(stores[True]), mode="r")
    assert raw_layout(group["features"]) and not raw_layout(group["labels"])  # compressed: through Zarr
    written = sorted(p.relative_to(stores[False]) for p in stores[False].rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(stores[True]) for p in stores[True].rglob("*") if p.is_file())
    for rel in written:  # byte for byte, shard index and its CRC-32C included
        assert (stores[True] / rel).read_bytes() == (stores[False] / rel).read_bytes(), rel
    assert np.array_equal(group["features"][...], values)
    assert np.array_equal(group["features"].get_orthogonal_selection((np.array([n_rows - 1, 0, 2]),)),
                          values[[n_rows - 1, 0, 2]])  # random rows read through the shard index


def test_rows_that_are_not_whole_shards_go_through_zarr(tmp_path):
    store = _store(tmp_path / "f.zarr", rows_per_chunk=4)
    values = np.random.default_rng(1).standard_normal((16, 3, 4)).astype(np.float16)
    write_rows(store, 0, {"features": values[:4]})  # part of a shard: Zarr reads, merges, writes
    write_rows(store, 4, {"features": values[4:8]})
    write_rows(store, 8, {"features": values[8:]})
    assert np.array_equal(zarr.open_group(str(store), mode="r")["features"][...], values)
