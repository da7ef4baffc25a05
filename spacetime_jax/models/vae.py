"""Stable Diffusion's VAE (diffusers' AutoencoderKL) in flax.linen, layout NHWC.

`encode(images in [-1, 1]) -> (mean, logvar)`: the latent moments after quant_conv, logvar
clipped as diffusers' DiagonalGaussianDistribution does. `decode(latents) -> images`
(post_quant_conv, then the decoder). Latents are unscaled here: multiplying by
`config.scaling_factor` (and dividing before decode) is the caller's business.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.models.attention import multihead_attention
from spacetime_jax.models.config_utils import UnsupportedArchitectureError, check_supported
from spacetime_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

Dtype = Any

# Every norm of diffusers' VAE (resnets, mid-block attention, conv_norm_out) uses this eps.
VAE_NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps logvar to this range.
LOGVAR_RANGE = (-30.0, 20.0)

# diffusers config keys whose value must be the one this architecture has.
_REQUIRED_VALUES = {
    "down_block_types": "DownEncoderBlock2D",
    "up_block_types": "UpDecoderBlock2D",
    "act_fn": "silu",
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, tuple[int, ...]] = 512
    scaling_factor: float = 0.18215
    # Kept only so that to_dict writes back what was read; our modules take their compute
    # dtype from the caller.
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        check_supported("vae", config, _REQUIRED_VALUES)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        for key, value in kwargs.items():
            if isinstance(value, list):
                kwargs[key] = tuple(value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d.update({k: v for k, v in _REQUIRED_VALUES.items() if not k.endswith("_block_types")})
        d["_class_name"] = "AutoencoderKL"
        return d

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UnsupportedArchitectureError(
                "vae: down_block_types, up_block_types and block_out_channels must have the "
                f"same length (got {len(self.down_block_types)}, {len(self.up_block_types)}, {n})")
        if not isinstance(self.layers_per_block, int):
            raise UnsupportedArchitectureError(
                "vae: layers_per_block must be one integer for all blocks")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for SD's four blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all pixels, residual.

    Names as diffusers' Attention (group_norm, to_q, to_k, to_v, to_out_0), all with biases.
    The softmax runs in float32 (diffusers sets upcast_softmax for this block).
    """
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(self.groups, VAE_NORM_EPS, self.dtype, "group_norm")(x)
        tokens = tokens.reshape(b, h * w, 1, c)  # (B, T, heads=1, C)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
        q, k, v = dense("to_q")(tokens), dense("to_k")(tokens), dense("to_v")(tokens)
        out = multihead_attention(q, k, v, upcast=True).reshape(b, h, w, c)
        return x + dense("to_out_0")(out)


class _MidBlock(nn.Module):
    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = lambda name: ResnetBlock2D(self.channels, self.groups, VAE_NORM_EPS, self.dtype,
                                            name=name)
        x = resnet("resnets_0")(x)
        x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return resnet("resnets_1")(x)


class _ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional 2x resampler."""
    out_channels: int
    num_layers: int
    resample: str  # "down", "up" or "none"
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_NORM_EPS, self.dtype,
                              name=f"resnets_{j}")(x)
        if self.resample == "down":
            # diffusers' encoder downsamples with padding=0 after padding (0, 1) by hand.
            x = Downsample2D(self.out_channels, asymmetric_pad=True, dtype=self.dtype,
                             name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """images (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent_channels)."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, self.dtype, "conv_in")(images)
        for i, width in enumerate(channels):
            resample = "down" if i < len(channels) - 1 else "none"
            x = _ResnetStack(width, cfg.layers_per_block, resample, cfg.norm_num_groups,
                             self.dtype, name=f"down_blocks_{i}")(x)
        x = _MidBlock(channels[-1], cfg.norm_num_groups, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out)."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, self.dtype, "conv_in")(latents)
        x = _MidBlock(channels[0], cfg.norm_num_groups, self.dtype, name="mid_block")(x)
        for i, width in enumerate(channels):
            resample = "up" if i < len(channels) - 1 else "none"
            x = _ResnetStack(width, cfg.layers_per_block + 1, resample, cfg.norm_num_groups,
                             self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """Call `encode` / `decode` through apply's `method=`; `__call__` runs both (for init)."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)
        self.quant_conv = conv(2 * latent, 1, self.dtype, "quant_conv", padding="VALID")
        self.post_quant_conv = conv(latent, 1, self.dtype, "post_quant_conv", padding="VALID")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images NHWC in [-1, 1] -> (mean, logvar), float32, NHWC."""
        moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents NHWC -> images NHWC (about [-1, 1]), float32."""
        x = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(x).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_latents(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian N(mean, exp(logvar))."""
    noise = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise
