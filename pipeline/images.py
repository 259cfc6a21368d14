"""Image grids (PNG) for reconstructions and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 8, pad: int = 2,
              row_labels: list[str] | None = None) -> Path:
    """uint8 (N, H, W, 3) -> one PNG of grid_image(images, ncol, pad, row_labels)."""
    Image.fromarray(grid_image(images, ncol, pad, row_labels)).save(path)
    return Path(path)


def grid_image(images: np.ndarray, ncol: int = 8, pad: int = 2, row_labels: list[str] | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image, row-major, `ncol` images per row, white padding; `row_labels`: a name
    written left of each row, so the grid says what its rows are."""
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
    return grid if row_labels is None else label_rows(grid, row_labels, h + pad, pad)


def label_width(labels: list[str], pad: int = 2) -> int:
    """Pixels of the margin `label_rows` adds."""
    from PIL import ImageFont

    return max(int(ImageFont.load_default().getlength(label)) for label in labels) + 2 * pad + 4


def label_rows(grid: np.ndarray, labels: list[str], row_height: int, pad: int) -> np.ndarray:
    """The grid with a white margin on its left holding each row's label (PIL's built-in font)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = label_width(labels, pad)
    canvas = Image.new("RGB", (grid.shape[1] + width, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((pad + 2, pad + r * row_height + row_height // 2), label, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)
