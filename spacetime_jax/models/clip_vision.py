"""CLIP vision transformer (transformers' CLIPVisionModel) in flax.linen, and CLIP's
image preprocessing.

The param tree is the content of the PyTorch `vision_model.` prefix: embeddings/
{class_embedding (a raw vector), patch_embedding (bias-free conv, kernel = stride = patch),
position_embedding}, pre_layrnorm (transformers' spelling), encoder/layers_N/...,
post_layernorm. Pixels are NHWC, already normalized (see `clip_preprocess`). No projection
head (visual_projection belongs to CLIPVisionModelWithProjection).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.models import convert
from spacetime_jax.models.clip_text import (CLIPEncoder, activation, check_heads,
                                            check_model_type, dataclass_kwargs)
from spacetime_jax.models.config_utils import UnsupportedArchitectureError

Dtype = Any

# OpenAI CLIP's normalization (CLIPImageProcessor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig, with transformers' defaults (see CLIPTextConfig)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512  # kept for the round trip; used by no module here
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        check_model_type("CLIP vision", config, "clip_vision_model")
        cfg = cls(**dataclass_kwargs(cls, config))
        activation(cfg.hidden_act)
        check_heads("CLIP vision", cfg.hidden_size, cfg.num_attention_heads)
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(cfg, key), int):
                raise UnsupportedArchitectureError(
                    f"CLIP vision: {key}={getattr(cfg, key)!r} (supported: one int, square)")
        if cfg.image_size % cfg.patch_size:
            raise UnsupportedArchitectureError(
                f"CLIP vision: image_size={cfg.image_size} is not a multiple of "
                f"patch_size={cfg.patch_size}")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = ["CLIPVisionModel"]
        d["model_type"] = "clip_vision_model"
        return d

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (B, 1 + patches, D) last layer output (no post LN)
    pooler_output: jax.Array  # (B, D) post_layernorm of the CLS token
    hidden_states: Optional[tuple[jax.Array, ...]] = None  # pre_layrnorm output, then layers


class CLIPVisionEmbeddings(nn.Module):
    """[CLS, patch tokens] + position embeddings; patches in row-major (h, w) order."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        width, patch = c.hidden_size, c.patch_size
        class_embedding = self.param("class_embedding", nn.initializers.normal(width ** -0.5),
                                     (width,))
        patches = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                          use_bias=False, dtype=self.dtype, name="patch_embedding")(pixels)
        batch = pixels.shape[0]
        patches = patches.reshape(batch, -1, width)
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, width))
        positions = nn.Embed(c.num_positions, width, dtype=self.dtype,
                             embedding_init=nn.initializers.normal(0.02),
                             name="position_embedding")(jnp.arange(c.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel: pixels (B, H, W, C) at config.image_size."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array,
                 output_hidden_states: bool = False) -> CLIPVisionOutput:
        c = self.config
        if pixel_values.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision: input {pixel_values.shape[1:3]} is not the model's "
                             f"{c.image_size}x{c.image_size} (see clip_preprocess)")
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        h = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(
            pixel_values.astype(self.dtype))
        h = norm("pre_layrnorm")(h)
        last, hidden_states = CLIPEncoder(
            c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act,
            c.layer_norm_eps, self.dtype, name="encoder")(h, causal=False)
        return CLIPVisionOutput(
            last_hidden_state=last,
            pooler_output=norm("post_layernorm")(last[:, 0]),
            hidden_states=hidden_states if output_hidden_states else None,
        )


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """CLIPImageProcessor's resize: the shorter side becomes `size`, the aspect is kept
    (the longer side truncated to an int)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def clip_preprocess(images: jax.Array, size: int) -> jax.Array:
    """Images (..., H, W, 3), uint8 in [0, 255] or float in [0, 1] -> CLIP's input.

    Bicubic resize of the shorter side to `size`, center crop to size x size, then CLIP's
    mean/std normalization. Close to CLIPImageProcessor (which resizes with PIL), not equal.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = images.astype(jnp.float32) / 255.0
    images = images.astype(jnp.float32)
    height, width = images.shape[-3:-1]
    new_h, new_w = resized_shape(height, width, size)
    if (new_h, new_w) != (height, width):
        images = jax.image.resize(images, images.shape[:-3] + (new_h, new_w, images.shape[-1]),
                                  method="bicubic")
        # PIL's resize of uint8 images saturates; bicubic overshoot is clipped the same way.
        images = jnp.clip(images, 0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top:top + size, left:left + size, :]
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (images - mean) / std


def clip_vision_param_template(config: CLIPVisionConfig) -> Any:
    """The param tree's shapes and dtypes (ShapeDtypeStructs), without computing anything."""
    model = CLIPVisionTransformer(config)
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return jax.eval_shape(model.init, jax.random.key(0), pixels)["params"]


def load_clip_vision_params(state_dict: Mapping[str, Any], config: CLIPVisionConfig) -> Any:
    """PyTorch CLIPVisionModel weights -> our params; `vision_model.`-prefixed names (classic
    checkpoints) and transformers 5's unprefixed ones both load."""
    return convert.torch_to_flax(state_dict, clip_vision_param_template(config),
                                 strip_prefix="vision_model.", what="CLIP vision encoder")
