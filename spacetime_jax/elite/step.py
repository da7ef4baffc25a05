"""ELITE's two training stages as pure functions: one compiled call per optimizer step.

Global stage: the image's five words replace the placeholder; trainable are the global mapper
and the copies of every cross-attention's to_k/to_v (merged over the frozen U-Net, so the
copies serve every call). Loss = noise MSE + 0.01 x mean |words|.
Local stage: the global mapper and its K/V copies are frozen, only word 0 is injected; the
local mapper's tokens enter through to_k_local/to_v_local gated by word 0's attention map.
Loss = the valid-region-masked noise loss + 1e-4 x the mean over layers of mean |V_local|.
Both clip the gradient at global norm 1 (METHODS.md).

A batch holds `grad_accum` micro-batches on a leading axis: (A, B, ...), B laid out over the
mesh's `data` axis. Noise, timesteps and VAE draws come from fold_in(key(seed), step): a
resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from spacetime_jax.diffusion.schedules import (DDPMSchedule, add_noise, sample_timesteps,
                                               training_target)
from spacetime_jax.elite.conditioning import encode_with_words, local_contexts
from spacetime_jax.elite.encoder import image_features, patch_mask
from spacetime_jax.elite.params import merge_params
from spacetime_jax.models.vae import AutoencoderKL, sample_latents
from spacetime_jax.training.guard import all_finite, keep_if_finite, reported_loss

WORD_WEIGHT = 0.01          # x mean |words|, global stage
LOCAL_VALUE_WEIGHT = 1e-4   # x mean over layers of mean |V_local|, local stage
CLIP_NORM = 1.0
STAGES = ("global", "local")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: Any      # {"mapper": ..., "kv": ...}
    opt_state: Any


@flax.struct.dataclass
class Frozen:
    """The frozen weights, jit arguments (never closed over)."""
    unet: Any
    text: Any
    vision: Any
    vae: Any
    global_mapper: Any = None  # local stage: the trained global mapper's params
    global_kv: Any = None      # local stage: its K/V copies


@dataclasses.dataclass(frozen=True)
class StepStatics:
    """Modules and settings the step closes over (hashable)."""
    stage: str
    unet: Any
    text_encoder: Any
    vision: Any
    vae: Any
    global_mapper: Any
    local_mapper: Optional[Any]
    feature_layers: tuple
    patch_grid: int
    num_layers: int
    prediction_type: str
    scaling_factor: float
    num_train_timesteps: int
    local_scale: float = 1.0
    batch_sharding: Optional[NamedSharding] = None  # (B, ...) over `data`


def make_optimizer(learning_rate: float, t) -> optax.GradientTransformation:
    """AdamW after clipping at global norm 1 (both stages)."""
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM),
                       optax.adamw(learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                                   weight_decay=t.weight_decay))


def _constrain(x: jax.Array, statics: StepStatics) -> jax.Array:
    if statics.batch_sharding is None:
        return x
    spec = P(*statics.batch_sharding.spec, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(statics.batch_sharding.mesh, spec))


def _noisy_latents(frozen: Frozen, schedule: DDPMSchedule, pixels: jax.Array, rng,
                   statics: StepStatics):
    """(noisy latents, timesteps, target) of a micro-batch of images in [-1, 1]."""
    latent_rng, noise_rng, t_rng = jax.random.split(rng, 3)
    mean, logvar = statics.vae.apply({"params": frozen.vae}, pixels,
                                     method=AutoencoderKL.encode)
    latents = _constrain(sample_latents(latent_rng, mean, logvar) * statics.scaling_factor,
                         statics)
    noise = _constrain(jax.random.normal(noise_rng, latents.shape), statics)
    timesteps = _constrain(sample_timesteps(t_rng, latents.shape[0],
                                            statics.num_train_timesteps), statics)
    target = training_target(schedule, latents, noise, timesteps, statics.prediction_type)
    return add_noise(schedule, latents, noise, timesteps), timesteps, target


def global_words(statics: StepStatics, mapper_params, vision_params, clip_pixels) -> jax.Array:
    """(B, W, D) words of CLIP-normalized images at the vision tower's size."""
    features = image_features(statics.vision, vision_params, clip_pixels, statics.feature_layers)
    return statics.global_mapper.apply({"params": mapper_params}, features)


def local_tokens(statics: StepStatics, mapper_params, vision_params, local_pixels,
                 local_mask) -> jax.Array:
    """(B, P, D) local-mapper tokens of masked images; zero outside the object's patches."""
    features = image_features(statics.vision, vision_params, local_pixels,
                              statics.feature_layers)
    return statics.local_mapper.apply({"params": mapper_params}, features,
                                      patch_mask(local_mask, statics.patch_grid))


def local_values(kv: Any, tokens: jax.Array) -> list[jax.Array]:
    """Each layer's V_local = to_v_local(tokens), from the local K/V tree."""
    flat = traverse_util.flatten_dict(kv, sep="/")
    return [tokens @ kernel.astype(tokens.dtype) for path, kernel in sorted(flat.items())
            if path.endswith("to_v_local/kernel")]


