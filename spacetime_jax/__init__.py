"""spacetime-jax: NeTI and ELITE personalization of Stable Diffusion in JAX."""
from spacetime_jax.training.compiler import prefer_memory_scheduler

# Before jax starts a backend: XLA reads XLA_FLAGS once (training/compiler.py says why).
prefer_memory_scheduler()
