"""ELITE's input pipeline: determinism, resume, per-host slices, epochs, augmentations."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from spacetime_jax.data.templates import OBJECT_TEMPLATES
from spacetime_jax.elite import pipeline
from spacetime_jax.errors import UserError
from spacetime_jax.models.clip_vision import CLIP_MEAN, CLIP_STD

CROP = 40  # source crops, resized up and down by the pipeline
RESOLUTION = 32
CLIP_SIZE = 28
NUM_EXAMPLES = 12
PLACEHOLDER = "S"
OBJECT_RGB = (220, 40, 40)
BACKGROUND_RGB = (30, 160, 30)
CLIP_BLACK = -np.asarray(CLIP_MEAN, np.float32) / np.asarray(CLIP_STD, np.float32)

# A word-level stand-in for the CLIP tokenizer: BOS, one id per word, EOS, padding to 77.
BOS, EOS, PAD, MAX_LENGTH = 1, 2, 0, 77
_WORDS = sorted({word for text in OBJECT_TEMPLATES + pipeline.SMALL_PREFIXES
                 + pipeline.LARGE_PREFIXES + (PLACEHOLDER,) for word in text.split()})
VOCAB = {word: 3 + i for i, word in enumerate(_WORDS)}
WORDS = {i: word for word, i in VOCAB.items()}


def encode_prompt(text):
    ids = [BOS] + [VOCAB[word] for word in text.split()] + [EOS]
    position = ids.index(VOCAB[PLACEHOLDER])
    return np.array(ids + [PAD] * (MAX_LENGTH - len(ids))), position


def decode(ids):
    return " ".join(WORDS[int(i)] for i in ids if int(i) > EOS)


def object_crop(index):
    """An off-centre ellipse of one colour on another: flips and rotations move it."""
    rng = np.random.default_rng(index)
    mask = Image.new("L", (CROP, CROP), 0)
    left, top = rng.integers(2, 12, 2)
    width, height = rng.integers(14, 26, 2)
    ImageDraw.Draw(mask).ellipse([left, top, left + width, top + height], fill=255)
    mask = np.asarray(mask)[..., None]
    image = np.where(mask > 0, np.array(OBJECT_RGB, np.uint8), np.array(BACKGROUND_RGB, np.uint8))
    return {"image": image.astype(np.uint8), "mask": mask.astype(np.uint8)}


SOURCE = [object_crop(i) for i in range(NUM_EXAMPLES)]


def spec(stage, global_batch=4, seed=3, **kwargs):
    return pipeline.PipelineSpec(stage=stage, global_batch=global_batch, resolution=RESOLUTION,
                                 clip_size=CLIP_SIZE, encode_prompt=encode_prompt,
                                 placeholder=PLACEHOLDER, seed=seed, **kwargs)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_batch_is_a_function_of_seed_and_step(stage):
    first = pipeline.host_batch(SOURCE, spec(stage), step=4)
    again = pipeline.host_batch(SOURCE, spec(stage), step=4)
    assert_batches_equal(first, again)
    for other in (pipeline.host_batch(SOURCE, spec(stage), step=5),
                  pipeline.host_batch(SOURCE, spec(stage, seed=4), step=4)):
        assert not np.array_equal(first["clip_pixels"], other["clip_pixels"])
        assert not np.array_equal(first["example_index"], other["example_index"])


def test_batch_shapes_dtypes_and_ranges():
    glob = pipeline.host_batch(SOURCE, spec("global"), step=0)
    local = pipeline.host_batch(SOURCE, spec("local"), step=0)
    image_shapes = {"pixels": (4, RESOLUTION, RESOLUTION, 3),
                    "valid_mask": (4, RESOLUTION, RESOLUTION, 1),
                    "clip_pixels": (4, CLIP_SIZE, CLIP_SIZE, 3),
                    "local_pixels": (4, CLIP_SIZE, CLIP_SIZE, 3),
                    "local_mask": (4, CLIP_SIZE, CLIP_SIZE, 1)}
    index_shapes = {"input_ids": (4, MAX_LENGTH), "placeholder_position": (4,),
                    "example_index": (4,)}
    assert set(glob) == {"pixels", "clip_pixels"} | set(index_shapes)
    assert set(local) == set(image_shapes) | set(index_shapes)
    for batch in (glob, local):
        for key, value in batch.items():
            expected = image_shapes.get(key) or index_shapes[key]
            assert value.shape == expected, key
            assert value.dtype == (np.float32 if key in image_shapes else np.int32), key
        assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
        # The object's red 220 -> 220/127.5 - 1 = 0.725 (bicubic overshoots only at edges).
        red = batch["pixels"][..., 0]
        assert np.median(red[red > 0.3]) == pytest.approx(220 / 127.5 - 1, abs=0.01)
        lowest = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        highest = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        assert np.all(batch["clip_pixels"] >= lowest.astype(np.float32) - 1e-6)
        assert np.all(batch["clip_pixels"] <= highest.astype(np.float32) + 1e-6)
        ids = batch["input_ids"]
        rows = np.arange(4)
        assert np.all(ids[rows, batch["placeholder_position"]] == VOCAB[PLACEHOLDER])
    for key in ("valid_mask", "local_mask"):
        assert set(np.unique(local[key])) <= {0.0, 1.0}
    assert np.all(local["local_mask"].sum(axis=(1, 2, 3)) > 0)


def test_resumed_run_draws_what_an_uninterrupted_run_draws():
    local = spec("local")
    with pipeline.Prefetcher(SOURCE, local, start_step=0, stop_step=8) as through:
        uninterrupted = list(through)
    assert len(uninterrupted) == 8
    with pipeline.Prefetcher(SOURCE, local, start_step=5, stop_step=8) as resumed:
        for step, batch in zip(range(5, 8), resumed, strict=True):
            assert_batches_equal(batch, uninterrupted[step])
            assert_batches_equal(pipeline.host_batch(SOURCE, local, step), uninterrupted[step])


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_process_slices_concatenate_to_the_single_process_batch(stage):
    whole = pipeline.host_batch(SOURCE, spec(stage), step=2)
    halves = [pipeline.host_batch(SOURCE, spec(stage), step=2, process_index=p,
                                  process_count=2) for p in range(2)]
    assert not set(halves[0]["example_index"]) & set(halves[1]["example_index"])
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key],
                                      err_msg=key)
    assert list(pipeline.host_rows(8, 1, 4)) == [2, 3]


@pytest.mark.parametrize("global_batch", [4, 5])
def test_each_epoch_visits_every_example_once(global_batch):
    draws = [pipeline.global_batch_rows(step, NUM_EXAMPLES, global_batch, seed=3)
             for step in range(2 * NUM_EXAMPLES // global_batch + 1)]
    order = np.concatenate(draws)
    first, second = order[:NUM_EXAMPLES], order[NUM_EXAMPLES:2 * NUM_EXAMPLES]
    np.testing.assert_array_equal(np.sort(first), np.arange(NUM_EXAMPLES))
    np.testing.assert_array_equal(np.sort(second), np.arange(NUM_EXAMPLES))
    assert not np.array_equal(first, second)  # a fresh permutation each epoch
    np.testing.assert_array_equal(first, np.random.default_rng([3, 0]).permutation(NUM_EXAMPLES))
    if global_batch == 4:  # N / G steps of batches hold each example exactly once
        batches = [pipeline.host_batch(SOURCE, spec("global"), step) for step in range(3)]
        seen = np.concatenate([b["example_index"] for b in batches])
        np.testing.assert_array_equal(np.sort(seen), np.arange(NUM_EXAMPLES))


def test_prompt_prefix_replaces_the_leading_article_on_every_template():
    assert len(OBJECT_TEMPLATES) == 27
    for template in OBJECT_TEMPLATES:
        article, rest = template.split(" ", 1)
        assert article in pipeline.ARTICLES
        assert pipeline.prompt_with_prefix(template, None) == template
        for prefix in pipeline.SMALL_PREFIXES + pipeline.LARGE_PREFIXES:
            prompt = pipeline.prompt_with_prefix(template, prefix)
            assert prompt == f"{prefix} {rest}"
            assert prompt.format(PLACEHOLDER).split().count(PLACEHOLDER) == 1
    # The reference built "a far away" + "he photo of a S" here.
    assert (pipeline.prompt_with_prefix("the photo of a {}", "a far away")
            == "a far away photo of a {}")
    assert pipeline.prompt_with_prefix("photo of {}", "close up") == "close up photo of {}"


def test_rescaled_target_cases_masks_and_prefixes():
    image = SOURCE[0]["image"]
    plain = pipeline.to_unit_range(pipeline._resize(image, RESOLUTION))
    cases = set()
    for seed in range(200):
        target = pipeline.rescale_target(image, np.random.default_rng(seed), RESOLUTION)
        assert target.scale % 2 == 0
        valid = target.valid_mask[..., 0]
        if target.scale < pipeline.PASTE_BELOW * RESOLUTION:
            cases.add("small")
            assert target.prefix in pipeline.SMALL_PREFIXES
            assert target.scale >= RESOLUTION // 3
            rows, cols = np.nonzero(valid)
            top, left = rows.min(), cols.min()
            box = np.zeros_like(valid)
            box[top:top + target.scale, left:left + target.scale] = 1
            np.testing.assert_array_equal(valid, box)
            assert np.all(target.pixels[valid == 0] == -1.0)
            assert np.any(target.pixels[valid == 1] > -0.5)  # the object is inside the box
        elif target.scale > RESOLUTION:
            cases.add("large")
            assert target.prefix in pipeline.LARGE_PREFIXES
            assert target.scale < 1.4 * RESOLUTION + 2
            assert np.all(valid == 1)
            assert not np.array_equal(target.pixels, plain)
        else:
            cases.add("plain")
            assert target.prefix is None
            assert np.all(valid == 1)
            np.testing.assert_array_equal(target.pixels, plain)
    assert cases == {"small", "large", "plain"}


def test_local_batch_prompts_follow_the_scale_of_their_row():
    local = spec("local", global_batch=12)
    for step in range(3):
        batch = pipeline.host_batch(SOURCE, local, step)
        for row in range(12):
            example = SOURCE[batch["example_index"][row]]
            target = pipeline.rescale_target(example["image"],
                                             pipeline.row_rng(local.seed, step, row), RESOLUTION)
            np.testing.assert_array_equal(batch["pixels"][row], target.pixels)
            np.testing.assert_array_equal(batch["valid_mask"][row], target.valid_mask)
            prompt = decode(batch["input_ids"][row])
            if target.prefix is None:
                assert prompt in {t.format(PLACEHOLDER) for t in OBJECT_TEMPLATES}
            else:
                assert prompt.startswith(target.prefix + " ")
                assert not prompt.startswith(target.prefix + " a ")
            if np.any(batch["valid_mask"][row] == 0):
                assert target.prefix in pipeline.SMALL_PREFIXES
            # The global branch sees the whole, unaugmented crop.
            np.testing.assert_array_equal(
                batch["clip_pixels"][row],
                pipeline.clip_normalize(pipeline._resize(example["image"], CLIP_SIZE)))


def corner_object(size=48):
    """A small disc near one corner: a mask moved unlike its image lands on black."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([6, 4, 22, 20], fill=255)
    mask = np.asarray(mask)[..., None]
    image = np.where(mask > 0, np.array(OBJECT_RGB, np.uint8), np.array(BACKGROUND_RGB, np.uint8))
    return image.astype(np.uint8), mask


