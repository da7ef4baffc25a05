"""Concept-fidelity measures of toyworld/fidelity.py on rendered pictures with known answers."""
import dataclasses

import numpy as np
import pytest

from spacetime_jax.toyworld import fidelity
from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, render_concept_images
from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.scene import Background, Scene


def _scene(**changes) -> Scene:
    scene = Scene("crescent", "yellow", "large", (0.5, 0.5), Background("plain", "purple"))
    return dataclasses.replace(scene, **changes)


def test_object_mask_is_the_rendered_object():
    image, mask = render(_scene(shape="star", color="red",
                                background=Background("gradient", "green")))
    measured = fidelity.object_mask(image)
    assert fidelity.silhouette_iou(measured, mask) > 0.9


def test_silhouette_ignores_position_and_size():
    big = fidelity.normalized_silhouette(render(_scene())[1])
    small = fidelity.normalized_silhouette(render(_scene(size="small", position=(0.3, 0.7)))[1])
    circle = fidelity.normalized_silhouette(render(_scene(shape="circle"))[1])
    assert big.shape == (fidelity.SILHOUETTE_SIDE,) * 2
    assert fidelity.silhouette_iou(big, small) > 0.85
    assert fidelity.silhouette_iou(big, circle) < 0.6


def test_empty_picture_has_no_silhouette_and_scores_zero():
    blank = np.full((64, 64, 3), (30, 160, 50), np.uint8)
    assert fidelity.normalized_silhouette(fidelity.object_mask(blank)) is None
    references = [np.ones((fidelity.SILHOUETTE_SIDE,) * 2, bool)]
    assert fidelity.shape_similarity(blank, references) == 0.0


@pytest.mark.parametrize("name, super_category", [("crescent", "circle"), ("arrow", "triangle"),
                                                  ("bolt", "star")])
def test_new_shapes_score_above_their_super_category(name, super_category):
    concept = HELD_OUT_CONCEPTS[name]
    references = fidelity.reference_silhouettes(np.stack(render_concept_images(concept, 5)))
    own = [fidelity.shape_similarity(im, references)
           for im in render_concept_images(concept, 6, seed=1)]
    other = [fidelity.shape_similarity(im, references) for im in render_concept_images(
        dataclasses.replace(concept, shape=super_category), 6, seed=1)]
    assert np.mean(own) > 0.7
    assert np.mean(own) > np.mean(other) + 0.1


def test_silhouette_iou_counts_overlap_over_union():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert fidelity.silhouette_iou(a, b) == pytest.approx(4 / 12)
    assert fidelity.silhouette_iou(a, a) == 1.0
    assert fidelity.silhouette_iou(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_mean_cosine_similarity_averages_over_references():
    embeddings = np.array([[1.0, 0.0], [0.0, 2.0]])
    references = np.array([[3.0, 0.0], [1.0, 1.0]])
    expected = [(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2]
    np.testing.assert_allclose(fidelity.mean_cosine_similarity(embeddings, references), expected)


def test_shape_and_size_are_read_back_from_world_renders():
    # Textured, rotated objects on patterned backgrounds: the reader's own ceiling.
    from spacetime_jax.toyworld.world import generate
    examples = generate(seed=5, n=120)
    shapes = [fidelity.read_shape(image) for image in examples.images]
    sizes = [fidelity.read_size(image, scene.shape)
             for image, scene in zip(examples.images, examples.scenes)]
    assert np.mean([s == scene.shape for s, scene in zip(shapes, examples.scenes)]) >= 0.93
    assert np.mean([s == scene.size for s, scene in zip(sizes, examples.scenes)]) >= 0.95


@pytest.mark.parametrize("shape", ["circle", "star", "cross", "heart", "ring"])
def test_each_size_of_a_shape_reads_as_itself_and_no_object_reads_as_none(shape):
    for size in ("small", "medium", "large"):
        image, _ = render(_scene(shape=shape, size=size, position=(0.4, 0.6), rotation=10.0))
        assert fidelity.read_shape(image) == shape
        assert fidelity.read_size(image, shape) == size
    blank = np.full((64, 64, 3), (30, 160, 50), np.uint8)
    assert fidelity.read_shape(blank) is None and fidelity.read_size(blank, shape) is None


def test_templates_cover_the_worlds_rotations_and_only_its_shapes():
    templates = fidelity.shape_templates()
    assert set(templates) == set(fidelity.SHAPES)
    assert all(len(t) == len(fidelity.TEMPLATE_ROTATIONS) for t in templates.values())
    # A crescent is none of them: it reads as its closest world shape, never as itself.
    image, _ = render(_scene())
    assert fidelity.read_shape(image) in fidelity.SHAPES
