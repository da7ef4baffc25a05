"""Stable Diffusion 1.x / 2.x U-Net (diffusers' UNet2DConditionModel) in flax.linen.

Input latents are NHWC. Cross-attention layers are numbered statically in forward order
(down blocks, mid block, up blocks); SD 1.x/2.x have 16 of them. The context is one array
or a `LayerContexts` stacked over those layers (see attention.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.models.attention import Attention, Context, CrossAttention
from spacetime_jax.models.config_utils import UnsupportedArchitectureError, check_supported
from spacetime_jax.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                         Upsample2D, conv, group_norm, timestep_embedding)
from spacetime_jax.training.remat import remat_module

Dtype = Any

# diffusers config keys whose value must be the default for this architecture; anything
# else is an architecture we do not implement.
_REQUIRED_VALUES = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    # diffusers' historical naming: `attention_head_dim` holds the number of HEADS per block
    # when `num_attention_heads` is unset (true of every SD 1.x / 2.x config).
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        check_supported("unet", config, _REQUIRED_VALUES)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for key in ("attention_head_dim", "num_attention_heads"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["_class_name"] = "UNet2DConditionModel"
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UnsupportedArchitectureError(
                "unet: down_block_types, up_block_types and block_out_channels must have the "
                f"same length (got {len(self.down_block_types)}, {len(self.up_block_types)}, {n})")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise UnsupportedArchitectureError(
                    f"unet: down block type {t!r} is not supported (supported: {_DOWN_TYPES})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise UnsupportedArchitectureError(
                    f"unet: up block type {t!r} is not supported (supported: {_UP_TYPES})")
        if not isinstance(self.layers_per_block, int):
            raise UnsupportedArchitectureError(
                "unet: layers_per_block must be one integer for all blocks")

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        return tuple(heads)

    @property
    def num_cross_attention_layers(self) -> int:
        down = sum(self.layers_per_block for t in self.down_block_types if t.startswith("CrossAttn"))
        up = sum(self.layers_per_block + 1 for t in self.up_block_types if t.startswith("CrossAttn"))
        return down + 1 + up


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    layer_index: int
    upcast: bool = False
    local_branch: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context: Context, return_probs: bool = False):
        head_dim = self.dim // self.heads
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        x = x + Attention(self.heads, head_dim, upcast=self.upcast, dtype=self.dtype,
                          attention=self.attention, name="attn1")(ln("norm1")(x))
        attn, probs = CrossAttention(self.heads, head_dim, self.layer_index, upcast=self.upcast,
                                     local_branch=self.local_branch, dtype=self.dtype,
                                     attention=self.attention,
                                     name="attn2")(ln("norm2")(x), context, return_probs)
        x = x + attn
        # diffusers names the GEGLU projection ff.net.0.proj and the output ff.net.2.
        ff_in = ln("norm3")(x)
        ff = _FeedForwardNamed(self.dim, dtype=self.dtype, name="ff")
        return x + ff(ff_in), probs


class _GEGLU(nn.Module):
    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
        return hidden * nn.gelu(gate, approximate=False)


class _FeedForwardNamed(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> one BasicTransformerBlock -> proj_out, residual."""
    dim: int
    heads: int
    layer_index: int
    use_linear_projection: bool
    groups: int = 32
    upcast: bool = False
    local_branch: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context: Context, return_probs: bool = False):
        b, h, w, c = x.shape
        residual = x
        x = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(self.dim, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(self.dim, 1, self.dtype, "proj_in", padding="VALID")(x).reshape(b, h * w, self.dim)
        x, probs = BasicTransformerBlock(self.dim, self.heads, self.layer_index, self.upcast,
                                         self.local_branch, self.dtype, self.attention,
                                         name="transformer_blocks_0")(x, context, return_probs)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, self.dtype, "proj_out", padding="VALID")(x.reshape(b, h, w, self.dim))
        return x + residual, probs


@dataclasses.dataclass(frozen=True)
class _BlockSettings:
    """What every block of one U-Net shares."""
    groups: int
    eps: float
    use_linear_projection: bool
    upcast: bool
    local_branch: bool
    remat_policy: str = "none"
    attention: str = "auto"

    def resnet(self) -> type[nn.Module]:
        return remat_module(ResnetBlock2D, self.remat_policy)

    def transformer(self) -> type[nn.Module]:
        # Argument 3 (self is 0) is `return_probs`, a Python flag.
        return remat_module(Transformer2DModel, self.remat_policy, static_argnums=(3,))