def test_object_augmentation_keeps_image_and_mask_aligned():
    image, mask_in = corner_object()
    size = 64
    unmoved = pipeline._resize((mask_in >= 128).astype(np.uint8), size,
                               Image.Resampling.NEAREST)[..., 0]
    moved = 0
    for seed in range(40):
        obj, mask = pipeline.augment_object(image, mask_in, np.random.default_rng(seed), size)
        inside = mask[..., 0] == 1
        assert inside.sum() > 100
        assert np.all(obj[~inside] == 0.0)  # black outside the mask, exactly
        # Inside it the object's colour, blended with black only along the edge; a mask
        # moved unlike its image would cover the black around the object here.
        close = np.all(np.abs(obj[inside] - np.array(OBJECT_RGB)) < 12, axis=-1)
        assert close.mean() > 0.7, seed
        # The same mask 28 px to the side (wider than the disc) covers no object at all.
        shifted = np.roll(mask[..., 0], 28, axis=1) == 1
        assert np.all(obj[shifted] == 0.0), seed
        moved += not np.array_equal(mask[..., 0], unmoved)
    assert moved > 20  # each of 3 steps fires with p = 0.5: ~35 of 40 move


def test_local_pixels_are_background_outside_the_local_mask():
    batch = pipeline.host_batch(SOURCE, spec("local", global_batch=12), step=1)
    outside = batch["local_mask"][..., 0] == 0
    np.testing.assert_allclose(batch["local_pixels"][outside],
                               np.broadcast_to(CLIP_BLACK, (outside.sum(), 3)), atol=1e-6)
    inside = ~outside
    object_clip = pipeline.clip_normalize(np.array(OBJECT_RGB, np.float32))
    close = np.all(np.abs(batch["local_pixels"][inside] - object_clip) < 0.2, axis=-1)
    assert close.mean() > 0.7  # 28 px: the blended edge is a large part of the object


