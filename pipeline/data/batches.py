"""The data position of a training run: which samples each rank trains on at each global step.

    BatchSchedule   every epoch a fresh permutation of the samples; global batch s is cut from the
                    stream of epochs (a pure function of (seed, step): resume needs only the step)
    WindowShuffle   the same stream, with each epoch's permutation chunk-aligned windows shuffled
                    inside, so that the rows of a window lie in whole chunks (codes, features)
    step_windows    for each step, the windows its batch reads, the next one read ahead on a thread

Under DDP a rank reads only its own rows of a window (`window_positions`): the positions of the window
whose global batch slot falls in the rank's slice, never the other ranks' share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import closing

import numpy as np

from pipeline.data.read_ahead import read_ahead


class BatchSchedule:
    """Which samples each rank trains on at each global step: a pure function of (seed, step).

    Every epoch is a fresh permutation of range(n), np.random.default_rng((seed, epoch)).permutation(n).
    The global batch of `batch_size` samples at step s is cut from the stream of epochs:
      drop_last=True:  epoch = s // (n // batch_size); the batch is that epoch's permutation
                       [k * batch_size, (k + 1) * batch_size), k = s % (n // batch_size); the last
                       n % batch_size samples of each epoch are skipped;
      drop_last=False: the permutations are concatenated and the batch is the stream positions
                       [s * batch_size, (s + 1) * batch_size), so epoch = position // n and a batch
                       may straddle two epochs; nothing is skipped.
    Either way every batch is full and each index appears at most once per epoch. Rank r of W takes
    the contiguous slice [r * b, (r + 1) * b) of the global batch, b = batch_size / W, so W processes
    together see exactly the samples one process sees at the same global batch size.

    This is the run's data position: resuming at step s needs nothing but s (no sampler or loader
    state in the checkpoint), and changing the world size keeps the global data order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if n < 1 or (drop_last and n < batch_size):
            raise ValueError(f"{n} samples cannot fill one batch of {batch_size} with drop_last={drop_last}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.local_batch_size = batch_size // world_size
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # a reader's threads (batches, windows) share the schedule

    @property
    def steps_per_epoch(self) -> float:
        return self.n // self.batch_size if self.drop_last else self.n / self.batch_size

    def epoch(self, step: int) -> int:
        """The epoch step's global batch starts in."""
        if self.drop_last:
            return step // (self.n // self.batch_size)
        return step * self.batch_size // self.n

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order, computed once (batches only ever touch the current and the next epoch)."""
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = self.order(np.random.default_rng((self.seed, epoch)))
            return self._perms[epoch]

    def order(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's permutation of range(n), drawn from the epoch's generator."""
        return rng.permutation(self.n)

    def indices(self, step: int) -> np.ndarray:
        """This rank's sample indices (int64, local_batch_size of them) for global step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.local_batch_size
        if self.drop_last:
            per_epoch = self.n // self.batch_size
            start = (step % per_epoch) * self.batch_size + self.rank * b
            return self.permutation(step // per_epoch)[start:start + b].astype(np.int64)
        start = step * self.batch_size + self.rank * b  # stream position of this rank's first sample
        parts, position, end = [], start, start + b
        while position < end:
            epoch, offset = divmod(position, self.n)
            take = min(end - position, self.n - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            position += take
        return np.concatenate(parts).astype(np.int64)


class WindowShuffle(BatchSchedule):
    """BatchSchedule (drop_last=False) whose epoch permutation is chunk-aligned windows, shuffled inside
    (see the module docstring); window w of an epoch is its permutation[w * window:(w + 1) * window]."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 block: int = 1, window: int = 16384):
        super().__init__(n, batch_size, seed, rank, world_size, drop_last=False)
        if block < 1 or window < 1:
            raise ValueError(f"block and window must be >= 1, got block={block}, window={window}")
        self.block, self.window = block, max(block, window // block * block)  # whole blocks per window

    def order(self, rng: np.random.Generator) -> np.ndarray:
        # whole blocks in random order; the short last block (n % block images) stays last, so that every
        # window is made of whole blocks
        starts = np.arange(0, self.n - self.block + 1, self.block)[rng.permutation(self.n // self.block)]
        order = np.concatenate([(starts[:, None] + np.arange(self.block)).reshape(-1),
                                np.arange(self.n - self.n % self.block, self.n)])
        for w in range(0, self.n, self.window):
            order[w:w + self.window] = order[w:w + self.window][rng.permutation(len(order[w:w + self.window]))]
        return order

    def positions(self, step: int) -> np.ndarray:
        """This rank's stream positions (epoch * n + offset) at `step`."""
        b = self.local_batch_size
        start = step * self.batch_size + self.rank * b
        return np.arange(start, start + b, dtype=np.int64)

    def images_at(self, positions: np.ndarray) -> np.ndarray:
        """The images at stream positions (int64)."""
        epoch, offset = np.divmod(positions, self.n)
        images = np.empty(len(positions), np.int64)
        for e in np.unique(epoch).tolist():
            at = epoch == e
            images[at] = self.permutation(e)[offset[at]]
        return images

    def windows(self, step: int) -> list[tuple[int, int]]:
        """(epoch, window) pairs that step's global batch reads, in stream order."""
        epoch, offset = np.divmod(np.arange(step * self.batch_size, (step + 1) * self.batch_size), self.n)
        return list(dict.fromkeys(zip(epoch.tolist(), (offset // self.window).tolist(), strict=True)))

    def window_positions(self, key: tuple[int, int], steps: range) -> np.ndarray:
        """This rank's stream positions in window `key` = (epoch, window) that the batches of `steps` take, in
        order: the positions whose slot in their global batch is in this rank's slice. A rank reads these rows
        of a window and no others."""
        epoch, w = key
        first = max(epoch * self.n + w * self.window, steps.start * self.batch_size)
        end = min(epoch * self.n + min((w + 1) * self.window, self.n), steps.stop * self.batch_size)
        positions = np.arange(first, max(first, end), dtype=np.int64)
        return positions[positions % self.batch_size // self.local_batch_size == self.rank]

    def window_parts(self, step: int, rows: np.ndarray, held: dict,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's batch at `step` (`rows`: a row key per batch position, e.g. the image), window by window:
        (the batch positions the window fills, its values, their rows in those values), from `held` =
        {(epoch, window): (sorted row keys, values)}."""
        epoch, offset = np.divmod(self.positions(step), self.n)
        window = offset // self.window
        for key in dict.fromkeys(zip(epoch.tolist(), window.tolist(), strict=True)):
            window_rows, values = held[key]
            mine = np.flatnonzero((epoch == key[0]) & (window == key[1]))
            yield mine, values, np.searchsorted(window_rows, rows[mine])


def step_windows(schedule: WindowShuffle, steps: range, read_window: Callable) -> Iterator[dict]:
    """For each step of `steps`, {(epoch, window): read_window((epoch, window))} of the windows its global
    batch reads. Windows are read in stream order on a background thread, one ahead of the step that needs
    it: memory is the current step's windows (one, or two where a batch straddles) plus the next."""
    ahead = read_ahead(lambda key: (key, read_window(key)), window_keys(schedule, steps), depth=1)
    with closing(ahead):
        held: dict = {}
        for step in steps:
            needed = schedule.windows(step)
            held = {k: v for k, v in held.items() if k in needed}
            while any(k not in held for k in needed):
                key, value = next(ahead)
                held[key] = value
            yield held


def window_keys(schedule: WindowShuffle, steps: range) -> Iterator[tuple[int, int]]:
    """The (epoch, window) keys the steps read, each once, in stream order (keys only grow along the stream)."""
    last = None
    for step in steps:
        for key in schedule.windows(step):
            if last is None or key > last:
                last = key
                yield key
