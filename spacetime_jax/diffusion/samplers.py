"""Deterministic samplers matching diffusers' DDIM, DPM-Solver++(2M), Euler and LMS schedulers.

Each sampler has two halves. On the host, numpy computes the per-step tables for N steps
(timesteps, noise levels, update coefficients) exactly as the diffusers scheduler's
`set_timesteps` and `step` do; on the device, one `lax.scan` runs the N model calls and
updates. `sample` is traceable: call it inside the caller's `jax.jit` with the model weights as
jit arguments, and let `denoise_fn` close over them.

Noise levels: abar_t is the cumulative alpha of the training schedule. DDIM and DPM-Solver work
on the variance-preserving latents x = alpha x0 + sigma eps (alpha = sqrt(abar),
sigma = sqrt(1 - abar)); Euler and LMS, as in diffusers, on x / alpha = x0 + s eps with
s = sigma / alpha, and feed the model x / sqrt(s^2 + 1), the variance-preserving latents again.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.diffusion.schedules import (SchedulerConfig, UnsupportedSchedulerError,
                                               alphas_cumprod_numpy, x0_and_eps)

# denoise_fn(latents, t) -> epsilon or v (per the config's prediction_type); t is a float32
# scalar holding the current training timestep.
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

METHODS = ("ddim", "dpmpp_2m", "euler", "lms")
LMS_ORDER = 4


class SamplerPlan(NamedTuple):
    """Host-side tables of one sampler for a given number of steps."""
    timesteps: np.ndarray          # (N,) the timesteps the model sees, in order
    init_noise_sigma: float        # scale of the initial Gaussian noise
    rows: dict[str, np.ndarray]    # per-step coefficients, scanned over with the timesteps
    history_size: int              # past predictions the update keeps
    step: Callable                 # (denoise_fn, prediction_type, latents, history, row)


def inference_timesteps(config: SchedulerConfig, num_steps: int, method: str) -> np.ndarray:
    """The timesteps diffusers' scheduler for `method` visits in `num_steps` steps (float64)."""
    total = config.num_train_timesteps
    if not 1 <= num_steps <= total:
        raise UnsupportedSchedulerError(f"num_steps={num_steps} must be in [1, {total}]")
    if config.timestep_spacing == "trailing":
        # diffusers' np.arange(total, 0, -total / N) holds the same values, plus a spurious
        # (N+1)-th one (t = -1) for some N (61, 103, ...) through float round-off.
        return np.round(total - np.arange(num_steps) * (total / num_steps)) - 1
    # DPM-Solver spaces N + 1 points and drops the smallest one.
    divisions = num_steps + 1 if method == "dpmpp_2m" else num_steps
    if config.timestep_spacing == "leading":
        points = np.arange(divisions) * (total // divisions) + config.steps_offset
    else:
        points = np.linspace(0, total - 1, divisions)
        # Euler and LMS keep fractional linspace timesteps; DDIM and DPM-Solver round them.
        if method in ("ddim", "dpmpp_2m"):
            points = points.round()
    return points[::-1][:num_steps].astype(np.float64)


def _continuous_sigmas(config: SchedulerConfig, timesteps: np.ndarray) -> np.ndarray:
    """s_t = sqrt((1 - abar_t) / abar_t), linearly interpolated at (possibly fractional) t."""
    alphas_cumprod = alphas_cumprod_numpy(config)
    sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def _model_output(denoise_fn: DenoiseFn, model_input: jax.Array, t: jax.Array) -> jax.Array:
    return denoise_fn(model_input, t).astype(jnp.float32)


# ----- DDIM (eta = 0) -----

def _ddim_plan(config: SchedulerConfig, num_steps: int) -> SamplerPlan:
    timesteps = inference_timesteps(config, num_steps, "ddim").astype(np.int64)
    alphas_cumprod = alphas_cumprod_numpy(config)
    # diffusers steps to t - T // N whatever the spacing, and past t = 0 to the final alpha.
    previous = timesteps - config.num_train_timesteps // num_steps
    final_alpha_cumprod = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
    previous_alphas_cumprod = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)],
                                       final_alpha_cumprod)
    current_alphas_cumprod = alphas_cumprod[timesteps]
    rows = {"alpha": np.sqrt(current_alphas_cumprod),
            "sigma": np.sqrt(1.0 - current_alphas_cumprod),
            "alpha_prev": np.sqrt(previous_alphas_cumprod),
            "sigma_prev": np.sqrt(1.0 - previous_alphas_cumprod)}
    clip_range = config.clip_sample_range if config.clip_sample else None
    return SamplerPlan(timesteps.astype(np.float64), 1.0, rows, 0,
                       functools.partial(_ddim_step, clip_range=clip_range))


