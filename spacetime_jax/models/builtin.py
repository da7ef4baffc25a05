"""Models the project makes itself, addressed as `builtin:NAME` wherever a model is named.

builtin:tiny-random  a random-init SD 1.x-topology model at toy widths (tests, smoke runs);
                     written on first use into the cache folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from spacetime_jax.errors import UserError

PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-random",)


def cache_dir() -> Path:
    return Path(os.environ.get("SPACETIME_JAX_CACHE", Path.home() / ".cache" / "spacetime-jax"))


def resolve_builtin(name: str) -> str:
    """`builtin:NAME` -> the local folder holding it; anything else is returned unchanged."""
    if not name.startswith(PREFIX):
        return name
    model = name[len(PREFIX):]
    if model not in BUILTIN_MODELS:
        raise UserError(f"unknown built-in model {name!r}; known: "
                        + ", ".join(PREFIX + m for m in BUILTIN_MODELS))
    folder = cache_dir() / model
    if not (folder / "model_index.json").is_file():
        from spacetime_jax.tools.make_tiny_model import make_tiny_model
        make_tiny_model(folder, style="sd1", seed=0, vision=True)
    return str(folder)
