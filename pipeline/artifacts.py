"""The artifact store: `<storage.root>/<stage>/<fingerprint[:16]>/`, complete iff `_SUCCESS.json` lists it whole.

A stage output's identity is its fingerprint: sha256 over the stage name, its code version,
its semantic config, the fingerprints of the upstream artifacts it reads and the digests of the
external inputs it reads (weight files, the dataset listing). Operational settings never enter.

Integrity (README "Integrity and concurrency"):
- `_SUCCESS.json` lists every file of the output with its size and CRC-32C; row stores take each
  shard file's record from the shard's commit marker, written when the shard was (see `Commits`).
- `check` (fast: every listed file exists with its size; deep: and its checksum) gives the state
  done | damaged | partial | stale | missing, and the bad files.
- One writer per output, on one host or many sharing the store (NFS, Lustre): `lock` is a
  per-(stage, fingerprint) lease file (`LEASE_SECONDS`, `lock`'s docstring says why not flock),
  taken over when its holder dies. A forced rebuild writes into `.<fp16>.rebuild` and replaces the
  output only when it is complete (`commit`), never leaving the output's path without one
  (`replace_dir`).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from storage_schemas import SchemaError
from storage_schemas.success import (
    DAMAGED,
    Manifest,
    OutputFile,
    read_damage,
    read_manifest,
    temp_owner,
    write_atomic,
    write_manifest,
    writer_host,
)
from storage_schemas.success import FILENAME as SUCCESS

PROGRESS = "_PROGRESS.json"
UPSTREAM = "_UPSTREAM.json"  # in an output: the content digests of the upstream outputs it was begun from
REBUILD = ".rebuild"  # suffix of a forced rebuild's directory, `.<fp16>.rebuild`
ASIDE = ".old-"  # `.<fp16>.old-<pid>`: the old output of a forced rebuild, moved aside where renameat2 cannot swap
# A lock's lease: its holder touches it every HEARTBEAT_SECONDS; a peer that sees it unchanged for LEASE_SECONDS (on
# its own clock) takes it over. Over NFS a peer may see a touch up to acregmax (60 s by default) late: the lease is
# longer than heartbeat + acregmax, so a live holder is never taken over.
LEASE_SECONDS = 120.0
HEARTBEAT_SECONDS = 20.0
TEMP_STALE_SECONDS = 900.0  # a temp file of another host untouched this long (by the filesystem's clock) is dead
SWAP_WAIT_SECONDS = 5.0  # a reader that finds an output moved aside waits this long for the new one
log = logging.getLogger("srcflow")


class LockLost(RuntimeError):
    """A run's lease on an output was taken over (it stopped heartbeating for LEASE_SECONDS): it must not commit."""


def fingerprint(stage: str, code_version: str, semantic: dict, upstream: dict[str, str],
                external: dict[str, str]) -> str:
    payload = {"stage": stage, "code_version": code_version, "semantic": semantic, "upstream": upstream,
               "external": external}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- digests of external inputs (weights): sha256, remembered outside the store --------------------

_DIGESTS: dict[str, str] = {}  # per process, for when the cache directory cannot be written
_READ_ONLY = False  # inside `read_only()`


@contextmanager
def read_only():
    """`status`, `plan`, `verify`: inside, planning reads the local caches but writes none, and creates no input
    (the tiny dataset, the stand-in Inception: `stages.inputs` gives those a `pending` digest instead)."""
    global _READ_ONLY
    _READ_ONLY = True
    try:
        yield
    finally:
        _READ_ONLY = False


def writes_allowed() -> bool:
    return not _READ_ONLY


def local_cache_dir() -> Path:
    """Project-local cache (`.srcflow/` in the working directory, beside `.prefect/`; SRCFLOW_CACHE_DIR overrides).
    Never inside storage.root: `status` must not write into the store, nor here (`read_only`)."""
    return Path(os.environ.get("SRCFLOW_CACHE_DIR") or ".srcflow").absolute()


