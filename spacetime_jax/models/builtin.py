"""Models the project makes itself, addressed as `builtin:NAME` wherever a model is named.

builtin:toyworld     the toy-world Stable Diffusion the project pretrained and ships in the
                     package (spacetime_jax/assets/toyworld/, fp16): SD 1.x topology at toy
                     widths, 64x64 images; every file is checked against the SHA-256 list
                     spacetime_jax/assets/toyworld.sha256 before it is used.
builtin:tiny-random  a random-init SD 1.x-topology model at toy widths (tests, smoke runs);
                     written on first use into the cache folder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from spacetime_jax.errors import UserError

PREFIX = "builtin:"
BUILTIN_MODELS = ("toyworld", "tiny-random")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOYWORLD_DIR = ASSETS / "toyworld"
TOYWORLD_HASHES = ASSETS / "toyworld.sha256"


class BuiltinModelError(UserError):
    """A shipped model whose files are missing or differ from the recorded hashes."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPACETIME_JAX_CACHE", Path.home() / ".cache" / "spacetime-jax"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_hash_list(path: Path) -> dict[str, str]:
    """`sha256sum`'s format: '<hex>  <relative path>' per line."""
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            entries[name.strip()] = digest
    return entries


def write_hash_list(folder: Path, path: Path) -> dict[str, str]:
    """Hashes every file under `folder` into `path` (sorted, sha256sum's format)."""
    entries = {str(p.relative_to(folder)): sha256_file(p)
               for p in sorted(folder.rglob("*")) if p.is_file()}
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in entries.items()))
    return entries


def verify_folder(folder: Path, hash_list: Path) -> None:
    """Every listed file exists with its recorded SHA-256, and nothing else is there."""
    if not hash_list.is_file():
        raise BuiltinModelError(f"the hash list {hash_list} is missing; reinstall spacetime-jax")
    expected = read_hash_list(hash_list)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    missing = sorted(set(expected) - present)
    if missing:
        raise BuiltinModelError(f"the shipped model {folder} lacks {', '.join(missing)}; "
                                "reinstall spacetime-jax")
    extra = sorted(present - set(expected))
    if extra:
        raise BuiltinModelError(f"the shipped model {folder} holds files not in {hash_list}: "
                                f"{', '.join(extra)}; remove them or reinstall spacetime-jax")
    for name, digest in expected.items():
        actual = sha256_file(folder / name)
        if actual != digest:
            raise BuiltinModelError(
                f"{folder / name} has SHA-256 {actual[:16]}..., expected {digest[:16]}... "
                f"({hash_list}): the shipped model was changed; reinstall spacetime-jax")


def resolve_builtin(name: str) -> str:
    """`builtin:NAME` -> the local folder holding it; anything else is returned unchanged."""
    if not name.startswith(PREFIX):
        return name
    model = name[len(PREFIX):]
    if model not in BUILTIN_MODELS:
        raise UserError(f"unknown built-in model {name!r}; known: "
                        + ", ".join(PREFIX + m for m in BUILTIN_MODELS))
    if model == "toyworld":
        verify_folder(TOYWORLD_DIR, TOYWORLD_HASHES)
        return str(TOYWORLD_DIR)
    folder = cache_dir() / model
    if not (folder / "model_index.json").is_file():
        _write_tiny_random(folder)
    return str(folder)


def _write_tiny_random(folder: Path) -> None:
    """Writes beside, then renames: several processes of one machine may get here at once,
    and a killed write leaves no half model."""
    import shutil

    from spacetime_jax.tools.make_tiny_model import make_tiny_model
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_tiny_model(partial, style="sd1", seed=0, vision=True)
    if folder.exists() and not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # left by a write of an older version
    try:
        os.rename(partial, folder)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(partial, ignore_errors=True)
