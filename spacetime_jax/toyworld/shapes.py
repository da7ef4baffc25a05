"""Shape outlines in unit coordinates (x right, y down; bounding radius 1 about the origin).

An outline is a sequence of (polygon, filled) parts drawn in order: a part with filled=False
cuts a hole (the ring's center, the crescent's bite).
"""
from __future__ import annotations

import numpy as np

Outline = tuple[tuple[np.ndarray, bool], ...]


def _regular(n: int, start_deg: float = -90.0, radius: float = 1.0,
             center: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(angles), np.sin(angles)], -1) * radius + np.asarray(center)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points) * radii[:, None]


def _heart(n: int = 96) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 3.0], -1)  # +3 centers it vertically


def _normalized(outline: Outline) -> Outline:
    """Scales an outline so that its farthest point lies at radius 1."""
    reach = max(np.linalg.norm(poly, axis=-1).max() for poly, filled in outline if filled)
    return tuple((poly / reach, filled) for poly, filled in outline)


_CIRCLE = _regular(96)
_CROSS = np.array([(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3),
                   (-1, 1), (-3, 1), (-3, -1), (-1, -1)], np.float64)
_ARROW = np.array([(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6),
                   (0.15, 0.22), (-1.0, 0.22)])
_BOLT = np.array([(0.25, -1.0), (-0.55, 0.15), (-0.05, 0.15), (-0.3, 1.0), (0.55, -0.2),
                  (0.05, -0.2)])
_HOUSE = np.array([(0.0, -1.0), (0.8, -0.2), (0.8, 0.8), (-0.8, 0.8), (-0.8, -0.2)])
_TEE = np.array([(-0.9, -0.8), (0.9, -0.8), (0.9, -0.35), (0.25, -0.35), (0.25, 0.9),
                 (-0.25, 0.9), (-0.25, -0.35), (-0.9, -0.35)])
_HOURGLASS = np.array([(-0.7, -0.9), (0.7, -0.9), (0.12, 0.0), (0.7, 0.9), (-0.7, 0.9),
                       (-0.12, 0.0)])


def _drop(n: int = 96) -> np.ndarray:
    """A teardrop: a circle's lower half narrowing to a point at the top."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.sin(t) * np.sin(t / 2) ** 1.5, -np.cos(t)], -1) * [0.8, 1.0]


# Shapes of the pretraining world.
SHAPES: dict[str, Outline] = {name: _normalized(outline) for name, outline in {
    "circle": ((_CIRCLE, True),),
    "square": ((_regular(4, start_deg=45.0), True),),
    "triangle": ((_regular(3), True),),
    "star": ((_star(), True),),
    "hexagon": ((_regular(6), True),),
    "diamond": ((_regular(4) * np.array([0.65, 1.0]), True),),
    "cross": ((_CROSS, True),),
    "ring": ((_CIRCLE, True), (_regular(96, radius=0.55), False)),
    "heart": ((_heart(), True),),
}.items()}

# Shapes that pretraining never draws: material for held-out concepts.
HELD_OUT_SHAPES: dict[str, Outline] = {name: _normalized(outline) for name, outline in {
    "crescent": ((_CIRCLE, True), (_regular(96, radius=0.85, center=(0.45, -0.2)), False)),
    "arrow": ((_ARROW, True),),
    "bolt": ((_BOLT, True),),
}.items()}

# More held-out shapes, drawn only by the quality benchmark (reported apart from the ones
# above, to show whether its results carry over to shapes nothing was chosen for).
BENCHMARK_SHAPES: dict[str, Outline] = {name: _normalized(outline) for name, outline in {
    "house": ((_HOUSE, True),),
    "tee": ((_TEE, True),),
    "hourglass": ((_HOURGLASS, True),),
    "drop": ((_drop(), True),),
}.items()}

ALL_SHAPES: dict[str, Outline] = {**SHAPES, **HELD_OUT_SHAPES, **BENCHMARK_SHAPES}
