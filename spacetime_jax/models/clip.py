"""CLIP (transformers' CLIPModel) in flax.linen: both towers, their projections and the
contrastive loss that pretrains them.

The param tree mirrors the PyTorch state dict: text_model/... (clip_text.py's tree),
vision_model/... (clip_vision.py's tree), text_projection/kernel and visual_projection/kernel
(bias-free), and the scalar logit_scale (the log of the softmax temperature's inverse), so that
`convert.flax_to_torch(params)` loads into transformers' CLIPModel with strict=True.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spacetime_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, check_model_type
from spacetime_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer

Dtype = Any

# transformers' CLIPConfig default: log(1 / 0.07), CLIP's initial temperature.
LOGIT_SCALE_INIT = 2.6592


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
    """transformers' CLIPConfig: a text config, a vision config and the shared embedding width."""
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = LOGIT_SCALE_INIT

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPModelConfig":
        check_model_type("CLIP", config, "clip")
        return cls(
            text=CLIPTextConfig.from_dict(config.get("text_config") or {}),
            vision=CLIPVisionConfig.from_dict(config.get("vision_config") or {}),
            projection_dim=config.get("projection_dim", 512),
            logit_scale_init_value=config.get("logit_scale_init_value", LOGIT_SCALE_INIT),
        )

    def to_dict(self) -> dict:
        """config.json of transformers' CLIPModel."""
        def tower(config) -> dict:
            d = config.to_dict()
            d.pop("architectures")  # a sub-config names no model class of its own
            return d
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "text_config": tower(self.text),
            "vision_config": tower(self.vision),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


def l2_normalize(features: jax.Array) -> jax.Array:
    """Rows scaled to unit length, as transformers does (no epsilon: features are never 0)."""
    return features / jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))


def clip_logits(image_features: jax.Array, text_features: jax.Array,
                logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unit-length features (B_img, P), (B_txt, P) -> (logits_per_image, logits_per_text):
    cosine similarities times exp(logit_scale)."""
    logits_per_text = text_features @ image_features.T * jnp.exp(logit_scale)
    return logits_per_text.T, logits_per_text


def contrastive_loss(logits_per_image: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy: image i's caption is text i and text i's image is
    image i; the mean of the image->text and text->image losses."""
    labels = jnp.arange(logits_per_image.shape[0])
    logits = logits_per_image.astype(jnp.float32)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (image_to_text + text_to_image) / 2


class CLIPModel(nn.Module):
    """Text and vision towers with projections into one embedding space.

    input_ids (B, T) as clip_text expects (bos, prompt, eos, padding); pixels (B, H, W, 3)
    already CLIP-normalized at config.vision.image_size (see clip_vision.clip_preprocess).
    """
    config: CLIPModelConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(c.vision, self.dtype)
        projection = lambda: nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = projection()
        self.visual_projection = projection()
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """(B, P) unit-length projections of the pooled (EOS) text features."""
        pooled = self.text_model(input_ids).pooled_output
        return l2_normalize(self.text_projection(pooled).astype(jnp.float32))

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """(B, P) unit-length projections of the pooled (CLS) image features."""
        pooled = self.vision_model(pixels).pooler_output
        return l2_normalize(self.visual_projection(pooled).astype(jnp.float32))

    def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
        return clip_logits(self.image_features(pixels), self.text_features(input_ids),
                           self.logit_scale)


def clip_param_template(config: CLIPModelConfig) -> Any:
    """The param tree's shapes and dtypes (ShapeDtypeStructs), without computing anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    size = config.vision.image_size
    pixels = jnp.zeros((1, size, size, config.vision.num_channels))
    return jax.eval_shape(CLIPModel(config).init, jax.random.key(0), ids, pixels)["params"]
