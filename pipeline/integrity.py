"""Bytes verified where they are read (README "Integrity and concurrency").

Nothing a stage computes comes from bytes that differ from the ones written (or, for an external input,
digested when the run was planned):
- Zarr chunks: each inner chunk of `features.zarr` / `codes.zarr` carries its CRC-32C (Zarr v3's crc32c codec,
  storage_schemas/zarr_layouts.py), which Zarr checks on every read; `CheckedGroup` turns a mismatch into one
  line naming the shard file;
- scattered rows read as their bytes alone (`CheckedArray.read_rows`, a DDP rank's share of a shuffle window): each
  row is checked against its CRC-32C in the store's `<name>_crc32c` (schema 3), the same way;
- images: a JPEG read from a shard tar is checked against its sha256 in manifest.parquet
  (pipeline.data.shards);
- whole files of an output (weights, tables): `read_verified` checks them against the CRC-32C their output's
  `_SUCCESS.json` lists;
- external inputs (weights files): `read_with_sha256` checks the bytes against the digest in the
  fingerprint, and the caller parses those very bytes, never the path again.
A reader that finds bad bytes records them in the output's `_DAMAGED.json` (so `status` says damaged and
`srcflow run` repairs it) and stops with a DamagedError naming the file and the repair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.artifacts import DamagedError, file_problem, file_sha256, forget_digest
from storage_schemas import SchemaError
from storage_schemas.success import FILENAME as SUCCESS
from storage_schemas.success import OutputFile, read_damage, read_manifest, write_damage
from storage_schemas.zarr_layouts import row_crc_name

OUTPUT_DEPTH = 6  # how far above a file its output directory can be (encode: features.zarr/features/c/k/0/0)


# --- the record of a file of a committed output ---------------------------------------------------


def owning_output(path: Path) -> Path | None:
    """The committed output directory holding `path` (the nearest ancestor with `_SUCCESS.json`), or None."""
    for parent in list(Path(path).absolute().parents)[:OUTPUT_DEPTH]:
        if (parent / SUCCESS).is_file():
            return parent
    return None


@lru_cache(maxsize=64)
def _records(success: str, stamp: tuple[int, int]) -> tuple[str, dict[str, OutputFile]]:
    """(stage, path -> record) of one `_SUCCESS.json`, parsed once per version of the file (`stamp`)."""
    manifest = read_manifest(Path(success).parent)
    return manifest.stage, {f.path: f for f in manifest.files}


def output_records(out_dir: Path) -> tuple[str, dict[str, OutputFile]]:
    success = Path(out_dir) / SUCCESS
    st = success.stat()
    return _records(str(success), (st.st_mtime_ns, st.st_size))


def record_of(path: Path) -> tuple[Path, str, OutputFile] | None:
    """(output directory, its stage, the file's record) for a file of a committed output; None for a file of no
    committed output (e.g. the running stage's own). An unreadable manifest is a DamagedError."""
    out_dir = owning_output(path)
    if out_dir is None:
        return None
    try:
        stage, records = output_records(out_dir)
    except (OSError, SchemaError) as e:
        raise DamagedError(f"{out_dir / SUCCESS}: {e}; the output cannot be trusted") from None
    record = records.get(Path(path).absolute().relative_to(out_dir).as_posix())
    if record is None:
        raise DamagedError(f"{path}: not listed in {out_dir / SUCCESS}; it was added after the output was committed")
    return out_dir, stage, record


# --- what a reader does with bad bytes ------------------------------------------------------------


def damage(out_dir: Path, stage: str, problems: list[tuple[str, str]]) -> DamagedError:
    """Record bad files of an output in its `_DAMAGED.json` (merged with what is there) and return the one-line
    error naming the first and the repair: a row store (commit markers) is repaired in place by `srcflow run`,
    any other output rebuilt by `srcflow run --force STAGE`."""
    known = read_damage(out_dir) or []
    listed = {f["path"] for f in known}
    try:
        write_damage(out_dir, known + [{"path": p, "reason": why} for p, why in problems if p not in listed])
        recorded = ""
    except OSError as e:
        recorded = f" (not recorded: {e.strerror}; `srcflow verify --deep --stage {stage}` records it)"
    path, why = problems[0]
    more = f" (+{len(problems) - 1} more bad files)" if len(problems) > 1 else ""
    repair = ("`srcflow run` rebuilds it" if (out_dir / "commits").is_dir()
              else f"rebuild it with `srcflow run --force {stage}`")
    return DamagedError(f"{stage}: {out_dir / path}: {why}{more}: the bytes changed after they were written; "
                        f"{repair}{recorded}")


def damage_in(files: Iterable[Path], symptom: str) -> DamagedError:
    """A reader met bad bytes (`symptom`) somewhere in `files` (of one committed output): find which differ from
    their records (CRC-32C), record them, and return the error; when none does, an error naming the files and
    the symptom."""
    files = [Path(f) for f in files]
    found = record_of(files[0]) if files else None
    if found is None:
        return DamagedError(f"{files[0] if files else '?'}: {symptom}")
    out_dir = found[0]
    stage, records = output_records(out_dir)
    problems = []
    for f in files:
        record = records.get(f.absolute().relative_to(out_dir).as_posix())
        if record is not None and (why := file_problem(out_dir, record, deep=True)):
            problems.append((record.path, why))
    if not problems:
        return DamagedError(f"{stage}: {files[0]}: {symptom}, yet the file matches its record in {SUCCESS}")
    return damage(out_dir, stage, problems)


# --- whole files ----------------------------------------------------------------------------------


def read_verified(path: str | Path) -> bytes:
    """The bytes of a file of a committed output, checked against its record (size, CRC-32C) in the output's
    `_SUCCESS.json`; a file of no committed output (the running stage's own) is read as it is."""
    import crc32c

    data = Path(path).read_bytes()
    found = record_of(Path(path))
    if found is None:
        return data
    out_dir, stage, record = found
    crc = f"{crc32c.crc32c(data):08x}"
    if len(data) != record.bytes or crc != record.crc32c:
        why = (f"{len(data)} bytes, listed with {record.bytes}" if len(data) != record.bytes
               else f"checksum {crc}, listed with {record.crc32c}")
        raise damage(out_dir, stage, [(record.path, why)])
    return data


def check_file(path: str | Path) -> Path:
    """`path`, once its bytes (streamed) match its record in the committed output holding it: for a file read in
    place rather than loaded (a memory-mapped sample set)."""
    found = record_of(Path(path))
    if found is not None:
        out_dir, stage, record = found
        if why := file_problem(out_dir, record, deep=True):
            raise damage(out_dir, stage, [(record.path, why)])
    return Path(path)


def read_with_sha256(path: str | Path, sha256: str, key: str) -> bytes:
    """The bytes of an external input (config key `key`) whose sha256 must be `sha256`, the digest its
    fingerprint holds; the caller parses these bytes and never opens the path again."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise OSError(e.errno, f"{key}: {e.strerror}", str(path)) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        forget_digest(path)  # remembered by size and mtime, which an in-place change may keep
        raise DamagedError(f"{key}: {path} has sha256 {digest[:16]}.., not the {sha256[:16]}.. this run was planned "
                           f"with: the file changed since it was digested; restore it, or run again to plan with the "
                           f"new bytes (what was built from the old ones is then rebuilt)")
    return data


def read_input(path: str | Path, key: str) -> bytes:
    """An external input's bytes, checked against the sha256 the planner digested (`file_sha256`, remembered
    by the file's size and mtime: what the fingerprint holds)."""
    return read_with_sha256(path, file_sha256(path), key)


# --- Zarr chunks ----------------------------------------------------------------------------------


def checksum_error(e: BaseException) -> bool:
    """Zarr's crc32c codec (an inner chunk, or a shard index) found bytes that differ from their CRC-32C."""
    return isinstance(e, ValueError) and "checksum" in str(e).lower()


class RowChecksumError(Exception):
    """A row read from `path` differs from its row CRC-32C (pipeline.data.zarr_store.read_rows)."""

    def __init__(self, path: Path, row: int):
        super().__init__(f"{path}: row {row} fails its CRC-32C")
        self.path, self.row = Path(path), row


class CheckedArray:
    """A Zarr array whose reads turn a chunk checksum mismatch (or, in `read_rows`, a row checksum mismatch) into a
    DamagedError naming the shard file (and recording it); everything else is the array's."""

    def __init__(self, array, path: Path, group: CheckedGroup | None = None):
        self._array, self._path, self._group = array, Path(path), group

    def __getattr__(self, name: str):
        return getattr(self._array, name)

    def __getitem__(self, selection):
        return self._read(lambda: self._array[selection], selection)

    def get_orthogonal_selection(self, selection):
        return self._read(lambda: self._array.get_orthogonal_selection(selection), selection)

    def get_coordinate_selection(self, selection):
        return self._read(lambda: self._array.get_coordinate_selection(selection), selection)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Sorted, unique rows as their bytes alone (pipeline.data.zarr_store.read_rows), each checked against its
        CRC-32C where the store keeps them (schema 3: `<name>_crc32c`, itself read through Zarr, chunks checked);
        stores of schema 1 and 2 are read as before."""
        from pipeline.data import zarr_store

        rows = np.asarray(rows, dtype=np.int64)
        crcs = None
        if self._group is not None and row_crc_name(self._array.basename) in self._group:
            crcs = self._group[row_crc_name(self._array.basename)].get_orthogonal_selection((rows,))
        return self._read(lambda: zarr_store.read_rows(self._array, rows, crcs), (rows,))

    def _read(self, read, selection):
        try:
            return read()
        except RowChecksumError as e:
            raise damage_in([e.path], f"row {e.row} fails its CRC-32C") from None
        except ValueError as e:
            if not checksum_error(e):
                raise
            raise damage_in(self.shard_files(selection), "a chunk fails its CRC-32C") from None

    def shard_files(self, selection) -> list[Path]:
        """The storage files (one per shard of rows) that a selection on the first axis reads."""
        arr = self._array
        unit = (arr.shards or arr.chunks)[0]
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        n = arr.shape[0]
        if isinstance(first, slice):
            rows = np.arange(n)[first]
        elif first is Ellipsis or (isinstance(selection, tuple) and not selection):
            rows = np.arange(n)
        else:
            rows = np.atleast_1d(np.asarray(first)).astype(np.int64) % max(n, 1)
        keys = [arr.metadata.encode_chunk_key((int(k),) + (0,) * (arr.ndim - 1)) for k in np.unique(rows // unit)]
        return [self._path / key for key in keys]


class CheckedGroup:
    """A Zarr group whose arrays are CheckedArrays."""

    def __init__(self, group, path: Path):
        self._group, self._path = group, Path(path)

    def __getattr__(self, name: str):
        return getattr(self._group, name)

    def __getitem__(self, name: str) -> CheckedArray:
        return CheckedArray(self._group[name], self._path / name, self)

    def __contains__(self, name: str) -> bool:
        return name in self._group


def open_checked(store: str | Path) -> CheckedGroup:
    import zarr

    return CheckedGroup(zarr.open_group(str(store), mode="r"), Path(store))


def array_damage(store: str | Path, name: str, e: BaseException) -> BaseException:
    """For a read of a whole array outside CheckedArray (e.g. Dask's): a checksum error becomes the
    DamagedError naming the bad shard files of that array (all its files are checked); anything else is `e`."""
    if not checksum_error(e):
        return e
    store = Path(store)
    return damage_in(sorted(p for p in (store / name).rglob("*") if p.is_file() and p.name != "zarr.json"),
                     "a chunk fails its CRC-32C")
