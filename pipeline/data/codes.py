"""Reading `codes.zarr` (stage compress) for the flow: train batches that keep the step fed, and splits.

The unit of training data is an image; its rows are its views (row = image * views + view, see
storage_schemas/zarr_layouts.py). The data order is a pure function of (seed, step):

    WindowShuffle   each epoch: permute blocks of consecutive images (one Zarr inner chunk each; a
                    short last block stays last), cut the block sequence into windows of `window`
                    images, permute the images inside every window. A window is read as whole
                    chunks; a window as large as the split is a uniform shuffle. Global batch s =
                    stream positions [s B, (s+1) B) (pipeline/data/batches.py, drop_last=False); rank
                    r takes its slice. Memory when streamed: two windows (the current and the next) of all
                    views, window x views x T x d x 4 bytes each, per process.
    view            per image per step, uniform over the stored views, drawn for the global batch
                    from (seed, step) (so W ranks see what one process sees)

    code_batches    (codes, labels) for a range of steps, assembled ahead on a thread (read_ahead), from
                    whole windows read one ahead on a second thread, or indexing the split held in memory
                    when it is small (`in_memory_limit_gb`); both give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline.data.batches import WindowShuffle, step_windows
from pipeline.data.read_ahead import read_ahead
from pipeline.integrity import CheckedGroup, open_checked
from storage_schemas.zarr_layouts import CODES


def open_codes(store: Path) -> tuple[CheckedGroup, dict]:
    """The validated group (every read checks its chunks' CRC-32C) and its attrs; refuses a store of another
    layout or version."""
    attrs = CODES.validate(store)
    return open_checked(store), attrs


def split_rows(attrs: dict, split: str) -> tuple[int, int]:
    start, stop = attrs["splits"][split]
    return int(start), int(stop)


def read_rows(group: CheckedGroup, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
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


def view_choice(seed: int, step: int, global_batch: int, views: int) -> np.ndarray:
    """The view of each image of the global batch at `step` (zeros when only one view is stored)."""
    if views == 1:
        return np.zeros(global_batch, np.int64)
    return np.random.default_rng((seed, step, 1)).integers(0, views, global_batch)


def code_batches(data: TrainCodes, schedule: WindowShuffle, seed: int, steps: range, *, prefetch: int = 4,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches (codes (b, T, d) float32, labels (b,) int64) for `steps`, `prefetch` of them
    assembled ahead on a thread; streamed, the windows they come from are read one ahead on another
    (batches.step_windows). Held in memory or streamed, the batches are the same."""
    windows = None if data.memory is not None else step_windows(schedule, steps,
                                                                 lambda key: read_window(data, schedule, key))
    batches = read_ahead(lambda step: code_batch(data, schedule, seed, step, windows, pin_memory), steps, prefetch)
    with closing(windows) if windows is not None else nullcontext(), closing(batches):  # batches' thread first
        yield from batches


def code_batch(data: TrainCodes, schedule: WindowShuffle, seed: int, step: int, windows: Iterator[dict] | None,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at `step`: indexed from the split in memory, or cut from the next item of
    `windows` (the step's windows, taken in step order)."""
    s = schedule
    images = s.indices(step)
    local = slice(s.rank * s.local_batch_size, (s.rank + 1) * s.local_batch_size)
    views = view_choice(seed, step, s.batch_size, data.views)[local]
    if windows is None:
        codes = data.memory[images * data.views + views]
    else:
        codes = np.empty((len(images), data.tokens, data.channels), np.float32)
        for mine, values, where in s.window_parts(step, images, next(windows)):
            codes[mine] = values[where, views[mine]]
    codes_t, labels_t = torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(data.labels[images])
    if pin_memory:
        codes_t, labels_t = codes_t.pin_memory(), labels_t.pin_memory()
    return codes_t, labels_t


def read_window(data: TrainCodes, schedule: WindowShuffle, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted images, all their views) of one shuffle window."""
    images = schedule.window_images(key)
    return images, data.read_images(images)
