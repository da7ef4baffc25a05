"""Training schedule and samplers against diffusers' schedulers; guidance; config validation.

Each sampler test runs the WHOLE sampling loop of diffusers' scheduler of the same name and of
ours, both driven by the same deterministic analytic stand-in for the U-Net.
"""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler)

from spacetime_jax.diffusion import (SchedulerConfig, UnsupportedSchedulerError, add_noise,
                                     ddpm_schedule, guided, inference_timesteps, sample,
                                     sample_timesteps, training_target, velocity)

DIFFUSERS_SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                        "euler": EulerDiscreteScheduler, "lms": LMSDiscreteScheduler}
# Max abs difference allowed, relative to the largest final latent (floor 1).
RELATIVE_TOLERANCE = 1e-5

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim.
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def stand_in_model(x, t, xp):
    """A smooth, nonlinear, timestep-dependent 'model output' (epsilon or v)."""
    return 0.3 * xp.tanh(x) * xp.cos(t / 300.0) + 0.05 * x


def initial_noise(shape=(2, 4, 8, 8), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def diffusers_loop(method, config, num_steps, noise):
    scheduler = DIFFUSERS_SCHEDULERS[method].from_config(config.to_dict())
    scheduler.set_timesteps(num_steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t).numpy()
        output = stand_in_model(model_input, float(t), np).astype(np.float32)
        latents = scheduler.step(torch.from_numpy(output), t, latents).prev_sample
    return scheduler.timesteps.numpy(), latents.numpy()


def ours(method, config, num_steps, noise):
    denoise_fn = lambda x, t: stand_in_model(x, t, jnp)
    return np.asarray(sample(denoise_fn, jnp.asarray(noise), config, num_steps, method))


def assert_loops_match(method, config, num_steps):
    noise = initial_noise()
    reference_timesteps, reference = diffusers_loop(method, config, num_steps, noise)
    np.testing.assert_array_equal(inference_timesteps(config, num_steps, method),
                                  reference_timesteps)
    result = ours(method, config, num_steps, noise)
    assert result.shape == reference.shape and result.dtype == np.float32
    scale = max(1.0, np.abs(reference).max())
    assert np.abs(result - reference).max() <= RELATIVE_TOLERANCE * scale


# ---- samplers: the whole loop equals diffusers' ----

@pytest.mark.parametrize("num_steps", [5, 20, 50])
@pytest.mark.parametrize("method", list(DIFFUSERS_SCHEDULERS))
def test_sampler_matches_diffusers_sd1(method, num_steps):
    assert_loops_match(method, SchedulerConfig(), num_steps)


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_dpm_solver_matches_diffusers_with_few_steps(num_steps):
    assert_loops_match("dpmpp_2m", SchedulerConfig(), num_steps)


@pytest.mark.parametrize("method", list(DIFFUSERS_SCHEDULERS))
def test_sampler_matches_diffusers_v_prediction_sd2(method):
    # SD 2.x (768-v) ships DDIM settings: v_prediction, steps_offset 1, "leading" spacing.
    assert_loops_match(method, SchedulerConfig(prediction_type="v_prediction"), 20)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("method", list(DIFFUSERS_SCHEDULERS))
def test_sampler_matches_diffusers_other_spacings(method, spacing):
    # 7 does not divide 1000: exercises the rounding of each spacing.
    assert_loops_match(method, SchedulerConfig(timestep_spacing=spacing), 7)


@pytest.mark.parametrize("method", list(DIFFUSERS_SCHEDULERS))
def test_trailing_spacing_gives_exactly_n_timesteps(method):
    # diffusers gives 62 here, the last t = -1 (float round-off in np.arange).
    timesteps = inference_timesteps(SchedulerConfig(timestep_spacing="trailing"), 61, method)
    assert len(timesteps) == 61 and timesteps[0] == 999 and timesteps[-1] == 15


def test_ddim_matches_diffusers_with_clipping_and_final_alpha_one():
    config = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                             set_alpha_to_one=True, clip_sample=True)
    assert_loops_match("ddim", config, 7)


