"""A procedural captioned image world: the toy data that the embedded toy Stable Diffusion
pretrains on, held-out concepts to personalize it with, and color measurements to score it.
"""
from spacetime_jax.toyworld.captions import (DEFAULT_TEMPLATE, background_phrase, caption,
                                             object_phrase, world_vocabulary)
from spacetime_jax.toyworld.concepts import (BENCHMARK_CONCEPTS, HELD_OUT_CONCEPTS, Concept,
                                             get_concept, render_concept_images,
                                             write_concept_images)
from spacetime_jax.toyworld.measure import (measure_background_color, measure_object_color,
                                            nearest_color_labels)
from spacetime_jax.toyworld.render import paint_background, render, render_object
from spacetime_jax.toyworld.scene import (BACKGROUND_KINDS, COLORS, SIZES, TEXTURES, Background,
                                          Scene, shade)
from spacetime_jax.toyworld.shapes import BENCHMARK_SHAPES, HELD_OUT_SHAPES, SHAPES
from spacetime_jax.toyworld.world import (Examples, generate, is_held_out, sample_background,
                                          sample_captioned_scene, sample_scene)
