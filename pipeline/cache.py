"""The one per-process cache: models and readers a worker process builds once and shares between its jobs.

`per_process(kind, key, build, files)` returns the value built for (key, the identity of `files`), building it
at most once however many threads ask at the same time. A file's identity is (path, mtime_ns, size), so a
file rebuilt in place (a forced refit) is reloaded. A process holds one value per `kind`: a new key replaces
the old value, so a long-lived worker that samples many runs holds one flow on the device, not all of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_VALUES: dict[str, tuple[Any, Any]] = {}  # kind -> (full key, value)
_BUILDING: dict[str, threading.Lock] = {}  # kind -> the lock its builders wait on
_LOCK = threading.Lock()


def per_process(kind: str, key: Any, build: Callable[[], T], files: Iterable[str | Path] = ()) -> T:
    """build() once per process for (key, files' identity); one value per `kind` is kept. `key` must be
    hashable and equal for equal inputs (paths as str, specs as frozen dataclasses)."""
    full = (key, tuple(file_identity(f) for f in files))
    with _LOCK:
        lock = _BUILDING.setdefault(kind, threading.Lock())
    with lock:  # one builder per kind at a time: concurrent jobs wait for the first one's value
        held = _VALUES.get(kind)
        if held is None or held[0] != full:
            _VALUES.pop(kind, None)  # the stale value goes before the new one is built (device memory)
            _VALUES[kind] = (full, build())
        return _VALUES[kind][1]


def file_identity(path: str | Path) -> tuple[str, int, int] | tuple[str, None, None]:
    """(path, mtime_ns, size); a missing file is (path, None, None), so building reports the missing file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return str(path), None, None
    return str(path), st.st_mtime_ns, st.st_size


def clear() -> None:
    """Forget every value (tests)."""
    with _LOCK:
        _VALUES.clear()
