"""The toy world: reproducible scenes, masks, captions, held-out concepts, color measurement."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spacetime_jax import toyworld as tw
from spacetime_jax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES

N_MEASURED = 300


@pytest.fixture(scope="module")
def examples() -> tw.Examples:
    return tw.generate(seed=7, n=N_MEASURED)


def _plain_scene(**changes) -> tw.Scene:
    scene = tw.Scene("star", "red", "medium", (0.5, 0.5), tw.Background("plain", "green"))
    return dataclasses.replace(scene, **changes)


def test_templates_are_textual_inversions_lists():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert OBJECT_TEMPLATES[0] == "a photo of a {}"
    assert STYLE_TEMPLATES[-1] == "a large painting in the style of {}"


def test_same_seed_gives_byte_identical_examples():
    first, again = tw.generate(3, 6), tw.generate(3, 6)
    assert first.images.tobytes() == again.images.tobytes()
    assert np.array_equal(first.masks, again.masks)
    assert first.captions == again.captions and first.scenes == again.scenes


def test_different_seeds_give_different_examples():
    one, other = tw.generate(3, 6), tw.generate(4, 6)
    assert all(not np.array_equal(a, b) for a, b in zip(one.images, other.images))
    assert one.captions != other.captions


def test_example_does_not_depend_on_batching():
    whole = tw.generate(5, 9)
    parts = [tw.generate(5, 4), tw.generate(5, 5, start=4)]
    assert np.array_equal(whole.images, np.concatenate([p.images for p in parts]))
    assert whole.captions == parts[0].captions + parts[1].captions
    assert tw.sample_captioned_scene(5, 8) == (whole.scenes[8], whole.captions[8])


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in each of the 8 directions."""
    padded = np.pad(mask, 1)
    return np.any([np.roll(np.roll(padded, dy, 0), dx, 1)[1:-1, 1:-1]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def _shrink(mask: np.ndarray) -> np.ndarray:
    return ~_grow(~mask)


def test_render_shapes_and_dtypes():
    image, mask = tw.render(_plain_scene(), size=48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == bool


def test_mask_pixels_have_the_object_color(examples):
    for image, mask, scene in zip(examples.images, examples.masks, examples.scenes):
        if scene.texture != "plain":
            continue
        distance = np.abs(image[mask].astype(int) - tw.COLORS[scene.color]).max(-1)
        # Edge pixels of the mask blend with the background; the inside is the exact color.
        assert np.mean(distance == 0) > 0.6, scene
        assert np.median(distance) == 0


def test_pixels_outside_the_mask_are_background():
    image, mask = tw.render(_plain_scene(texture="striped", rotation=20.0))
    # Blended edge pixels lie within one pixel of the mask; everything beyond is background.
    assert np.all(image[~_grow(mask)] == tw.COLORS["green"])
    assert not np.all(image[~mask] == tw.COLORS["green"])  # there are blended edge pixels


def test_mask_area_grows_with_size_as_the_radius_squared():
    areas = {size: tw.render(_plain_scene(shape="circle", size=size))[1].sum()
             for size in tw.SIZES}
    assert areas["small"] < areas["medium"] < areas["large"]
    for size, area in areas.items():
        expected = np.pi * (tw.SIZES[size] * 64) ** 2
        assert abs(area / expected - 1) < 0.05, (size, area, expected)


def test_render_object_is_the_scene_object_on_a_plain_fill():
    scene = _plain_scene(texture="dotted", background=tw.Background("checkered", "blue"))
    scene_image, scene_mask = tw.render(scene)
    alone, alone_mask = tw.render_object(scene, fill=(0, 0, 0))
    assert np.array_equal(scene_mask, alone_mask)
    inside = _shrink(scene_mask)
    assert inside.sum() > 100
    assert np.array_equal(alone[inside], scene_image[inside])
    assert np.all(alone[~_grow(alone_mask)] == 0)
    assert not np.array_equal(alone[~inside], scene_image[~inside])


def test_default_caption_is_the_issue_example():
    assert tw.caption(_plain_scene()) == "a photo of a red star on a green background"


def test_caption_words_follow_the_scene():
    scene = _plain_scene(size="small", texture="striped",
                         background=tw.Background("checkered", "orange"))
    assert tw.caption(scene, "a rendering of a {}") == (
        "a rendering of a small red striped star on an orange checkered background")
    # A template that already names a size gets no second size word.
    assert tw.caption(scene, "a photo of the large {}") == (
        "a photo of the large red striped star on an orange checkered background")


def test_captions_name_color_shape_and_background(examples):
    for text, scene in zip(examples.captions, examples.scenes):
        assert tw.object_phrase(scene, with_size=False) in text
        assert text.endswith(f"on {tw.background_phrase(scene.background)}")
        assert scene.color in text.split() and scene.shape in text.split()


def test_caption_words_are_in_the_world_vocabulary(examples):
    vocabulary = tw.world_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    caption_words = {w for text in examples.captions for w in text.split()}
    template_words = {w for t in OBJECT_TEMPLATES + STYLE_TEMPLATES
                      for w in t.replace("{}", "").split()}
    assert caption_words | template_words <= set(vocabulary)
    assert set(tw.COLORS) | set(tw.SHAPES) <= caption_words  # all in use, none dead
    assert not (set(tw.HELD_OUT_SHAPES) | set(tw.BENCHMARK_SHAPES)) & set(vocabulary)


def test_pretraining_sampler_never_produces_held_out_concepts():
    scenes = [tw.sample_scene(np.random.default_rng([11, i])) for i in range(3000)]
    assert not any(tw.is_held_out(s) for s in scenes)
    assert {s.shape for s in scenes} == set(tw.SHAPES)
    assert {s.color for s in scenes} == set(tw.COLORS)
    assert {s.texture for s in scenes} == set(tw.TEXTURES)
    assert {s.background.kind for s in scenes} == set(tw.BACKGROUND_KINDS)
    assert all(s.background.color != s.color for s in scenes)


def test_every_concept_is_held_out_and_keeps_its_identity():
    rng = np.random.default_rng(0)
    for concept in [*tw.HELD_OUT_CONCEPTS.values(), *tw.BENCHMARK_CONCEPTS.values()]:
        scenes = [concept.scene(rng) for _ in range(20)]
        assert all(tw.is_held_out(s) for s in scenes)
        assert {(s.shape, s.color, s.texture, s.accent) for s in scenes} == {
            (concept.shape, concept.color, concept.texture, concept.accent)}
        assert not {s.background.color for s in scenes} & set(concept.colors)


def test_concept_images_are_reproducible_and_varied():
    concept = tw.get_concept("crescent")
    images = tw.render_concept_images(concept, 5, seed=1)
    assert len(images) == 5 and images[0].shape == (64, 64, 3)
    assert all(np.array_equal(a, b)
               for a, b in zip(images, tw.render_concept_images(concept, 5, seed=1)))
    assert len({image.tobytes() for image in images}) == 5
    assert all(tw.measure_object_color(image) == "yellow" for image in images)


def test_unknown_names_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="known concepts: arrow, bolt"):
        tw.get_concept("dragon")
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        _plain_scene(color="teal")


def test_shades_stay_nearest_to_their_own_color():
    names = list(tw.COLORS)
    palette = np.array([tw.COLORS[n] for n in names], np.float32)[None]
    shades = np.stack([tw.shade(n) for n in names])[None]
    assert [names[i] for i in tw.nearest_color_labels(palette)[0]] == names
    assert [names[i] for i in tw.nearest_color_labels(shades)[0]] == names


def test_measured_colors_match_plain_scenes_exactly():
    rng = np.random.default_rng(2)
    for shape, color, background in zip(rng.choice(list(tw.SHAPES), 64),
                                         rng.choice(list(tw.COLORS), 64),
                                         rng.choice(list(tw.COLORS), 64)):
        if color == background:
            continue
        scene = _plain_scene(shape=str(shape), color=str(color), size="small",
                             background=tw.Background("plain", str(background)))
        image, _ = tw.render(scene)
        assert tw.measure_background_color(image) == background
        assert tw.measure_object_color(image) == color


def test_measured_colors_match_all_scene_kinds(examples):
    # Textures, gradients and patterns included: measured 300/300 (and 1000/1000 when written).
    measured = [(tw.measure_background_color(image), tw.measure_object_color(image))
                for image in examples.images]
    truth = [(s.background.color, s.color) for s in examples.scenes]
    assert np.mean([m == t for m, t in zip(measured, truth)]) == 1.0
    with_masks = [(tw.measure_background_color(i, m), tw.measure_object_color(i, m))
                  for i, m in zip(examples.images, examples.masks)]
    assert with_masks == truth


def test_no_object_measures_as_none():
    empty = np.broadcast_to(np.array(tw.COLORS["blue"], np.uint8), (64, 64, 3))
    assert tw.measure_background_color(empty) == "blue"
    assert tw.measure_object_color(empty) is None


def _write_concept(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spacetime_jax.toyworld.write_concept", *args],
                          capture_output=True, text=True, timeout=60)


def test_write_concept_cli_writes_readable_pngs(tmp_path):
    result = _write_concept("--concept", "arrow", "--out", str(tmp_path / "arrow"), "--n", "4")
    assert result.returncode == 0, result.stderr
    paths = sorted((tmp_path / "arrow").glob("*.png"))
    assert len(paths) == 4 and result.stdout.split() == [str(p) for p in paths]
    written = [np.asarray(Image.open(p)) for p in paths]
    expected = tw.render_concept_images(tw.get_concept("arrow"), 4, seed=0)
    assert all(np.array_equal(w, e) for w, e in zip(written, expected))


def test_write_concept_cli_fails_clearly_on_an_unknown_concept(tmp_path):
    result = _write_concept("--concept", "dragon", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown concept 'dragon'" in result.stderr
    assert all(name in result.stderr for name in tw.HELD_OUT_CONCEPTS)
    assert not list(tmp_path.iterdir())
