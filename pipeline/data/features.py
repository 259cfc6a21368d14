"""Reading `features.zarr`: the normalized RAE features that the SRC sees (SRC-FLOW.md, RAE step 2).

z = (f - mean) / sqrt(var + 1e-5) per position, with either the statistics computed by `encode`
(exact, over the train rows) or RAE's released ones (`encode.stats: file`; mean may be None).
TrainFeatures streams the train rows in shuffle windows for fit_src's training loop.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline.data.batches import WindowShuffle, step_windows
from pipeline.data.read_ahead import read_ahead
from pipeline.integrity import CheckedGroup, open_checked, read_input
from storage_schemas.zarr_layouts import FEATURES

EPS = 1e-5


class FeatureNormalizer:
    def __init__(self, mean: torch.Tensor | None, var: torch.Tensor):
        """mean/var: (C, H, W) as RAE stores them; applied to (B, T, C) token rows."""
        c = var.shape[0]
        self.mean = None if mean is None else mean.reshape(c, -1).T.contiguous().float()
        self.std = (var.reshape(c, -1).T.double() + EPS).sqrt().float()

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.mean is not None:
            f = f - self.mean.to(f.device)
        return f / self.std.to(f.device)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        f = z.float() * self.std.to(z.device)
        return f if self.mean is None else f + self.mean.to(z.device)


def load_normalizer(store: Path, stats: str = "computed", stats_file: str | None = None) -> FeatureNormalizer:
    if stats == "computed":
        group = open_checked(store)
        return FeatureNormalizer(torch.from_numpy(group["stats_mean"][...]), torch.from_numpy(group["stats_var"][...]))
    return FeatureNormalizer(*load_released_stats(stats_file))


def load_released_stats(path: str | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """RAE's released statistics: a dict {'mean': (C,H,W) or None, 'var': (C,H,W)} (a leading 1 is allowed), or the
    ones a diffusers AutoencoderRAE folder carries (folder_stats)."""
    if path and Path(path).is_dir():
        return folder_stats(path)
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"encode.stats_file: {path} does not exist (expected RAE's released statistics, "
                                f"a torch file holding {{'mean': tensor or None, 'var': tensor}})")
    obj = torch.load(io.BytesIO(read_input(path, "encode.stats_file")), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "var" not in obj:
        held = list(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"encode.stats_file: {path} holds no 'var' entry (keys: {held})")

    def squeeze(t):
        return None if t is None else torch.as_tensor(t).float().reshape(torch.as_tensor(t).shape[-3:])

    return squeeze(obj.get("mean")), squeeze(obj["var"])


def folder_stats(path: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A diffusers AutoencoderRAE folder's `_latents_mean` / `_latents_std` as RAE's (mean, var). diffusers' converter
    stored latents_std = sqrt(var + 1e-5) (convert_rae_to_diffusers.py), so var = std^2 - 1e-5 gives back RAE's
    z / sqrt(var + 1e-5) here; diffusers itself divides by std + 1e-5, a relative 1e-5 / std from RAE. A mean of
    zeros(1) is diffusers' "none" (RAE's DINOv2 statistics carry no mean). The folder's safetensors is read once and
    checked against the sha256 the fingerprint holds; the two tensors are taken from those bytes."""
    from pipeline.models.rae_family import read_weights_folder, safetensors_tensors

    folder = read_weights_folder(path, "encode.stats_file")
    found = safetensors_tensors(read_input(folder.weights, "encode.stats_file"), ("_latents_mean", "_latents_std"))
    if len(found) < 2:
        raise ValueError(f"encode.stats_file: {folder.weights} holds no _latents_mean/_latents_std (expected a "
                         f"diffusers AutoencoderRAE folder)")
    mean, std = (torch.from_numpy(found[name]).double() for name in ("_latents_mean", "_latents_std"))
    if std.numel() == 1:
        raise ValueError(f"encode.stats_file: {path} carries no latent statistics (its latents_std is diffusers' "
                         f"default, a single 1); use encode.stats: computed")
    var = (std.square() - EPS).clamp_min(0).float()
    mean = None if mean.numel() == 1 and float(mean) == 0 else mean.float().reshape(var.shape)
    return mean, var


def open_features(store: Path) -> tuple[CheckedGroup, dict]:
    """The validated group (every read checks its chunks' CRC-32C, `read_rows` each row's) and its attrs;
    refuses a store of an unknown layout or version."""
    attrs = FEATURES.validate(store)
    return open_checked(store), attrs


def read_features(group: CheckedGroup, rows: slice | np.ndarray) -> torch.Tensor:
    """Rows of `features` as float32 tensors."""
    values = group["features"][rows] if isinstance(rows, slice) else group["features"].get_orthogonal_selection((rows,))
    return torch.from_numpy(widen(values))


def widen(values: np.ndarray) -> np.ndarray:
    """Stored features -> float32, exactly: float16 casts; bf16 bits (stored as uint16) are the top half of a
    float32."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


class TrainFeatures:
    """The normalized train rows [start, stop) batch by batch, in WindowShuffle order (pipeline/data/batches.py):
    each epoch permutes blocks of one Zarr inner chunk of rows and shuffles the rows inside windows of
    `window_batches` batches. Rank `rank` of `world_size` gets its slice of every global batch and reads only
    those rows of a window, held in the stored dtype while a thread reads the next window's, so memory is two
    windows / world_size, independent of N. `rows_read` counts the rows read from the store."""

    def __init__(self, group: CheckedGroup, rows: tuple[int, int], normalizer: FeatureNormalizer, batch_size: int,
                 seed: int, window_batches: int, rank: int = 0, world_size: int = 1):
        self.features, self.start, self.normalizer = group["features"], rows[0], normalizer
        self.schedule = WindowShuffle(rows[1] - rows[0], batch_size, seed, rank, world_size,
                                      block=self.features.chunks[0], window=window_batches * batch_size)
        self.rows_read = 0

    def batches(self, steps: range) -> Iterator[torch.Tensor]:
        """Normalized features (local batch, T, C) float32 of each step, the next batch assembled on a thread."""
        windows = step_windows(self.schedule, steps, lambda key: self.read_window(key, steps))
        batches = read_ahead(lambda step: self.batch(step, next(windows)), steps, depth=1)
        with closing(windows), closing(batches):  # batches' thread first: it is the one reading `windows`
            yield from batches

    def batch(self, step: int, held: dict) -> torch.Tensor:
        """This rank's batch of `step` cut from its windows `held` ({(epoch, window): (sorted rows, features)})."""
        rows = self.schedule.indices(step)
        out = np.empty((len(rows), *self.features.shape[1:]), self.features.dtype)
        for mine, values, where in self.schedule.window_parts(step, rows, held):
            out[mine] = values[where]
        return self.normalizer(torch.from_numpy(widen(out)))

    def read_window(self, key: tuple[int, int], steps: range) -> tuple[np.ndarray, np.ndarray]:
        """(sorted rows, their stored features): this rank's rows of one window for the batches of `steps`, their
        bytes alone, each row checked against its CRC-32C (CheckedArray.read_rows)."""
        rows = np.sort(self.schedule.images_at(self.schedule.window_positions(key, steps)))
        self.rows_read += len(rows)
        return rows, self.features.read_rows(self.start + rows)
