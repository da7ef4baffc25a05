"""VAE latent moments of the concept images, computed once and cached in the workdir.

The training step never runs the VAE: it draws latents from the cached Gaussian moments
(`sample_latents`), which is what diffusers' `latent_dist.sample()` does on every step of the
reference, minus the encoder. Rows 0..N-1 hold the images, rows N..2N-1 their horizontal
flips (row N + i is image i mirrored), so a random flip is a choice of row.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from spacetime_jax.data.images import hflip
from spacetime_jax.errors import UserError
from spacetime_jax.models import vae as vae_lib
from spacetime_jax.paths import as_path, write_atomic

CACHE_NAME = "latent_moments.npz"
# Bump when what the cache holds or how it is computed changes: old caches then recompute.
_CACHE_FORMAT = "latent-moments-v1"

_log = logging.getLogger(__name__)


class LatentMoments(NamedTuple):
    """Diagonal Gaussian of each row's unscaled latent, float32 (rows, r, r, latent_channels).

    A NamedTuple, hence a pytree: it goes into a jitted step as an argument.
    """
    mean: Any
    logvar: Any


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(vae: vae_lib.AutoencoderKL, vae_params: Any,
                  pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    # uint8 travels to the device (4x smaller than float32); scaling to [-1, 1] happens there.
    scaled = pixels.astype(jnp.float32) / 127.5 - 1.0
    return vae.apply({"params": vae_params}, scaled, method=vae.encode)


def encode_moments(vae: vae_lib.AutoencoderKL, vae_params: Any, images: np.ndarray,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, R, R, 3) -> (mean, logvar), float32 (N, R/f, R/f, latent_channels).

    Runs in batches of `batch_size`; the last batch is padded so that one compiled shape
    serves every batch. The VAE params are jit arguments, never closed-over constants.
    """
    factor = vae.config.downsample_factor
    height, width = images.shape[1:3]
    if height % factor or width % factor:
        raise UserError(f"image size {height}x{width} is not a multiple of {factor}, the "
                        "VAE's downsampling factor; choose a resolution divisible by it")
    means, logvars = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padding = batch_size - len(batch)
        if padding:
            batch = np.concatenate([batch, np.zeros((padding,) + batch.shape[1:], batch.dtype)])
        mean, logvar = _encode_batch(vae, vae_params, jnp.asarray(batch, jnp.uint8))
        keep = batch_size - padding
        means.append(np.asarray(mean[:keep], np.float32))
        logvars.append(np.asarray(logvar[:keep], np.float32))
    return np.concatenate(means), np.concatenate(logvars)


def moments_fingerprint(images: np.ndarray, model_id: str, vae: vae_lib.AutoencoderKL,
                        vae_params: Any) -> str:
    """sha256 over everything the moments depend on: pixels, size, model, VAE config, dtype
    and the VAE's weights (a model folder retrained in place keeps its id)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(vae_params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    digest.update(_CACHE_FORMAT.encode())
    digest.update(json.dumps({
        "shape": list(images.shape),
        "model_id": str(model_id),
        "vae_config": vae.config.to_dict(),
        "compute_dtype": np.dtype(vae.dtype).name,
    }, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images, np.uint8).tobytes())
    return digest.hexdigest()


def _read_cache(path: epath.Path, fingerprint: str) -> LatentMoments | None:
    """The cached moments if `path` holds them for `fingerprint`; None otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes())) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                _log.info("%s was computed for other images or another model: recomputing",
                          path)
                return None
            return LatentMoments(cached["mean"], cached["logvar"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        _log.warning("unreadable latent cache %s (%s): recomputing", path, err)
        return None


def _write_cache(path: epath.Path, fingerprint: str, moments: LatentMoments) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.str_(fingerprint), mean=moments.mean, logvar=moments.logvar)
    # Atomic: a run killed mid-write never leaves a half file that a resumed run would trust.
    write_atomic(path, buffer.getvalue())


def concept_latent_cache(workdir: str | os.PathLike, vae: vae_lib.AutoencoderKL,
                         vae_params: Any, images: np.ndarray, model_id: str) -> LatentMoments:
    """Moments of every image and of its horizontal flip: 2N rows, originals then flips.

    Read from `workdir/latent_moments.npz` (workdir local or gs://) when it was computed from
    the same pixels, model id, VAE config, weights and compute dtype; computed and written
    otherwise.
    """
    path = as_path(workdir) / CACHE_NAME
    fingerprint = moments_fingerprint(images, model_id, vae, vae_params)
    cached = _read_cache(path, fingerprint)
    if cached is not None:
        return cached
    both = np.concatenate([images, hflip(images)])
    moments = LatentMoments(*encode_moments(vae, vae_params, both))
    _write_cache(path, fingerprint, moments)
    return moments


def sample_latents(rng: jax.Array, moments: LatentMoments, indices: jax.Array,
                   scaling_factor: float) -> jax.Array:
    """Scaled latents for rows `indices`: (mean + exp(logvar / 2) * noise) * scaling_factor.

    Pure jax (traceable inside the training step); the same key gives the same draw.
    """
    mean = jnp.take(jnp.asarray(moments.mean), indices, axis=0)
    logvar = jnp.take(jnp.asarray(moments.logvar), indices, axis=0)
    return vae_lib.sample_latents(rng, mean, logvar) * scaling_factor
