"""Image grids a person can look at: a title line (what the grid is, which seeds), column
labels, a label strip above each row, and the images enlarged (nearest neighbour) to at least
MIN_TILE pixels a side.

Labels are drawn in DejaVu Sans (the TrueType font matplotlib ships), so spaces keep their
width (PIL's default bitmap font squeezes "a photo of a" into "a photoofa"). Every strip is
LABEL_HEIGHT pixels: two lines of FONT_SIZE text; a longer label wraps at spaces, then shrinks
(down to MIN_FONT_SIZE), then is cut with an ellipsis, so it never spills out of its cell.
"""
from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from spacetime_jax.paths import as_path

MIN_TILE = 128
FONT_SIZE = 13
MIN_FONT_SIZE = 8
LINE_SPACING = 1.2  # line height / font size
MAX_LINES = 2
PADDING = 3  # pixels between a strip's text and its edges
LABEL_HEIGHT = math.ceil(MAX_LINES * LINE_SPACING * FONT_SIZE) + 2 * PADDING  # 38
ELLIPSIS = "\u2026"
FONT_FILES = {False: "DejaVuSans.ttf", True: "DejaVuSans-Bold.ttf"}


@functools.cache
def label_font(size: int = FONT_SIZE, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at `size` pixels, from matplotlib's own font folder (no font search)."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return ImageFont.truetype(str(folder / FONT_FILES[bold]), size)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels (a word wider than
    `width` stands alone on its line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def fit_label(text: str, width: float, bold: bool = False
              ) -> tuple[list[str], ImageFont.FreeTypeFont]:
    """(lines, font): the largest size from FONT_SIZE down to MIN_FONT_SIZE at which `text`
    wraps into MAX_LINES lines of at most `width` pixels; at MIN_FONT_SIZE what does not fit
    is cut with an ellipsis."""
    for size in range(FONT_SIZE, MIN_FONT_SIZE - 1, -1):
        font = label_font(size, bold)
        lines = wrap(text, font, width)
        if len(lines) <= MAX_LINES and all(font.getlength(line) <= width for line in lines):
            return lines, font
    lines = lines[:MAX_LINES]
    if lines != wrap(text, font, width):  # some text is left out: say so
        lines[-1] += ELLIPSIS
    cut = []
    for line in lines:
        while font.getlength(line) > width and len(line) > 1:
            line = line[:-2] + ELLIPSIS
        cut.append(line)
    return cut, font


def draw_label(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int],
               bold: bool = False, centered: bool = False) -> None:
    """`text` fitted (fit_label) into box (left, top, width, height), vertically centered."""
    left, top, width, height = box
    lines, font = fit_label(str(text), width - 2 * PADDING, bold)
    line_height = LINE_SPACING * font.size
    y = top + (height - len(lines) * line_height) / 2
    for number, line in enumerate(lines):
        x = (left + (width - font.getlength(line)) / 2 if centered else left + PADDING)
        draw.text((x, y + number * line_height), line, fill="black", font=font)


def tile_scale(height: int, width: int) -> int:
    """The smallest whole factor that makes an image at least MIN_TILE pixels a side."""
    return max(1, math.ceil(MIN_TILE / min(height, width)))


def image_grid(images: np.ndarray, rows: int, cols: int, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), title: str = "", scale: int = 0
               ) -> Image.Image:
    """images (rows*cols, H, W, 3) uint8 in row-major order -> one labelled PIL image.

    From the top: the title strip (if `title`), the column-label strip (if `col_labels`), then
    per row its label strip (if `row_labels`) and its images. Every strip is LABEL_HEIGHT
    pixels. scale 0 enlarges the images by tile_scale (nearest neighbour).
    """
    if len(images) != rows * cols:
        raise ValueError(f"{len(images)} images do not fill a {rows}x{cols} grid")
    scale = scale or tile_scale(images.shape[1], images.shape[2])
    h, w = images.shape[1] * scale, images.shape[2] * scale
    width = max(cols * w, 1)
    top = (LABEL_HEIGHT if title else 0) + (LABEL_HEIGHT if col_labels else 0)
    row_height = h + (LABEL_HEIGHT if row_labels else 0)
    grid = Image.new("RGB", (width, top + rows * row_height), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    if title:
        draw_label(draw, title, (0, 0, width, LABEL_HEIGHT), bold=True)
        y = LABEL_HEIGHT
    for c, label in enumerate(col_labels):
        draw_label(draw, label, (c * w, y, w, LABEL_HEIGHT), centered=True)
    for r in range(rows):
        y = top + r * row_height
        if row_labels:
            draw_label(draw, row_labels[r], (0, y, width, LABEL_HEIGHT))
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
    """image_grid(images, rows, cols, **labels) written as a PNG at `path`."""
    return save_png(path, image_grid(images, rows, cols, **labels))
