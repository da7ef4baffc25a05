"""A step whose loss or gradient is not finite (NaN, inf) changes nothing.

Inside the compiled step, with no host sync: the update is dropped (the state stays the one
the step started from) and the step reports its loss as NaN. The training loop reads that
loss one step later (at once on steps that log, validate or save) and stops the run at that
step with the last good checkpoint kept, so no non-finite value reaches a checkpoint or an
artifact.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(*trees: Any) -> jax.Array:
    """() bool: every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(trees)]))


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old` (a scalar flag for the whole tree)."""
    # One branch for the whole tree, not a select per leaf: on the toy U-Net's pretraining
    # step (params, Adam state and EMA, ~900 leaves) XLA:CPU's compile of the per-leaf selects
    # grew past 18 GB; the cond compiles in seconds. Under vmap (NeTI's concept axis) it
    # becomes the per-concept select.
    return jax.lax.cond(finite, lambda: new, lambda: old)


def reported_loss(finite: jax.Array, loss: jax.Array) -> jax.Array:
    """The loss, or NaN where the step's loss or gradient was not finite."""
    return jnp.where(finite, loss, jnp.nan)
