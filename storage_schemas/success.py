"""`_SUCCESS.json`: written last and atomically; its presence is what makes an output complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from storage_schemas import SchemaError, check_version

SCHEMA_VERSION = 1
FILENAME = "_SUCCESS.json"


class OutputFile(BaseModel):
    path: str  # relative to the stage output directory
    bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    stage: str
    fingerprint: str
    code_version: str
    path: str  # the stage output directory, absolute
    semantic_config: dict[str, Any]
    upstream: dict[str, str]  # stage -> fingerprint
    external_inputs: dict[str, str]  # name -> digest
    started: str
    ended: str
    host: str
    files: list[OutputFile]
    metrics: dict[str, Any]

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Temp file in the same directory + fsync + rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    write_atomic(out_dir / FILENAME, manifest.model_dump_json(indent=2))


def read_manifest(out_dir: Path) -> Manifest:
    path = Path(out_dir) / FILENAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: unreadable manifest ({e})") from None
    check_version(str(path), raw.get("schema_version"), SCHEMA_VERSION)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise SchemaError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