def file_sha256(path: str | Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so `status` does not rehash GB of weights. The cache is
    best effort: on a read-only or full disk it lives in memory only."""
    path = Path(path).resolve()
    key = _digest_key(path)
    cached = (cache_dir or local_cache_dir() / "digests") / key
    if key in _DIGESTS:
        return _DIGESTS[key]
    try:
        digest = cached.read_text().strip()
    except OSError:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        try:
            if writes_allowed():
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, digest)
        except OSError:
            pass
    _DIGESTS[key] = digest
    return digest


def _digest_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


def forget_digest(path: str | Path) -> None:
    """Drop the remembered sha256 of `path` (its bytes changed under the same size and mtime, which is what the
    digest is remembered by): the next `file_sha256` reads the file again."""
    key = _digest_key(Path(path).resolve())
    _DIGESTS.pop(key, None)
    with suppress(OSError):
        (local_cache_dir() / "digests" / key).unlink()


def input_digest(key: str, path: str | Path | None, expected: str) -> str:
    """Digest of an external input file for a fingerprint; a missing file is a one-line error naming its key."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (expected {expected})")
    return file_sha256(path)


_PASSED: set[str] = set()  # per process, as _DIGESTS


def check_once(path: str | Path, spec: str, check: Callable[[], None]) -> str:
    """The sha256 of `path` once `check()` (raising a one-line error for a bad file) has passed for these bytes
    and this `spec` (e.g. the architecture the weights must fit). A pass is remembered beside the digests, so
    planning again reads no weights and imports no torch."""
    digest = file_sha256(path)
    key = hashlib.sha256(f"{digest}|{spec}".encode()).hexdigest()[:32]
    marker = local_cache_dir() / "checks" / key
    if key in _PASSED or marker.is_file():
        return digest
    check()
    _PASSED.add(key)
    try:
        if writes_allowed():
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, f"{Path(path).resolve()}\n{spec}\n")
    except OSError:
        pass
    return digest


# --- file records: size and CRC-32C (hardware CRC, ~13 GB/s here: fine for terabytes) ----------------


def file_crc32c(path: Path) -> str:
    import crc32c

    value, buf = 0, bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            value = crc32c.crc32c(view[:n], value)
    return f"{value:08x}"


def file_record(base: Path, path: Path) -> OutputFile:
    return OutputFile(path=path.relative_to(base).as_posix(), bytes=path.stat().st_size, crc32c=file_crc32c(path))


def file_problem(base: Path, record: OutputFile, deep: bool) -> str | None:
    """Why the listed file no longer matches its record (None if it does)."""
    path = base / record.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"missing (listed with {record.bytes} bytes)"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size != record.bytes:
        return f"{size} bytes, listed with {record.bytes}"
    if deep:
        try:
            crc = file_crc32c(path)
        except OSError as e:
            return f"unreadable ({e.strerror})"
        if crc != record.crc32c:
            return f"checksum {crc}, listed with {record.crc32c}"
    return None


# Files whose bytes depend on when they were written, not on what was computed (TensorBoard events, timings,
# zip timestamps of commit markers, resume checkpoints): left out of an output's content digest, so a
# bit-identical rebuild or repair keeps the outputs built from it valid.
VOLATILE = ("commits/", "checkpoints/", "tensorboard/", "metrics.jsonl", "train_summary.json", PROGRESS, UPSTREAM)


def content_digest(manifest: Manifest) -> str:
    """sha256 over the records (path, size, CRC-32C) of an output's files, less the VOLATILE ones: what an output
    built from it records (`Manifest.upstream_content`), so that one built from other bytes is stale."""
    h = hashlib.sha256()
    for f in sorted(manifest.files, key=lambda f: f.path):
        if not f.path.startswith(VOLATILE):
            h.update(f"{f.path}\t{f.bytes}\t{f.crc32c}\n".encode())
    return h.hexdigest()


# --- commit markers of row stores ---------------------------------------------------------------