def test_clip_augmentation_flips_and_leaves_untouched_rows_alone():
    image = SOURCE[2]["image"]
    resized = pipeline._resize(image, CLIP_SIZE).astype(np.float32)
    found = {"none": 0, "flip": 0, "changed": 0}
    for seed in range(60):
        out = pipeline.augment_for_clip(image, np.random.default_rng(seed), CLIP_SIZE)
        assert out.shape == (CLIP_SIZE, CLIP_SIZE, 3)
        assert 0.0 <= out.min() and out.max() <= 255.0
        flip, rotate, blur, elastic = np.random.default_rng(seed).random(4)
        # With neither rotation nor blur drawn, the draws are the four coins in order.
        if (rotate >= pipeline.ROTATE_P and blur >= pipeline.BLUR_P
                and elastic >= pipeline.ELASTIC_P):
            expected = resized[:, ::-1] if flip < pipeline.FLIP_P else resized
            np.testing.assert_array_equal(out, expected)
            found["flip" if flip < pipeline.FLIP_P else "none"] += 1
        elif not (np.array_equal(out, resized) or np.array_equal(out, resized[:, ::-1])):
            found["changed"] += 1
    assert min(found.values()) > 0
    assert found["changed"] > 20  # 1 - 0.5 * 0.7 * 0.7 of the rows: ~45 of 60


