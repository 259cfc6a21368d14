"""`_SUCCESS.json`: written last and atomically; its presence is what makes an output complete.

Version 2 lists every file of the output with its size and CRC-32C (Castagnoli, hex), and names the
output by its path relative to `storage.root`, so a copied or moved root stays whole and a damaged
copy never reads the original. Version 1 (absolute paths, sizes only) is refused.

Version 3 adds `upstream_content`: per upstream stage, the digest of the files (records) of the upstream output
this one was built from (`pipeline.artifacts.content_digest`), so an output whose upstream now holds other bytes
is stale. Version 2 manifests are read as before (no such digests: their lineage is by fingerprint only).

`_DAMAGED.json`, written by `srcflow verify --deep` beside it, lists files whose checksum no longer
matches (DAMAGE_SCHEMA); an output holding one is damaged until it is rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from pydantic import BaseModel, ConfigDict, PrivateAttr

from storage_schemas import check_version, read_json_model

SCHEMA_VERSION = 3
OLDER_VERSIONS = (2,)  # read as before
FILENAME = "_SUCCESS.json"
DAMAGED = "_DAMAGED.json"


class OutputFile(BaseModel):
    path: str  # relative to the stage output directory
    bytes: int
    crc32c: str  # 8 hex digits


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    stage: str
    fingerprint: str
    code_version: str
    path: str  # the stage output directory relative to storage.root: "<stage>/<fingerprint[:16]>"
    semantic_config: dict[str, Any]
    upstream: dict[str, str]  # stage -> fingerprint
    upstream_content: dict[str, str] = {}  # stage -> content digest of the upstream output read (version 3)
    external_inputs: dict[str, str]  # name -> digest
    started: str
    ended: str
    host: str
    files: list[OutputFile]
    metrics: dict[str, Any]
    _root: Path | None = PrivateAttr(None)

    @property
    def dir(self) -> Path:
        """The output directory under the root this manifest was read from (never an absolute path on disk)."""
        if self._root is None:
            raise RuntimeError(f"manifest of {self.path} was not read through an artifact store root")
        return self._root / self.path

    def at(self, root: Path) -> Manifest:
        self._root = Path(root)
        return self

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def temp_name(path: Path) -> Path:
    """`.NAME.tmp-PID-TID-HOST`: per process and thread, so no two writers share one, and a cleaner on any host of a
    shared filesystem can tell whose (see `temp_owner`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{writer_host()}")


class TempOwner(NamedTuple):
    pid: int
    host: str | None  # None in a name written before hosts were recorded (then: this host)


def temp_owner(path: Path) -> TempOwner | None:
    """Who writes a `temp_name`, or None for a name that is not one."""
    _, sep, tail = path.name.rpartition(".tmp-")
    pid, _, rest = tail.partition("-")
    if not (sep and path.name.startswith(".") and pid.isdigit()):
        return None
    _, _, host = rest.partition("-")
    return TempOwner(int(pid), host or None)


INITIAL_PID_NAMESPACE = 0xEFFFFFFC  # the inode Linux gives the host's own PID namespace


def writer_host() -> str:
    """This host, as a file-name part: its hostname and, inside a PID namespace of its own (a container sharing the
    hostname), that namespace, so a PID is only checked where it means that process."""
    name = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "_"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = INITIAL_PID_NAMESPACE
    return name if namespace == INITIAL_PID_NAMESPACE else f"{name}+{namespace:x}"


def write_atomic(path: Path, data: str | bytes | Callable[[BinaryIO], object], fsync: bool = True) -> None:
    """The one file writer: a `temp_name` in the same directory (created if need be), fsynced and renamed into
    place, then the directory fsynced so the rename survives a crash too (no fsyncs with `fsync=False`: files a
    commit marker covers, as Zarr's own writes): readers see the old file or the whole new one.
    `data` is the bytes, or a function that writes them to the open file (np.savez, a tar or zip stream,
    torch.save; a library that writes by name gets the temp file's, `f.name`).
    A writer that fails leaves no temp file behind; an OSError (a full disk) names the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                mode = os.fstat(f.fileno()).st_mode & 0o777  # the umask's, as every file opened here
                data(f)
                if os.stat(tmp).st_mode & 0o777 != mode:  # a writer by name replaced it (safetensors: 0600)
                    os.chmod(tmp, mode)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is None:  # a library's own message, with no errno to name the file by: kept as it is
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable; some filesystems refuse fsync on a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    write_atomic(out_dir / FILENAME, manifest.model_dump_json(indent=2))


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of an output directory, its `.dir` under that directory's root; SchemaError names the file."""
    out_dir = Path(out_dir)
    manifest = read_json_model(out_dir / FILENAME, Manifest, SCHEMA_VERSION, "manifest", OLDER_VERSIONS)
    return manifest.at(out_dir.parents[1])


DAMAGE_SCHEMA_VERSION = 1


def write_damage(out_dir: Path, problems: list[dict[str, str]]) -> None:
    """`_DAMAGED.json`: [{"path": relative file, "reason": ...}], what a deep verify found."""
    write_atomic(Path(out_dir) / DAMAGED, json.dumps({"schema_version": DAMAGE_SCHEMA_VERSION, "files": problems},
                                                     indent=2))


def read_damage(out_dir: Path) -> list[dict[str, str]] | None:
    """The files `_DAMAGED.json` lists; None without one. An unreadable one damages the whole output."""
    path = Path(out_dir) / DAMAGED
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        check_version(str(path), raw.get("schema_version"), DAMAGE_SCHEMA_VERSION)
        return [{"path": str(f["path"]), "reason": str(f["reason"])} for f in raw["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [{"path": DAMAGED, "reason": "unreadable damage report"}]
