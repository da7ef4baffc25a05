"""The pretraining world: a seeded distribution of captioned scenes.

Example `index` of `seed` draws from its own generator, `np.random.default_rng([seed, index])`,
so it is the same whichever batch it is generated in. Pretraining never shows a held-out shape
nor a two-tone texture (a texture in a second palette color): those make held-out concepts.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from spacetime_jax.data.templates import OBJECT_TEMPLATES
from spacetime_jax.toyworld.captions import caption
from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.scene import BACKGROUND_KINDS, COLORS, SIZES, Background, Scene
from spacetime_jax.toyworld.shapes import SHAPES

_BACKGROUND_KIND_PROBS = (0.4, 0.2, 0.2, 0.2)  # plain, gradient, checkered, striped
_TEXTURE_PROBS = {"plain": 0.5, "striped": 0.25, "dotted": 0.25}
_CELLS = (4, 8)
_MAX_ROTATION = 25.0  # degrees either way
_BORDER_MARGIN = 0.03  # keeps objects off the image border, where the background is measured


class Examples(NamedTuple):
    images: np.ndarray  # (n, size, size, 3) uint8
    masks: np.ndarray  # (n, size, size) bool, the object's pixels
    captions: list[str]
    scenes: list[Scene]


def sample_background(rng: np.random.Generator, exclude: Sequence[str] = ()) -> Background:
    """A random background whose color is none of `exclude` (the object's colors)."""
    kind = BACKGROUND_KINDS[rng.choice(len(BACKGROUND_KINDS), p=_BACKGROUND_KIND_PROBS)]
    color = str(rng.choice([c for c in COLORS if c not in exclude]))
    if kind == "plain":
        return Background(kind, color)
    return Background(kind, color, vertical=bool(rng.integers(2)), cells=int(rng.choice(_CELLS)))


def sample_placement(rng: np.random.Generator, max_rotation: float = _MAX_ROTATION
                     ) -> tuple[str, tuple[float, float], float]:
    """A size, a center that keeps the whole object inside the image, and a rotation."""
    size = str(rng.choice(list(SIZES)))
    reach = SIZES[size] + _BORDER_MARGIN
    x, y = rng.uniform(reach, 1.0 - reach, size=2)
    return size, (float(x), float(y)), float(rng.uniform(-max_rotation, max_rotation))


def sample_scene(rng: np.random.Generator) -> Scene:
    """One pretraining scene: a pretraining shape, plain or self-shaded texture."""
    shape = str(rng.choice(list(SHAPES)))
    color = str(rng.choice(list(COLORS)))
    texture = str(rng.choice(list(_TEXTURE_PROBS), p=list(_TEXTURE_PROBS.values())))
    size, position, rotation = sample_placement(rng)
    return Scene(shape, color, size, position, sample_background(rng, exclude=(color,)),
                 texture=texture, rotation=rotation)


def is_held_out(scene: Scene) -> bool:
    """True for scenes pretraining never shows: shapes it does not draw (held-out and
    benchmark-only) and two-tone textures."""
    return scene.shape not in SHAPES or scene.accent is not None


def _example_rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def sample_captioned_scene(seed: int, index: int) -> tuple[Scene, str]:
    """Example `index` of `seed`: its scene and its caption (in a random object template)."""
    rng = _example_rng(seed, index)
    scene = sample_scene(rng)
    template = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))]
    return scene, caption(scene, template)


def generate(seed: int, n: int, start: int = 0, size: int = 64) -> Examples:
    """Examples start .. start + n - 1 of `seed`, rendered at `size` pixels."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    scenes, captions = zip(*(sample_captioned_scene(seed, i) for i in range(start, start + n)))
    images, masks = zip(*(render(scene, size) for scene in scenes))
    return Examples(np.stack(images), np.stack(masks), list(captions), list(scenes))
