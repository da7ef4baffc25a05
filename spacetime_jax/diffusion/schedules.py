"""The training noise schedule (DDPM forward process) and the scheduler config it comes from.

`SchedulerConfig` reads a diffusers `scheduler/scheduler_config.json` dict. The forward process
is the variance-preserving one of DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with
abar_t the cumulative product of (1 - beta) over the first t + 1 training steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.errors import UserError

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler keys that would change the noise levels or the update if set to anything
# but this value; we do not implement those variants, so a config asking for one is an error
# rather than a silently different sampler. Keys not listed here (the class name, PNDM's
# skip_prk_steps, solver settings of other schedulers...) do not affect what we compute.
_NEUTRAL_VALUES = {
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "final_sigmas_type": "zero",
}


class UnsupportedSchedulerError(UserError, ValueError):
    """A scheduler setting (config key, sampler, step count) this project does not implement."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule and timestep spacing; the defaults are Stable Diffusion 1.x's."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    # DDIM: the "previous" cumulative alpha after the last step (1, or abar_0 as SD ships).
    set_alpha_to_one: bool = False
    # DDIM: clip the predicted x0 to [-clip_sample_range, clip_sample_range] (SD: off).
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
        unsupported = [f"{key}={config[key]!r} (supported: {neutral!r})"
                       for key, neutral in _NEUTRAL_VALUES.items()
                       if key in config and config[key] != neutral]
        if unsupported:
            raise UnsupportedSchedulerError(
                "scheduler config: unsupported settings: " + "; ".join(unsupported))
        fields = {f.name for f in dataclasses.fields(cls)}
        scheduler_config = cls(**{k: v for k, v in config.items() if k in fields})
        scheduler_config.validate()
        return scheduler_config

    def to_dict(self) -> dict[str, Any]:
        """A scheduler_config.json dict that diffusers' DDIM/DPM/Euler/LMS schedulers load."""
        return {"_class_name": "DDIMScheduler", **dataclasses.asdict(self)}

    def validate(self) -> None:
        for key, allowed in (("beta_schedule", BETA_SCHEDULES),
                             ("prediction_type", PREDICTION_TYPES),
                             ("timestep_spacing", TIMESTEP_SPACINGS)):
            value = getattr(self, key)
            if value not in allowed:
                raise UnsupportedSchedulerError(
                    f"scheduler config: {key}={value!r} is not supported (supported: {allowed})")


def betas_numpy(config: SchedulerConfig) -> np.ndarray:
    """beta_t for t = 0..T-1, in float64 on the host."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, steps, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, steps,
                           dtype=np.float64) ** 2
    raise UnsupportedSchedulerError(f"beta_schedule={config.beta_schedule!r} is not supported "
                                    f"(supported: {BETA_SCHEDULES})")


def alphas_cumprod_numpy(config: SchedulerConfig) -> np.ndarray:
    """abar_t for t = 0..T-1, in float64 on the host (the samplers build their tables from it)."""
    return np.cumprod(1.0 - betas_numpy(config))


@flax.struct.dataclass
class DDPMSchedule:
    betas: jax.Array            # (T,) float32
    alphas_cumprod: jax.Array   # (T,) float32


def ddpm_schedule(config: SchedulerConfig) -> DDPMSchedule:
    betas = betas_numpy(config)
    return DDPMSchedule(betas=jnp.asarray(betas, jnp.float32),
                        alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, ..., 1), broadcastable against a (B, ...) batch."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _signal_and_noise_scales(schedule: DDPMSchedule, t: jax.Array,
                             like: jax.Array) -> tuple[jax.Array, jax.Array]:
    alphas_cumprod = _per_example(schedule.alphas_cumprod[t], like)
    return jnp.sqrt(alphas_cumprod), jnp.sqrt(1.0 - alphas_cumprod)


def add_noise(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t for integer timesteps t of shape (B,)."""
    signal, noise_scale = _signal_and_noise_scales(schedule, t, x0)
    return signal * x0 + noise_scale * noise


def velocity(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    signal, noise_scale = _signal_and_noise_scales(schedule, t, x0)
    return signal * noise - noise_scale * x0


def x0_and_eps(model_output: jax.Array, model_input: jax.Array, alpha: jax.Array,
               sigma: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Clean-sample and noise predictions at model_input = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return (model_input - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1.
        return (alpha * model_input - sigma * model_output,
                alpha * model_output + sigma * model_input)
    raise UnsupportedSchedulerError(f"prediction_type={prediction_type!r} is not supported "
                                    f"(supported: {PREDICTION_TYPES})")


def predicted_x0(schedule: DDPMSchedule, model_output: jax.Array, x_t: jax.Array,
                 t: jax.Array, prediction_type: str) -> jax.Array:
    """The clean sample a denoiser's output implies at x_t = add_noise(schedule, x0, noise, t)."""
    signal, noise_scale = _signal_and_noise_scales(schedule, t, x_t)
    return x0_and_eps(model_output, x_t, signal, noise_scale, prediction_type)[0]


def training_target(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
    """What the denoiser is trained to output at x_t = add_noise(schedule, x0, noise, t)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    raise UnsupportedSchedulerError(f"prediction_type={prediction_type!r} is not supported "
                                    f"(supported: {PREDICTION_TYPES})")


def min_snr_weights(schedule: DDPMSchedule, t: jax.Array, gamma: float,
                    prediction_type: str = "epsilon") -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape (B,): min(SNR(t), gamma) / SNR(t)
    for epsilon prediction, min(SNR(t), gamma) / (SNR(t) + 1) for v-prediction (whose loss is
    (SNR + 1) times the x0 loss, where epsilon's is SNR times it). Low-noise steps, whose
    target is easy and whose gradients fight those of high-noise steps, are weighted down;
    gamma <= 0 gives weight 1."""
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    alpha_bar = schedule.alphas_cumprod[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return jnp.minimum(snr, gamma) / snr
    if prediction_type == "v_prediction":
        return jnp.minimum(snr, gamma) / (snr + 1.0)
    raise UnsupportedSchedulerError(f"prediction_type={prediction_type!r} is not supported "
                                    f"(supported: {PREDICTION_TYPES})")


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int,
                     logit_mean: float = 0.0, logit_std: float = 0.0) -> jax.Array:
    """Integer timesteps in [0, num_train_timesteps), shape (batch,): uniform when logit_std
    is 0, else logit-normal (t / T = sigmoid(logit_mean + logit_std * N(0, 1)), SD3's
    sampling), which spends more of the training on the middle of the schedule, where a
    sample's layout and outlines are decided, and less on its nearly clean and nearly pure
    noise ends."""
    if logit_std <= 0:
        return jax.random.randint(rng, (batch,), 0, num_train_timesteps)
    fraction = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    return jnp.minimum(jnp.floor(fraction * num_train_timesteps).astype(jnp.int32),
                       num_train_timesteps - 1)
