"""Random params drawn on the host with numpy, from a param template.

XLA compiles a linen `init` of a whole U-Net slowly on CPU (over a minute for the tiny one:
hundreds of separate random-number ops), while numpy draws the same tree in milliseconds. The
scheme is linen's defaults without truncation: kernels LeCun-normal, biases zero, norm scales
one, embeddings N(0, 0.02).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util


def host_init(template: Any, seed: int) -> dict:
    """template: a param tree of arrays or ShapeDtypeStructs -> float32 numpy params."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in sorted(traverse_util.flatten_dict(template).items()):
        shape = tuple(leaf.shape)
        name = path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name == "bias":
            value = np.zeros(shape)
        elif name == "scale":
            value = np.ones(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)


def param_template(module, *example_inputs) -> Any:
    """The module's param tree as ShapeDtypeStructs (no compute, no compile)."""
    return jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]
