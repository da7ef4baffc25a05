"""Stage 1 of the toy-world Stable Diffusion: a small CLIP trained contrastively on captioned
toy-world images, with a tokenizer built for the world's words.

As in SD, the U-Net (stage 3) is conditioned on this CLIP's frozen text tower; the vision
tower is ELITE's image encoder. Text tower: causal transformer, quick_gelu, MLP 4x wide,
pooled at the EOS token; vision tower: ViT on the 64x64 images themselves, CLIP-normalized.
Patches of 8 px give an 8x8 grid of patch tokens, which ELITE's local branch masks by the
object.

Contrastive batches of random captions are told apart by their colors alone, so a CLIP
trained on them learns little of shape (held-out shape retrieval 0.35 of 9, chance 0.11) and
its text tower maps circle and hexagon, or star, triangle, diamond and heart, to nearly the
same features: a U-Net conditioned on it cannot draw the shape it is asked for.
`groups_per_batch` > 0 fills each batch with a few (object color, background color) groups,
whose captions differ only past their colors: hard negatives that make shape pay.

Captions are trained at the length of the longest one, not at CLIP's 77: with causal
attention the pooled EOS features never see the padding after them, so the loss and its
gradients are exactly those of 77-token inputs. Positions past the longest caption keep their
initial embeddings, as padding positions of any CLIP trained on short captions do.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spacetime_jax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from spacetime_jax.models import host_init
from spacetime_jax.models.clip import CLIPModel, CLIPModelConfig, contrastive_loss
from spacetime_jax.models.clip_text import CLIPTextConfig
from spacetime_jax.models.clip_vision import CLIPVisionConfig, clip_preprocess
from spacetime_jax.models.tokenizer import (MAX_LENGTH, TokenizerInfo,
                                            build_clip_tokenizer_files, load_tokenizer,
                                            tokenize)
from spacetime_jax.toyworld.captions import world_vocabulary
from spacetime_jax.toyworld.scene import COLORS
from spacetime_jax.toyworld.shapes import SHAPES
from spacetime_jax.toyworld.stage import stage_loop
from spacetime_jax.training.batches import grouped_minibatch_indices, minibatch_indices
from spacetime_jax.training.guard import all_finite, keep_if_finite, reported_loss
from spacetime_jax.training.progress import read_metrics

# NeTI's validation prompts: prompts written for this world should tokenize to whole words.
NETI_VALIDATION_PROMPTS = ("A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                           "A painting of {} in the style of Monet")
BACKGROUND_PROMPTS = tuple(f"{{}} on a {color} background" for color in COLORS)

EVAL_BATCH = 64  # retrieval is scored among the captions of one held-out batch of this size
MAX_HELD_OUT = 1024
MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clips the temperature's inverse at 100
LOG_LINES = 20  # progress lines per run


@dataclasses.dataclass
class ClipStageResult:
    """A trained toy-world CLIP: its config, its params (CLIPModel's tree, numpy float32),
    the tokenizer folder it reads, and how well it learned."""
    config: CLIPModelConfig
    params: dict
    tokenizer_dir: Path
    final_loss: float  # mean training loss over the last progress window
    retrieval_accuracy: float  # held-out image -> caption top-1 within batches of 64
    shape_accuracy: float  # held-out image -> its caption's shape word among the world's
    held_out_loss: float  # contrastive loss on the held-out batches of 64
    initial_held_out_loss: float  # the same, before training
    loss_curve: list[tuple[int, float]]  # (step, mean loss over the window ending there)
    train_seconds: float  # the loop, compilation included

    @property
    def text_config(self) -> CLIPTextConfig:
        return self.config.text

    @property
    def text_params(self) -> dict:
        return self.params["text_model"]

    @property
    def vision_config(self) -> CLIPVisionConfig:
        return self.config.vision

    @property
    def vision_params(self) -> dict:
        return self.params["vision_model"]


# ---------------------------------------------------------------------------------------
# Tokenizer


def world_prompt_words() -> list[str]:
    """Every word of the world's captions, of the prompt templates and of NeTI's validation
    prompts (the `{}` left out), sorted."""
    words = set(world_vocabulary())
    templates = OBJECT_TEMPLATES + STYLE_TEMPLATES + NETI_VALIDATION_PROMPTS + BACKGROUND_PROMPTS
    for template in templates:
        words |= set(template.replace("{}", " ").split())
    return sorted(words)


def build_world_tokenizer(out_dir: str | Path) -> TokenizerInfo:
    """Writes a CLIP tokenizer in which each of `world_prompt_words()` is one token."""
    return build_clip_tokenizer_files(world_prompt_words(), out_dir)


# ---------------------------------------------------------------------------------------
# Model and optimizer


class TrainState(NamedTuple):
    """What a checkpoint holds."""
    params: dict
    opt_state: Any


def clip_model_config(config: ml_collections.ConfigDict, tokens: TokenizerInfo
                      ) -> CLIPModelConfig:
    """The stage's CLIP: transformer widths from `config`, special ids from the tokenizer."""
    text = CLIPTextConfig(
        vocab_size=tokens.vocab_size, hidden_size=config.width,
        intermediate_size=4 * config.width, projection_dim=config.projection_dim,
        num_hidden_layers=config.text_layers, num_attention_heads=config.heads,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        pad_token_id=tokens.pad_token_id, bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
        projection_dim=config.projection_dim, num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads, image_size=config.image_size,
        patch_size=config.patch_size, hidden_act="quick_gelu")
    return CLIPModelConfig(text=text, vision=vision, projection_dim=config.projection_dim)


def init_params(model_config: CLIPModelConfig, seed: int) -> dict:
    """Host-drawn params (jit of linen's init compiles slowly on CPU); logit_scale starts at
    CLIP's log(1 / 0.07)."""
    size = model_config.vision.image_size
    template = host_init.param_template(CLIPModel(model_config), jnp.zeros((1, 1), jnp.int32),
                                        jnp.zeros((1, size, size, 3)))
    params = host_init.host_init(template, seed)
    params["logit_scale"] = np.asarray(model_config.logit_scale_init_value, np.float32)
    return params


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (CLIP's betas and eps) with linear warmup then cosine decay to 0; weight decay
    on matrices only (not on biases, norms, the class embedding or logit_scale)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=config.weight_decay,
                       mask=decay_mask)


def make_train_step(model: CLIPModel, optimizer: optax.GradientTransformation,
                    image_size: int) -> Callable:
    """(state, ids, uint8 images) -> (state, {"loss": loss}); compiled once, the state
    donated."""

    def loss_fn(params, ids, images):
        logits_per_image, _ = model.apply({"params": params}, ids,
                                          clip_preprocess(images, image_size))
        return contrastive_loss(logits_per_image)

    def step(state: TrainState, ids, images):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, ids, images)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        finite = all_finite(loss, grads)
        new_state = keep_if_finite(finite, TrainState(params, opt_state), state)
        return new_state, {"loss": reported_loss(finite, loss)}

    return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------
