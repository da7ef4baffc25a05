"""The NeTI training step: pure functions, one compiled call per optimizer step.

Every concept-indexed array carries a leading concept axis K (K = 1 for a single concept: the
same code path). The per-concept loss is vmapped over K with `spmd_axis_name="concept"`, so on
a mesh the K concepts spread over the `concept` axis and each concept's batch over `data`. K
may include padding rows (K rounded up to a multiple of the mesh's concept axis): `real` marks
them, and they neither learn nor report a loss. With `concept_passes` P > 1 the gradients of
the K concepts are computed in P passes of K / P (a `lax.map` over vmapped groups): the same
result, a P times smaller working set. Gradient accumulation is a `lax.scan` over
micro-batches inside the step. Everything random in a step (images, flips, prompts, latents,
noise, timesteps, nested dropout) comes from fold_in(key(concept seed), step): a concept's run
does not depend on its batch-mates, and a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from spacetime_jax.data.latents import LatentMoments, sample_latents
from spacetime_jax.diffusion.schedules import (DDPMSchedule, add_noise, sample_timesteps,
                                               training_target)
from spacetime_jax.neti.sample import concept_contexts
from spacetime_jax.training.guard import all_finite, reported_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # () int32: optimizer steps taken
    params: Any          # mapper params, leading axis K
    opt_state: Any       # optimizer state, leading axis K


@flax.struct.dataclass
class ConceptData:
    """What a step draws a concept's examples from; leading axis K on every field."""
    moments: LatentMoments    # (K, R, h, w, c): each image and its flip, padded to R rows
    num_rows: jax.Array       # (K,) valid rows of `moments`
    prompt_ids: jax.Array     # (K, P, 77) the templates with the placeholder, tokenized
    positions: jax.Array      # (K, P) the placeholder's position in each template
    target_norms: jax.Array   # (K,)
    seeds: jax.Array          # (K,) uint32 per-concept seed
    encoding: Any             # the mappers' fixed variables (Fourier W), leading axis K
    real: Any = None          # (K,) bool, False on padding rows; None: every row is real


class MicroBatch(NamedTuple):
    """What one concept's micro-batch draws: B examples, each row its own (example, noise,
    timestep, prompt); laid out over `data` inside the step."""
    latents: jax.Array    # (B, h, w, c) scaled latents of the drawn images (or their flips)
    noise: jax.Array      # (B, h, w, c)
    timesteps: jax.Array  # (B,)
    prompts: jax.Array    # (B,) template index


@dataclasses.dataclass(frozen=True)
class StepStatics:
    """Everything static the step closes over: modules, shapes and settings (hashable)."""
    unet: Any
    text_encoder: Any
    mapper: Any
    mapper_config: Any
    prediction_type: str
    scaling_factor: float
    batch_size: int          # one concept's micro-batch over all its `data` replicas
    grad_accum: int
    num_train_timesteps: int
    batch_sharding: Optional[NamedSharding] = None  # (B, ...) over `data`, inside the vmap
    concept_passes: int = 1  # gradients of K / concept_passes concepts at a time


def _constrain_batch(x: jax.Array, statics: StepStatics) -> jax.Array:
    if statics.batch_sharding is None:
        return x
    spec = P(*statics.batch_sharding.spec, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(statics.batch_sharding.mesh, spec))


def _concept_axis(statics: StepStatics) -> Optional[str]:
    """The mesh axis a vmap over concepts maps to (its sharding constraints gain it)."""
    return "concept" if statics.batch_sharding is not None else None


def _micro_batch_keys(rng) -> jax.Array:
    """(rows, prompts, latents, noise, timesteps, nested dropout) keys of one micro-batch."""
    return jax.random.split(rng, 6)


def draw_micro_batch(data: ConceptData, rng, statics: StepStatics) -> MicroBatch:
    """One concept's micro-batch from `rng` (its own (K,)-less slice of `data`)."""
    rows_rng, prompt_rng, latent_rng, noise_rng, t_rng, _ = _micro_batch_keys(rng)
    batch = statics.batch_size
    rows = jax.random.randint(rows_rng, (batch,), 0, data.num_rows)
    prompts = jax.random.randint(prompt_rng, (batch,), 0, data.prompt_ids.shape[0])
    latents = _constrain_batch(
        sample_latents(latent_rng, data.moments, rows, statics.scaling_factor), statics)
    noise = _constrain_batch(jax.random.normal(noise_rng, latents.shape), statics)
    timesteps = _constrain_batch(
        sample_timesteps(t_rng, batch, statics.num_train_timesteps), statics)
    return MicroBatch(latents, noise, timesteps, _constrain_batch(prompts, statics))


def draw_batches(data: ConceptData, rngs: jax.Array, statics: StepStatics) -> MicroBatch:
    """Every concept's micro-batch, (K, B, ...): the layout the step trains on."""
    return jax.vmap(draw_micro_batch, in_axes=(0, 0, None),
                    spmd_axis_name=_concept_axis(statics))(data, rngs, statics)


