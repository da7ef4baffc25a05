"""Image files -> pixels: the one opener every image and mask of both methods goes through.

`read_upright` is the hardened opener: NeTI's concept photos (load_image, load_concept_images),
ELITE's source images and masks (elite/data.py) and ELITE personalization's images and masks
(elite/personalize.py) all read through it. It either returns the decoded image, turned upright
as a viewer shows it, or raises ImageError: one line naming the file and what is wrong with it.
What it does, in order:
  - an empty file is refused by name (0 bytes);
  - the format is identified by content, not by suffix (a PNG named .jpg works), and only
    FORMATS are decoded: PIL's other ~40 decoders are never tried (EPS runs Ghostscript, and
    rarely used parsers are where decoder bugs live);
  - the header's size is checked against MAX_PIXELS BEFORE any pixel is decoded (a
    decompression bomb: a few KB of PNG or GIF that would decode to gigabytes);
  - every byte of the first frame is decoded now (animated GIF / WebP: the first frame), so a
    truncated file fails here with its name rather than later or not at all;
  - the EXIF orientation is applied (a phone photo stored on its side is turned upright); a
    corrupt EXIF block counts as no orientation, as in viewers;
  - any exception of the decoders on a malformed file (PIL raises OSError, SyntaxError,
    ValueError, struct.error, IndexError, ... depending on where the parse fails) becomes
    ImageError.

Concept images (NeTI reference): each image is resized to (resolution, resolution) with bicubic
resampling and no crop (the aspect ratio is not kept). Every PIL mode becomes RGB with the
colours a viewer shows (to_rgb), and a file that cannot be fully decoded stops the run with its
name (training silently on a subset of the concept, or on a zeroed image, would be worse than
not training).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image

from spacetime_jax.errors import UserError
from spacetime_jax.paths import as_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# What read_upright decodes, identified by content (PIL's JPEG decoder also reads the
# multi-picture JPEGs (MPO) that many cameras and phones write).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"
# The largest image decoded: 2**26 pixels (67 MP, e.g. 8192 x 8192; 0.2 GB as RGB, decoded in
# about 1 s), above the 61 MP of the largest full-frame cameras; a bigger photo is downscaled
# first. Every input is resized to 512 px or cropped around an object, so nothing is lost. PIL's
# own check (a warning from 89 MP, an error from 179 MP) comes later and is not relied on.
MAX_PIXELS = 2 ** 26
# Transparent pixels become this colour. White, not PIL's `.convert("RGB")`, which simply drops
# alpha and keeps whatever colour the file stores under transparent pixels (often black, or
# leftovers of an editor): a cut-out object on white is what a viewer shows and what product
# shots look like, while an arbitrary hidden colour would be learned as part of the concept.
BACKGROUND = (255, 255, 255)
# PIL modes holding 16-bit integer samples (16-bit grayscale PNGs open as one of these; 16-bit
# RGB(A) PNGs open as 8-bit RGB(A), their high bytes). PIL's own conversion clips them at 255
# instead of scaling, turning most pixels white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF orientation -> the transpose that shows the image as its camera meant (EXIF 2.3, 0x0112).
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}

_log = logging.getLogger(__name__)


class ImageError(UserError):
    """An image file or folder that cannot be used; the message (one line) names it."""


class ImageListing(NamedTuple):
    """The image files of a concept folder (sorted) and the other entries it ignored."""
    paths: list[epath.Path]
    ignored: list[str]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text[:200]}"


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation 1..8; 1 (as stored) when there is none or the EXIF is unreadable."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: viewers show such a file as stored
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _too_large(path: epath.Path, what: str, pixels: str) -> ImageError:
    return ImageError(f"refused {what} {path}: {pixels} pixels, over the limit of {MAX_PIXELS} "
                      f"(a decompression bomb, or a photo to downscale first); nothing was "
                      f"decoded")


def _open_decoded(path: epath.Path, what: str) -> Image.Image:
    with path.open("rb") as f:
        if f.read(1) == b"":
            raise ImageError(f"cannot read {what} {path}: the file is empty (0 bytes)")
        f.seek(0)
        try:
            img = Image.open(f, formats=FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError(f"cannot read {what} {path}: not a {FORMAT_NAMES} image (judged "
                             f"by its content, whatever its name)") from None
        except Image.DecompressionBombError as err:  # PIL's own limit, 2 x 89 MP
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            raise _too_large(path, what, pixels.group(1) if pixels else "too many") from None
        with img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise _too_large(path, what, f"{width} x {height} = {width * height}")
            img.load()  # the first frame, every byte: a truncated file fails here
            transpose = _UPRIGHT.get(_orientation(img))
            # A new image either way: the file can close.
            return img.transpose(transpose) if transpose is not None else img.copy()


def read_upright(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The image file at `path` (local or gs://), decoded and turned upright as displayed (its
    first frame, in the file's own PIL mode). Raises ImageError naming the file: missing, empty,
    not one of FORMATS, over MAX_PIXELS, truncated or malformed. `what` names the file's role in
    the message ("image", "mask")."""
    path = as_path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            upright = _open_decoded(path, what)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"cannot read {what} {path}: no such file") from None
    except Exception as err:  # every decoder failure on a malformed file (see the docstring)
        raise ImageError(f"cannot read {what} {path}: truncated or malformed "
                         f"({_one_line(err)})") from None
    # PIL's notices ("Corrupt EXIF data", ...) name no file: logged once each, with its name.
    # Its decompression-bomb warning is MAX_PIXELS' business, judged before decoding.
    notices = {str(w.message) for w in caught
               if not issubclass(w.category, Image.DecompressionBombWarning)}
    for notice in sorted(notices):
        _log.warning("%s %s: %s", what, path, " ".join(notice.split()))
    return upright


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit samples scaled to 8 bits (65535 -> 255, rounded); other modes unchanged."""
    if img.mode not in _SIXTEEN_BIT_MODES:
        return img
    samples = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB as a viewer shows it: 16-bit scaled, palette colours, CMYK converted,
    transparency composited onto BACKGROUND."""
    img = _eight_bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit gray ("L"): 16-bit scaled, colours by luminance, alpha ignored."""
    return _eight_bit(img).convert("L")


def square(img: Image.Image, resolution: int) -> np.ndarray:
    """The whole image resized to (resolution, resolution), bicubic, no crop -> uint8 array."""
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BICUBIC), np.uint8)


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """One image file (local or gs://) -> uint8 array (resolution, resolution, 3), RGB as
    displayed. Raises ImageError naming the file (see read_upright)."""
    return square(to_rgb(read_upright(path)), resolution)


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
