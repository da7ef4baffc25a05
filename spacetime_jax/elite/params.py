"""The U-Net side of ELITE, as pure functions on the U-Net's param dict.

Trainable trees hold only the leaves they train, nested like the U-Net params
(e.g. down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel), so that
`merge_params(unet_params, kv, local_kv)` gives the params the U-Net is applied with:
  cross_attention_kv  the global stage's copies of every attn2's to_k / to_v kernels;
  local_kv_init       the local stage's to_k_local / to_v_local, started from to_k / to_v.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from spacetime_jax.errors import UserError

CROSS_ATTENTION = "attn2"
KV_NAMES = ("to_k", "to_v")
LOCAL_NAMES = {"to_k": "to_k_local", "to_v": "to_v_local"}


def cross_attention_kernel_paths(unet_params: Any) -> list[tuple[str, ...]]:
    """Paths (..., 'attn2', 'to_k' | 'to_v', 'kernel') of the U-Net params, in sorted order."""
    paths = [path for path in traverse_util.flatten_dict(unet_params)
             if len(path) >= 3 and path[-3] == CROSS_ATTENTION and path[-2] in KV_NAMES
             and path[-1] == "kernel"]
    if not paths:
        raise UserError("the U-Net params hold no cross-attention (attn2) to_k/to_v kernels: "
                        "ELITE needs a Stable Diffusion U-Net")
    return sorted(paths)


def _trainable_copy(kernel: Any) -> jax.Array:
    # A real copy in float32: the trainable tree must not share buffers with the frozen
    # U-Net params (a train step may donate it), and it trains in fp32 whatever the U-Net's
    # compute dtype.
    return jnp.array(kernel, dtype=jnp.float32, copy=True)


def cross_attention_kv(unet_params: Any) -> dict:
    """Copies of every attn2's to_k / to_v kernels, nested as in the U-Net params."""
    flat = traverse_util.flatten_dict(unet_params)
    return traverse_util.unflatten_dict(
        {path: _trainable_copy(flat[path]) for path in cross_attention_kernel_paths(unet_params)})


def local_kv_init(unet_params: Any) -> dict:
    """to_k_local / to_v_local kernels under every attn2, initialized from its to_k / to_v."""
    flat = traverse_util.flatten_dict(unet_params)
    return traverse_util.unflatten_dict(
        {path[:-2] + (LOCAL_NAMES[path[-2]], "kernel"): _trainable_copy(flat[path])
         for path in cross_attention_kernel_paths(unet_params)})


def merge_params(unet_params: Any, *trees: Any) -> dict:
    """Deep merge: later trees override or add leaves. Untouched subtrees are the originals
    (not copied), so merging a few trainable leaves into a large U-Net costs nothing."""
    merged = unet_params
    for tree in trees:
        merged = _merge_two(merged, tree)
    return merged


def _merge_two(base: Any, update: Any) -> Any:
    if not isinstance(update, Mapping):
        return update
    if not isinstance(base, Mapping):
        base = {}
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge_two(base.get(key), value)
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def differing_paths(want: Mapping[tuple, tuple], have: Mapping[tuple, tuple]) -> list[str]:
    """Paths ("a/b/c") that one of two {path: shape} maps lacks, then those whose shapes
    differ: what an error message names when params do not fit."""
    wrong = sorted("/".join(p) for p in set(want) ^ set(have))
    return wrong + sorted("/".join(p) for p in set(want) & set(have) if want[p] != have[p])
