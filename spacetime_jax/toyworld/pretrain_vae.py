"""Stage 2 of the toy-world Stable Diffusion: a KL autoencoder (our AutoencoderKL, SD's
topology at toy widths: 64x64x3 images <-> 8x8x4 latents).

Loss = L1 reconstruction (mean absolute error per pixel channel, images in [-1, 1])
       + kl_weight * KL(q(z|x) || N(0, I)) (mean per latent element).
SD's autoencoder added LPIPS and a patch GAN to the L1 term and weighted a KL summed over the
latent by 1e-6 against a reconstruction summed over the pixels; we have no perceptual or
adversarial term (the toy world is flat colors and hard edges, which L1 reconstructs), and
with both terms as means a weight of 1e-6 keeps the KL about as small as SD's: it only stops
the posterior variances from collapsing to zero.

Reconstructions are judged as the later stages need them: the silhouette IoU of the object read
back from a reconstruction (toyworld/fidelity.py's object mask) against the rendered mask, and
the hot-spot ratio of the mean background error map (each pixel's error averaged over the
images where it is background, at least BACKGROUND_MARGIN pixels from the object, so that the
objects' edges, which crowd the middle of the world's pictures, do not count; then the
largest 8x8-pixel cell's mean over all cells' mean: an artifact at a fixed place shows as a
ratio well above 1).

After training, with `center_latents`, each latent channel's mean over a sample of training
images is folded into the autoencoder's weights (center_latents), so that latents are zero-mean
per channel. Then the scaling factor is set as SD's 0.18215 was: 1 / the standard deviation of
latents drawn from the posterior of that sample, so that the U-Net's latents have unit
variance.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spacetime_jax.data.latents import encode_moments
from spacetime_jax.models.host_init import host_init, param_template
from spacetime_jax.models.vae import AutoencoderKL, VAEConfig, sample_latents
from spacetime_jax.toyworld.fidelity import object_mask, silhouette_iou
from spacetime_jax.toyworld.stage import stage_loop
from spacetime_jax.training.batches import minibatch_indices
from spacetime_jax.training.guard import all_finite, keep_if_finite, reported_loss
from spacetime_jax.training.progress import read_metrics

MAX_HELD_OUT = 64  # images kept out of training (at most an eighth) to score reconstruction
SCALING_SAMPLE = 2048  # images whose latents set the scaling factor
HOT_SPOT_CELL = 8  # pixels: the error map's cells
BACKGROUND_MARGIN = 2  # pixels between the object and what the background error map counts
LOG_LINES = 20


class VAEStageResult(NamedTuple):
    config: VAEConfig  # scaling_factor set from the trained latents
    params: Any  # numpy float32 tree
    final_loss: float  # mean training loss over the last progress window
    heldout_l1_before: float  # reconstruction L1 (posterior means) on held-out images, at init
    heldout_l1_after: float  # the same after training
    train_seconds: float  # the loop, compilation included
    heldout_report: dict  # reconstruction_report of the held-out images after training


class TrainState(NamedTuple):
    """What a checkpoint holds (a step's noise folds in the loop's step number)."""
    params: Any
    opt_state: Any


def vae_config(config: ml_collections.ConfigDict, image_size: int) -> VAEConfig:
    """SD's AutoencoderKL layout (one DownEncoderBlock2D per width, 4 latent channels)."""
    blocks = len(config.channels)
    return VAEConfig(down_block_types=("DownEncoderBlock2D",) * blocks,
                     up_block_types=("UpDecoderBlock2D",) * blocks,
                     block_out_channels=tuple(config.channels),
                     layers_per_block=config.layers_per_block, latent_channels=4,
                     norm_num_groups=config.norm_num_groups, sample_size=image_size)


def init_params(model: AutoencoderKL, image_size: int, seed: int) -> dict:
    """Host-drawn params (jit of linen's init compiles slowly on CPU)."""
    images = jnp.zeros((1, image_size, image_size, model.config.in_channels))
    return host_init(param_template(model, images), seed)


