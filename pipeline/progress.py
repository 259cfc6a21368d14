"""Progress bars (rich) and throughput logging for long stages."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("srcflow")

_MODE: str | bool = "auto"  # runtime.progress, set by the CLI and the flow


def set_mode(mode: str | bool) -> None:
    global _MODE
    _MODE = mode


def _enabled() -> bool:
    return sys.stderr.isatty() if _MODE == "auto" else bool(_MODE)


class Meter:
    def __init__(self, bar: Progress | None, task_id, desc: str, unit: str, total: int):
        self.bar, self.task_id, self.desc, self.unit, self.total = bar, task_id, desc, unit, total
        self.done = 0
        self.start = self.last_log = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task_id, n)
        t = time.perf_counter()
        if t - self.last_log > 30:  # a line every 30 s for logs (Prefect UI, files) without a bar
            self.last_log = t
            log.info("%s: %d/%d %s (%.1f %s/s)", self.desc, self.done, self.total, self.unit, self.rate, self.unit)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)


@contextmanager
def progress(desc: str, total: int, unit: str = "items") -> Iterator[Meter]:
    """`with progress("encode", n, "img") as p: ... p.advance(k)`; logs the throughput at the end."""
    bar = None
    if _enabled():
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    meter = Meter(bar, bar.add_task(desc, total=total) if bar else None, desc, unit, total)
    if bar:
        bar.start()
    try:
        yield meter
    finally:
        if bar:
            bar.stop()
        log.info("%s: %d %s in %.1f s (%.1f %s/s)", desc, meter.done, unit,
                 time.perf_counter() - meter.start, meter.rate, unit)


def human_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 1.5 GB is 1.5e9 bytes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_hours(h: float) -> str:
    if h >= 1:
        return f"{h:,.1f} h"
    return f"{h * 60:.1f} min" if h * 60 >= 1 else f"{h * 3600:.0f} s"
