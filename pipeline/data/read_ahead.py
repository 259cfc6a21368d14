"""Read ahead: `for batch in read_ahead(load, steps, depth)` is `for batch in map(load, steps)`, with the
loads of the next `depth` items running on a background thread while the consumer works on this one.

One mechanism for every reader that keeps a step fed (fit_decoder's pairs, fit_src's feature windows,
train_flow's code batches, reference's shards); they compose (the items of one can be another's output).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()  # the items ran out


class _Raised:
    """fn(item) raised: the exception travels to the consumer, who raises it at that item's place."""

    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(fn: Callable[[Any], Any], items: Iterable, depth: int) -> Iterator:
    """fn(item) for item in items, in order; at most `depth` results are computed before the consumer takes
    them (the thread waits), so memory is bounded by depth. An exception from fn (or from iterating items)
    is raised in the consumer when it reaches that item. Closing the generator early (break, an exception in
    the loop, `contextlib.closing`) stops the thread before it starts another item and waits for it."""
    if depth < 1:
        raise ValueError(f"read_ahead depth must be >= 1, got {depth}")
    results: queue.Queue = queue.Queue()
    room = threading.Semaphore(depth)  # one permit per result not yet taken
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not room.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                results.put(fn(item))
        except BaseException as e:  # surfaced in the consumer
            results.put(_Raised(e))
            return
        results.put(_DONE)

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            value = results.get()
            if value is _DONE:
                return
            if isinstance(value, _Raised):
                raise value.error
            room.release()
            yield value
    finally:
        stop.set()
        thread.join()
