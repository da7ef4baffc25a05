"""Sampling with ELITE: an image's words (and local tokens) from one encoder pass, then the
frozen Stable Diffusion with the trained K/V copies in every cross-attention call.

Classifier-free guidance is one batched U-Net call: the unconditional rows see the empty
prompt (through the same K/V copies, as in the reference) and get no local term (lambda 0);
the conditional rows get lambda x the local term gated by word 0's attention map.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.diffusion import guided, sample
from spacetime_jax.elite.conditioning import (EliteText, encode_with_words, local_contexts,
                                              prepare_text, word_selection)
from spacetime_jax.elite.encoder import GlobalMapper, LocalMapper, image_features, patch_mask
from spacetime_jax.elite.params import merge_params
from spacetime_jax.elite.encoder import encoder_config_for
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_clip_vision, load_stable_diffusion
from spacetime_jax.pipelines.sample_job import compute_dtype
from spacetime_jax.models.clip_vision import clip_preprocess
from spacetime_jax.models.tokenizer import tokenize, warn_unknown_words
from spacetime_jax.paths import as_path
from spacetime_jax.pipelines.text_to_image import initial_noise, latent_shape, to_uint8


@flax.struct.dataclass
class EncoderParams:
    """What a trained (or imported) ELITE encoder holds."""
    global_mapper: Any
    global_kv: Any
    local_mapper: Any = None
    local_kv: Any = None

    @property
    def has_local(self) -> bool:
        return self.local_mapper is not None


@dataclasses.dataclass
class EliteModel:
    """The frozen parts: Stable Diffusion (its U-Net built with the local branch), the CLIP
    vision tower, the text side that knows the placeholder, and the encoder's modules."""
    sd: Any
    vision: Any
    vision_params: Any
    text: EliteText
    encoder_config: Any

    @functools.cached_property
    def global_mapper(self):
        return GlobalMapper(self.encoder_config)

    @functools.cached_property
    def local_mapper(self):
        return LocalMapper(self.encoder_config)

    @property
    def clip_size(self) -> int:
        return self.vision.config.image_size

    @property
    def patch_grid(self) -> int:
        return self.vision.config.image_size // self.vision.config.patch_size


def check_lambda(scale: Optional[float]) -> None:
    if scale is not None and not (np.isfinite(scale) and scale >= 0):
        raise UserError(f"lambda {scale} must be a number >= 0 (0.6..0.8 are the method's "
                        "inference values; 0 turns the local branch off)")