def _ddim_step(denoise_fn, prediction_type, latents, history, row, clip_range):
    model_output = _model_output(denoise_fn, latents, row["t"])
    x0, eps = x0_and_eps(model_output, latents, row["alpha"], row["sigma"], prediction_type)
    if clip_range is not None:
        # diffusers clips x0 only; the noise direction keeps the unclipped prediction.
        x0 = jnp.clip(x0, -clip_range, clip_range)
    return row["alpha_prev"] * x0 + row["sigma_prev"] * eps, history


# ----- DPM-Solver++ 2M (midpoint, lower_order_final, final sigma 0) -----

def _dpmpp_2m_plan(config: SchedulerConfig, num_steps: int) -> SamplerPlan:
    timesteps = inference_timesteps(config, num_steps, "dpmpp_2m")
    sigmas = np.append(_continuous_sigmas(config, timesteps), 0.0)
    alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
    noise_scales = sigmas * alphas
    # With lambda = log(alpha / sigma) = -log s, exp(-h) of the step i -> i+1 is s_{i+1} / s_i;
    # written this way the last step (s = 0, lambda = inf) needs no infinities.
    decay = sigmas[1:] / sigmas[:-1]
    x0_coefficient = alphas[1:] * (1.0 - decay)
    # Midpoint correction 0.5 * alpha_{i+1} (1 - exp(-h)) / r0 * (x0_i - x0_{i-1}) with
    # r0 = h_{i-1} / h_i. The first step has no previous x0; the last step (to sigma 0) is
    # first order, as diffusers' lower_order_final / final_sigmas_type "zero" make it.
    correction = np.zeros(num_steps)
    log_sigmas = np.log(sigmas[:num_steps])
    second_order = np.arange(1, num_steps - 1)
    h = log_sigmas[second_order] - log_sigmas[second_order + 1]
    h_previous = log_sigmas[second_order - 1] - log_sigmas[second_order]
    correction[second_order] = 0.5 * x0_coefficient[second_order] * h / h_previous
    rows = {"alpha": alphas[:-1], "sigma": noise_scales[:-1],
            "latent_coefficient": noise_scales[1:] / noise_scales[:-1],
            "x0_coefficient": x0_coefficient, "correction": correction}
    return SamplerPlan(timesteps, 1.0, rows, 1, _dpmpp_2m_step)


def _dpmpp_2m_step(denoise_fn, prediction_type, latents, history, row):
    model_output = _model_output(denoise_fn, latents, row["t"])
    x0, _ = x0_and_eps(model_output, latents, row["alpha"], row["sigma"], prediction_type)
    previous_x0 = history[0]
    latents = (row["latent_coefficient"] * latents + row["x0_coefficient"] * x0
               + row["correction"] * (x0 - previous_x0))
    return latents, x0[None]


# ----- Euler and LMS (on x / alpha, noise level s) -----

def _euler_lms_sigmas(config: SchedulerConfig, timesteps: np.ndarray) -> tuple[np.ndarray, float]:
    """Noise levels s_0..s_N (s_N = 0) and the initial-noise scale diffusers uses."""
    sigmas = np.append(_continuous_sigmas(config, timesteps), 0.0)
    sigma_max = sigmas.max()
    if config.timestep_spacing == "leading":
        return sigmas, float(np.sqrt(sigma_max**2 + 1.0))
    return sigmas, float(sigma_max)


def _euler_lms_rows(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    input_scale = 1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0)
    return {"sigma": sigmas[:-1], "sigma_next": sigmas[1:], "input_scale": input_scale}


