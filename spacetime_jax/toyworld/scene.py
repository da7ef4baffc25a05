"""What a toy-world picture is made of: the palette, the vocabulary and the `Scene` spec.

A scene is one object (shape, color, size, position, rotation, texture) over a background
(plain, gradient, checkered or striped). Everything is in fractions of the image side, so one
scene renders at any resolution.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from spacetime_jax.toyworld.shapes import ALL_SHAPES

RGB = tuple[int, int, int]

# Eight colors far apart in RGB (closest pair: red/orange, ~90 apart) so that the nearest
# named color of a pixel is reliable; every color is also a background color.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}

# A color's shade paints its textures, gradients and patterns. It moves 20% towards black, or
# towards white for yellow (darker, it reads as orange) and black; it stays nearest to its own
# color, so the measured color of a textured or patterned region is its base color.
SHADE_AMOUNT = 0.2
_LIGHTER_SHADE = ("yellow", "black")

# Object radius (of the shape's bounding circle) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.22, "large": 0.30}

# Object textures, drawn in the base color and a second color (its shade unless an accent).
TEXTURES = ("plain", "striped", "dotted")

BACKGROUND_KINDS = ("plain", "gradient", "checkered", "striped")


def rgb(color: str) -> np.ndarray:
    return np.asarray(COLORS[color], np.float32)


def shade(color: str) -> np.ndarray:
    target = 255.0 if color in _LIGHTER_SHADE else 0.0
    return rgb(color) + (target - rgb(color)) * SHADE_AMOUNT


def check_known(name: str, value: object, allowed) -> None:
    """Raises ValueError naming the unknown value and the known ones."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(map(str, allowed))}")


@dataclasses.dataclass(frozen=True)
class Background:
    """Plain, or a `color`-to-shade gradient, or `cells` checks/stripes of color and shade."""
    kind: str
    color: str
    vertical: bool = True  # gradient runs top->bottom / stripes are vertical bands
    cells: int = 4  # checks or stripes across the image side

    def __post_init__(self):
        check_known("background kind", self.kind, BACKGROUND_KINDS)
        check_known("color", self.color, COLORS)
        if self.cells < 1:
            raise ValueError(f"cells must be >= 1, got {self.cells}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object on a background. `position` is the object's center (x, y) in [0, 1]."""
    shape: str
    color: str
    size: str
    position: tuple[float, float]
    background: Background
    texture: str = "plain"
    accent: Optional[str] = None  # the texture's second color; None: the color's shade
    rotation: float = 0.0  # degrees, counter-clockwise

    def __post_init__(self):
        check_known("shape", self.shape, ALL_SHAPES)
        check_known("color", self.color, COLORS)
        check_known("size", self.size, SIZES)
        check_known("texture", self.texture, TEXTURES)
        if self.accent is not None:
            check_known("accent color", self.accent, COLORS)
        if not all(0.0 <= p <= 1.0 for p in self.position):
            raise ValueError(f"position must lie in [0, 1]^2, got {self.position}")

    @property
    def radius(self) -> float:
        return SIZES[self.size]
