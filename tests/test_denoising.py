"""The one-step denoising probe (toyworld/denoising.py) on the shipped toy-world model."""
from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from spacetime_jax.models import builtin
from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.toyworld import world
from spacetime_jax.toyworld.denoising import format_scores, one_step_denoising
from spacetime_jax.toyworld.fidelity import object_mask, silhouette_iou


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(builtin.resolve_builtin("builtin:toyworld"))


@pytest.fixture(scope="module")
def examples():
    return world.generate(seed=123, n=24)


def test_outlines_fade_as_the_noise_grows_and_t0_is_the_vaes_own(sd, examples):
    scores = one_step_denoising(sd, examples, timesteps=(200, 800), batch_size=16)
    assert [s.timestep for s in scores] == [0, 200, 800]
    # t = 0 is the VAE's reconstruction, computed here by hand.
    scaling = sd.vae_config.scaling_factor
    mean, _ = sd.vae.apply({"params": sd.vae_params},
                           jnp.asarray(examples.images, jnp.float32) / 127.5 - 1.0,
                           method=type(sd.vae).encode)
    decoded = sd.vae.apply({"params": sd.vae_params}, mean * scaling / scaling,
                           method=type(sd.vae).decode)
    decoded = np.asarray(jnp.clip((decoded + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
    by_hand = np.mean([silhouette_iou(object_mask(d), m) for d, m in zip(decoded, examples.masks)])
    assert scores[0].iou == pytest.approx(by_hand, abs=1e-6)
    assert scores[0].latent_rmse == 0.0
    # The shipped VAE keeps outlines (about 0.9); one step from t = 800 (sqrt(abar) 0.19)
    # cannot, and the predicted latents drift further from the clean ones as t grows.
    assert scores[0].iou > 0.8
    assert scores[0].iou > scores[1].iou > scores[2].iou
    assert 0.0 < scores[1].latent_rmse < scores[2].latent_rmse
    assert scores[2].iou < 0.6
    line = format_scores(scores)
    assert line.startswith("t=0 IoU ") and "t=800" in line


def test_the_same_seed_gives_the_same_scores(sd, examples):
    first = one_step_denoising(sd, examples, timesteps=(400,),
                               batch_size=24, seed=5)
    again = one_step_denoising(sd, examples, timesteps=(400,), batch_size=24, seed=5)
    other = one_step_denoising(sd, examples, timesteps=(400,), batch_size=24, seed=6)
    assert first == again
    assert first[1].latent_rmse != other[1].latent_rmse
