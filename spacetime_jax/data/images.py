"""Concept images: a folder of photos -> uint8 RGB arrays of one square size.

As in the NeTI reference, each image is resized to (resolution, resolution) with bicubic
resampling and no crop (the aspect ratio is not kept). On top of the reference: the EXIF
orientation is applied, every PIL mode becomes RGB with the colours a viewer shows, and a file
that cannot be fully decoded stops the run with its name (training silently on a subset of the
concept, or on a zeroed image, would be worse than not training).
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from spacetime_jax.errors import UserError
from spacetime_jax.paths import as_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Transparent pixels become this colour. White, not PIL's `.convert("RGB")`, which simply drops
# alpha and keeps whatever colour the file stores under transparent pixels (often black, or
# leftovers of an editor): a cut-out object on white is what a viewer shows and what product
# shots look like, while an arbitrary hidden colour would be learned as part of the concept.
BACKGROUND = (255, 255, 255)
# PIL modes holding 16-bit integer samples (16-bit grayscale PNGs open as one of these).
# PIL's own conversion clips them at 255 instead of scaling, turning most pixels white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_log = logging.getLogger(__name__)


class ImageError(UserError):
    """An image file or folder that cannot be used; the message names it."""


class ImageListing(NamedTuple):
    """The image files of a concept folder (sorted) and the other entries it ignored."""
    paths: list[epath.Path]
    ignored: list[str]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, transparency composited onto BACKGROUND."""
    if img.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """One image file (local or gs://) -> uint8 array (resolution, resolution, 3), RGB as
    displayed.

    Raises ImageError naming the file when it is not an image, is truncated or cannot be
    converted.
    """
    path = as_path(path)
    try:
        with path.open("rb") as f, Image.open(f) as img:
            # Decode every byte now: PIL opens lazily, and a truncated file would otherwise
            # fail later, far from its name, or not at all where only the header is read.
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(
            f"cannot read image {path}: truncated or not an image ({type(err).__name__}: "
            f"{err})") from err
    resized = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _is_image_file(entry: epath.Path) -> bool:
    return entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()


def find_image_files(folder: str | os.PathLike) -> ImageListing:
    """The image files of `folder` in sorted name order, and the names it skipped.

    Hidden entries (`.DS_Store`, macOS's `._photo.jpg` resource forks) are skipped without
    mention; other non-image entries are returned in `ignored` so a caller can show them.
    """
    folder = as_path(folder)
    if not folder.exists():
        raise ImageError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ImageError(f"image folder {folder} is not a folder")
    entries = sorted((e for e in folder.iterdir() if not e.name.startswith(".")),
                     key=lambda e: e.name)
    paths = [e for e in entries if _is_image_file(e)]
    ignored = [e.name for e in entries if not _is_image_file(e)]
    if not paths:
        found = f"; it holds only: {', '.join(ignored)}" if ignored else ""
        raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}{found}")
    return ImageListing(paths, ignored)


def load_concept_images(folder: str | os.PathLike,
                        resolution: int) -> tuple[np.ndarray, list[epath.Path]]:
    """Every image of a concept folder -> (uint8 (N, resolution, resolution, 3), paths).

    Order is sorted by file name, the same on every machine. One unreadable image stops the
    run (the error names it, and the other unreadable ones if any).
    """
    paths, ignored = find_image_files(folder)
    if ignored:
        _log.warning("ignored in %s (not %s): %s", folder, "/".join(IMAGE_SUFFIXES),
                     ", ".join(ignored))
    images, errors = [], []
    for path in paths:
        try:
            images.append(load_image(path, resolution))
        except ImageError as err:
            errors.append((path, err))
    if errors:
        first = str(errors[0][1])
        others = ", ".join(p.name for p, _ in errors[1:])
        raise ImageError(first + (f"; also unreadable: {others}" if others else ""))
    return np.stack(images), paths


def hflip(images: np.ndarray) -> np.ndarray:
    """Mirror left-right: (..., H, W, C) -> same shape, columns reversed."""
    return np.ascontiguousarray(np.flip(images, axis=-2))
