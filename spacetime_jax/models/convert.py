"""PyTorch state dict <-> Flax param tree, by an explicit name table.

Our Flax modules are named after the diffusers / transformers PyTorch modules, so a
PyTorch key maps to a Flax path by one rule: a numeric segment joins the name before it
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/<leaf>`). The
leaf is renamed and transposed by the kind of Flax param found at that path (the tables
below). Legacy names of older checkpoints are renamed first. Every mismatch is collected
and reported together, by name.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from spacetime_jax.errors import UserError

# Older diffusers checkpoints (e.g. the SD 1.x VAE) name the attention projections this way.
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
)

# PyTorch leaf `weight` -> Flax leaf, chosen by which one the Flax module has at that path,
# with the transpose that takes the PyTorch layout to the Flax one.
#   Linear  (out, in)            -> kernel (in, out)
#   Conv2d  (out, in, kh, kw)    -> kernel (kh, kw, in, out)
#   Norm    (c,)                 -> scale
#   Embedding (n, d)             -> embedding
WEIGHT_LEAVES = ("kernel", "scale", "embedding")
KERNEL_TO_FLAX = {2: (1, 0), 4: (2, 3, 1, 0)}
KERNEL_TO_TORCH = {2: (1, 0), 4: (3, 2, 0, 1)}

# Module names that end in `_<digit>` without being a list index.
NAMES_ENDING_IN_DIGIT = frozenset({"linear_1", "linear_2"})

# Buffers that PyTorch saves and that are not parameters.
IGNORED_TORCH_KEYS = (r"(^|\.)position_ids$",)


class WeightMismatchError(UserError, ValueError):
    """The weights do not fit the model: names the missing, unexpected and mis-shaped ones."""


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """`a.0.b.weight` -> ('a_0', 'b', 'weight'); the leaf is resolved later."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path:
        m = re.fullmatch(r"(.*[A-Za-z])_(\d+)", p)
        if m and p not in NAMES_ENDING_IN_DIGIT:
            parts.extend([m.group(1), m.group(2)])
        else:
            parts.append(p)
    return ".".join(parts)


def _apply_legacy_renames(key: str) -> str:
    for pattern, repl in LEGACY_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _to_flax_leaf(module_path, leaf, value, template_flat):
    """Returns (flax path, converted array) or (None, None) when nothing fits."""
    if leaf != "weight":
        path = module_path + (leaf,)
        return (path, value) if path in template_flat else (None, None)
    for flax_leaf in WEIGHT_LEAVES:
        path = module_path + (flax_leaf,)
        if path not in template_flat:
            continue
        want = tuple(template_flat[path].shape)
        if flax_leaf == "kernel":
            if value.ndim == 4 and len(want) == 2:
                # A 1x1 conv stored where we use a Dense (or the reverse in old checkpoints).
                value = value[:, :, 0, 0]
            perm = KERNEL_TO_FLAX.get(value.ndim)
            if perm is not None:
                value = np.transpose(value, perm)
        return path, value
    return None, None


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Any,
    *,
    strip_prefix: str = "",
    what: str = "model",
) -> dict:
    """Converts a PyTorch state dict (name -> array) onto the structure of `template`.

    `template` is a Flax param tree (arrays or ShapeDtypeStructs, e.g. from jax.eval_shape);
    the result has exactly its structure and dtypes. Raises WeightMismatchError naming every
    missing, unexpected and mis-shaped weight.
    """
    template_flat = traverse_util.flatten_dict(template)
    converted = _match_to_template(state_dict, template_flat, strip_prefix, what)
    return traverse_util.unflatten_dict(
        {path: array.astype(template_flat[path].dtype) for path, array in converted.items()})


def torch_shapes_to_flax(
    torch_shapes: Mapping[str, tuple[int, ...]],
    template: Any,
    *,
    strip_prefix: str = "",
    what: str = "model",
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """torch_to_flax on shapes alone: PyTorch key -> shape in, flat Flax path -> shape out.

    For checking full-size architectures without weights (a model on torch's meta device,
    a template from jax.eval_shape). The same rules and the same WeightMismatchError as
    torch_to_flax; each weight is stood in for by a zero-stride array, so nothing is allocated.
    """
    stand_ins = {key: np.broadcast_to(np.zeros((), np.float32), tuple(shape))
                 for key, shape in torch_shapes.items()}
    converted = _match_to_template(stand_ins, traverse_util.flatten_dict(template),
                                   strip_prefix, what)
    return {path: tuple(array.shape) for path, array in converted.items()}


def _match_to_template(state_dict, template_flat, strip_prefix, what):
    """Flax path -> converted (not yet cast) array; raises WeightMismatchError on any misfit."""
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in IGNORED_TORCH_KEYS):
            continue
        name = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
        name = _apply_legacy_renames(name)
        *module, leaf = torch_key_to_flax_path(name)
        value = np.asarray(value)
        path, array = _to_flax_leaf(tuple(module), leaf, value, template_flat)
        if path is None:
            unexpected.append(key)
            continue
        want = tuple(template_flat[path].shape)
        if tuple(array.shape) != want:
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, model expects {want}")
            continue
        converted[path] = array
    missing = [flax_path_to_torch_key(p).replace(".kernel", ".weight")
               .replace(".scale", ".weight").replace(".embedding", ".weight")
               for p in template_flat if p not in converted]
    if missing or unexpected or misshaped:
        lines = [f"the {what} weights do not fit its config:"]
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {label}: {shown}")
        lines.append("  Check that the folder's config.json belongs to these weights.")
        raise WeightMismatchError("\n".join(lines))
    return converted


def flax_to_torch(params: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax param tree -> PyTorch-layout state dict of numpy arrays (contiguous)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        *module, leaf = path
        if leaf in WEIGHT_LEAVES:
            if leaf == "kernel" and value.ndim in KERNEL_TO_TORCH:
                value = np.transpose(value, KERNEL_TO_TORCH[value.ndim])
            leaf = "weight"
        key = prefix + flax_path_to_torch_key(tuple(module) + (leaf,))
        # ascontiguousarray makes 0-d arrays 1-d; CLIP's scalar logit_scale must stay 0-d.
        out[key] = np.ascontiguousarray(value).reshape(value.shape)
    return out
