"""Config values a run cannot use, refused before anything loads or compiles: one line each,
naming the key, its value and what it takes. (Types are ml_collections' own check: an
override of another type never reaches a job.)"""
from __future__ import annotations

import math
from typing import Any, Iterable

from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.errors import UserError
from spacetime_jax.models.attention_kernels import resolve_attention

# A training section's counts: every job that trains has them.
TRAIN_COUNTS = ("train.steps", "train.batch_size", "train.grad_accum", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints")


def value_of(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_at_least(config: Any, keys: Iterable[str], minimum: int) -> None:
    for key in keys:
        value = value_of(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{key}={value!r}: it takes a whole number >= {minimum}")


def check_positive_number(config: Any, key: str) -> None:
    value = value_of(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value!r}: it takes a positive finite number")


def check_sampler(config: Any, key: str) -> None:
    value = value_of(config, key)
    if value not in METHODS:
        raise UserError(f"{key}={value!r} is unknown; use one of {', '.join(METHODS)}")


def check_training_config(config: Any) -> None:
    """What every training job (NeTI, its batches, both ELITE stages) needs of its config:
    positive counts, a positive learning rate, validation settings a sampler can run."""
    check_at_least(config, TRAIN_COUNTS, 1)
    if "attention" in config:
        resolve_attention(config.attention, what="attention")
    check_positive_number(config, "train.learning_rate")
    check_at_least(config, ("validation.every",), 0)
    if config.validation.every:
        check_at_least(config, ("validation.steps",), 1)
        check_positive_number(config, "validation.guidance_scale")
        check_sampler(config, "validation.sampler")
