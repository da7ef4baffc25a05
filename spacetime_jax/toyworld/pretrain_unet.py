"""Stage 3 of the toy-world Stable Diffusion: the U-Net, trained as SD 1.x was.

SD 1.x's topology at toy widths (4 down blocks, 3 with cross-attention, a mid block, 3
cross-attention up blocks: 16 cross-attention layers), DDPM training with SD's schedule
(scaled-linear betas, 1000 steps) and epsilon prediction (or, with `prediction_type`
v_prediction, SD 2's velocity target; the exported scheduler says which). Latents are drawn
from the cached VAE posterior moments at every step (mean + std * noise), times the scaling
factor. The text
context comes from the frozen CLIP text tower, computed once for every caption before
training; with probability `caption_dropout` a row's context is replaced by the empty
prompt's, which is what classifier-free guidance needs. AdamW with warmup, gradient clipping
at norm 1, and an exponential moving average of the params (with diffusers' EMA warmup,
decay min(ema_decay, (1 + step) / (10 + step))): the EMA is what gets exported. With
`snr_gamma` > 0 the per-example losses are min-SNR weighted (diffusion/schedules.py): at the
toy model's budget the weighting spends the updates on the noisy steps that lay out the shape;
the held-out loss stays unweighted, comparable between runs. With `noise_offset` > 0 the
training noise gets a per-example, per-channel offset (offset_noise), so that the text, not the
leak of SD's schedule, sets each image's mean colour; the held-out loss keeps plain noise.
With `timestep_logit_std` > 0 the training timesteps are logit-normal instead of uniform
(sample_timesteps); the held-out set keeps uniform ones.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spacetime_jax.diffusion.schedules import (DDPMSchedule, SchedulerConfig, add_noise,
                                               ddpm_schedule, min_snr_weights, sample_timesteps,
                                               training_target)
from spacetime_jax.models.host_init import host_init, param_template
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from spacetime_jax.models.vae import sample_latents
from spacetime_jax.toyworld.stage import stage_loop
from spacetime_jax.training.batches import minibatch_indices
from spacetime_jax.training.guard import all_finite, keep_if_finite, reported_loss
from spacetime_jax.training.progress import read_metrics

MAX_HELD_OUT = 256  # examples kept out of training (at most an eighth): a fixed noise loss
LOG_LINES = 40


class LatentTrainingSet(NamedTuple):
    """What the U-Net trains on, all computed once before training."""
    latent_means: np.ndarray  # (N, h, w, 4) float32, unscaled VAE posterior means
    latent_logvars: np.ndarray  # (N, h, w, 4) float32
    context_index: np.ndarray  # (N,) int32: row of `contexts` for each example's caption
    contexts: np.ndarray  # (U, 77, D) float16 or float32: frozen text-tower output per caption
    empty_context: np.ndarray  # (77, D): the empty prompt's context (caption dropout)

    def take(self, rows: np.ndarray) -> "LatentTrainingSet":
        return self._replace(latent_means=self.latent_means[rows],
                             latent_logvars=self.latent_logvars[rows],
                             context_index=self.context_index[rows])


class UNetStageResult(NamedTuple):
    config: UNetConfig
    params: Any  # the EMA params, numpy float32 tree
    final_loss: float  # mean training loss over the last progress window
    heldout_loss_before: float  # noise loss of the held-out set at init
    heldout_loss_after: float  # the same with the EMA params after training
    train_seconds: float  # the loop, compilation included


class HeldOutSet(NamedTuple):
    """Fixed draws for a noise loss that is comparable between params."""
    latents: np.ndarray  # scaled latents
    noise: np.ndarray
    timesteps: np.ndarray
    contexts: np.ndarray


class TrainState(NamedTuple):
    """What a checkpoint holds."""
    step: jax.Array  # () int32: steps taken, folded into each step's key
    params: Any
    opt_state: Any
    ema_params: Any


def unet_config(config: ml_collections.ConfigDict, latent_side: int,
                cross_attention_dim: int) -> UNetConfig:
    """SD 1.x's U-Net layout (cross-attention in all blocks but the lowest)."""
    blocks = len(config.block_out_channels)
    return UNetConfig(
        sample_size=latent_side,
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_heads)


def init_params(model: UNet2DConditionModel, seed: int) -> dict:
    """Host-drawn params (jit of linen's init of a U-Net compiles for minutes on CPU)."""
    c = model.config
    return host_init(param_template(
        model, jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1, 1, c.cross_attention_dim))), seed)