def micro_batch_loss(params, frozen, schedule: DDPMSchedule, data: ConceptData, rng,
                     statics: StepStatics, train: bool = True) -> jax.Array:
    """Noise-prediction MSE of one concept on one micro-batch drawn from `rng` (with nested
    dropout when `train`)."""
    unet_params, text_params = frozen
    latents, noise, timesteps, prompts = draw_micro_batch(data, rng, statics)
    dropout_rng = _micro_batch_keys(rng)[5]
    noisy = add_noise(schedule, latents, noise, timesteps)
    variables = {"params": params, **data.encoding}
    contexts = concept_contexts(
        statics.text_encoder, text_params, statics.mapper, variables, statics.mapper_config,
        data.prompt_ids[prompts], data.positions[prompts], timesteps, data.target_norms,
        dropout_rng=dropout_rng if train else None)
    prediction = statics.unet.apply({"params": unet_params}, noisy, timesteps, contexts)
    target = training_target(schedule, latents, noise, timesteps, statics.prediction_type)
    return jnp.mean((prediction.astype(jnp.float32) - target) ** 2)


def concept_grads(params, frozen, schedule, data: ConceptData, step_rng, statics: StepStatics):
    """Mean loss and gradient over `grad_accum` micro-batches of one concept."""
    grad_fn = jax.value_and_grad(micro_batch_loss)

    def accumulate(carry, micro):
        loss, grads = grad_fn(params, frozen, schedule, data, jax.random.fold_in(step_rng, micro),
                              statics)
        total_loss, total_grads = carry
        return (total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0.0), zeros),
                                    jnp.arange(statics.grad_accum))
    scale = 1.0 / statics.grad_accum
    return loss * scale, jax.tree.map(lambda g: g * scale, grads)


def all_concept_grads(params, frozen, schedule, data: ConceptData, rngs: jax.Array,
                      statics: StepStatics):
    """(K,) losses and gradients of every concept, in `statics.concept_passes` passes.

    Pass p takes concepts p, P + p, 2P + p, ...: on a mesh whose `concept` axis splits K in
    contiguous blocks, every device then has K / (P x devices) concepts in each pass. Why
    passes: on a CPU the step's working set grows with K until it no longer fits the caches,
    and K = 8 at once ran slower per concept than K = 1 (benchmarks/batch_concepts.py)."""
    per_concept = jax.vmap(concept_grads, in_axes=(0, None, None, 0, 0, None),
                           spmd_axis_name=_concept_axis(statics))
    passes = statics.concept_passes
    if passes == 1:
        return per_concept(params, frozen, schedule, data, rngs, statics)
    count = rngs.shape[0]
    if count % passes:
        raise ValueError(f"{count} concept rows do not split into {passes} passes")

    def constrain(x, spec):
        if statics.batch_sharding is None:
            return x
        spec = P(*spec, *([None] * (x.ndim - len(spec))))
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(statics.batch_sharding.mesh, spec))

    def to_passes(x):  # (K, ...) -> (P, K / P, ...), row k = g * P + p at [p, g]
        x = jnp.swapaxes(x.reshape(count // passes, passes, *x.shape[1:]), 0, 1)
        return constrain(x, (None, "concept"))

    def from_passes(x):
        return constrain(jnp.swapaxes(x, 0, 1).reshape(count, *x.shape[2:]), ("concept",))

    def one_pass(group):
        group_params, group_data, group_rngs = group
        return per_concept(group_params, frozen, schedule, group_data, group_rngs, statics)

    grouped = jax.lax.map(one_pass, jax.tree.map(to_passes, (params, data, rngs)))
    return jax.tree.map(from_passes, grouped)


def step_rngs(seeds: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)


def keep_real_rows(real: Optional[jax.Array], new: Any, old: Any) -> Any:
    """`new` on rows where `real` (K,) is True, `old` elsewhere (leading axis K on every
    leaf): padding rows, and concepts whose step was not finite."""
    if real is None:
        return new
    def select(new_leaf, old_leaf):
        mask = real.reshape(real.shape + (1,) * (new_leaf.ndim - 1))
        return jnp.where(mask, new_leaf, old_leaf)
    return jax.tree.map(select, new, old)


def train_step(state: TrainState, data: ConceptData, frozen, schedule: DDPMSchedule, *,
               optimizer: optax.GradientTransformation,
               statics: StepStatics) -> tuple[TrainState, jax.Array]:
    """One optimizer step for all K concepts; returns the new state and the (K,) losses
    (0 on padding rows, whose params and optimizer state stay as they were). A concept whose
    loss or gradient is not finite keeps its params and optimizer state and reports NaN
    (training/guard.py); the others step on."""
    rngs = step_rngs(data.seeds, state.step)
    losses, grads = all_concept_grads(state.params, frozen, schedule, data, rngs, statics)
    updates, opt_state = jax.vmap(optimizer.update)(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jax.vmap(all_finite)(losses, grads)
    stepping = finite if data.real is None else finite & data.real
    params, opt_state = keep_real_rows(stepping, (params, opt_state),
                                       (state.params, state.opt_state))
    losses = keep_real_rows(data.real, reported_loss(finite, losses), jnp.zeros_like(losses))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), losses


def evaluation_loss(params, data: ConceptData, frozen, schedule: DDPMSchedule,
                    eval_seeds: jax.Array, statics: StepStatics) -> jax.Array:
    """(K,) loss on fixed draws (examples, noise, timesteps) from `eval_seeds`, without
    nested dropout: the same draws for any params, so it measures progress on held-out
    (noise, timestep) pairs."""
    def one(params_k, data_k, seed):
        rngs = jax.random.split(jax.random.key(seed), statics.grad_accum)
        return jax.vmap(lambda r: micro_batch_loss(params_k, frozen, schedule, data_k, r, statics,
                                                   train=False))(rngs).mean()
    losses = jax.vmap(one, spmd_axis_name=_concept_axis(statics))(params, data, eval_seeds)
    return keep_real_rows(data.real, losses, jnp.zeros_like(losses))
