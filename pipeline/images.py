"""Image grids (PNG) for reconstructions and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 8, pad: int = 2) -> Path:
    """uint8 (N, H, W, 3) -> one PNG of grid_image(images, ncol, pad)."""
    Image.fromarray(grid_image(images, ncol, pad)).save(path)
    return Path(path)


def grid_image(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image, row-major, `ncol` images per row, white padding."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_grid wants uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid
