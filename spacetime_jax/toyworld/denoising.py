"""How much of an object's outline a toy-world U-Net recovers from a noised latent, in one step.

Prompt following (pretrain.validate, benchmarks/toyworld_prompt_following.py) says whether a
model draws the prompted shape, but a model that is still learning scores near chance on it
for most of its training, so it cannot rank two short trials. This probe can: held-out renders
are encoded by the model's VAE, noised to timestep t with a fixed draw, denoised once by the
U-Net (with their own captions), and the predicted clean latents decoded. The silhouette of
each decoded object is compared with the rendered mask (IoU), and the world shape read from it
with the rendered shape. The VAE's own reconstructions give the ceiling (t = 0 in the report).
Around t = 400..600 (sqrt(abar) 0.65..0.40 on SD's schedule) the noisy latent still holds the
outline but a weak denoiser returns a blob: that is where models that draw blobs differ from
models that draw shapes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.data.latents import encode_moments
from spacetime_jax.diffusion.schedules import add_noise, ddpm_schedule, predicted_x0
from spacetime_jax.models.pretrained import StableDiffusion
from spacetime_jax.models.tokenizer import tokenize
from spacetime_jax.pipelines.text_to_image import to_uint8
from spacetime_jax.toyworld.fidelity import object_mask, read_shape, silhouette_iou
from spacetime_jax.toyworld.world import Examples

DEFAULT_TIMESTEPS = (200, 400, 600, 800)


class DenoisingScore(NamedTuple):
    timestep: int  # 0: the VAE's reconstruction, no noise
    iou: float  # mean IoU, in place, of the decoded object's pixels with the rendered mask
    shape_accuracy: float  # fraction whose shape reads as the rendered shape
    latent_rmse: float  # of the predicted clean latent (scaled units; 0 at t = 0)


def _score(timestep: int, decoded: np.ndarray, examples: Examples, rmse: float
           ) -> DenoisingScore:
    ious = [silhouette_iou(object_mask(image), mask)
            for image, mask in zip(decoded, examples.masks)]
    shapes = [read_shape(image) == scene.shape for image, scene in zip(decoded, examples.scenes)]
    return DenoisingScore(timestep, float(np.mean(ious)), float(np.mean(shapes)), rmse)


@functools.partial(jax.jit, static_argnames=("vae", "scaling"))
def _decode(vae, vae_params, latents, *, scaling):
    return vae.apply({"params": vae_params}, latents / scaling, method=type(vae).decode)


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "prediction_type"))
def _denoise(unet, unet_params, text_encoder, text_params, schedule, latents, noise, t, ids, *,
             prediction_type):
    context = text_encoder.apply({"params": text_params}, ids).last_hidden_state
    t = jnp.full((latents.shape[0],), t)
    noisy = add_noise(schedule, latents, noise, t)
    output = unet.apply({"params": unet_params}, noisy, t, context)
    return predicted_x0(schedule, output.astype(jnp.float32), noisy, t, prediction_type)


def one_step_denoising(sd: StableDiffusion, examples: Examples,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                       batch_size: int = 64) -> list[DenoisingScore]:
    """The probe's scores: first the VAE's reconstruction (timestep 0), then one per
    timestep. Every timestep uses the same noise draw (seeded), so scores compare across
    models and timesteps."""
    schedule = ddpm_schedule(sd.scheduler_config)
    scaling = sd.vae_config.scaling_factor
    decode = functools.partial(_decode, sd.vae, sd.vae_params, scaling=scaling)
    denoise = functools.partial(_denoise, sd.unet, sd.unet_params, sd.text_encoder,
                                sd.text_params, schedule,
                                prediction_type=sd.scheduler_config.prediction_type)
    ids = np.asarray(tokenize(sd.tokenizer, list(examples.captions)))
    rows = [slice(i, i + batch_size) for i in range(0, len(examples.images), batch_size)]
    means, _ = encode_moments(sd.vae, sd.vae_params, examples.images, batch_size)
    latents = [jnp.asarray(means[r]) * scaling for r in rows]
    noise = [jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), z.shape)
             for i, z in enumerate(latents)]
    reconstructed = np.concatenate([to_uint8(decode(z)) for z in latents])
    scores = [_score(0, reconstructed, examples, 0.0)]
    for t in timesteps:
        clean = [denoise(z, e, jnp.int32(t), jnp.asarray(ids[r]))
                 for z, e, r in zip(latents, noise, rows)]
        squared = np.concatenate([np.asarray((c - z) ** 2).reshape(len(z), -1)
                                  for c, z in zip(clean, latents)])
        decoded = np.concatenate([to_uint8(decode(c)) for c in clean])
        scores.append(_score(int(t), decoded, examples, float(np.sqrt(squared.mean()))))
    return scores


def format_scores(scores: Sequence[DenoisingScore]) -> str:
    """One line: IoU / shape accuracy at each timestep (t=0: the VAE alone)."""
    return ", ".join(f"t={s.timestep} IoU {s.iou:.3f} shape {s.shape_accuracy:.2f}"
                     for s in scores)