def clip_inputs(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[jax.Array, jax.Array,
                                                                             jax.Array]:
    """(global input, local input = image x mask, mask) at the vision tower's size; images
    uint8 (N, H, W, 3), masks (N, H, W, 1) in {0, 1}."""
    masks = jnp.asarray(masks, jnp.float32)
    resized_mask = jax.image.resize(masks, masks.shape[:1] + (size, size, 1), method="nearest")
    images = jnp.asarray(images, jnp.float32) / 255.0
    # The object on black, as the local mapper was trained (crop x mask, then normalized).
    return (clip_preprocess(images, size), clip_preprocess(images * masks, size),
            resized_mask)


@functools.partial(jax.jit, static_argnames=("static",))
def _encode(encoder_params: EncoderParams, vision_params, global_pixels, local_pixels, masks,
            *, static):
    vision, global_mapper, local_mapper, layers, grid, with_local = static
    words = global_mapper.apply({"params": encoder_params.global_mapper},
                                image_features(vision, vision_params, global_pixels, layers))
    if not with_local:
        return words, None
    tokens = local_mapper.apply({"params": encoder_params.local_mapper},
                                image_features(vision, vision_params, local_pixels, layers),
                                patch_mask(masks, grid))
    return words, tokens


def encode_images(model: EliteModel, params: EncoderParams, images: np.ndarray,
                  masks: np.ndarray) -> tuple[jax.Array, Optional[jax.Array]]:
    """One encoder pass: (N, W, D) words and, with a local mapper, (N, P, D) local tokens."""
    global_pixels, local_pixels, resized = clip_inputs(images, masks, model.clip_size)
    static = (model.vision, model.global_mapper, model.local_mapper,
              tuple(model.encoder_config.feature_layers), model.patch_grid, params.has_local)
    return _encode(params, model.vision_params, global_pixels, local_pixels, resized,
                   static=static)


@functools.partial(jax.jit, static_argnames=("static", "num_steps", "method"))
def _generate(frozen, input_ids, positions, empty_ids, words, tokens, noise, guidance_scale,
              local_scale, *, static, num_steps, method):
    unet, vae, text_encoder, scheduler_config, scaling, num_layers = static
    unet_params, vae_params, text_params = frozen
    batch = input_ids.shape[0]
    cond = encode_with_words(text_encoder, text_params, input_ids, positions, words)
    empty = text_encoder.apply({"params": text_params}, empty_ids).last_hidden_state
    hidden = jnp.concatenate([empty, cond], axis=0)
    if tokens is None:
        context = hidden
    else:
        scale = jnp.concatenate([jnp.zeros((batch,)), jnp.full((batch,), local_scale)])
        context = local_contexts(hidden, jnp.concatenate([tokens, tokens], axis=0),
                                 jnp.concatenate([positions, positions]), scale, num_layers)

    def denoise_pair(latents, t):
        return unet.apply({"params": unet_params}, latents, jnp.full((latents.shape[0],), t),
                          context)

    latents = sample(guided(denoise_pair, guidance_scale), noise, scheduler_config, num_steps,
                     method)
    return vae.apply({"params": vae_params}, latents / scaling, method=type(vae).decode)


def generate(model: EliteModel, params: EncoderParams, images: np.ndarray, masks: np.ndarray,
             prompts: Sequence[str], seeds: Sequence[int], *, local_scale: Optional[float] = 0.6,
             token_index: Optional[int] = 0, num_steps: int = 100, guidance_scale: float = 5.0,
             method: str = "lms", words=None, tokens=None) -> np.ndarray:
    """Images (N, H, W, 3) uint8: row i personalizes images[i] (mask masks[i]) in prompts[i]
    (which holds the placeholder) from seeds[i].

    local_scale: lambda of the local branch, None for the global words alone (also when the
    encoder has no local mapper). token_index: 0 injects the primary word only, None all words.
    words/tokens: an earlier encode_images result for these rows (skips the encoder pass).
    """
    check_lambda(local_scale)
    if not len(prompts) == len(seeds) == len(images) == len(masks):
        raise ValueError("images, masks, prompts and seeds must have one entry per row")
    use_local = params.has_local and local_scale is not None
    if words is None:
        words, tokens = encode_images(model, params, images, masks)
    input_ids, positions = model.text.encode_prompts(prompts)
    empty_ids = tokenize(model.text.tokenizer, [""] * len(prompts))
    sd = model.sd
    resolution = sd.unet.config.sample_size * sd.vae_config.downsample_factor
    noise = initial_noise(seeds, latent_shape(sd, resolution))
    trees = [params.global_kv] + ([params.local_kv] if use_local else [])
    unet_params = merge_params(sd.unet_params, *trees)
    static = (sd.unet, sd.vae, model.text.text_encoder, sd.scheduler_config,
              sd.vae_config.scaling_factor, sd.num_cross_attention_layers)
    images_out = _generate((unet_params, sd.vae_params, model.text.text_params),
                           jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(empty_ids),
                           word_selection(words, token_index),
                           tokens if use_local else None, noise, jnp.float32(guidance_scale),
                           jnp.float32(local_scale or 0.0), static=static, num_steps=num_steps,
                           method=method)
    return to_uint8(images_out)


def image_encoder_path(config) -> str:
    if config.image_encoder:
        return resolve_builtin(config.image_encoder)
    folder = as_path(resolve_builtin(config.model)) / "image_encoder"
    if not folder.is_dir():
        raise UserError(f"image_encoder is empty and {config.model} has no image_encoder/ "
                        "folder: set --config.image_encoder to a CLIP vision model (e.g. "
                        "openai/clip-vit-large-patch14)")
    return str(folder)


def load_model(config, local_branch: bool = True) -> EliteModel:
    """Stable Diffusion (its U-Net with the local branch; config.model at the optional
    config.model_revision), CLIP vision, the placeholder. A training config's validation
    prompts are checked against the model's words here, where its run loads the model."""
    dtype = compute_dtype(config.compute_dtype)
    sd = load_stable_diffusion(resolve_builtin(config.model), dtype, local_branch=local_branch,
                               revision=config.get("model_revision", ""),
                               attention=config.get("attention", "auto"))
    if config.get("validation") and config.validation.every:
        warn_unknown_words(sd.tokenizer, config.validation.prompts, "validation.prompts",
                           config.model)
    vision, vision_params = load_clip_vision(image_encoder_path(config), dtype)
    text = prepare_text(sd.text_encoder, sd.tokenizer, sd.text_params, config.placeholder)
    encoder_config = encoder_config_for(vision.config, sd.text_encoder.config.hidden_size,
                                        tuple(config.encoder.feature_layers),
                                        config.encoder.hidden_width)
    return EliteModel(sd=sd, vision=vision, vision_params=vision_params, text=text,
                      encoder_config=encoder_config)
