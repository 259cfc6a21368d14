"""Reading `codes.zarr` (stage compress) for the flow: train batches that keep the step fed, and splits.

The unit of training data is an image; its rows are its views (row = image * views + view, see
storage_schemas/zarr_layouts.py). The data order is a pure function of (seed, step):

    WindowShuffle   each epoch: permute blocks of consecutive images (one Zarr inner chunk each; a
                    short last block stays last), cut the block sequence into windows of `window`
                    images, permute the images inside every window. A window is read as whole
                    chunks; a window as large as the split is a uniform shuffle. Global batch s =
                    stream positions [s B, (s+1) B) (BatchSchedule, drop_last=False); rank r takes
                    its slice. Memory when streamed: two windows (the current and the next) of all
                    views, window x views x T x d x 4 bytes each, per process.
    view            per image per step, uniform over the stored views, drawn for the global batch
                    from (seed, step) (so W ranks see what one process sees)

    CodeBatches     a background thread: (step, codes, labels) for steps [start, stop), reading
                    whole windows ahead of use (a second thread) or indexing the split held in memory
                    when it is small (`in_memory_limit_gb`); both give the same batches.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.training import BatchSchedule
from storage_schemas.zarr_layouts import CODES


def open_codes(store: Path) -> tuple[zarr.Group, dict]:
    """The validated group and its attrs; refuses a store of another layout or version."""
    attrs = CODES.validate(store)
    return zarr.open_group(str(store), mode="r"), attrs


def split_rows(attrs: dict, split: str) -> tuple[int, int]:
    start, stop = attrs["splits"][split]
    return int(start), int(stop)


def read_rows(group: zarr.Group, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """codes (n, T, d) float32 and labels (n,) int64 of rows [start, stop)."""
    return group["codes"][start:stop], group["labels"][start:stop].astype(np.int64)


class TrainCodes:
    """The train split as images x views. `codes(images, views)` reads rows image * views + view."""

    def __init__(self, store: Path, in_memory_limit_gb: float = 4.0):
        self.group, attrs = open_codes(store)
        self.start, stop = split_rows(attrs, "train")
        self.views = len(attrs["views"])
        rows = stop - self.start
        if rows < self.views or rows % self.views:
            raise ValueError(f"{store}: {rows} train rows do not hold whole images of {self.views} views")
        self.n = rows // self.views
        _, self.tokens, self.channels = self.group["codes"].shape
        all_labels = self.group["labels"][self.start:stop].astype(np.int64)
        self.labels = all_labels[::self.views]
        self.num_classes = int(all_labels.max()) + 1
        # images per inner Zarr chunk: the block a window is made of
        self.block = max(1, self.group["codes"].chunks[0] // self.views)
        self.in_memory = rows * self.tokens * self.channels * 4 <= in_memory_limit_gb * 2**30
        self.memory = self.group["codes"][self.start:stop] if self.in_memory else None

    def read_images(self, images: np.ndarray) -> np.ndarray:
        """All views of the given images (sorted, unique), (k, views, T, d), one read per contiguous run."""
        v = self.views
        out = np.empty((len(images), v, self.tokens, self.channels), np.float32)
        breaks = np.flatnonzero(np.diff(images) != 1) + 1
        for run in np.split(np.arange(len(images)), breaks):
            first, last = images[run[0]], images[run[-1]]
            block = self.group["codes"][self.start + first * v:self.start + (last + 1) * v]
            out[run] = block.reshape(len(run), v, self.tokens, self.channels)
        return out


class WindowShuffle(BatchSchedule):
    """BatchSchedule (drop_last=False) whose epoch permutation is chunk-aligned windows, shuffled inside
    (see the module docstring); window w of an epoch is its permutation[w * window:(w + 1) * window]."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 block: int = 1, window: int = 16384):
        super().__init__(n, batch_size, seed, rank, world_size, drop_last=False)
        if block < 1 or window < 1:
            raise ValueError(f"block and window must be >= 1, got block={block}, window={window}")
        self.block, self.window = block, max(block, window // block * block)  # whole blocks per window

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng((self.seed, epoch))
            # whole blocks in random order; the short last block (n % block images) stays last, so that
            # every window is made of whole blocks
            starts = np.arange(0, self.n - self.block + 1, self.block)[rng.permutation(self.n // self.block)]
            order = np.concatenate([(starts[:, None] + np.arange(self.block)).reshape(-1),
                                    np.arange(self.n - self.n % self.block, self.n)])
            for w in range(0, self.n, self.window):
                order[w:w + self.window] = order[w:w + self.window][rng.permutation(len(order[w:w + self.window]))]
            self._perms[epoch] = order
        return self._perms[epoch]

    def positions(self, step: int) -> np.ndarray:
        """This rank's stream positions (epoch * n + offset) at `step`."""
        b = self.local_batch_size
        start = step * self.batch_size + self.rank * b
        return np.arange(start, start + b, dtype=np.int64)

    def windows(self, step: int) -> list[tuple[int, int]]:
        """(epoch, window) pairs that step's global batch reads, in stream order."""
        epoch, offset = np.divmod(np.arange(step * self.batch_size, (step + 1) * self.batch_size), self.n)
        return list(dict.fromkeys(zip(epoch.tolist(), (offset // self.window).tolist())))

    def window_images(self, key: tuple[int, int]) -> np.ndarray:
        epoch, w = key
        return np.sort(self.permutation(epoch)[w * self.window:(w + 1) * self.window])


def view_choice(seed: int, step: int, global_batch: int, views: int) -> np.ndarray:
    """The view of each image of the global batch at `step` (zeros when only one view is stored)."""
    if views == 1:
        return np.zeros(global_batch, np.int64)
    return np.random.default_rng((seed, step, 1)).integers(0, views, global_batch)


class CodeBatches:
    """`with CodeBatches(data, schedule, seed, start, stop) as batches: for step, codes, labels in batches`

    A producer thread assembles this rank's batches (codes (b, T, d) float32, labels (b,) int64) into a
    queue of `prefetch`; without the split in memory, a second thread reads the next window while the
    current one is consumed. `wait_s` adds up the time the consumer waited for a batch.
    """

    def __init__(self, data: TrainCodes, schedule: WindowShuffle, seed: int, start: int, stop: int, *,
                 prefetch: int = 4, pin_memory: bool = False):
        self.data, self.schedule, self.seed = data, schedule, seed
        self.start, self.stop, self.pin = start, stop, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stopping = threading.Event()
        self.wait_s = 0.0
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="codes-window")
        self.windows: dict[tuple[int, int], Future] = {}
        self.thread = threading.Thread(target=self._produce, name="codes-batches", daemon=True)

    def __enter__(self) -> CodeBatches:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.reader.shutdown(wait=True, cancel_futures=True)

    def __iter__(self):
        for _ in range(self.start, self.stop):
            t = time.perf_counter()
            item = self.queue.get()
            self.wait_s += time.perf_counter() - t
            if isinstance(item, Exception):
                raise item
            yield item

    def batch(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """This rank's batch at `step`, computed directly (what the producer thread queues)."""
        s = self.schedule
        images = s.indices(step)
        views = view_choice(self.seed, step, s.batch_size, self.data.views)
        views = views[s.rank * s.local_batch_size:(s.rank + 1) * s.local_batch_size]
        if self.data.memory is not None:
            rows = images * self.data.views + views
            codes = self.data.memory[rows]
        else:
            codes = np.empty((len(images), self.data.tokens, self.data.channels), np.float32)
            epoch, offset = np.divmod(s.positions(step), s.n)
            for key in dict.fromkeys(zip(epoch.tolist(), (offset // s.window).tolist())):
                window_images, values = self._window(key)
                mine = np.flatnonzero((epoch == key[0]) & (offset // s.window == key[1]))
                where = np.searchsorted(window_images, images[mine])
                codes[mine] = values[where, views[mine]]
            self._read_ahead(step)
        codes_t, labels_t = torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(self.data.labels[images])
        if self.pin:
            codes_t, labels_t = codes_t.pin_memory(), labels_t.pin_memory()
        return step, codes_t, labels_t

    def _window(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if key not in self.windows:
            self.windows[key] = self.reader.submit(self._read_window, key)
        return self.windows[key].result()

    def _read_window(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        images = self.schedule.window_images(key)
        return images, self.data.read_images(images)

    def _read_ahead(self, step: int) -> None:
        """Keep the windows of this step and the next; start reading the next one now."""
        wanted = self.schedule.windows(step) + self.schedule.windows(step + 1)
        for key in list(self.windows):
            if key not in wanted:
                del self.windows[key]
        for key in wanted:
            if key not in self.windows:
                self.windows[key] = self.reader.submit(self._read_window, key)

    def _produce(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self.stopping.is_set():
                    return
                item = self.batch(step)
                while not self.stopping.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # surfaced to the consumer
            self.queue.put(e)
