"""What every long job shares: progress lines and metrics files."""
from spacetime_jax.training.progress import Progress, format_duration
