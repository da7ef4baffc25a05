"""Colors measured from pixels, for prompt-following scores on generated images.

Each pixel votes for its nearest palette color; a region's color is the most voted one. Votes
ignore the shades that textures, gradients and patterns add (a shade stays nearest to its own
color) and the few anti-aliased edge pixels between two colors.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from spacetime_jax.toyworld.scene import COLORS

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], np.float32)
_BORDER = 2  # pixels: objects never reach the image border in the world's scenes
# Fewest object votes (a fraction of the image) to report an object color at all.
_MIN_OBJECT_FRACTION = 0.005


def nearest_color_labels(image: np.ndarray) -> np.ndarray:
    """The index into COLORS of each pixel's nearest color (Euclidean RGB), shape (H, W)."""
    pixels = np.asarray(image, np.float32)[..., None, :]
    return np.argmin(((pixels - _PALETTE) ** 2).sum(-1), axis=-1)


def _most_voted(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(_NAMES)).argmax())


def _background_label(labels: np.ndarray, mask: Optional[np.ndarray]) -> int:
    if mask is not None:
        return _most_voted(labels[~mask])
    border = np.ones(labels.shape, bool)
    border[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    return _most_voted(labels[border])


def measure_background_color(image: np.ndarray, mask: Optional[np.ndarray] = None) -> str:
    """The background's color name: the most voted color outside `mask`, or on the image
    border when no mask is given."""
    return _NAMES[_background_label(nearest_color_labels(image), mask)]


def measure_object_color(image: np.ndarray, mask: Optional[np.ndarray] = None) -> Optional[str]:
    """The object's color name: the most voted color inside `mask`, or, without a mask, among
    pixels not voting for the background color. None when too few such pixels remain (no
    object visible)."""
    labels = nearest_color_labels(image)
    if mask is None:
        candidates = labels[labels != _background_label(labels, None)]
    else:
        candidates = labels[mask]
    votes = np.bincount(candidates, minlength=len(_NAMES))
    if votes.max() < _MIN_OBJECT_FRACTION * labels.size:
        return None
    return _NAMES[int(votes.argmax())]