def noise_loss(model: UNet2DConditionModel, params: Any, schedule: DDPMSchedule,
               latents: jax.Array, noise: jax.Array, timesteps: jax.Array,
               contexts: jax.Array, snr_gamma: float = 0.0,
               prediction_type: str = "epsilon") -> jax.Array:
    """Mean squared error of the prediction (epsilon or v) at add_noise(latents, noise,
    timesteps), each example's weighted by min_snr_weights (1 when snr_gamma <= 0)."""
    noisy = add_noise(schedule, latents, noise, timesteps)
    prediction = model.apply({"params": params}, noisy, timesteps, contexts)
    target = training_target(schedule, latents, noise, timesteps, prediction_type)
    per_example = jnp.mean((prediction - target) ** 2, axis=tuple(range(1, target.ndim)))
    return jnp.mean(min_snr_weights(schedule, timesteps, snr_gamma, prediction_type)
                    * per_example)


def make_heldout_set(data: LatentTrainingSet, scaling_factor: float, num_train_timesteps: int,
                     seed: int) -> HeldOutSet:
    """One seeded draw of latents, noise and timesteps for each example of `data`."""
    latent_key, noise_key, time_key = jax.random.split(jax.random.key(seed + 1), 3)
    latents = sample_latents(latent_key, jnp.asarray(data.latent_means),
                             jnp.asarray(data.latent_logvars)) * scaling_factor
    return HeldOutSet(
        latents=np.asarray(latents),
        noise=np.asarray(jax.random.normal(noise_key, latents.shape)),
        timesteps=np.asarray(sample_timesteps(time_key, len(latents), num_train_timesteps)),
        contexts=np.asarray(data.contexts[data.context_index], np.float32))


def make_heldout_loss(model: UNet2DConditionModel, schedule: DDPMSchedule,
                      prediction_type: str = "epsilon") -> Callable[[Any, HeldOutSet], float]:
    """(params, held-out set) -> its unweighted loss on the training target."""
    jitted = jax.jit(lambda params, schedule, *batch: noise_loss(
        model, params, schedule, *batch, prediction_type=prediction_type))
    return lambda params, heldout: float(jitted(params, schedule, *heldout))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SD's recipe: AdamW at a constant rate after a linear warmup, gradients clipped to
    norm 1."""
    schedule = optax.warmup_constant_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """diffusers' EMAModel warmup: the average follows the params closely at first."""
    step = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def offset_noise(key: jax.Array, shape: tuple[int, ...], offset: float) -> jax.Array:
    """Gaussian noise plus, with offset > 0, one Gaussian draw per example and channel scaled
    by offset (NHWC). SD's schedule keeps some signal at its last step, so a model trained on
    plain noise reads each image's mean colour from x_T, which sampling from fresh noise does
    not carry (backgrounds come out the colour that zero decodes to); a per-channel offset
    swamps that leak and makes the text set the mean (Guttenberg's "offset noise")."""
    pixel_key, channel_key = jax.random.split(key)
    noise = jax.random.normal(pixel_key, shape)
    if offset <= 0:
        return noise
    return noise + offset * jax.random.normal(channel_key, (shape[0], 1, 1, shape[-1]))