def _derivative(denoise_fn, prediction_type, latents, row) -> jax.Array:
    """d latents / d s = (latents - x0) / s, with the model fed the variance-preserving input."""
    input_scale = row["input_scale"]
    model_input = latents * input_scale
    model_output = _model_output(denoise_fn, model_input, row["t"])
    x0, _ = x0_and_eps(model_output, model_input, input_scale, row["sigma"] * input_scale,
                        prediction_type)
    return (latents - x0) / row["sigma"]


def _euler_plan(config: SchedulerConfig, num_steps: int) -> SamplerPlan:
    timesteps = inference_timesteps(config, num_steps, "euler")
    sigmas, init_noise_sigma = _euler_lms_sigmas(config, timesteps)
    return SamplerPlan(timesteps, init_noise_sigma, _euler_lms_rows(sigmas), 0, _euler_step)


def _euler_step(denoise_fn, prediction_type, latents, history, row):
    derivative = _derivative(denoise_fn, prediction_type, latents, row)
    return latents + derivative * (row["sigma_next"] - row["sigma"]), history


def _lms_coefficients(sigmas: np.ndarray, step: int) -> np.ndarray:
    """Weights of the current and up to 3 previous derivatives, newest first.

    Each weight integrates a Lagrange basis polynomial through the last `order` noise levels
    over [s_step, s_step+1]; diffusers does that with scipy's quad, exactly, as the integrand is
    a polynomial of degree < 4, so the exact antiderivative here gives the same numbers.
    """
    order = min(step + 1, LMS_ORDER)
    nodes = [sigmas[step - k] for k in range(order)]
    weights = np.zeros(LMS_ORDER)
    for j in range(order):
        others = nodes[:j] + nodes[j + 1:]
        basis = np.poly1d(others, r=True) / np.prod([nodes[j] - s for s in others])
        antiderivative = basis.integ()
        weights[j] = antiderivative(sigmas[step + 1]) - antiderivative(sigmas[step])
    return weights


def _lms_plan(config: SchedulerConfig, num_steps: int) -> SamplerPlan:
    timesteps = inference_timesteps(config, num_steps, "lms")
    sigmas, init_noise_sigma = _euler_lms_sigmas(config, timesteps)
    rows = _euler_lms_rows(sigmas)
    rows["weights"] = np.stack([_lms_coefficients(sigmas, i) for i in range(num_steps)])
    return SamplerPlan(timesteps, init_noise_sigma, rows, LMS_ORDER - 1, _lms_step)


def _lms_step(denoise_fn, prediction_type, latents, history, row):
    derivative = _derivative(denoise_fn, prediction_type, latents, row)
    derivatives = jnp.concatenate([derivative[None], history], axis=0)  # newest first
    update = jnp.tensordot(row["weights"], derivatives, axes=1)
    return latents + update, derivatives[:-1]


_PLANNERS = {"ddim": _ddim_plan, "dpmpp_2m": _dpmpp_2m_plan, "euler": _euler_plan,
             "lms": _lms_plan}


def sampler_plan(config: SchedulerConfig, num_steps: int, method: str) -> SamplerPlan:
    if method not in _PLANNERS:
        raise UnsupportedSchedulerError(
            f"sampler method {method!r} is not supported (supported: {METHODS})")
    return _PLANNERS[method](config, num_steps)


def sample(denoise_fn: DenoiseFn, initial_noise: jax.Array, config: SchedulerConfig,
           num_steps: int, method: str) -> jax.Array:
    """Runs `num_steps` steps of `method` from standard Gaussian `initial_noise`; float32 latents.

    config, num_steps and method are static (they shape the host-side tables).
    """
    plan = sampler_plan(config, num_steps, method)
    rows = {name: jnp.asarray(values, jnp.float32) for name, values in plan.rows.items()}
    rows["t"] = jnp.asarray(plan.timesteps, jnp.float32)
    latents = initial_noise.astype(jnp.float32) * plan.init_noise_sigma
    history = jnp.zeros((plan.history_size,) + latents.shape, jnp.float32)

    def body(carry, row):
        return plan.step(denoise_fn, config.prediction_type, *carry, row), None

    (latents, _), _ = jax.lax.scan(body, (latents, history), rows)
    return latents
