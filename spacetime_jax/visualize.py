"""Image grids a person can look at: rows and columns with their labels."""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from spacetime_jax.paths import as_path

LABEL_HEIGHT = 12


MIN_TILE = 128


def image_grid(images: np.ndarray, rows: int, cols: int, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), scale: int = 0) -> Image.Image:
    """images (rows*cols, H, W, 3) uint8 in row-major order -> one labelled PIL image.

    scale 0 enlarges small images (nearest neighbour) to at least MIN_TILE pixels a side, so
    that toy-model outputs and labels stay readable.
    """
    scale = scale or max(1, MIN_TILE // images.shape[2])
    if len(images) != rows * cols:
        raise ValueError(f"{len(images)} images do not fill a {rows}x{cols} grid")
    h, w = images.shape[1] * scale, images.shape[2] * scale
    top = LABEL_HEIGHT if col_labels else 0
    # A row's label is a strip above its images.
    row_height = h + (LABEL_HEIGHT if row_labels else 0)
    grid = Image.new("RGB", (max(cols * w, 1), top + rows * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((c * w + 2, 0), str(label), fill="black")
    for r in range(rows):
        y = top + r * row_height
        if row_labels:
            draw.text((2, y), str(row_labels[r]), fill="black")
            y += LABEL_HEIGHT
        for c in range(cols):
            tile = Image.fromarray(images[r * cols + c])
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (c * w, y))
    return grid


def save_png(path: str | os.PathLike, image: Image.Image | np.ndarray) -> epath.Path:
    """Writes `image` (a PIL image or uint8 (H, W, 3) pixels) as a PNG at `path`, local or
    gs://, making its folder."""
    path = as_path(path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def save_grid(path: str | os.PathLike, images: np.ndarray, rows: int, cols: int,
              **labels) -> epath.Path:
    return save_png(path, image_grid(images, rows, cols, **labels))
