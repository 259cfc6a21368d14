"""The artifact store: `<storage.root>/<stage>/<fingerprint[:16]>/`, complete iff `_SUCCESS.json`.

A stage output's identity is its fingerprint: sha256 over the stage name, its code version,
its semantic config, the fingerprints of the upstream artifacts it reads and the digests of the
external inputs it reads (weight files, the dataset listing). Operational settings never enter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage_schemas.success import FILENAME as SUCCESS, Manifest, OutputFile, read_manifest, write_atomic, write_manifest

PROGRESS = "_PROGRESS.json"


def fingerprint(stage: str, code_version: str, semantic: dict, upstream: dict[str, str], external: dict[str, str]) -> str:
    payload = {"stage": stage, "code_version": code_version, "semantic": semantic, "upstream": upstream, "external": external}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so `status` does not rehash GB of weights."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir / key if cache_dir else None
    if cached and cached.is_file():
        return cached.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, digest)
    return digest


def input_digest(storage_root: str | Path, key: str, path: str | Path | None, expected: str) -> str:
    """Digest of an external input file for a fingerprint; a missing file is a one-line error naming its key."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (expected {expected})")
    return file_sha256(path, ArtifactStore(storage_root).digest_cache)


@dataclass
class StageOutput:
    """What a stage function gets to write into: its directory and a progress reporter."""

    stage: str
    fingerprint: str
    path: Path

    def report_progress(self, done: int, total: int, unit: str) -> None:
        """Shown by `srcflow status` while the output is partial."""
        write_atomic(self.path / PROGRESS, json.dumps({"done": done, "total": total, "unit": unit}))


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def stage_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp[:16]

    @property
    def digest_cache(self) -> Path:
        return self.root / ".digests"

    def state(self, stage: str, fp: str) -> str:
        """done | partial | stale | missing (see README: "Stage states")."""
        d = self.stage_dir(stage, fp)
        if (d / SUCCESS).is_file():
            return "done"
        if d.is_dir():
            return "partial"
        others = [p for p in (self.root / stage).glob("*") if p.is_dir() and p != d] if (self.root / stage).is_dir() else []
        return "stale" if others else "missing"

    def manifest(self, stage: str, fp: str) -> Manifest:
        return read_manifest(self.stage_dir(stage, fp))

    def progress(self, stage: str, fp: str) -> dict | None:
        p = self.stage_dir(stage, fp) / PROGRESS
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def open_output(self, stage: str, fp: str, force: bool = False) -> StageOutput:
        """The directory to write into. An existing partial output is kept, so the stage can resume."""
        d = self.stage_dir(stage, fp)
        if force and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        for leftover in d.rglob(".*.tmp-*"):  # half-written files of a killed run (see write_atomic)
            leftover.unlink()
        return StageOutput(stage, fp, d)

    def commit(self, out: StageOutput, *, code_version: str, semantic: dict, upstream: dict[str, str],
               external: dict[str, str], started: datetime, metrics: dict[str, Any]) -> Manifest:
        """List every output file, then write `_SUCCESS.json` last and atomically."""
        (out.path / PROGRESS).unlink(missing_ok=True)
        files = [
            OutputFile(path=str(p.relative_to(out.path)), bytes=p.stat().st_size)
            for p in sorted(out.path.rglob("*"))
            if p.is_file() and p.name != SUCCESS
        ]
        manifest = Manifest(
            stage=out.stage, fingerprint=out.fingerprint, code_version=code_version, path=str(out.path),
            semantic_config=semantic, upstream=upstream, external_inputs=external,
            started=started.isoformat(), ended=now().isoformat(), host=socket.gethostname(),
            files=files, metrics=metrics,
        )
        write_manifest(out.path, manifest)
        return manifest


def now() -> datetime:
    return datetime.now(timezone.utc)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
