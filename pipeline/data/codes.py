"""Reading `codes.zarr` (stage compress) for the flow: train batches that keep the step fed, and splits.

The unit of training data is an image; its rows are its views (row = image * views + view, see
storage_schemas/zarr_layouts.py). The data order is a pure function of (seed, step):

    WindowShuffle   each epoch: permute blocks of consecutive images (one Zarr inner chunk each; a
                    short last block stays last), cut the block sequence into windows of `window`
                    images, permute the images inside every window. A window's rows lie in whole
                    chunks; a window as large as the split is a uniform shuffle. Global batch s =
                    stream positions [s B, (s+1) B) (pipeline/data/batches.py, drop_last=False); rank
                    r takes its slice.
    view            per image per step, uniform over the stored views, drawn for the global batch
                    from (seed, step) (so W ranks see what one process sees)

    code_batches    (codes, labels) for a range of steps, assembled ahead on a thread (read_ahead), from
                    windows read one ahead on a second thread, or indexing the split held in memory when it
                    is small (`in_memory_limit_gb`: every process then reads the whole split once); both give
                    the same batches. Streamed, a rank reads only its own rows of each window, one view per
                    image (the one drawn for it): window x T x d x 4 / W bytes, two windows held per process,
                    each row checked against its CRC-32C.
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
    """The validated group (every read checks its chunks' CRC-32C, `read_rows` each row's) and its attrs;
    refuses a store of another layout or version."""
    attrs = CODES.validate(store)
    return open_checked(store), attrs


def split_rows(attrs: dict, split: str) -> tuple[int, int]:
    start, stop = attrs["splits"][split]
    return int(start), int(stop)


def read_rows(group: CheckedGroup, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """codes (n, T, d) float32 and labels (n,) int64 of rows [start, stop)."""
    return group["codes"][start:stop], group["labels"][start:stop].astype(np.int64)


class TrainCodes:
    """The train split as images x views: row = image * views + view. `rows_read` counts the rows this process
    has read from the store (the whole split when it is held in memory)."""

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
        # labels keep their ImageNet numbers under a class subset (data.classes): the flow has max + 1 class
        # embeddings, of which only `classes` (the labels of the train rows) are ever trained
        self.classes = np.unique(all_labels)
        self.num_classes = int(all_labels.max()) + 1
        # images per inner Zarr chunk: the block a window is made of
        self.block = max(1, self.group["codes"].chunks[0] // self.views)
        self.in_memory = rows * self.tokens * self.channels * 4 <= in_memory_limit_gb * 2**30
        self.memory = self.group["codes"][self.start:stop] if self.in_memory else None
        self.rows_read = rows if self.in_memory else 0

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Codes (k, T, d) of the given train rows (sorted, unique), their bytes alone, each row checked against its
        CRC-32C (CheckedArray.read_rows)."""
        self.rows_read += len(rows)
        return self.group["codes"].read_rows(self.start + rows)


def view_choice(seed: int, step: int, global_batch: int, views: int) -> np.ndarray:
    """The view of each image of the global batch at `step` (zeros when only one view is stored)."""
    if views == 1:
        return np.zeros(global_batch, np.int64)
    return np.random.default_rng((seed, step, 1)).integers(0, views, global_batch)


def rows_at(data: TrainCodes, schedule: WindowShuffle, seed: int, positions: np.ndarray) -> np.ndarray:
    """The train rows (image * views + view) at stream positions: the scheduled image, in the view drawn for
    its slot of the global batch (view_choice)."""
    step, slot = np.divmod(positions, schedule.batch_size)
    views = np.zeros(len(positions), np.int64)
    if data.views > 1:
        for s in np.unique(step).tolist():
            at = step == s
            views[at] = view_choice(seed, s, schedule.batch_size, data.views)[slot[at]]
    return schedule.images_at(positions) * data.views + views


def code_batches(data: TrainCodes, schedule: WindowShuffle, seed: int, steps: range, *, prefetch: int = 4,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches (codes (b, T, d) float32, labels (b,) int64) for `steps`, `prefetch` of them
    assembled ahead on a thread; streamed, this rank's rows of the windows they come from are read one window
    ahead on another (batches.step_windows). Held in memory or streamed, the batches are the same."""
    windows = None if data.memory is not None else step_windows(
        schedule, steps, lambda key: read_window(data, schedule, seed, key, steps))
    batches = read_ahead(lambda step: code_batch(data, schedule, seed, step, windows, pin_memory), steps, prefetch)
    with closing(windows) if windows is not None else nullcontext(), closing(batches):  # batches' thread first
        yield from batches


def code_batch(data: TrainCodes, schedule: WindowShuffle, seed: int, step: int, windows: Iterator[dict] | None,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at `step`: indexed from the split in memory, or cut from the next item of
    `windows` (the step's windows, taken in step order)."""
    rows = rows_at(data, schedule, seed, schedule.positions(step))
    if windows is None:
        codes = data.memory[rows]
    else:
        codes = np.empty((len(rows), data.tokens, data.channels), np.float32)
        for mine, values, where in schedule.window_parts(step, rows, next(windows)):
            codes[mine] = values[where]
    codes_t = torch.from_numpy(np.ascontiguousarray(codes))
    labels_t = torch.from_numpy(data.labels[rows // data.views])
    if pin_memory:
        codes_t, labels_t = codes_t.pin_memory(), labels_t.pin_memory()
    return codes_t, labels_t


def read_window(data: TrainCodes, schedule: WindowShuffle, seed: int, key: tuple[int, int],
                steps: range) -> tuple[np.ndarray, np.ndarray]:
    """(sorted rows, their codes): this rank's rows of one shuffle window, for the batches of `steps`."""
    rows = np.unique(rows_at(data, schedule, seed, schedule.window_positions(key, steps)))
    return rows, data.read_rows(rows)