class Commits:
    """Commit markers of a row store (shard, encode, compress): `dir/{k:06d}.npz`, one per shard job, written
    last. Each holds that shard's partial results (e.g. statistics) and the records (size, CRC-32C) of the files
    the job wrote, relative to the stage output (the marker directory's parent). A killed run redoes exactly the
    shards without a marker; a damaged file costs only its shard (`ArtifactStore.prepare_repair`)."""

    FILES = "_files"

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    @property
    def base(self) -> Path:
        return self.dir.parent

    def path(self, k: int) -> Path:
        return self.dir / f"{k:06d}.npz"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def any(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("*.npz"))

    def write(self, k: int, files: list[Path] = (), **partials: np.ndarray) -> None:
        """Commit shard k: record `files` (absolute paths under the stage output), then write the marker."""
        self.dir.mkdir(parents=True, exist_ok=True)
        records = [file_record(self.base, Path(f)).model_dump() for f in files]
        buf = io.BytesIO()
        np.savez(buf, **partials, **{self.FILES: np.array(json.dumps(records).encode())})
        write_atomic(self.path(k), buf.getvalue())

    def read(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self.path(k)) as z:
            return {name: z[name] for name in z.files if name != self.FILES}

    def records(self, k: int) -> list[OutputFile]:
        """The files marker k commits; ValueError/OSError when the marker is unreadable."""
        with np.load(self.path(k)) as z:
            if self.FILES not in z.files:
                return []
            return [OutputFile.model_validate(r) for r in json.loads(z[self.FILES].item())]

    def indices(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.npz") if p.stem.isdigit()) if self.dir.is_dir() else []


# --- the store ----------------------------------------------------------------------------------


@dataclass
class StageOutput:
    """What a stage function gets to write into: its directory and a progress reporter. `final` is where the output
    lands when committed: `path` itself, or the output a forced rebuild in `path` replaces."""

    stage: str
    fingerprint: str
    path: Path
    final: Path | None = None

    def report_progress(self, done: int, total: int, unit: str) -> None:
        """Shown by `srcflow status` while the output is partial."""
        write_atomic(self.path / PROGRESS, json.dumps({"done": done, "total": total, "unit": unit}))


@dataclass
class Health:
    """An output's state and, when damaged, its bad files (paths relative to the output directory)."""

    state: str  # done | damaged | partial | stale | missing
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    files: int = 0
    bytes: int = 0

    def first(self, base: Path) -> str:
        path, why = self.problems[0]
        more = f" (+{len(self.problems) - 1} more bad files)" if len(self.problems) > 1 else ""
        return f"{base / path}: {why}{more}"


class DamagedError(ValueError):
    """An output that is damaged and is not rebuilt automatically; the message names the file and the repair."""


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.leases: dict[tuple[str, str], Any] = {}  # (stage, fp) -> the lease this store holds on it

    def stage_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp[:16]

    def rebuild_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / f".{fp[:16]}{REBUILD}"

    def check(self, stage: str, fp: str, deep: bool = False) -> Health:
        """done | damaged | partial | stale | missing. Fast: every file `_SUCCESS.json` lists exists with its size;
        deep: and its CRC-32C matches. A whole output built from other bytes of an upstream output than that output
        holds now (`content_digest`) is stale, with the reason as its problem. Reads only."""
        d = self.stage_dir(stage, fp)
        if not (d / SUCCESS).exists() and not self.swapped_in(stage, fp):
            if d.is_dir():
                return Health("partial")
            siblings = (self.root / stage).glob("*") if (self.root / stage).is_dir() else []
            others = [p for p in siblings if p.is_dir() and not p.name.startswith(".") and p != d]
            return Health("stale" if others else "missing")
        try:
            m = read_manifest(d)
        except SchemaError as e:
            return Health("damaged", [(SUCCESS, str(e).removeprefix(f"{d / SUCCESS}: "))])
        if (m.stage, m.fingerprint) != (stage, fp):
            return Health("damaged", [(SUCCESS, f"belongs to {m.stage}/{m.fingerprint[:16]}, not to this output")])
        problems = [(f["path"], f["reason"]) for f in read_damage(d) or []]
        problems += [(f.path, why) for f in m.files if (why := file_problem(d, f, deep))]
        if problems:
            return Health("damaged", problems, len(m.files), m.bytes)
        if changed := self.changed_upstream(m):
            return Health("stale", [(SUCCESS, changed)], len(m.files), m.bytes)
        return Health("done", [], len(m.files), m.bytes)

    def changed_upstream(self, m: Manifest) -> str | None:
        """Why an output's recorded upstream content differs from what its upstream outputs hold now, or None.
        An upstream that is gone or unreadable is its own problem (its state says so), not this output's."""
        for stage, digest in m.upstream_content.items():
            fp = m.upstream.get(stage, "")
            try:
                upstream = read_manifest(self.stage_dir(stage, fp))
            except (OSError, SchemaError):
                continue
            if content_digest(upstream) != digest:
                return f"built from other bytes of {stage}/{fp[:16]} than it holds now (rebuilt since); run rebuilds it"
        return None

    def state(self, stage: str, fp: str) -> str:
        return self.check(stage, fp).state

    def manifest(self, stage: str, fp: str) -> Manifest:
        """The manifest of a complete, intact output (the fast check); DamagedError names the first bad file."""
        health = self.check(stage, fp)
        if health.state != "done":
            d = self.stage_dir(stage, fp)
            detail = health.first(d) if health.problems else f"{d} is {health.state}"
            raise DamagedError(f"{stage}: {detail}; rebuild it with `srcflow run --force {stage}`"
                               if health.problems else f"{stage}: {detail}: run it first")
        return read_manifest(self.stage_dir(stage, fp))

    def progress(self, stage: str, fp: str) -> dict | None:
        p = self.stage_dir(stage, fp) / PROGRESS
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def swapped_in(self, stage: str, fp: str) -> bool:
        """Whether the output appears within SWAP_WAIT_SECONDS when a forced rebuild has just moved the old one aside
        (`replace_dir` on a filesystem without renameat2's exchange): a reader never sees that window."""
        if not list((self.root / stage).glob(f".{fp[:16]}{ASIDE}*")):
            return False
        success, deadline = self.stage_dir(stage, fp) / SUCCESS, time.monotonic() + SWAP_WAIT_SECONDS
        while time.monotonic() < deadline:
            if success.exists():
                return True
            time.sleep(0.02)
        return False

    @contextmanager
    def lock(self, stage: str, fp: str):
        """Hold the one-writer lock of an output; yields whether another run held it first (then it may have built
        the output meanwhile). Says once that it waits, naming the holder.

        The lock is a lease file (filelock's SoftFileLease), `.locks/<stage>-<fp16>.lease`, naming its holder's host
        and pid: created exclusively, touched every HEARTBEAT_SECONDS by a thread of the holder, taken over at once
        when the holder is a dead process of this host, and after LEASE_SECONDS without a touch when it is on
        another host. An OS lock (flock/fcntl) does not hold across nodes everywhere: on Lustre mounted without
        `flock` it is local to each node (`localflock`) or fails, and a holder on a dead node is released only by
        the NFS server's own lease recovery. A holder that loses its lease (frozen for LEASE_SECONDS) logs it and
        refuses to commit (`LockLost`). An interrupted forced rebuild's swap is finished here (`finish_swap`)."""
        from filelock import SoftFileLease, Timeout

        path = self.root / ".locks" / f"{stage}-{fp[:16]}.lease"
        path.parent.mkdir(parents=True, exist_ok=True)
        lease = SoftFileLease(path, lease_duration=LEASE_SECONDS, heartbeat_interval=HEARTBEAT_SECONDS,
                              on_compromise=lambda lost: log.error(
                                  "%s: lost the lock of %s (%s): another run took it over; this run will not commit "
                                  "it", stage, self.stage_dir(stage, fp), lost.reason))
        waited = False
        try:
            lease.acquire(timeout=0)
        except Timeout:
            owner = lease.owner
            log.info("%s: another run is writing %s (%s); waiting for it", stage, self.stage_dir(stage, fp),
                     f"host {owner.hostname}, pid {owner.pid}" if owner else "its holder just left")
            lease.acquire(poll_interval=1.0)
            waited = True
        self.leases[(stage, fp)] = lease
        try:
            self.finish_swap(stage, fp)
            yield waited
        finally:
            self.leases.pop((stage, fp), None)
            lease.release()

    def finish_swap(self, stage: str, fp: str) -> None:
        """Complete a forced rebuild's swap that died between its two renames (`replace_dir`), holding the lock: the
        rebuilt output takes the output's place, and the old one moved aside is removed."""
        final, rebuilt = self.stage_dir(stage, fp), self.rebuild_dir(stage, fp)
        asides = list((self.root / stage).glob(f".{fp[:16]}{ASIDE}*"))
        if not asides:
            return
        if not final.exists() and (rebuilt / SUCCESS).exists():
            os.rename(rebuilt, final)
            log.warning("%s: finished the swap of a forced rebuild that was interrupted (%s)", stage, final)
        if final.exists():
            for aside in asides:
                shutil.rmtree(aside, ignore_errors=True)

    def open_output(self, stage: str, fp: str, rebuild: bool = False) -> StageOutput:
        """The directory to write into (hold `lock`). An existing partial output is kept, so the stage can resume;
        `rebuild` writes a fresh output beside a complete one, which stays until `commit` replaces it."""
        final = self.stage_dir(stage, fp)
        d = self.rebuild_dir(stage, fp) if rebuild else final
        d.mkdir(parents=True, exist_ok=True)
        now = filesystem_clock(d)
        for leftover in d.rglob(".*.tmp-*"):  # half-written files of a killed run (see write_atomic)
            if writer_gone(leftover, now):
                leftover.unlink(missing_ok=True)
        return StageOutput(stage, fp, d, final)

    def begin(self, out: StageOutput, upstream_content: dict[str, str]) -> None:
        """Record in `UPSTREAM` the content digests of the upstream outputs a partial (or repaired) output is built
        from; one begun from other upstream bytes (an upstream rebuilt since, not bit-identically) is emptied
        first, so that no output mixes shards, or a training resumes, from two versions of its inputs."""
        path = out.path / UPSTREAM
        try:
            begun = json.loads(path.read_text())
        except (OSError, ValueError):
            begun = None
        if begun is not None and begun != upstream_content:
            log.warning("%s: %s was begun from other bytes of %s; starting it again", out.stage, out.path,
                        ", ".join(sorted(k for k in upstream_content if begun.get(k) != upstream_content[k])))
            for child in out.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if begun != upstream_content:
            write_atomic(path, json.dumps(upstream_content, sort_keys=True))

    def repairable(self, stage: str, fp: str) -> bool:
        """A row store (commit markers) is repaired in place; other damaged outputs need `--force`."""
        return Commits(self.stage_dir(stage, fp) / "commits").any()

    def prepare_repair(self, stage: str, fp: str, problems: list[tuple[str, str]]) -> int | None:
        """Make a damaged row store resumable: drop the commit marker of every shard whose files are bad (by the
        markers' own records, and `problems`), and the output's `_SUCCESS.json`; the stage then redoes only those
        shards, bit-identically. A bad file no marker owns drops them all. Returns the shards dropped, or None
        when the output has no commit markers (it cannot be repaired in place)."""
        d = self.stage_dir(stage, fp)
        commits = Commits(d / "commits")
        if not commits.any():
            return None
        bad = {path for path, _ in problems} - {SUCCESS, DAMAGED}
        owned: set[str] = set()
        dropped = []
        for k in commits.indices():
            try:
                records = commits.records(k)
            except (OSError, ValueError, KeyError):
                records = None
            marker = commits.path(k).relative_to(d).as_posix()
            owned.update([marker] + [r.path for r in records or []])
            if records is None or marker in bad or any(r.path in bad or file_problem(d, r, deep=False)
                                                       for r in records):
                dropped.append(k)
        if bad - owned:  # e.g. a Zarr array's metadata: the store is rebuilt whole
            dropped = commits.indices()
        for k in dropped:
            commits.path(k).unlink(missing_ok=True)
        (d / DAMAGED).unlink(missing_ok=True)
        (d / SUCCESS).unlink(missing_ok=True)
        return len(dropped)

    def commit(self, out: StageOutput, *, code_version: str, semantic: dict, upstream: dict[str, str],
               external: dict[str, str], started: datetime, metrics: dict[str, Any],
               upstream_content: dict[str, str] | None = None) -> Manifest:
        """List every output file with its size and CRC-32C (a row store's shard files from their commit markers),
        write `_SUCCESS.json` last and atomically, then, for a rebuild, swap it in place of the old output.
        `upstream_content`: the content digest of each upstream output the stage read."""
        (out.path / PROGRESS).unlink(missing_ok=True)
        committed = {}
        commits = Commits(out.path / "commits")
        for k in commits.indices():
            committed.update({r.path: r for r in commits.records(k)})
        files = []
        for p in sorted(out.path.rglob("*")):
            if not p.is_file() or p.name in (SUCCESS, DAMAGED) or temp_owner(p) is not None:
                continue
            rel = p.relative_to(out.path).as_posix()
            known = committed.get(rel)
            files.append(known if known and known.bytes == p.stat().st_size else file_record(out.path, p))
        final = out.final or out.path
        manifest = Manifest(
            stage=out.stage, fingerprint=out.fingerprint, code_version=code_version,
            path=final.relative_to(self.root).as_posix(), semantic_config=semantic, upstream=upstream,
            upstream_content=upstream_content or {}, external_inputs=external, started=started.isoformat(),
            ended=now().isoformat(), host=socket.gethostname(), files=files, metrics=metrics,
        )
        lease = self.leases.get((out.stage, out.fingerprint))
        if lease is not None and lease.compromise is not None:
            raise LockLost(f"{out.stage}: this run lost the lock of {final} ({lease.compromise.reason}) while it was "
                           f"writing it; another run took it over, so this run does not commit")
        write_manifest(out.path, manifest)
        if out.path != final:
            replace_dir(out.path, final)
        return manifest.at(self.root)


def replace_dir(new: Path, old: Path) -> None:
    """Put directory `new` in place of `old`: one atomic exchange where the filesystem has renameat2's
    RENAME_EXCHANGE (Linux local filesystems), then the old one removed. Elsewhere (NFS, Lustre) two renames, the old
    output aside as `.<name>.old-<pid>` first: readers that find an aside wait for the new output
    (`ArtifactStore.swapped_in`), and a swap that dies between them is finished by the next lock holder
    (`ArtifactStore.finish_swap`)."""
    if not old.exists():
        os.rename(new, old)
        return
    if not exchange(new, old):
        aside = old.with_name(f".{old.name}{ASIDE}{os.getpid()}")
        os.rename(old, aside)
        os.rename(new, old)
        new = aside
    shutil.rmtree(new)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the OS or the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


def writer_gone(temp: Path, now: float) -> bool:
    """Whether the writer of temp file `temp` is gone: a dead process of this host, or, on another host (a shared
    store), a file untouched for TEMP_STALE_SECONDS by `now`, the filesystem's clock (see `filesystem_clock`)."""
    owner = temp_owner(temp)
    if owner is None:
        return False
    if owner.host in (None, writer_host()):
        return not pid_alive(owner.pid)
    try:
        return now - temp.stat().st_mtime > TEMP_STALE_SECONDS
    except FileNotFoundError:
        return False


def filesystem_clock(directory: Path) -> float:
    """The time by the clock that stamps files in `directory`: an NFS server stamps them with its own, whatever
    this host's clock says, so ages are measured against a touch of the directory."""
    try:
        os.utime(directory)
        return directory.stat().st_mtime
    except OSError:
        return time.time()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now() -> datetime:
    return datetime.now(UTC)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