class _Block(nn.Module):
    """One down or up block: resnets, optional transformers, optional resampler.

    `first_layer` is the static index of its first cross-attention layer.
    """
    kind: str  # "down" or "up"
    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    first_layer: int
    resample: bool
    settings: _BlockSettings
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips, return_probs):
        s = self.settings
        outputs, probs = [], []
        for j in range(self.num_layers):
            if self.kind == "up":
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = s.resnet()(self.out_channels, s.groups, s.eps, self.dtype,
                           name=f"resnets_{j}")(x, temb)
            if self.has_attention:
                x, p = s.transformer()(self.out_channels, self.heads, self.first_layer + j,
                                       s.use_linear_projection, s.groups, s.upcast,
                                       s.local_branch, self.dtype, s.attention,
                                       name=f"attentions_{j}")(x, context, return_probs)
                probs.append(p)
            outputs.append(x)
        if self.resample and self.kind == "down":
            x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            outputs.append(x)
        elif self.resample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x, outputs, probs


class _MidBlock(nn.Module):
    channels: int
    heads: int
    layer: int
    settings: _BlockSettings
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, return_probs):
        s = self.settings
        x = s.resnet()(self.channels, s.groups, s.eps, self.dtype, name="resnets_0")(x, temb)
        x, p = s.transformer()(self.channels, self.heads, self.layer, s.use_linear_projection,
                               s.groups, s.upcast, s.local_branch, self.dtype, s.attention,
                               name="attentions_0")(x, context, return_probs)
        x = s.resnet()(self.channels, s.groups, s.eps, self.dtype, name="resnets_1")(x, temb)
        return x, p


class UNet2DConditionModel(nn.Module):
    """`__call__(latents NHWC, timesteps (B,), context) -> noise prediction NHWC`.

    `return_attention_probs=True` also returns a tuple of the cross-attention probabilities
    (B, heads, queries, tokens) of every layer, in layer order.

    `remat_policy` (spacetime_jax/training/remat.py: "none", "full", "dots",
    "dots_saveable") rematerializes every ResNet and transformer block in the backward pass;
    it changes neither the param tree nor the outputs.

    `attention` (models/attention_kernels.py: "auto", "xla", "cudnn", "splash") picks the
    kernel of every attention layer that does not need the probabilities; like remat it
    changes neither the param tree nor (beyond rounding) the outputs, so
    `unet.clone(attention=...)` switches a built model.
    """
    config: UNetConfig
    local_branch: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, latents: jax.Array, timesteps: jax.Array, context: Context,
                 return_attention_probs: bool = False):
        cfg = self.config
        channels = cfg.block_out_channels
        heads = cfg.heads_per_block
        settings = _BlockSettings(cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection,
                                  cfg.upcast_attention, self.local_branch, self.remat_policy,
                                  self.attention)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (latents.shape[0],))
        temb = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(channels[0] * 4, dtype=self.dtype, name="time_embedding")(
            temb.astype(self.dtype))

        all_probs: list = []
        layer = 0
        x = conv(channels[0], 3, self.dtype, "conv_in")(latents.astype(self.dtype))
        skips = [x]
        last = len(channels) - 1
        for i, block_type in enumerate(cfg.down_block_types):
            has_attention = block_type == "CrossAttnDownBlock2D"
            x, outputs, probs = _Block(
                "down", channels[i], cfg.layers_per_block, has_attention, heads[i], layer,
                i < last, settings, self.dtype, name=f"down_blocks_{i}",
            )(x, temb, context, None, return_attention_probs)
            skips.extend(outputs)
            all_probs.extend(probs)
            layer += cfg.layers_per_block if has_attention else 0

        x, p = _MidBlock(channels[-1], heads[-1], layer, settings, self.dtype, name="mid_block")(
            x, temb, context, return_attention_probs)
        all_probs.append(p)
        layer += 1

        for i, block_type in enumerate(cfg.up_block_types):
            has_attention = block_type == "CrossAttnUpBlock2D"
            x, _, probs = _Block(
                "up", channels[last - i], cfg.layers_per_block + 1, has_attention,
                heads[last - i], layer, i < last, settings, self.dtype, name=f"up_blocks_{i}",
            )(x, temb, context, skips, return_attention_probs)
            all_probs.extend(probs)
            layer += cfg.layers_per_block + 1 if has_attention else 0

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        x = conv(cfg.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)
        if return_attention_probs:
            return x, tuple(all_probs)
        return x
