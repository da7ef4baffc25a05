"""Stage 1 of the toy-world SD: the world tokenizer, and a tiny CLIP run that learns."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spacetime_jax import toyworld
from spacetime_jax.models.clip import CLIPModel, contrastive_loss
from spacetime_jax.models.clip_text import CLIPTextTransformer
from spacetime_jax.models.clip_vision import CLIPVisionTransformer, clip_preprocess
from spacetime_jax.models.tokenizer import load_tokenizer, tokenize
from spacetime_jax.toyworld import pretrain_clip
from spacetime_jax.toyworld.shapes import SHAPES
from spacetime_jax.training.batches import grouped_minibatch_indices, minibatch_indices

STEPS = 30


def tiny_config() -> ml_collections.ConfigDict:
    """The orchestrator's field names at toy widths."""
    return ml_collections.ConfigDict(dict(
        width=32, text_layers=2, heads=2, vision_width=32, vision_layers=2, patch_size=8,
        image_size=64, projection_dim=32, batch_size=32, steps=STEPS, learning_rate=2e-3,
        warmup_steps=5, weight_decay=0.1, seed=0, checkpoint_every=200, groups_per_batch=0))


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world_tokenizer")
    info = pretrain_clip.build_world_tokenizer(folder)
    return info, load_tokenizer(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    examples = toyworld.generate(seed=3, n=256)
    workdir = tmp_path_factory.mktemp("clip_stage")
    result = pretrain_clip.train_clip(examples.images, examples.captions, tiny_config(),
                                      workdir, log=lambda line: None)
    return examples, workdir, result


# ---------------------------------------------------------------------------------------
# Tokenizer


def test_every_world_word_is_one_token(world_tokenizer):
    _, tokenizer = world_tokenizer
    words = pretrain_clip.world_prompt_words()
    assert {"beach", "icon", "app", "monet", "painting", "style", "background"} <= \
        {w.lower() for w in words}
    for word in words:
        pieces = tokenizer.tokenize(word)
        # 'close-up' is three pre-tokens (close, -, up), each of them one token.
        expected = 3 if word == "close-up" else 1
        assert len(pieces) == expected, (word, pieces)
    for color in toyworld.COLORS:
        assert len(tokenizer.tokenize(color)) == 1


def test_world_caption_is_bos_words_eos(world_tokenizer):
    info, tokenizer = world_tokenizer
    ids = tokenize(tokenizer, ["a photo of a red star on a green background"])[0]
    words = 10
    assert ids[0] == info.bos_token_id == tokenizer.bos_token_id
    assert ids[words + 1] == info.eos_token_id == tokenizer.eos_token_id
    prompt = ids[1:words + 1]
    assert info.eos_token_id not in prompt and info.bos_token_id not in prompt
    assert prompt[0] == prompt[3] == prompt[7]  # "a" three times, one id
    assert len(set(prompt.tolist())) == 8
    np.testing.assert_array_equal(ids[words + 2:], info.pad_token_id)  # eos padding to 77
    # NeTI's validation prompts and capitals stay whole words too.
    monet = tokenizer("A painting of a star in the style of Monet",
                      add_special_tokens=False)["input_ids"]
    assert len(monet) == 10


# ---------------------------------------------------------------------------------------
# Data plumbing


def test_minibatches_cover_each_epoch_once_and_are_seeded():
    batches = minibatch_indices(10, 3, seed=7)
    epoch = [next(batches) for _ in range(3)]  # 9 of 10, the ragged end dropped
    assert len(np.unique(np.concatenate(epoch))) == 9
    again = minibatch_indices(10, 3, seed=7)
    np.testing.assert_array_equal(next(again), epoch[0])
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(minibatch_indices(2, 3, seed=0))


def test_grouped_minibatches_take_equal_shares_of_distinct_groups_and_resume():
    groups = np.repeat(np.arange(5), [6, 6, 6, 6, 2])  # group 4 is too small for 3 a batch
    batches = grouped_minibatch_indices(groups, batch_size=6, groups_per_batch=2, seed=7)
    drawn = [next(batches) for _ in range(20)]
    for batch in drawn:
        assert len(np.unique(batch)) == 6
        labels, counts = np.unique(groups[batch], return_counts=True)
        assert len(labels) == 2 and counts.tolist() == [3, 3] and 4 not in labels
    assert len(np.unique(np.concatenate([groups[b] for b in drawn]))) == 4  # all eligible used
    resumed = grouped_minibatch_indices(groups, batch_size=6, groups_per_batch=2, seed=7,
                                        start=13)
    np.testing.assert_array_equal(next(resumed), drawn[13])
    with pytest.raises(ValueError, match="not a multiple"):
        next(grouped_minibatch_indices(groups, batch_size=6, groups_per_batch=4, seed=0))
    with pytest.raises(ValueError, match="only 4 groups have the 3 examples"):
        next(grouped_minibatch_indices(groups, batch_size=15, groups_per_batch=5, seed=0))


def test_color_pair_groups_read_the_object_and_background_colors():
    captions = ["a photo of a red star on a green background",
                "a rendering of the small red striped ring on a green checkered background",
                "a photo of a green star on a red background",
                "a photo of a red circle on a blue background"]
    labels = pretrain_clip.color_pair_groups(captions)
    assert labels[0] == labels[1] and len(set(labels.tolist())) == 3
    with pytest.raises(ValueError, match="names no color"):
        pretrain_clip.color_pair_groups(["a photo of a star"])


def test_word_swaps_replace_the_one_word_in_order():
    swapped, labels = pretrain_clip.word_swaps(
        ["a photo of a red star on a green background", "a small ring on a red background"],
        ("circle", "star", "ring"))
    assert labels.tolist() == [1, 2]
    assert swapped[:3] == ["a photo of a red circle on a green background",
                           "a photo of a red star on a green background",
                           "a photo of a red ring on a green background"]
    assert swapped[3] == "a small circle on a red background"
    with pytest.raises(ValueError, match="has 0 of the words"):
        pretrain_clip.word_swaps(["a photo of a red square"], ("circle", "star"))


def test_too_few_examples_are_refused_before_any_work(tmp_path):
    # 64 held out + a batch of 32 need 96.
    images = np.zeros((95, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="95 examples are too few: 64 are held out"):
        pretrain_clip.train_clip(images, ["a red star"] * 95, tiny_config(), tmp_path)
    assert not (tmp_path / "tokenizer").exists()


def test_held_out_is_whole_batches_of_64():
    assert pretrain_clip.held_out_count(256) == 64
    assert pretrain_clip.held_out_count(20_000) == 1024
    assert pretrain_clip.held_out_count(3_000) == 256


# ---------------------------------------------------------------------------------------
# Training


def test_training_lowers_the_contrastive_loss(trained):
    examples, _, result = trained
    losses = [loss for _, loss in result.loss_curve]
    assert len(losses) == STEPS  # a progress line every step at 30 steps
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.3, (first, last)
    assert result.final_loss == losses[-1]

    # On the held-out examples (the last 64) too: trained params beat the initial ones.
    assert result.held_out_loss < result.initial_held_out_loss - 0.1, (
        result.initial_held_out_loss, result.held_out_loss)
    assert 0.0 <= result.retrieval_accuracy <= 1.0
    assert 0.0 <= result.shape_accuracy <= 1.0


def test_held_out_loss_is_the_loss_of_the_last_64(trained):
    examples, _, result = trained
    model = CLIPModel(result.config)
    ids = pretrain_clip.caption_ids(result.tokenizer_dir, examples.captions)[-64:]
    pixels = clip_preprocess(jnp.asarray(examples.images[-64:]), 64)
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, pixels)[0])
    initial = logits(pretrain_clip.init_params(result.config, seed=0))  # seed of tiny_config
    assert abs(float(contrastive_loss(initial)) - result.initial_held_out_loss) < 1e-4
    trained_logits = logits(result.params)
    assert abs(float(contrastive_loss(trained_logits)) - result.held_out_loss) < 1e-4
    hits = np.argmax(trained_logits, axis=1) == np.arange(64)
    assert result.retrieval_accuracy == pytest.approx(hits.mean())

    # Shape retrieval: each image against its caption with each world shape in its place.
    variants, labels = pretrain_clip.word_swaps(examples.captions[-64:], tuple(SHAPES))
    variant_ids = pretrain_clip.caption_ids(result.tokenizer_dir, variants)
    variant_logits = jax.jit(lambda p: model.apply({"params": p}, variant_ids, pixels)[0])(
        result.params).reshape(64, 64, len(SHAPES))  # image, caption, shape
    own = variant_logits[np.arange(64), np.arange(64)]
    shape_hits = np.argmax(own, axis=1) == labels
    assert result.shape_accuracy == pytest.approx(np.mean(shape_hits))