def make_train_step(model: UNet2DConditionModel, optimizer: optax.GradientTransformation,
                    caption_dropout: float, ema_decay: float, snr_gamma: float = 0.0,
                    noise_offset: float = 0.0, prediction_type: str = "epsilon",
                    timestep_logit_mean: float = 0.0,
                    timestep_logit_std: float = 0.0) -> Callable:
    """(state, schedule, means, logvars, contexts, empty context, scaling, key) ->
    (state, metrics); compiled once, the state donated. The schedule and the batch are jit
    arguments: closed-over arrays would become constants of the program."""

    def step(state: TrainState, schedule, means, logvars, contexts, empty_context, scaling,
             key):
        rng = jax.random.fold_in(key, state.step)
        latent_rng, noise_rng, time_rng, drop_rng = jax.random.split(rng, 4)
        batch = means.shape[0]
        latents = sample_latents(latent_rng, means, logvars) * scaling
        noise = offset_noise(noise_rng, latents.shape, noise_offset)
        timesteps = sample_timesteps(time_rng, batch, schedule.betas.shape[0],
                                     timestep_logit_mean, timestep_logit_std)
        dropped = jax.random.uniform(drop_rng, (batch, 1, 1)) < caption_dropout
        contexts = jnp.where(dropped, empty_context[None].astype(jnp.float32),
                             contexts.astype(jnp.float32))
        loss, grads = jax.value_and_grad(
            lambda p: noise_loss(model, p, schedule, latents, noise, timesteps, contexts,
                                 snr_gamma, prediction_type))(
                state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        finite = all_finite(loss, grads)
        params, opt_state, ema_params = keep_if_finite(
            finite, (params, opt_state, ema_params),
            (state.params, state.opt_state, state.ema_params))
        return (TrainState(state.step + 1, params, opt_state, ema_params),
                {"loss": reported_loss(finite, loss)})

    return jax.jit(step, donate_argnums=(0,))


def train_unet(data: LatentTrainingSet, scaling_factor: float,
               config: ml_collections.ConfigDict, workdir: str | Path,
               log: Callable[[str], Any] = print,
               scheduler_config: SchedulerConfig = SchedulerConfig()) -> UNetStageResult:
    """Trains the U-Net on `data` minus its last examples (held out for a fixed noise loss).
    The loop (training/loop.py) writes progress lines, workdir/metrics.jsonl and checkpoints in
    workdir/checkpoints, and resumes from the newest."""
    n = len(data.latent_means)
    held_out = max(1, min(MAX_HELD_OUT, n // 8))
    loop = stage_loop("unet", workdir, config,
                      {"examples": n, "latent_side": data.latent_means.shape[1],
                       "captions": len(data.contexts), "context_dim": data.contexts.shape[-1],
                       "scaling_factor": float(scaling_factor)}, LOG_LINES, log)
    train_data = data.take(np.arange(n - held_out))
    schedule = ddpm_schedule(scheduler_config)
    heldout = make_heldout_set(data.take(np.arange(n - held_out, n)), scaling_factor,
                               scheduler_config.num_train_timesteps, config.seed)

    # --- model, params, optimizer, compiled step
    model_config = unet_config(config, data.latent_means.shape[1], data.contexts.shape[-1])
    model = UNet2DConditionModel(model_config)
    params = jax.device_put(init_params(model, config.seed))
    optimizer = make_optimizer(config)
    initial = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                         jax.tree.map(jnp.copy, params))
    train_step = make_train_step(model, optimizer, config.caption_dropout, config.ema_decay,
                                 config.snr_gamma, config.noise_offset,
                                 config.prediction_type, config.timestep_logit_mean,
                                 config.timestep_logit_std)
    heldout_loss = make_heldout_loss(model, schedule, config.prediction_type)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"unet: {count / 1e6:.2f}M params, {model_config.num_cross_attention_layers} "
        f"cross-attention layers, {n - held_out} training / {held_out} held-out examples, "
        f"{config.steps} steps of {config.batch_size}")
    heldout_before = heldout_loss(params, heldout)

    # --- restore or init, then the loop; a resumed run draws the batches and noise an
    # uninterrupted one draws (the batch order skips what was taken, the key folds in
    # state.step)
    state, start = loop.restore_or_init(lambda: initial, jax.eval_shape(lambda: initial))
    key = jax.random.key(config.seed)
    empty_context = jnp.asarray(data.empty_context)
    scaling = jnp.float32(scaling_factor)
    batches = minibatch_indices(len(train_data.latent_means), config.batch_size, config.seed,
                                start)

    def step(state: TrainState, _) -> tuple[TrainState, dict]:
        rows = next(batches)
        return train_step(
            state, schedule, train_data.latent_means[rows], train_data.latent_logvars[rows],
            train_data.contexts[train_data.context_index[rows]], empty_context, scaling, key)

    loop_start = time.perf_counter()
    state = loop.run(state, start, step)
    train_seconds = time.perf_counter() - loop_start

    ema_params = jax.device_get(state.ema_params)
    heldout_after = heldout_loss(ema_params, heldout)
    log(f"unet: held-out noise loss {heldout_before:.4f} -> {heldout_after:.4f} (EMA), "
        f"{train_seconds:.0f}s")
    return UNetStageResult(model_config, ema_params, read_metrics(workdir)[-1]["loss"],
                           heldout_before, heldout_after, train_seconds)