def test_euler_and_lms_scale_the_initial_noise():
    noise = np.ones((1, 1, 1, 1), np.float32)
    zero_model = lambda x, t: jnp.zeros_like(x)
    for method in ("euler", "lms"):
        # With a zero epsilon the sample only sheds the initial scale: sigma_N = 0 leaves
        # x0 = latents, which started as noise * init_noise_sigma.
        result = sample(zero_model, jnp.asarray(noise), SchedulerConfig(), 5, method)
        scheduler = DIFFUSERS_SCHEDULERS[method].from_config(SchedulerConfig().to_dict())
        scheduler.set_timesteps(5)
        np.testing.assert_allclose(np.asarray(result).item(), float(scheduler.init_noise_sigma),
                                   rtol=1e-6)
        assert float(scheduler.init_noise_sigma) > 5.0  # sqrt(s_801^2 + 1) for 5 steps


def test_sample_runs_inside_jit_with_traced_closure():
    noise = initial_noise((1, 4, 4, 4))

    @jax.jit
    def run(noise, strength):
        return sample(lambda x, t: strength * stand_in_model(x, t, jnp), noise,
                      SchedulerConfig(), 10, "dpmpp_2m")

    jitted = np.asarray(run(jnp.asarray(noise), jnp.float32(0.7)))
    eager = np.asarray(sample(lambda x, t: 0.7 * stand_in_model(x, t, jnp), jnp.asarray(noise),
                              SchedulerConfig(), 10, "dpmpp_2m"))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    assert not np.allclose(jitted, np.asarray(run(jnp.asarray(noise), jnp.float32(0.2))))


def test_unknown_sampler_is_an_error_naming_it():
    with pytest.raises(UnsupportedSchedulerError, match="heun"):
        sample(lambda x, t: x, jnp.zeros((1, 2)), SchedulerConfig(), 5, "heun")


# ---- training schedule: add_noise / velocity equal DDPMScheduler's ----

@pytest.fixture(scope="module")
def noising_batch():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    return x0, noise, t


@pytest.mark.parametrize("config", [SchedulerConfig(),
                                    SchedulerConfig(beta_schedule="linear", beta_start=1e-4,
                                                    beta_end=0.02)])
def test_add_noise_and_velocity_match_ddpm_scheduler(config, noising_batch):
    x0, noise, t = noising_batch
    reference = DDPMScheduler.from_config(config.to_dict())
    schedule = ddpm_schedule(config)
    torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod),
                               reference.alphas_cumprod.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(add_noise(schedule, x0, noise, jnp.asarray(t))),
                               reference.add_noise(*torch_args).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(velocity(schedule, x0, noise, jnp.asarray(t))),
                               reference.get_velocity(*torch_args).numpy(), atol=1e-5)


def test_training_target_is_noise_or_velocity(noising_batch):
    x0, noise, t = noising_batch
    schedule = ddpm_schedule(SchedulerConfig())
    t = jnp.asarray(t)
    np.testing.assert_array_equal(
        np.asarray(training_target(schedule, x0, noise, t, "epsilon")), noise)
    np.testing.assert_array_equal(
        np.asarray(training_target(schedule, x0, noise, t, "v_prediction")),
        np.asarray(velocity(schedule, x0, noise, t)))


def test_sample_timesteps_are_uniform_integers_in_range():
    t = np.asarray(sample_timesteps(jax.random.key(0), 20000, 1000))
    assert t.shape == (20000,) and np.issubdtype(t.dtype, np.integer)
    assert t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 10


@pytest.mark.parametrize("mean", [0.0, 0.5])
def test_logit_normal_timesteps_gather_around_sigmoid_of_the_mean(mean):
    t = np.asarray(sample_timesteps(jax.random.key(0), 20000, 1000, logit_mean=mean,
                                    logit_std=1.0))
    assert t.shape == (20000,) and np.issubdtype(t.dtype, np.integer)
    assert t.min() >= 0 and t.max() <= 999
    centre = 1000 / (1 + np.exp(-mean))
    assert abs(np.median(t) - centre) < 15
    # one std either side of the mean holds 68% of them: t in 1000 * sigmoid(mean -+ 1)
    low, high = 1000 / (1 + np.exp(-(mean - 1))), 1000 / (1 + np.exp(-(mean + 1)))
    assert abs(np.mean((t >= low) & (t < high)) - 0.683) < 0.02
    uniform = np.asarray(sample_timesteps(jax.random.key(0), 20000, 1000))
    assert np.mean((t >= 250) & (t < 750)) > np.mean((uniform >= 250) & (uniform < 750)) + 0.1


# ---- classifier-free guidance ----

