"""Byte counts of the on-disk layouts (shard tars, sharded Zarr arrays, commit markers), from their formats."""

from __future__ import annotations

import math
from dataclasses import dataclass

# WebDataset's TarWriter (tarfile, PAX format, float mtime): every member is a PAX header (512 B)
# and its record (512 B), the ustar header (512 B) and the data padded to 512 B. A sample has three
# members (.jpg, .cls and .json, both < 512 B); the archive ends with 2 x 512 B of zeros and is
# padded to tarfile's 10,240 B record.
TAR_BLOCK, TAR_RECORD, TAR_MEMBER_HEADERS = 512, 10_240, 3 * 512
TAR_SAMPLE_OVERHEAD = 3 * TAR_MEMBER_HEADERS + 2 * TAR_BLOCK

# Zarr v3 sharding (pipeline/data/zarr_store.py: features and codes are stored uncompressed): a
# shard file holds its written inner chunks back to back, each followed by its crc32c (4 B, schema 2), then the
# index, (offset, nbytes) as two uint64 per inner chunk, and its crc32c (4 B). Inner chunks wholly past the last
# row are not written.
ZARR_INDEX_BYTES_PER_CHUNK, ZARR_INDEX_CRC, ZARR_CHUNK_CRC = 16, 4, 4
# A commit marker of encode and compress (np.savez of count, sum, sumsq, _files): 992 B of zip and .npy
# headers, plus the int64 count, plus the JSON records of the shard's files (`commit_records`).
COMMIT_OVERHEAD = 992 + 8


@dataclass
class Output:
    """One thing a stage writes: a file set under `path` (relative to the stage's output folder)."""

    path: str
    bytes: int
    files: int
    per_dir: int  # entries in the fullest directory of this output
    exact: bool
    basis: str
    transient: bool = False  # written while the stage runs and deleted when it commits (training checkpoints)



def sharded_array(rows: int, row_bytes: int, rows_per_shard: int, rows_per_chunk: int) -> tuple[int, int]:
    """(bytes, shard files) of one uncompressed row-sharded Zarr v3 array (see ZARR_INDEX_* above)."""
    chunk = min(rows_per_chunk, rows_per_shard)
    if chunk == rows_per_shard:  # one chunk per shard: no sharding codec, no index; a last chunk is full size
        shards = math.ceil(rows / rows_per_shard)
        return shards * (rows_per_shard * row_bytes + ZARR_CHUNK_CRC), shards
    chunks_per_shard = math.ceil(rows_per_shard / chunk)
    index = ZARR_INDEX_BYTES_PER_CHUNK * chunks_per_shard + ZARR_INDEX_CRC
    full, rest = divmod(rows, rows_per_shard)
    total = full * (chunks_per_shard * (chunk * row_bytes + ZARR_CHUNK_CRC) + index)
    if rest:
        total += math.ceil(rest / chunk) * (chunk * row_bytes + ZARR_CHUNK_CRC) + index
    return total, full + (rest > 0)


def tar_set(images: int, mean_jpeg: float, per_tar: int) -> tuple[int, int]:
    """(bytes, tars) of a split cut into tars of `per_tar` samples, every JPEG of the mean size."""
    sample = TAR_SAMPLE_OVERHEAD + math.ceil(mean_jpeg / TAR_BLOCK) * TAR_BLOCK
    full, rest = divmod(images, per_tar)

    def one(k: int) -> int:
        return math.ceil((k * sample + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD

    return full * one(per_tar) + (one(rest) if rest else 0), full + (rest > 0)


def row_arrays(rows: int, rows_per_shard: int, key_chars: int = 20) -> Output:
    """labels (int32), view and split (uint8), keys (vlen UTF-8): zstd-compressed, so an upper bound."""
    per_row = 4 + 1 + 1 + 4 + key_chars
    shards = math.ceil(rows / rows_per_shard)
    return Output("{labels,keys,view,split}", rows * per_row, 4 * shards, shards, False,
                  "uncompressed upper bound, ~20-char keys")


def commit_records(store: str, array: str, shard_bytes: int, shards: int) -> int:
    """Bytes of the JSON file records in one commit marker: {"path", "bytes", "crc32c"} of the shard's file of
    `array` and of the 4 small row arrays (their compressed sizes guessed at 3 digits)."""
    k = "0" * len(str(max(shards - 1, 0)))
    paths = [(f"{store}/{array}/c/{k}/0/0", len(str(shard_bytes)))] + \
        [(f"{store}/{name}/c/{k}", 3) for name in ("labels", "key", "view", "split")]
    return sum(len('{"path": "", "bytes": , "crc32c": "00000000"}, ') + len(p) + digits for p, digits in paths)

