"""Building blocks shared by the U-Net and the VAE (diffusers' names and numerics).

Layout is NHWC throughout. `dtype` is the compute dtype; params are always float32.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance: the one-pass form loses precision against PyTorch at large means.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype,
                        use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
         padding: Any = None, use_bias: bool = True) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, output scale 1)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = group_norm(self.groups, self.eps, self.dtype, "norm1")(x)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv. `asymmetric_pad`: the VAE encoder pads (0, 1) instead of (1, 1)."""
    out_channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers get_timestep_embedding: sinusoids of the (float) timestep."""
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))
