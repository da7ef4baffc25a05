"""Text-to-image sampling with a plain (unpersonalized) Stable Diffusion.

One jitted function per (batch, steps, sampler): text encoding, the whole sampling loop under
`lax.scan` with classifier-free guidance as one batched U-Net call, and VAE decoding. Weights
are jit arguments, never closed over.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.diffusion import guided, sample
from spacetime_jax.models.pretrained import StableDiffusion
from spacetime_jax.models.tokenizer import check_prompt_length, tokenize


def initial_noise(seeds: Sequence[int], latent_shape: tuple[int, int, int]) -> jax.Array:
    """One standard-normal latent per seed; the same seed gives the same image in any batch."""
    return jnp.stack([jax.random.normal(jax.random.key(int(s)), latent_shape) for s in seeds])


def latent_shape(sd: StableDiffusion, resolution: int) -> tuple[int, int, int]:
    factor = sd.vae_config.downsample_factor
    if resolution % (factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)):
        raise ValueError(f"resolution {resolution} must be a multiple of "
                         f"{factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)}")
    side = resolution // factor
    return (side, side, sd.unet.config.in_channels)


def to_uint8(images: jax.Array) -> np.ndarray:
    """VAE output in [-1, 1] -> uint8 HWC."""
    return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("sd_static", "num_steps", "method"))
def _generate(params, prompt_ids, empty_ids, noise, guidance_scale, *, sd_static, num_steps,
              method):
    unet, vae, text_encoder, scheduler_config, scaling = sd_static
    unet_params, vae_params, text_params = params
    cond = text_encoder.apply({"params": text_params}, prompt_ids).last_hidden_state
    uncond = text_encoder.apply({"params": text_params}, empty_ids).last_hidden_state
    contexts = jnp.concatenate([uncond, cond], axis=0)

    def denoise_pair(latents, t):
        return unet.apply({"params": unet_params}, latents, jnp.full((latents.shape[0],), t),
                          contexts)

    latents = sample(guided(denoise_pair, guidance_scale), noise, scheduler_config, num_steps,
                     method)
    return vae.apply({"params": vae_params}, latents / scaling, method=type(vae).decode)


def text_to_image(sd: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], *,
                  num_steps: int = 50, guidance_scale: float = 7.5, method: str = "dpmpp_2m",
                  resolution: int | None = None) -> np.ndarray:
    """Images (len(prompts), H, W, 3) uint8; prompt i is sampled from seed i."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    for prompt in prompts:
        check_prompt_length(sd.tokenizer, prompt)
    resolution = resolution or sd.unet.config.sample_size * sd.vae_config.downsample_factor
    noise = initial_noise(seeds, latent_shape(sd, resolution))
    prompt_ids = jnp.asarray(tokenize(sd.tokenizer, list(prompts)))
    empty_ids = jnp.asarray(tokenize(sd.tokenizer, [""] * len(prompts)))
    static = (sd.unet, sd.vae, sd.text_encoder, sd.scheduler_config, sd.vae_config.scaling_factor)
    images = _generate((sd.unet_params, sd.vae_params, sd.text_params), prompt_ids, empty_ids,
                       noise, jnp.float32(guidance_scale), sd_static=static,
                       num_steps=num_steps, method=method)
    return to_uint8(images)
