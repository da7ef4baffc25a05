"""Rematerialization (activation checkpointing) policies by name.

A policy decides which activations of a wrapped block the backward pass keeps; the rest it
recomputes from the block's inputs. Less kept: less memory, more compute.

  none           no remat: every activation is kept (fastest, most memory)
  full           nothing is kept: the block runs forward twice (least memory)
  dots           matmul outputs without batch dimensions are kept (the projections'
                 outputs); attention scores, norms and activations are recomputed
  dots_saveable  every matmul output is kept, attention scores included
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax

from spacetime_jax.errors import UserError

_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
REMAT_POLICIES = tuple(_POLICIES)


def check_remat_policy(name: str, what: str = "remat_policy") -> str:
    """`name` if it is a known policy; UserError naming `what` (e.g. the config key) if not."""
    if name not in _POLICIES:
        raise UserError(f"{what}={name!r} is unknown; use one of {', '.join(REMAT_POLICIES)}")
    return name


@functools.lru_cache(maxsize=None)
def remat_module(module_class: type[nn.Module], policy: str,
                 static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`module_class`, its __call__ rematerialized under `policy` ("none": unchanged).

    The wrapped class takes the same constructor arguments and `name`, so the param tree is
    the plain class's. `static_argnums` count `self` as 0 (flax's convention) and mark the
    Python-valued arguments (flags) of __call__. Cached: one class per (class, policy), so
    retracing a model does not mint new classes.
    """
    check_remat_policy(policy)
    if policy == "none":
        return module_class
    return nn.remat(module_class, policy=_POLICIES[policy], static_argnums=static_argnums)