def global_loss(params, frozen: Frozen, schedule: DDPMSchedule, batch, rng,
                statics: StepStatics):
    words = global_words(statics, params["mapper"], frozen.vision, batch["clip_pixels"])
    hidden = encode_with_words(statics.text_encoder, frozen.text, batch["input_ids"],
                               batch["placeholder_position"], words)
    noisy, timesteps, target = _noisy_latents(frozen, schedule, batch["pixels"], rng, statics)
    unet_params = merge_params(frozen.unet, params["kv"])
    prediction = statics.unet.apply({"params": unet_params}, noisy, timesteps, hidden)
    mse = jnp.mean((prediction.astype(jnp.float32) - target) ** 2)
    regularizer = WORD_WEIGHT * jnp.mean(jnp.abs(words))
    return mse + regularizer, {"mse": mse, "regularizer": regularizer}


def masked_noise_loss(prediction: jax.Array, target: jax.Array,
                      valid: jax.Array) -> jax.Array:
    """Per sample sum_(c,h,w) m (eps_hat - eps)^2 / sum_(h,w) m, averaged over the batch;
    valid (B, h, w, 1) at latent resolution."""
    squared = (prediction.astype(jnp.float32) - target) ** 2
    per_sample = jnp.sum(valid * squared, axis=(1, 2, 3)) / jnp.sum(valid, axis=(1, 2, 3))
    return jnp.mean(per_sample)


def latent_mask(valid_mask: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    """(B, R, R, 1) 0/1 -> (B, h, w, 1) by nearest neighbour."""
    return jax.image.resize(valid_mask.astype(jnp.float32),
                            latent_shape[:3] + (1,), method="nearest")


def local_loss(params, frozen: Frozen, schedule: DDPMSchedule, batch, rng,
               statics: StepStatics):
    word = global_words(statics, frozen.global_mapper, frozen.vision, batch["clip_pixels"])
    hidden = encode_with_words(statics.text_encoder, frozen.text, batch["input_ids"],
                               batch["placeholder_position"], word[:, :1])
    tokens = local_tokens(statics, params["mapper"], frozen.vision, batch["local_pixels"],
                          batch["local_mask"])
    noisy, timesteps, target = _noisy_latents(frozen, schedule, batch["pixels"], rng, statics)
    scale = jnp.full((noisy.shape[0],), statics.local_scale, jnp.float32)
    contexts = local_contexts(hidden, tokens, batch["placeholder_position"], scale,
                              statics.num_layers)
    unet_params = merge_params(frozen.unet, frozen.global_kv, params["kv"])
    prediction = statics.unet.apply({"params": unet_params}, noisy, timesteps, contexts)
    masked = masked_noise_loss(prediction, target, latent_mask(batch["valid_mask"],
                                                               noisy.shape))
    values = local_values(params["kv"], tokens)
    regularizer = LOCAL_VALUE_WEIGHT * jnp.mean(jnp.stack([jnp.mean(jnp.abs(v))
                                                           for v in values]))
    return masked + regularizer, {"mse": masked, "regularizer": regularizer}


LOSSES = {"global": global_loss, "local": local_loss}


def step_rng(seed: int | jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def loss_and_grads(params, frozen: Frozen, schedule, batch, rng, statics: StepStatics):
    """Mean loss, metrics and gradient over the batch's leading micro-batch axis."""
    grad_fn = jax.value_and_grad(LOSSES[statics.stage], has_aux=True)
    micro_batches = jax.tree.leaves(batch)[0].shape[0]

    def accumulate(carry, micro):
        index, micro_batch = micro
        (loss, metrics), grads = grad_fn(params, frozen, schedule, micro_batch,
                                         jax.random.fold_in(rng, index), statics)
        total = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return total, None

    zeros = (jnp.float32(0.0), {"mse": jnp.float32(0.0), "regularizer": jnp.float32(0.0)},
             jax.tree.map(jnp.zeros_like, params))
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros,
                                             (jnp.arange(micro_batches), batch))
    scale = 1.0 / micro_batches
    return jax.tree.map(lambda x: x * scale, (loss, metrics, grads))


def train_step(state: TrainState, batch, frozen: Frozen, schedule: DDPMSchedule, seed, *,
               optimizer: optax.GradientTransformation, statics: StepStatics):
    """One optimizer step; returns the new state and metrics (loss, mse, regularizer,
    grad_norm before clipping). A non-finite loss or gradient leaves the params and optimizer
    state as they were and reports the loss as NaN (training/guard.py)."""
    loss, metrics, grads = loss_and_grads(state.params, frozen, schedule, batch,
                                          step_rng(seed, state.step), statics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = all_finite(loss, grads)
    params, opt_state = keep_if_finite(finite, (params, opt_state),
                                       (state.params, state.opt_state))
    metrics = dict(metrics, loss=reported_loss(finite, loss), grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def evaluation_loss(params, batch, frozen: Frozen, schedule: DDPMSchedule, seed,
                    statics: StepStatics) -> dict:
    """The stage's loss terms on a fixed batch with fixed draws (noise, timesteps): the same
    draws for any params, so they measure progress on held-out examples."""
    loss_fn = LOSSES[statics.stage]
    rng = jax.random.key(seed)

    def one(micro):
        index, micro_batch = micro
        loss, metrics = loss_fn(params, frozen, schedule, micro_batch,
                                jax.random.fold_in(rng, index), statics)
        return dict(metrics, loss=loss)

    micro_batches = jax.tree.leaves(batch)[0].shape[0]
    per_micro = jax.lax.map(one, (jnp.arange(micro_batches), batch))
    return jax.tree.map(jnp.mean, per_micro)
