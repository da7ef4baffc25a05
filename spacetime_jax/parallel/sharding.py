"""The one place for sharding rules: param-path patterns -> PartitionSpecs.

A rule set is a list of (regex, PartitionSpec). A leaf's path is its keys joined by "/"
(`up_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel`); the first rule whose
regex matches anywhere in the path (re.search) gives the spec, and a leaf no rule matches is
replicated. A spec only applies where it fits: a dimension whose size is not divisible by its
mesh axes, or a spec longer than the leaf's rank, falls back to replicated on that dimension
(respectively the whole leaf), so one rule set serves every model size and mesh without error.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = list[tuple[str, P]]

REPLICATED: Rules = []

# NeTI's trainable state and optimizer state: every leaf has a leading concept axis K.
CONCEPT_LEADING: Rules = [(r".*", P("concept"))]

# Batches: [K, B, ...], concepts over `concept`, each concept's examples over its replicas.
BATCH_RULES: Rules = [(r".*", P("concept", "data"))]

# The frozen U-Net's big kernels: output features over `model`. Dense kernels are
# (in, out), conv kernels (kh, kw, in, out); SD 2.x's linear proj_in/proj_out (2-d) do not fit
# the 4-d conv spec and stay replicated, as do norms, biases and small embeddings.
MODEL_SHARDED_UNET: Rules = [
    (r"(^|/)(to_q|to_k|to_v|to_out_0)/kernel$", P(None, "model")),
    (r"(^|/)ff/net_0/proj/kernel$", P(None, "model")),
    (r"(^|/)ff/net_2/kernel$", P(None, "model")),
    (r"(^|/)(conv\w*|proj_in|proj_out)/kernel$", P(None, None, None, "model")),
]


# ELITE's trainable state (mapper MLPs and the U-Net's K/V copies or local projections):
# replicated on a mesh without `model`; over `model` their output features. Its batches are
# (micro-batches, B, ...) with B over `data`.
ELITE_TRAINABLE: Rules = [
    (r"(^|/)(to_k|to_v|to_k_local|to_v_local)/kernel$", P(None, "model")),
    (r"(^|/)mapping\w*/.*kernel$", P(None, "model")),
]
ELITE_BATCH: Rules = [(r".*", P(None, "data"))]


def leaf_path(key_path: tuple) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def spec_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: Rules) -> P:
    """The spec of the first rule matching `path`, with the dimensions it cannot split
    evenly left replicated."""
    spec = next((spec for pattern, spec in rules if re.search(pattern, path)), P())
    if len(spec) > len(shape):
        return P()
    fitted = []
    for dim_size, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fits = dim_size % math.prod(mesh.shape[name] for name in names) == 0
        fitted.append(axes if fits else None)
    while fitted and fitted[-1] is None:  # P(None, None) and P() mean the same; show P()
        fitted.pop()
    return P(*fitted)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """A NamedSharding for each leaf of `tree` (arrays or jax.ShapeDtypeStruct)."""
    return jax.tree_util.tree_map_with_path(
        lambda key_path, leaf: NamedSharding(mesh, spec_for(leaf_path(key_path),
                                                            leaf.shape, mesh, rules)),
        tree)


def sharded_abstract(tree: Any, shardings: Any) -> Any:
    """`tree` as jax.ShapeDtypeStruct leaves carrying `shardings`: a restore target."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                    sharding=sharding),
                        tree, shardings)


def shard_put(tree: Any, shardings: Any) -> Any:
    """Places `tree` on the devices as `shardings` say (single-process: from host arrays)."""
    return jax.device_put(tree, shardings)