def test_configs_agree_with_the_tokenizer(trained):
    _, workdir, result = trained
    assert result.tokenizer_dir.parent == workdir
    tokenizer = load_tokenizer(result.tokenizer_dir)
    text = result.text_config
    assert text.vocab_size == len(tokenizer)
    assert (text.bos_token_id, text.eos_token_id) == (tokenizer.bos_token_id,
                                                      tokenizer.eos_token_id)
    assert text.pad_token_id == tokenizer.pad_token_id
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (32, 128, 2)
    assert text.max_position_embeddings == 77
    assert (result.vision_config.image_size, result.vision_config.patch_size) == (64, 8)
    assert result.config.to_dict()["text_config"]["eos_token_id"] == tokenizer.eos_token_id


def test_returned_towers_run_standalone(trained):
    examples, _, result = trained
    tokenizer = load_tokenizer(result.tokenizer_dir)
    ids = tokenize(tokenizer, examples.captions[:2])
    # jit: one compile is faster than eager op-by-op dispatch on 2 shared cores.
    text = jax.jit(CLIPTextTransformer(result.text_config).apply)(
        {"params": result.text_params}, ids)
    assert text.last_hidden_state.shape == (2, 77, 32)
    assert np.all(np.isfinite(text.last_hidden_state))
    pixels = clip_preprocess(jnp.asarray(examples.images[:2]), 64)
    vision = jax.jit(CLIPVisionTransformer(result.vision_config).apply)(
        {"params": result.vision_params}, pixels)
    assert vision.last_hidden_state.shape == (2, 65, 32)  # CLS + 8x8 patches
    assert np.all(np.isfinite(vision.pooler_output))
    # logit_scale is a trained scalar kept within CLIP's clip range.
    assert result.params["logit_scale"].shape == ()
    assert 0.0 <= float(result.params["logit_scale"]) <= np.log(100.0)