def test_rotation_and_elastic_keep_the_colours_of_a_flat_image():
    flat = np.full((CROP, CROP, 3), 90, np.uint8)
    for seed in range(20):
        out = pipeline.augment_for_clip(flat, np.random.default_rng(seed), CLIP_SIZE)
        np.testing.assert_allclose(out, 90.0, atol=1e-3)  # mirrored borders: no black corners


def test_prefetcher_yields_the_direct_batches_and_stops_cleanly():
    glob = spec("global")
    with pipeline.Prefetcher(SOURCE, glob, start_step=3, workers=2) as batches:
        for step in range(3, 7):
            assert batches.next_step == step
            assert_batches_equal(next(batches), pipeline.host_batch(SOURCE, glob, step))
    assert not batches._thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)
    assert not [t for t in threading.enumerate() if t.name.startswith("elite-")]


def test_prefetcher_raises_what_the_source_raised():
    class Broken:
        def __len__(self):
            return NUM_EXAMPLES

        def __getitem__(self, index):
            raise UserError(f"cannot read example {index}")

    with pipeline.Prefetcher(Broken(), spec("global"), start_step=0) as batches:
        with pytest.raises(UserError, match="cannot read example"):
            next(batches)


def test_bad_arguments_raise_user_errors():
    with pytest.raises(UserError, match="not divisible"):
        pipeline.host_batch(SOURCE, spec("local", global_batch=5), step=0, process_index=0,
                            process_count=2)
    with pytest.raises(UserError, match="not divisible"):
        pipeline.Prefetcher(SOURCE, spec("local", global_batch=5), 0, 1, 2)
    with pytest.raises(UserError, match="process_index 2"):
        pipeline.host_rows(4, 2, 2)
    with pytest.raises(UserError, match="unknown ELITE stage"):
        spec("both")
    with pytest.raises(UserError, match="exactly one"):
        spec("global", templates=("a photo",))
    with pytest.raises(UserError, match="resolution"):
        pipeline.PipelineSpec("global", 4, 4, CLIP_SIZE, encode_prompt)
    with pytest.raises(UserError, match="no mask"):
        pipeline.host_batch([{"image": SOURCE[0]["image"]}] * 4, spec("local"), step=0)
    with pytest.raises(UserError, match="empty"):
        pipeline.host_batch([], spec("global"), step=0)