def to_model_range(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def vae_losses(model: AutoencoderKL, params: Any, images: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L1 reconstruction of a posterior draw, KL per latent element) for images in [-1, 1]."""
    mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    latents = sample_latents(rng, mean, logvar)
    reconstruction = model.apply({"params": params}, latents, method=AutoencoderKL.decode)
    l1 = jnp.mean(jnp.abs(reconstruction - images))
    kl = jnp.mean(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    return l1, kl


def make_reconstruction_l1(model: AutoencoderKL) -> Callable[[Any, np.ndarray], float]:
    """(params, uint8 images) -> L1 of decode(posterior mean) against the images."""

    @jax.jit
    def l1(params, images_uint8):
        images = to_model_range(images_uint8)
        mean, _ = model.apply({"params": params}, images, method=AutoencoderKL.encode)
        reconstruction = model.apply({"params": params}, mean, method=AutoencoderKL.decode)
        return jnp.mean(jnp.abs(reconstruction - images))

    return lambda params, images: float(l1(params, jnp.asarray(images)))


def make_reconstruct(model: AutoencoderKL, batch_size: int = 256
                     ) -> Callable[[Any, np.ndarray], np.ndarray]:
    """(params, uint8 images) -> uint8 decode(posterior mean), in batches of batch_size."""

    @jax.jit
    def decode_mean(params, images_uint8):
        images = to_model_range(images_uint8)
        mean, _ = model.apply({"params": params}, images, method=AutoencoderKL.encode)
        pixels = model.apply({"params": params}, mean, method=AutoencoderKL.decode)
        return jnp.clip(jnp.round((pixels + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def reconstruct(params, images):
        return np.concatenate([np.asarray(decode_mean(params, jnp.asarray(images[i:i + batch_size])))
                               for i in range(0, len(images), batch_size)])

    return reconstruct


def error_map(images: np.ndarray, reconstructions: np.ndarray,
              masks: np.ndarray | None = None) -> np.ndarray:
    """(H, W): the mean absolute error per pixel over channels and images, in [0, 1] units;
    with the objects' `masks`, over the images where the pixel is background (dilated masks
    left out)."""
    difference = reconstructions.astype(np.float32) - images.astype(np.float32)
    errors = np.abs(difference).mean(axis=3) / 255.0
    if masks is None:
        return errors.mean(axis=0)
    background = ~dilate(np.asarray(masks, bool), BACKGROUND_MARGIN)
    return (errors * background).sum(axis=0) / np.maximum(background.sum(axis=0), 1)


def dilate(masks: np.ndarray, margin: int) -> np.ndarray:
    """(N, H, W) bool masks grown by `margin` pixels (a square neighbourhood)."""
    padded = np.pad(masks, ((0, 0), (margin, margin), (margin, margin)))
    height, width = masks.shape[1:]
    side = 2 * margin + 1
    return np.logical_or.reduce([padded[:, dy:dy + height, dx:dx + width]
                                 for dy in range(side) for dx in range(side)])


def hot_spot_ratio(errors: np.ndarray, cell: int = HOT_SPOT_CELL) -> float:
    """The largest cell's mean error over the mean of all cells (1 for a flat map, an
    error-free one included)."""
    rows, cols = errors.shape[0] // cell, errors.shape[1] // cell
    cells = errors[:rows * cell, :cols * cell].reshape(rows, cell, cols, cell).mean(axis=(1, 3))
    mean = float(cells.mean())
    return float(cells.max()) / mean if mean > 0 else 1.0


def reconstruction_report(images: np.ndarray, masks: np.ndarray,
                          reconstructions: np.ndarray) -> dict:
    """L1 (in [-1, 1] units, the training loss's), silhouette IoU (mean, 5th percentile,
    min) of the objects read back from the reconstructions, and the hot-spot ratio of the
    background error map."""
    ious = np.array([silhouette_iou(object_mask(r), m) for r, m in zip(reconstructions, masks)])
    return {"l1": float(2.0 * error_map(images, reconstructions).mean()),
            "silhouette_iou": float(ious.mean()),
            "silhouette_iou_p5": float(np.percentile(ious, 5)),
            "silhouette_iou_min": float(ious.min()),
            "hot_spot_ratio": hot_spot_ratio(error_map(images, reconstructions, masks)),
            "images": int(len(images))}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW, linear warmup then cosine decay to a tenth: a short run ends on small steps."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps,
        max(config.steps, config.warmup_steps + 1), end_value=0.1 * config.learning_rate)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_train_step(model: AutoencoderKL, optimizer: optax.GradientTransformation,
                    kl_weight: float) -> Callable:
    """(state, uint8 images, key, step) -> (state, metrics); compiled once, the state
    donated."""

    def loss_fn(params, images, rng):
        l1, kl = vae_losses(model, params, images, rng)
        return l1 + kl_weight * kl, (l1, kl)

    def step(state: TrainState, images_uint8, key, step_index):
        rng = jax.random.fold_in(key, step_index)
        (loss, (l1, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, to_model_range(images_uint8), rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        finite = all_finite(loss, grads)
        new_state = keep_if_finite(
            finite, TrainState(optax.apply_updates(state.params, updates), opt_state), state)
        return new_state, {"loss": reported_loss(finite, loss), "l1": l1, "kl": kl}

    return jax.jit(step, donate_argnums=(0,))


def latent_std(model: AutoencoderKL, params: Any, images: np.ndarray, seed: int) -> float:
    """Std of posterior draws over `images` (all latent elements pooled)."""
    means, logvars = encode_moments(model, params, images, batch_size=256)
    draws = sample_latents(jax.random.key(seed), jnp.asarray(means), jnp.asarray(logvars))
    return float(jnp.std(draws))


def latent_channel_means(model: AutoencoderKL, params: Any, images: np.ndarray) -> np.ndarray:
    """Each latent channel's mean of the posterior means over `images`: (C,) float32."""
    means, _ = encode_moments(model, params, images, batch_size=256)
    return np.asarray(means, np.float32).reshape(-1, means.shape[-1]).mean(axis=0)


