"""How much a generated toy-world picture looks like a concept, measured from pixels.

Shape: the object's silhouette is the set of pixels whose nearest palette color is not the
background's (toyworld/measure.py's vote), cleaned of stray pixels by a 3x3 majority; it is
cut to the square around its bounding box and resized to SILHOUETTE_SIDE pixels, so that
position and size do not count, only the outline. Two silhouettes compare by IoU; a picture's
shape similarity to a concept is its best IoU against the concept's photos (they vary in a
small rotation; the best match forgives it). A picture without an object scores 0.

Embeddings: the mean cosine similarity of a picture's embedding (e.g. CLIP's pooled image
output) to the embeddings of the concept's photos.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from spacetime_jax.toyworld.measure import measure_background_color, nearest_color_labels
from spacetime_jax.toyworld.scene import COLORS

SILHOUETTE_SIDE = 32
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


def mean_cosine_similarity(embeddings: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,): each embedding's mean cosine similarity to the (M, D) references."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    return (unit(np.asarray(embeddings, np.float64))
            @ unit(np.asarray(references, np.float64)).T).mean(axis=1)