def test_guidance_is_one_batched_call_combining_uncond_and_cond():
    calls = []

    def pair_fn(latents_2b, t):
        calls.append(latents_2b.shape)
        batch = latents_2b.shape[0] // 2
        # rows [uncond; cond] = [1 x; 3 x]
        return latents_2b * jnp.repeat(jnp.array([1.0, 3.0]), batch)[:, None]

    latents = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(np.asarray(guided(pair_fn, 1.0)(latents, 0.0)), 3 * latents)
    assert calls == [(6, 2)]
    np.testing.assert_allclose(np.asarray(guided(pair_fn, 7.5)(latents, 0.0)),
                               latents + 7.5 * 2 * latents)
    assert len(calls) == 2


# ---- config ----

def test_sd15_scheduler_json_gives_the_defaults():
    assert SchedulerConfig.from_dict(SD15_SCHEDULER_JSON) == SchedulerConfig()
    assert SchedulerConfig.from_dict(SchedulerConfig().to_dict()) == SchedulerConfig()


@pytest.mark.parametrize("key,value", [("beta_schedule", "squaredcos_cap_v2"),
                                       ("prediction_type", "sample"),
                                       ("timestep_spacing", "karras"),
                                       ("rescale_betas_zero_snr", True),
                                       ("use_karras_sigmas", True)])
def test_unsupported_scheduler_settings_are_errors_naming_them(key, value):
    # A ValueError, and a UserError the command line reports as one line.
    with pytest.raises(UnsupportedSchedulerError, match=f"{key}={value!r}"):
        SchedulerConfig.from_dict({**SD15_SCHEDULER_JSON, key: value})
    assert issubclass(UnsupportedSchedulerError, ValueError)


def test_min_snr_weights_cap_the_signal_to_noise_ratio_at_gamma():
    from spacetime_jax.diffusion.schedules import min_snr_weights
    schedule = ddpm_schedule(SchedulerConfig())
    t = jnp.array([0, 100, 400, 999])
    alpha_bar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
    snr = alpha_bar / (1 - alpha_bar)
    np.testing.assert_allclose(np.asarray(min_snr_weights(schedule, t, 5.0)),
                               np.minimum(snr, 5.0) / snr, rtol=1e-5)
    # Early (low-noise) steps are weighted down, the noisiest keep weight 1.
    weights = np.asarray(min_snr_weights(schedule, t, 5.0))
    assert weights[0] < 0.01 and weights[-1] == 1.0
    np.testing.assert_array_equal(np.asarray(min_snr_weights(schedule, t, 0.0)), np.ones(4))


def test_min_snr_weights_for_v_prediction_divide_by_snr_plus_one():
    from spacetime_jax.diffusion.schedules import min_snr_weights
    schedule = ddpm_schedule(SchedulerConfig())
    t = jnp.array([0, 100, 400, 999])
    alpha_bar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
    snr = alpha_bar / (1 - alpha_bar)
    weights = np.asarray(min_snr_weights(schedule, t, 5.0, "v_prediction"))
    np.testing.assert_allclose(weights, np.minimum(snr, 5.0) / (snr + 1.0), rtol=1e-5)
    # In x0 terms both are min(SNR, gamma): at the noisiest step (SNR 0.0047) v's loss is about
    # the x0 loss, so it keeps about SNR of it, where epsilon's keeps all of its own.
    assert weights[-1] == pytest.approx(snr[-1], rel=0.01) and weights[0] < 0.01
    with pytest.raises(UnsupportedSchedulerError, match="'sample'"):
        min_snr_weights(schedule, t, 5.0, "sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising_given_the_exact_target(noising_batch, prediction_type):
    from spacetime_jax.diffusion.schedules import predicted_x0
    x0, noise, t = noising_batch
    t = jnp.asarray(t[:-1])  # abar at t = 999 is 0.0047: x0 / sqrt(abar) loses float32 digits
    x0, noise = x0[:-1], noise[:-1]
    schedule = ddpm_schedule(SchedulerConfig())
    x_t = add_noise(schedule, x0, noise, t)
    target = training_target(schedule, x0, noise, t, prediction_type)
    np.testing.assert_allclose(np.asarray(predicted_x0(schedule, target, x_t, t,
                                                       prediction_type)), x0, atol=2e-4)
    # A wrong output moves the answer: the function reads the prediction, not x_t alone.
    wrong = np.asarray(predicted_x0(schedule, target + 0.1, x_t, t, prediction_type))
    assert np.abs(wrong - x0).max() > 0.01
