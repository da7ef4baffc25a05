"""Sampling with a NeTI concept: mapper outputs from each sampling step's actual timestep.

At every step the mapper runs at (t, l) for all layers, the batched conditioning builds the
16 key/value contexts of the conditional rows, and the unconditional rows use the plain
empty-prompt context in every layer; one U-Net call does both halves (guidance).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.diffusion import guided, sample
from spacetime_jax.errors import UserError
from spacetime_jax.models.attention import LayerContexts
from spacetime_jax.neti.concept import PreparedText
from spacetime_jax.models.tokenizer import check_prompt_length, find_token_positions, tokenize
from spacetime_jax.neti.conditioning import layer_major_rows, neti_contexts
from spacetime_jax.neti.mapper import split_output
from spacetime_jax.pipelines.text_to_image import initial_noise, latent_shape, to_uint8


def format_prompts(prompts: Sequence[str], placeholder: str) -> list[str]:
    """"A photo of a {}" -> "A photo of a <cat>"; a prompt without "{}" is an error."""
    out = []
    for prompt in prompts:
        if prompt.count("{}") != 1:
            raise UserError(f"prompt {prompt!r} must hold the concept's slot '{{}}' exactly once")
        # Not str.format: any other braces in the prompt ("{style}") are text, not fields.
        out.append(prompt.replace("{}", placeholder))
    return out


def mapper_embeddings(mapper, variables, mapper_config, timesteps, target_norm, *,
                      truncation=None, dropout_rng=None):
    """Token and bypass halves for all (layer, sample) rows at the samples' timesteps."""
    rows_t, rows_l = layer_major_rows(timesteps, mapper_config.num_layers)
    out = mapper.apply(variables, rows_t, rows_l, target_norm, truncation=truncation,
                       dropout_rng=dropout_rng)
    if out.shape[-1] == mapper_config.output_dim:
        return split_output(out, mapper_config)
    return out, None  # the textual-inversion baseline: token half only


def concept_contexts(text_encoder, text_params, mapper, variables, mapper_config, input_ids,
                     positions, timesteps, target_norm, *, truncation=None,
                     dropout_rng=None) -> LayerContexts:
    tokens, bypass = mapper_embeddings(mapper, variables, mapper_config, timesteps, target_norm,
                                       truncation=truncation, dropout_rng=dropout_rng)
    return neti_contexts(text_encoder, text_params, input_ids, positions, tokens, bypass,
                         mapper_config.num_layers)


@functools.partial(jax.jit, static_argnames=("static", "num_steps", "method"))
def _generate(frozen, variables, input_ids, positions, empty_ids, noise, target_norm,
              guidance_scale, truncation, *, static, num_steps, method):
    unet, vae, text_encoder, mapper, mapper_config, scheduler_config, scaling = static
    unet_params, vae_params, text_params = frozen
    batch = input_ids.shape[0]
    layers = mapper_config.num_layers
    empty = text_encoder.apply({"params": text_params}, empty_ids).last_hidden_state
    empty = jnp.broadcast_to(empty[None], (layers,) + empty.shape)

    def denoise_pair(latents, t):
        cond = concept_contexts(text_encoder, text_params, mapper, variables, mapper_config,
                                input_ids, positions, jnp.full((batch,), t), target_norm,
                                truncation=truncation)
        contexts = LayerContexts(keys=jnp.concatenate([empty, cond.keys], axis=1),
                                 values=jnp.concatenate([empty, cond.values], axis=1))
        return unet.apply({"params": unet_params}, latents, jnp.full((latents.shape[0],), t),
                          contexts)

    latents = sample(guided(denoise_pair, guidance_scale), noise, scheduler_config, num_steps,
                     method)
    return vae.apply({"params": vae_params}, latents / scaling, method=type(vae).decode)


def generate(sd, text: PreparedText, concept, placeholder_id: int, target_norm: float,
             prompts: Sequence[str], seeds: Sequence[int], *, truncation: Optional[int] = None,
             num_steps: int = 50, guidance_scale: float = 7.5, method: str = "dpmpp_2m",
             variables: Any = None) -> np.ndarray:
    """Images (len(prompts), H, W, 3) uint8 of `concept`; prompts hold its placeholder text.

    `text` knows the placeholder (concept.prepare_text_encoder); `variables` overrides the
    concept's own (validation during training).
    """
    tokenizer = text.tokenizer
    if truncation is not None and not 0 <= truncation <= concept.mapper_config.hidden_width:
        raise UserError(f"truncation index {truncation} is outside "
                        f"0..{concept.mapper_config.hidden_width}")
    for prompt in prompts:
        check_prompt_length(tokenizer, prompt)
    input_ids = tokenize(tokenizer, list(prompts))
    positions = find_token_positions(input_ids, placeholder_id, list(prompts))
    empty_ids = tokenize(tokenizer, [""] * len(prompts))
    resolution = sd.unet.config.sample_size * sd.vae_config.downsample_factor
    noise = initial_noise(seeds, latent_shape(sd, resolution))
    static = (sd.unet, sd.vae, text.text_encoder, concept.mapper, concept.mapper_config,
              sd.scheduler_config, sd.vae_config.scaling_factor)
    images = _generate((sd.unet_params, sd.vae_params, text.text_params),
                       variables if variables is not None else concept.variables,
                       jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(empty_ids),
                       noise, jnp.float32(target_norm), jnp.float32(guidance_scale),
                       # hidden_width keeps every dimension: one compiled sampler serves all.
                       jnp.int32(concept.mapper_config.hidden_width if truncation is None
                                 else truncation),
                       static=static, num_steps=num_steps, method=method)
    return to_uint8(images)
