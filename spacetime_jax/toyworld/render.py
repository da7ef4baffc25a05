"""Scene -> pixels. Shapes, textures and background patterns are drawn at 4x the output size
and box-filtered down, which anti-aliases every edge; flat regions keep their exact palette
values. The object is composited at the output size with its coverage as alpha, which equals
compositing at 4x since the background is flat within each output pixel once filtered.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from spacetime_jax.toyworld.scene import RGB, Background, Scene, rgb, shade
from spacetime_jax.toyworld.shapes import ALL_SHAPES

SUPERSAMPLE = 4
# Texture geometry in object-radius units: stripe period (and the fraction of it in the second
# color), dot spacing and radius. Both keep the second color under half of the object, so the
# base color dominates it.
_STRIPE_PERIOD, _STRIPE_FRACTION = 0.5, 0.35
_DOT_PERIOD, _DOT_RADIUS = 0.5, 0.14


def render(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The scene as a uint8 (size, size, 3) image, and the object's bool (size, size) mask."""
    return _compose(scene, paint_background(scene.background, size))


def render_object(scene: Scene, size: int = 64, fill: RGB = (0, 0, 0)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The scene's object alone, where it stands in the scene, on a plain `fill`; and its mask."""
    background = np.broadcast_to(np.asarray(fill, np.float32), (size, size, 3))
    return _compose(scene, background)


def paint_background(background: Background, size: int) -> np.ndarray:
    """A float32 (size, size, 3) image of the background."""
    if background.kind == "plain":
        return np.broadcast_to(rgb(background.color), (size, size, 3))
    weight = _downsample(_second_color_weight(background, size * SUPERSAMPLE))[..., None]
    return rgb(background.color) * (1.0 - weight) + shade(background.color) * weight


def _second_color_weight(background: Background, size: int) -> np.ndarray:
    """How much of the color's shade each pixel of a patterned background takes."""
    centers = (np.arange(size, dtype=np.float32) + 0.5) / size
    rows, cols = centers[:, None], centers[None, :]
    if background.kind == "gradient":  # from the color at the top (left) to its shade
        weight = rows if background.vertical else cols
    elif background.kind == "checkered":
        weight = (np.floor(rows * background.cells) + np.floor(cols * background.cells)) % 2
    else:  # striped: vertical bands change along the columns
        weight = np.floor((cols if background.vertical else rows) * background.cells) % 2
    return np.broadcast_to(weight, (size, size)).astype(np.float32)


def _compose(scene: Scene, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = background.shape[0]
    coverage = _object_coverage(scene, size * SUPERSAMPLE)
    alpha = _downsample(coverage)[..., None]
    image = background * (1.0 - alpha)
    if scene.texture == "plain":
        image += rgb(scene.color) * alpha
    else:  # texture only where the object is: the window of pixels it touches
        rows, cols = np.nonzero(alpha[..., 0])
        window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        hi_window = tuple(slice(s.start * SUPERSAMPLE, s.stop * SUPERSAMPLE) for s in window)
        fill = _object_fill(scene, size * SUPERSAMPLE, hi_window)
        image[window] += _downsample(fill * coverage[hi_window][..., None])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha[..., 0] >= 0.5


def _downsample(pixels: np.ndarray) -> np.ndarray:
    """Box filter: the mean of each SUPERSAMPLE x SUPERSAMPLE block, as float32."""
    height, width = pixels.shape[0] // SUPERSAMPLE, pixels.shape[1] // SUPERSAMPLE
    blocks = pixels.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE, *pixels.shape[2:])
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _rotation(scene: Scene) -> np.ndarray:
    """Maps object-local unit coordinates to screen offsets (y down, so a positive angle turns
    counter-clockwise on screen)."""
    angle = np.deg2rad(scene.rotation)
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, sin], [-sin, cos]])


def _object_coverage(scene: Scene, hi: int) -> np.ndarray:
    """Whether each pixel of the (hi, hi) canvas lies inside the object."""
    to_screen = _rotation(scene).T * scene.radius * hi
    center = np.asarray(scene.position) * hi
    canvas = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, filled in ALL_SHAPES[scene.shape]:
        points = polygon @ to_screen + center
        draw.polygon([tuple(p) for p in points], fill=255 if filled else 0)
    return np.asarray(canvas) > 127


def _object_fill(scene: Scene, hi: int, window: tuple[slice, slice]) -> np.ndarray:
    """The object's texture over a window of the (hi, hi) canvas, in object-local coordinates
    so that it moves, scales and turns with the object."""
    rows = np.arange(window[0].start, window[0].stop, dtype=np.float32) + 0.5
    cols = np.arange(window[1].start, window[1].stop, dtype=np.float32) + 0.5
    offsets = np.stack(np.meshgrid(cols, rows), -1) - np.asarray(scene.position, np.float32) * hi
    to_local = np.linalg.inv(_rotation(scene).T).astype(np.float32) / (scene.radius * hi)
    local = offsets @ to_local
    if scene.texture == "striped":
        marked = np.mod(local[..., 0], _STRIPE_PERIOD) < _STRIPE_FRACTION * _STRIPE_PERIOD
    else:  # dotted
        nearest_dot = np.mod(local + _DOT_PERIOD / 2, _DOT_PERIOD) - _DOT_PERIOD / 2
        marked = (nearest_dot ** 2).sum(-1) < _DOT_RADIUS ** 2
    second = rgb(scene.accent) if scene.accent is not None else shade(scene.color)
    return np.where(marked[..., None], second, rgb(scene.color))
