"""How much a generated toy-world picture looks like a concept, measured from pixels.

Shape: the object's silhouette is the set of pixels whose nearest palette color is not the
background's (toyworld/measure.py's vote), cleaned of stray pixels by a 3x3 majority; it is
cut to the square around its bounding box and resized to SILHOUETTE_SIDE pixels, so that
position and size do not count, only the outline. Two silhouettes compare by IoU; a picture's
shape similarity to a concept is its best IoU against the concept's photos (they vary in a
small rotation; the best match forgives it). A picture without an object scores 0.

Prompt following reads a shape and a size from a picture: the shape is the world shape whose
template silhouettes (rendered over the world's rotations) best match the picture's, by IoU
(chance 1/9); the size is the world size whose rendered area of the prompted shape is
nearest, in log area, to the measured object's.

Embeddings: the mean cosine similarity of a picture's embedding (e.g. CLIP's pooled image
output) to the embeddings of the concept's photos.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
from PIL import Image

from spacetime_jax.toyworld.measure import measure_background_color, nearest_color_labels
from spacetime_jax.toyworld.render import render_object
from spacetime_jax.toyworld.scene import COLORS, SIZES, Background, Scene
from spacetime_jax.toyworld.shapes import SHAPES

SILHOUETTE_SIDE = 32
TEMPLATE_ROTATIONS = tuple(range(-25, 26, 5))  # degrees: the world's rotations (world.py)
TEMPLATE_IMAGE_SIDE = 128  # pixels the templates are rendered at: sharp outlines
# Fewest object pixels (a fraction of the image) for a silhouette: measure.py's threshold.
MIN_OBJECT_FRACTION = 0.005
_NAMES = list(COLORS)


def object_mask(image: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels not voting for the background color, after a 3x3 majority filter
    (a pixel stays when at least 5 of its 9 neighbours, itself included, are object)."""
    labels = nearest_color_labels(image)
    raw = labels != _NAMES.index(measure_background_color(image))
    padded = np.pad(raw, 1).astype(np.int32)
    height, width = raw.shape
    votes = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    return votes >= 5


def normalized_silhouette(mask: np.ndarray, side: int = SILHOUETTE_SIDE) -> Optional[np.ndarray]:
    """Bool (side, side): the mask's bounding-box square (centered on the box, padded with
    background beyond the image) resized to `side`; None when the mask is nearly empty."""
    mask = np.asarray(mask, bool)
    if mask.sum() < MIN_OBJECT_FRACTION * mask.size:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    extent = max(bottom - top, right - left)
    # The square's corner, and the mask placed on a canvas that holds the whole square.
    y0 = top + (bottom - top - extent) // 2
    x0 = left + (right - left - extent) // 2
    canvas = np.zeros((mask.shape[0] + 2 * extent, mask.shape[1] + 2 * extent), np.uint8)
    canvas[extent:extent + mask.shape[0], extent:extent + mask.shape[1]] = mask * 255
    square = canvas[y0 + extent:y0 + 2 * extent, x0 + extent:x0 + 2 * extent]
    resized = Image.fromarray(square).resize((side, side), Image.BILINEAR)
    return np.asarray(resized) >= 128


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def reference_silhouettes(photos: np.ndarray) -> list[np.ndarray]:
    """The silhouettes of a concept's photos (photos without a measurable object skipped)."""
    silhouettes = [normalized_silhouette(object_mask(photo)) for photo in photos]
    kept = [s for s in silhouettes if s is not None]
    if not kept:
        raise ValueError("no photo of the concept shows a measurable object")
    return kept


def shape_similarity(image: np.ndarray, references: list[np.ndarray]) -> float:
    """The best IoU of the image's silhouette with the references'; 0 without an object."""
    silhouette = normalized_silhouette(object_mask(image))
    if silhouette is None:
        return 0.0
    return max(silhouette_iou(silhouette, reference) for reference in references)


def _object_alone(shape: str, size: str, rotation: float, side: int) -> np.ndarray:
    scene = Scene(shape, "white", size, (0.5, 0.5), Background("plain", "black"),
                  rotation=rotation)
    return render_object(scene, side)[1]


@functools.cache
def shape_templates(shapes: tuple[str, ...] = tuple(SHAPES)) -> dict[str, tuple[np.ndarray, ...]]:
    """Each shape's silhouettes over TEMPLATE_ROTATIONS (computed once)."""
    return {shape: tuple(normalized_silhouette(_object_alone(shape, "large", rotation,
                                                             TEMPLATE_IMAGE_SIDE))
                         for rotation in TEMPLATE_ROTATIONS)
            for shape in shapes}


def read_shape(image: np.ndarray, shapes: tuple[str, ...] = tuple(SHAPES)) -> Optional[str]:
    """The shape whose templates match the picture's object best (IoU); None without one."""
    silhouette = normalized_silhouette(object_mask(image))
    if silhouette is None:
        return None
    best = {shape: max(silhouette_iou(silhouette, t) for t in templates)
            for shape, templates in shape_templates(shapes).items()}
    return max(best, key=best.get)


@functools.cache
def _size_areas(shape: str, side: int) -> dict[str, float]:
    return {size: float(_object_alone(shape, size, 0.0, side).mean()) for size in SIZES}


def read_size(image: np.ndarray, shape: str) -> Optional[str]:
    """The world size whose area for `shape` (the prompted shape) is nearest, in log area, to
    the area of the picture's object; None without an object."""
    mask = object_mask(image)
    if mask.sum() < MIN_OBJECT_FRACTION * mask.size:
        return None
    area = float(mask.mean())
    areas = _size_areas(shape, image.shape[0])
    return min(areas, key=lambda size: abs(np.log(area / areas[size])))


def mean_cosine_similarity(embeddings: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,): each embedding's mean cosine similarity to the (M, D) references."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    return (unit(np.asarray(embeddings, np.float64))
            @ unit(np.asarray(references, np.float64)).T).mean(axis=1)
