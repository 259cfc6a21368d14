"""Reconstruction fidelity in pixels: PSNR of uint8 images (255 peak), from image pairs or from a squared
error summed over many batches (fit_decoder's and fit_src's reports, likelihood's round trip)."""

from __future__ import annotations

import numpy as np


def sse(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of squared differences, in float64."""
    return float(np.square(a.astype(np.float64) - b.astype(np.float64)).sum())


def psnr_from_mse(mse: float) -> float:
    """10 log10(255^2 / MSE) dB; inf for identical pixels."""
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 image batches, the MSE over the whole batch."""
    return psnr_from_mse(sse(a, b) / np.asarray(a).size)


def mean_image_sse(total: np.ndarray, total_sq: np.ndarray, count: int) -> float:
    """The squared error of predicting every image by the set's mean image, from the per-pixel sum and sum of
    squares over `count` images (fit_decoder's trivial baseline)."""
    return float((total_sq - np.square(total) / count).sum())
