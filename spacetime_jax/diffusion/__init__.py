"""Noise schedule for training, samplers and classifier-free guidance for inference."""
from spacetime_jax.diffusion.guidance import guided
from spacetime_jax.diffusion.samplers import (METHODS, DenoiseFn, inference_timesteps, sample,
                                              sampler_plan)
from spacetime_jax.diffusion.schedules import (DDPMSchedule, SchedulerConfig,
                                               UnsupportedSchedulerError, add_noise,
                                               ddpm_schedule, sample_timesteps, training_target,
                                               velocity)
