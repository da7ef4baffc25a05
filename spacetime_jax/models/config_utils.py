"""Validation of diffusers / transformers config dicts against what we implement."""
from __future__ import annotations

from typing import Any, Mapping

from spacetime_jax.errors import UserError


class UnsupportedArchitectureError(UserError, ValueError):
    """A config asks for an architecture variant that this project does not implement."""


def check_supported(what: str, config: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    """Raises naming every key whose value differs from the one we implement."""
    bad = []
    for key, expected in required.items():
        if key not in config:
            continue
        value = config[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        # Per-block lists (e.g. transformer_layers_per_block [1, 1, 1, 1]) are fine when
        # every entry is the supported value.
        if not values or any(v != expected or type(v) is bool and type(expected) is not bool
                             for v in values):
            bad.append(f"{key}={config[key]!r} (supported: {expected!r})")
    if bad:
        raise UnsupportedArchitectureError(
            f"{what}: unsupported architecture in config.json: " + "; ".join(bad))
