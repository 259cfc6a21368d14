"""Progress of long work: one rich display per terminal, a log line with rate and ETA every 30 s, and a reporter hook
(the Prefect flow's progress artifacts: flows/full.py).

Every `progress(...)` of a process shares one live display: nested or concurrent meters are lines of it, and it draws
on the console of Prefect's log handler when there is one, so log lines print above the bars instead of over them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from rich.theme import Theme

log = logging.getLogger("srcflow")

_MODE: str | bool = "auto"  # runtime.progress, set by the CLI and the flow
LOG_EVERY_S = 30  # a line for logs (Prefect UI, files) without a bar
REPORT_EVERY_S = 5  # at most one call of the reporter per meter in this time (and at its start and end)


def set_mode(mode: str | bool) -> None:
    global _MODE
    _MODE = mode


def _enabled() -> bool:
    return sys.stderr.isatty() if _MODE == "auto" else bool(_MODE)


class Meter:
    """What a `progress` block counts: `done` of `total` `unit`s, `first` of them done before it started (a resumed
    run), so `rate` and `eta_s` are of this run's work."""

    def __init__(self, desc: str, unit: str, total: int, first: int = 0):
        self.desc, self.unit, self.total, self.first = desc, unit, total, first
        self.done = first
        self.start = self.last_log = time.perf_counter()
        self.last_report = 0.0
        self.finished = False
        self.display: Progress | None = None
        self.task_id = None
        self.state: dict = {}  # the reporter's own (e.g. its artifact id)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.display is not None:
            self.display.advance(self.task_id, n)
        t = time.perf_counter()
        if t - self.last_log > LOG_EVERY_S:
            self.last_log = t
            log.info("%s: %s", self.desc, self.summary())
        if t - self.last_report > REPORT_EVERY_S:
            _report(self)

    @property
    def rate(self) -> float:
        return (self.done - self.first) / max(time.perf_counter() - self.start, 1e-9)

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 and self.total >= self.done else None

    def summary(self) -> str:
        """`456/800 steps, 15.2 steps/s, ETA 0:00:23`."""
        eta = self.eta_s
        eta = "" if eta is None or self.finished else f", ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        return f"{self.done}/{self.total} {self.unit}, {self.rate:.3g} {self.unit}/s{eta}"


class RateColumn(ProgressColumn):
    """Units per second, as rich estimates it over the last 30 s."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.3g} {task.fields['unit']}/s", style="progress.data.speed")


_display: Progress | None = None
_meters = 0
_lock = threading.Lock()
_reporter: Callable[[Meter], None] | None = None


def set_reporter(reporter: Callable[[Meter], None] | None) -> None:
    """`reporter(meter)` is called at a meter's start, at most every REPORT_EVERY_S while it advances, and at its end
    (`meter.finished`); an exception it raises is logged once and never stops the work."""
    global _reporter
    _reporter = reporter


def _report(meter: Meter) -> None:
    meter.last_report = time.perf_counter()
    reporter = _reporter
    if reporter is None or meter.state.get("failed"):
        return
    try:
        reporter(meter)
    except Exception as e:  # a progress report is never worth a stage
        meter.state["failed"] = True
        log.warning("%s: progress report failed (%s); the work goes on", meter.desc, e)


def terminal_console() -> Console:
    """The console that Prefect's log handler prints to, when there is one (rich prints what a console prints while
    it shows a live display above that display), else stderr's. Prefect's console has a theme of its own only: the
    bar's styles are added to it."""
    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)
        if isinstance(console, Console):
            if not getattr(console, "_srcflow_bar_styles", False):
                bar_styles = {k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}
                console.push_theme(Theme(bar_styles))
                console._srcflow_bar_styles = True
            return console
    return Console(stderr=True)


def _acquire() -> Progress:
    global _display, _meters
    with _lock:
        if _display is None:
            _display = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[unit]}"), RateColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=terminal_console(), transient=True)
            _display.start()
        _meters += 1
        return _display


def _release(meter: Meter) -> None:
    global _display, _meters
    with _lock:
        _display.remove_task(meter.task_id)
        _meters -= 1
        if _meters == 0:
            _display.stop()
            _display = None


@contextmanager
def progress(desc: str, total: int, unit: str = "items", done: int = 0) -> Iterator[Meter]:
    """`with progress("encode", n, "img", done=k) as p: ... p.advance(m)`: a line of the terminal's display, a log
    line every 30 s and the reporter's updates; at the end, one log line with the count and the rate. `done`: work
    finished before (a resumed run), counted in the bar but not in the rate."""
    meter = Meter(desc, unit, total, done)
    if _enabled():
        meter.display = _acquire()
        meter.task_id = meter.display.add_task(desc, total=total, completed=done, unit=unit)
    _report(meter)
    try:
        yield meter
    finally:
        meter.finished = True
        if meter.display is not None:
            _release(meter)
        log.info("%s: %d %s in %.1f s (%.1f %s/s)", desc, meter.done - meter.first, unit,
                 time.perf_counter() - meter.start, meter.rate, unit)
        _report(meter)


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