def center_latents(params: Any, channel_means: np.ndarray) -> Any:
    """The same autoencoder with `channel_means` moved from its latents into its weights:
    encode gives latents minus channel_means (quant_conv's mean biases) and decode adds them
    back before post_quant_conv (a 1x1 conv, so its bias absorbs kernel . channel_means).
    Stable Diffusion's format has a scaling factor but no shift (SD3's shift_factor is not read
    by SD 1.x pipelines); folding the shift into the weights keeps the format. Uncentered
    latents leak each image's mean colour through the schedule's last step (its signal is not
    zero), which sampling from zero-mean noise then lacks."""
    channel_means = np.asarray(channel_means, np.float32)
    latent = channel_means.shape[0]
    quant, post = params["quant_conv"], params["post_quant_conv"]
    quant_bias = np.array(quant["bias"], np.float32)
    quant_bias[:latent] -= channel_means
    post_kernel = np.asarray(post["kernel"], np.float32)  # (1, 1, latent, latent)
    post_bias = np.asarray(post["bias"], np.float32) + channel_means @ post_kernel[0, 0]
    return {**params,
            "quant_conv": {**quant, "bias": quant_bias.astype(np.asarray(quant["bias"]).dtype)},
            "post_quant_conv": {**post,
                                "bias": post_bias.astype(np.asarray(post["bias"]).dtype)}}


def train_vae(images: np.ndarray, masks: np.ndarray, config: ml_collections.ConfigDict,
              workdir: str | Path, log: Callable[[str], Any] = print) -> VAEStageResult:
    """Trains the autoencoder on uint8 images (N, S, S, 3) minus the last few (held out to
    measure reconstruction; `masks` (N, S, S) are the objects' pixels). The loop (training/loop.py) writes progress lines,
    workdir/metrics.jsonl and checkpoints in workdir/checkpoints, and resumes from the newest."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, S, S, 3) uint8, got {images.shape} {images.dtype}")
    held_out = max(1, min(MAX_HELD_OUT, len(images) // 8))
    train_images, heldout_images = images[:-held_out], images[-held_out:]
    heldout_masks = np.asarray(masks)[-held_out:]
    loop = stage_loop("vae", workdir, config,
                      {"examples": len(images), "image_size": images.shape[1]}, LOG_LINES, log)

    # --- model, params, optimizer, compiled step
    model_config = vae_config(config, images.shape[1])
    model = AutoencoderKL(model_config)
    params = jax.device_put(init_params(model, images.shape[1], config.seed))
    optimizer = make_optimizer(config)
    initial = TrainState(params, optimizer.init(params))
    train_step = make_train_step(model, optimizer, config.kl_weight)
    reconstruction_l1 = make_reconstruction_l1(model)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"vae: {count / 1e6:.2f}M params, {len(train_images)} training / {held_out} held-out "
        f"images, {config.steps} steps of {config.batch_size}")
    heldout_before = reconstruction_l1(params, heldout_images)

    # --- restore or init, then the loop; a resumed run draws the batches and noise an
    # uninterrupted one draws (the batch order skips what was taken, the noise folds in the step)
    state, start = loop.restore_or_init(lambda: initial, jax.eval_shape(lambda: initial))
    key = jax.random.key(config.seed)
    batches = minibatch_indices(len(train_images), config.batch_size, config.seed, start)

    def step(state: TrainState, step_number: int) -> tuple[TrainState, dict]:
        return train_step(state, train_images[next(batches)], key, step_number)

    loop_start = time.perf_counter()
    state = loop.run(state, start, step)
    train_seconds = time.perf_counter() - loop_start

    # --- held-out reconstruction and the scaling factor
    heldout_after = reconstruction_l1(state.params, heldout_images)
    params = jax.device_get(state.params)
    if config.center_latents:
        channel_means = latent_channel_means(model, params, train_images[:SCALING_SAMPLE])
        params = center_latents(params, channel_means)
        log("vae: latent channel means " + " ".join(f"{m:+.3f}" for m in channel_means)
            + " folded into quant_conv and post_quant_conv")
    std = latent_std(model, params, train_images[:SCALING_SAMPLE], config.seed)
    model_config = dataclasses.replace(model_config, scaling_factor=1.0 / std)
    report = reconstruction_report(heldout_images, heldout_masks,
                                   make_reconstruct(model)(params, heldout_images))
    log(f"vae: held-out L1 {heldout_before:.4f} -> {heldout_after:.4f}, silhouette IoU "
        f"{report['silhouette_iou']:.3f} (min {report['silhouette_iou_min']:.3f}), error "
        f"hot-spot ratio {report['hot_spot_ratio']:.2f}; latent std {std:.4f} -> "
        f"scaling_factor {model_config.scaling_factor:.5f}, {train_seconds:.0f}s")
    return VAEStageResult(model_config, params, read_metrics(workdir)[-1]["loss"],
                          heldout_before, heldout_after, train_seconds, report)
