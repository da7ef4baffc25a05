"""Held-out concepts: objects the pretraining world never shows, for personalization demos.

A concept fixes an object's identity (shape, colors, texture); its renders vary the size,
position, small rotation and background, like a handful of photos of one thing.
"""
from __future__ import annotations

import dataclasses
import pathlib
import zlib
from typing import Optional

import numpy as np
from PIL import Image

from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.scene import COLORS, TEXTURES, Scene, check_known
from spacetime_jax.toyworld.shapes import ALL_SHAPES
from spacetime_jax.toyworld.world import sample_background, sample_placement

_CONCEPT_MAX_ROTATION = 15.0  # degrees: a concept keeps its upright look


@dataclasses.dataclass(frozen=True)
class Concept:
    """A fixed object identity; `scene(rng)` places it in a random photo."""
    name: str
    shape: str
    color: str
    texture: str = "plain"
    accent: Optional[str] = None  # a second palette color for the texture (two-tone)

    def __post_init__(self):
        check_known("shape", self.shape, ALL_SHAPES)
        check_known("texture", self.texture, TEXTURES)
        for color in self.colors:
            check_known("color", color, COLORS)

    @property
    def colors(self) -> tuple[str, ...]:
        return (self.color,) if self.accent is None else (self.color, self.accent)

    def scene(self, rng: np.random.Generator) -> Scene:
        """One photo of the concept: random placement, a background in none of its colors."""
        size, position, rotation = sample_placement(rng, _CONCEPT_MAX_ROTATION)
        return Scene(self.shape, self.color, size, position,
                     sample_background(rng, exclude=self.colors),
                     texture=self.texture, accent=self.accent, rotation=rotation)


HELD_OUT_CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("crescent", "crescent", "yellow"),  # a new shape
    Concept("arrow", "arrow", "blue", texture="striped", accent="white"),  # new shape, two-tone
    Concept("bolt", "bolt", "orange"),  # a new shape
    Concept("polka_heart", "heart", "red", texture="dotted", accent="white"),  # new combination
)}


# Four more, of shapes drawn only by the quality benchmark (shapes.BENCHMARK_SHAPES): its
# results on these, reported apart, show whether what it measures on the four above carries
# over to concepts nothing was chosen or tuned for.
BENCHMARK_CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("house", "house", "green"),
    Concept("tee", "tee", "purple"),
    Concept("hourglass", "hourglass", "white"),
    Concept("drop", "drop", "blue"),
)}


def get_concept(name: str) -> Concept:
    if name not in HELD_OUT_CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; known concepts: "
                       f"{', '.join(sorted(HELD_OUT_CONCEPTS))}")
    return HELD_OUT_CONCEPTS[name]


def render_concept_images(concept: Concept, n: int, seed: int = 0, size: int = 64
                          ) -> list[np.ndarray]:
    """n uint8 (size, size, 3) photos of the concept. Photo i draws from its own generator, and
    the concept's name enters it so that concepts do not share placements."""
    name_key = zlib.crc32(concept.name.encode())
    return [render(concept.scene(np.random.default_rng([seed, i, name_key])), size)[0]
            for i in range(n)]


def write_concept_images(concept: Concept, out_dir: str | pathlib.Path, n: int, seed: int = 0,
                         size: int = 64) -> list[pathlib.Path]:
    """Writes the concept's photos as out_dir/<name>_<i>.png and returns their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(render_concept_images(concept, n, seed, size)):
        path = out_dir / f"{concept.name}_{i:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
