"""Classifier-free guidance as one batched model call."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spacetime_jax.diffusion.samplers import DenoiseFn


def guided(denoise_pair_fn: Callable[[jax.Array, jax.Array], jax.Array],
           guidance_scale: float | jax.Array) -> DenoiseFn:
    """A denoise_fn(latents, t) that returns uncond + scale * (cond - uncond).

    `denoise_pair_fn(latents_2b, t)` sees the B latents twice, stacked along the batch; its first
    B output rows are the unconditional predictions and the last B the conditional ones (the
    caller stacks its contexts in the same order).
    """
    def denoise_fn(latents: jax.Array, t: jax.Array) -> jax.Array:
        both = denoise_pair_fn(jnp.concatenate([latents, latents], axis=0), t)
        unconditional, conditional = jnp.split(both, 2, axis=0)
        return unconditional + guidance_scale * (conditional - unconditional)

    return denoise_fn