# Data


def caption_ids(tokenizer_dir: Path, captions: Sequence[str]) -> np.ndarray:
    """(N, L) int32 ids cut to the longest caption (bos ... eos); see the module docstring."""
    ids = tokenize(load_tokenizer(tokenizer_dir), captions)
    eos_id = ids[0, -1]  # padding is eos
    longest = int(np.argmax(ids == eos_id, axis=1).max()) + 1
    return ids[:, :longest]


def color_pair_groups(captions: Sequence[str]) -> np.ndarray:
    """(N,) int labels of each caption's (object color, background color): its first and last
    color words."""
    pairs = []
    for text in captions:
        colors = [word for word in text.split() if word in COLORS]
        if not colors:
            raise ValueError(f"caption names no color: {text!r}")
        pairs.append((colors[0], colors[-1]))
    _, labels = np.unique(np.asarray(pairs), axis=0, return_inverse=True)
    return labels.reshape(-1)


def word_swaps(captions: Sequence[str], words: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Each caption with its one word of `words` replaced by each of `words`, in order, and
    the index of the word it had: (N * len(words) captions, (N,) labels)."""
    swapped, labels = [], []
    for text in captions:
        split = text.split()
        where = [i for i, word in enumerate(split) if word in words]
        if len(where) != 1:
            raise ValueError(f"caption has {len(where)} of the words {list(words)}: {text!r}")
        labels.append(list(words).index(split[where[0]]))
        for word in words:
            swapped.append(" ".join(split[:where[0]] + [word] + split[where[0] + 1:]))
    return swapped, np.asarray(labels)


def held_out_count(n: int) -> int:
    """Examples kept for evaluation: about a tenth, whole batches of 64, at most 1024."""
    return min(MAX_HELD_OUT, EVAL_BATCH * max(1, n // 10 // EVAL_BATCH))


# ---------------------------------------------------------------------------------------
# Evaluation


def make_evaluate(model: CLIPModel, image_size: int) -> Callable:
    """-> evaluate(params, ids, images) -> (image -> caption top-1 accuracy, contrastive loss),
    both averaged over batches of EVAL_BATCH examples (the ragged end left out)."""

    @jax.jit
    def batch_metrics(params, ids, images):
        logits_per_image, _ = model.apply({"params": params}, ids,
                                          clip_preprocess(images, image_size))
        hits = jnp.argmax(logits_per_image, axis=1) == jnp.arange(ids.shape[0])
        return jnp.mean(hits), contrastive_loss(logits_per_image)

    def evaluate(params, ids: np.ndarray, images: np.ndarray) -> tuple[float, float]:
        starts = range(0, len(ids) - EVAL_BATCH + 1, EVAL_BATCH)
        metrics = [batch_metrics(params, ids[i:i + EVAL_BATCH], images[i:i + EVAL_BATCH])
                   for i in starts]
        accuracy, loss = np.mean(jax.device_get(metrics), axis=0)
        return float(accuracy), float(loss)

    return evaluate


def make_word_retrieval(model: CLIPModel, image_size: int) -> Callable:
    """-> retrieval(params, ids (N, K, L), images (N, ...), labels (N,)) -> the fraction of
    images whose own caption scores highest among its K variants (word_swaps): whether the
    towers tell the swapped word apart, everything else in the caption being the same."""

    @jax.jit
    def batch_hits(params, ids, images, labels):
        image = model.apply({"params": params}, clip_preprocess(images, image_size),
                            method=CLIPModel.image_features)
        text = model.apply({"params": params}, ids.reshape(-1, ids.shape[-1]),
                           method=CLIPModel.text_features).reshape(*ids.shape[:2], -1)
        return jnp.sum(jnp.argmax(jnp.einsum("bp,bkp->bk", image, text), -1) == labels)

    def retrieval(params, ids: np.ndarray, images: np.ndarray, labels: np.ndarray) -> float:
        hits = [batch_hits(params, ids[i:i + EVAL_BATCH], images[i:i + EVAL_BATCH],
                           labels[i:i + EVAL_BATCH]) for i in range(0, len(ids), EVAL_BATCH)]
        return float(np.sum(jax.device_get(hits)) / len(ids))

    return retrieval


# ---------------------------------------------------------------------------------------
# The stage


def train_clip(images: np.ndarray, captions: Sequence[str], config: ml_collections.ConfigDict,
               workdir: str | Path, log: Callable[[str], None] = print) -> ClipStageResult:
    """Builds the world tokenizer under workdir/tokenizer, trains CLIP on (images, captions)
    minus a held-out tail, and scores retrieval on that tail. The loop (training/loop.py)
    writes progress lines, workdir/metrics.jsonl and checkpoints in workdir/checkpoints, and
    resumes from the newest.

    images: (N, H, W, 3) uint8; captions: N strings.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    held_out = held_out_count(len(images))
    if len(images) < held_out + config.batch_size:
        raise ValueError(f"{len(images)} examples are too few: {held_out} are held out and a "
                         f"batch takes {config.batch_size}")

    # --- tokenizer and captions, tokenized once
    tokenizer_dir = Path(workdir) / "tokenizer"
    tokens = build_world_tokenizer(tokenizer_dir)
    loop = stage_loop("clip", workdir, config,
                      {"examples": len(images), "vocab_size": tokens.vocab_size}, LOG_LINES, log)
    ids = caption_ids(tokenizer_dir, captions)
    train_ids, train_images = ids[:-held_out], images[:-held_out]
    eval_ids, eval_images = ids[-held_out:], images[-held_out:]
    log(f"clip: {len(train_ids)} training / {held_out} held-out examples, captions of "
        f"{ids.shape[1]} tokens, vocabulary {tokens.vocab_size}")

    # --- model, params, optimizer, compiled step
    model_config = clip_model_config(config, tokens)
    model = CLIPModel(model_config)
    params = jax.device_put(init_params(model_config, config.seed))
    optimizer = make_optimizer(config)
    initial = TrainState(params, optimizer.init(params))
    train_step = make_train_step(model, optimizer, config.image_size)
    evaluate = make_evaluate(model, config.image_size)
    _, initial_loss = evaluate(params, eval_ids, eval_images)

    # --- restore or init, then the loop; a resumed run takes the batches an uninterrupted
    # one takes after its start step
    state, start = loop.restore_or_init(lambda: initial, jax.eval_shape(lambda: initial))
    if config.groups_per_batch:  # hard negatives: captions that differ past their colors
        batches = grouped_minibatch_indices(color_pair_groups(captions[:-held_out]),
                                            config.batch_size, config.groups_per_batch,
                                            config.seed, start)
        log(f"clip: each batch {config.groups_per_batch} (object color, background color) "
            f"groups of {config.batch_size // config.groups_per_batch}")
    else:
        batches = minibatch_indices(len(train_ids), config.batch_size, config.seed, start)

    def step(state: TrainState, _) -> tuple[TrainState, dict]:
        batch = next(batches)
        return train_step(state, train_ids[batch], train_images[batch])

    loop_start = time.perf_counter()
    state = loop.run(state, start, step)
    train_seconds = time.perf_counter() - loop_start
    loss_curve = [(record["step"], record["loss"]) for record in read_metrics(workdir)]

    # --- evaluation
    params = jax.device_get(state.params)
    accuracy, held_out_loss = evaluate(params, eval_ids, eval_images)
    shape_captions, shape_labels = word_swaps(captions[-held_out:], tuple(SHAPES))
    shape_ids = caption_ids(tokenizer_dir, shape_captions).reshape(held_out, len(SHAPES), -1)
    shape_accuracy = make_word_retrieval(model, config.image_size)(params, shape_ids,
                                                                   eval_images, shape_labels)
    log(f"clip: held-out retrieval top-1 (batches of {EVAL_BATCH}) {accuracy:.3f}, its shape "
        f"among the {len(SHAPES)} {shape_accuracy:.3f}, held-out loss {initial_loss:.4f} -> "
        f"{held_out_loss:.4f}, training loss {loss_curve[-1][1]:.4f}, {train_seconds:.0f}s")
    return ClipStageResult(config=model_config, params=params, tokenizer_dir=tokenizer_dir,
                           final_loss=loss_curve[-1][1], retrieval_accuracy=accuracy,
                           shape_accuracy=shape_accuracy,
                           held_out_loss=held_out_loss, initial_held_out_loss=initial_loss,
                           loss_curve=loss_curve, train_seconds=train_seconds)
