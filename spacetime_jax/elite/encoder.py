"""ELITE's image encoder: CLIP vision features -> words (global mapper) and per-patch tokens
(local mapper).

Both mappers hold, for each feature set i, two MLPs named as the reference's attributes:
`mapping_{i}` (applied to the CLS token) and `mapping_patch_{i}` (applied to the patch
tokens). Each MLP is the reference's nn.Sequential, and its layers keep the Sequential's
indices as names, so an official state dict maps 1:1 onto the param tree:

    mapping_{i}.0.weight / .bias   Dense      -> mapping_{i}/0/kernel (transposed) / bias
    mapping_{i}.1.weight / .bias   LayerNorm  -> mapping_{i}/1/scale / bias
    (2: LeakyReLU, no params)
    mapping_{i}.3.*                Dense      -> mapping_{i}/3/...
    mapping_{i}.4.*                LayerNorm  -> mapping_{i}/4/...
    (5: LeakyReLU)
    mapping_{i}.6.*                Dense      -> mapping_{i}/6/...

Mapper params and computations are float32 whatever the CLIP tower computes in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.errors import UserError
from spacetime_jax.models.clip_vision import CLIPVisionConfig
from spacetime_jax.neti.mapper import torch_linear_init

# The reference's layer choice for CLIP ViT-L/14 (24 layers): the last layer's output (the
# primary word), then blocks 4, 8, 12, 16. The toy world's 4-layer tower uses every layer.
DEFAULT_FEATURE_LAYERS = {24: (24, 4, 8, 12, 16), 4: (4, 0, 1, 2, 3)}
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (flax's is 1e-6)
# Sequential indices of the parameterized layers of one MLP.
DENSE_INDICES = ("0", "3", "6")
NORM_INDICES = ("1", "4")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes of ELITE's mappers. feature_layers[i] is the CLIP layer feeding set i (an entry
    equal to the tower's depth means its last_hidden_state); set 0 gives the primary word."""
    feature_layers: tuple[int, ...]
    vision_width: int
    hidden_width: int
    word_dim: int

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(int(k) for k in self.feature_layers))
        if not self.feature_layers:
            raise UserError("ELITE encoder: feature_layers is empty; give at least one CLIP "
                            "layer, e.g. (24, 4, 8, 12, 16) for ViT-L/14")
        for name in ("vision_width", "hidden_width", "word_dim"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"ELITE encoder: {name}={getattr(self, name)} must be positive")

    @property
    def num_words(self) -> int:
        return len(self.feature_layers)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), feature_layers=list(self.feature_layers))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise UserError(f"ELITE encoder config lacks {missing}")
        return cls(**{k: data[k] for k in names})


def default_feature_layers(num_hidden_layers: int) -> tuple[int, ...]:
    if num_hidden_layers not in DEFAULT_FEATURE_LAYERS:
        raise UserError(f"no default ELITE feature layers for a {num_hidden_layers}-layer CLIP "
                        f"vision tower (known: {sorted(DEFAULT_FEATURE_LAYERS)}); give "
                        f"feature_layers explicitly, the last layer ({num_hidden_layers}) first")
    return DEFAULT_FEATURE_LAYERS[num_hidden_layers]


def check_feature_layers(feature_layers: Sequence[int], num_hidden_layers: int) -> None:
    bad = [k for k in feature_layers if not 0 <= int(k) <= num_hidden_layers]
    if bad:
        raise UserError(f"ELITE feature_layers {list(bad)} are outside 0..{num_hidden_layers} "
                        f"(the CLIP vision tower has {num_hidden_layers} layers; 0 is the "
                        f"embeddings, {num_hidden_layers} the last layer)")


def encoder_config_for(vision_config: CLIPVisionConfig, text_width: int,
                       feature_layers: Optional[Sequence[int]] = None,
                       hidden_width: Optional[int] = None) -> EncoderConfig:
    """The mappers' sizes for a CLIP vision tower and a text encoder of width `text_width`.

    feature_layers None: the default for the tower's depth (DEFAULT_FEATURE_LAYERS).
    hidden_width None: the vision width (1024 at SD 1.x, as the reference hard-codes).
    """
    depth = vision_config.num_hidden_layers
    layers = default_feature_layers(depth) if feature_layers is None else tuple(feature_layers)
    check_feature_layers(layers, depth)
    return EncoderConfig(feature_layers=layers, vision_width=vision_config.hidden_size,
                         hidden_width=hidden_width or vision_config.hidden_size,
                         word_dim=int(text_width))


def image_features(vision_module: nn.Module, vision_params: Any, clip_pixels: jax.Array,
                   feature_layers: Sequence[int]) -> jax.Array:
    """CLIP features of preprocessed pixels (B, S, S, 3) -> (num_sets, B, 1 + P, Dv).

    Set i is hidden_states[feature_layers[i]] (0 = the embeddings after pre_layrnorm), the
    tower's depth meaning last_hidden_state (before post_layernorm).
    """
    depth = vision_module.config.num_hidden_layers
    check_feature_layers(feature_layers, depth)
    out = vision_module.apply({"params": vision_params}, clip_pixels, output_hidden_states=True)
    sets = [out.last_hidden_state if k == depth else out.hidden_states[k]
            for k in feature_layers]
    return jnp.stack(sets)


def patch_mask(mask: jax.Array, grid: int) -> jax.Array:
    """An object mask (B, H, W, 1) of 0/1 -> (B, grid * grid) in CLIP's row-major patch order.

    Nearest downsampling as torch's F.interpolate(mode="nearest"), which the reference uses:
    output cell j reads input index floor(j * H / grid).
    """
    if mask.ndim != 4 or mask.shape[-1] != 1:
        raise ValueError(f"patch_mask: expected a (B, H, W, 1) mask, got {mask.shape}")
    batch, height, width, _ = mask.shape
    rows = (jnp.arange(grid) * height) // grid
    cols = (jnp.arange(grid) * width) // grid
    cells = mask[:, rows][:, :, cols, 0]
    return cells.reshape(batch, grid * grid).astype(jnp.float32)


class MapperMLP(nn.Module):
    """The reference's nn.Sequential: Linear LayerNorm LeakyReLU Linear LayerNorm LeakyReLU
    Linear, params named by Sequential index; PyTorch's default init."""
    in_width: int
    hidden_width: int
    out_width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features: int, fan_in: int, name: str) -> nn.Dense:
            init = torch_linear_init(fan_in)
            return nn.Dense(features, kernel_init=init, bias_init=init,
                            precision=jax.lax.Precision.HIGHEST, dtype=jnp.float32,
                            param_dtype=jnp.float32, name=name)

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32,
                                param_dtype=jnp.float32, name=name)

        x = x.astype(jnp.float32)
        x = nn.leaky_relu(norm("1")(dense(self.hidden_width, self.in_width, "0")(x)), LEAKY_SLOPE)
        x = nn.leaky_relu(norm("4")(dense(self.hidden_width, self.hidden_width, "3")(x)),
                          LEAKY_SLOPE)
        return dense(self.out_width, self.hidden_width, "6")(x)


def _mlp_pair(config: EncoderConfig, i: int) -> tuple[MapperMLP, MapperMLP]:
    make = lambda name: MapperMLP(config.vision_width, config.hidden_width, config.word_dim,
                                  name=name)
    return make(f"mapping_{i}"), make(f"mapping_patch_{i}")


def _check_features(config: EncoderConfig, features: jax.Array) -> None:
    if features.ndim != 4 or features.shape[0] != config.num_words \
            or features.shape[-1] != config.vision_width:
        raise ValueError(f"ELITE mapper: features must be (num_sets={config.num_words}, B, "
                         f"1 + P, {config.vision_width}), got {features.shape}")


class GlobalMapper(nn.Module):
    """features (num_sets, B, 1 + P, Dv) -> words (B, num_words, word_dim);
    word_i = mapping_i(CLS_i) + mean over patches of mapping_patch_i(patch_i)."""
    config: EncoderConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        _check_features(self.config, features)
        words = []
        for i in range(self.config.num_words):
            cls_mlp, patch_mlp = _mlp_pair(self.config, i)
            tokens = features[i]
            words.append(cls_mlp(tokens[:, 0]) + patch_mlp(tokens[:, 1:]).mean(axis=1))
        return jnp.stack(words, axis=1)


class LocalMapper(nn.Module):
    """features (num_sets, B, 1 + P, Dv), patch weights (B, P) -> tokens (B, P, word_dim);
    h_i = mapping_i(CLS_i) + mapping_patch_i(patch_i) per patch, tokens = mean_i h_i times
    the patch weights (the object mask at patch resolution, see patch_mask)."""
    config: EncoderConfig

    @nn.compact
    def __call__(self, features: jax.Array, patch_weights: jax.Array) -> jax.Array:
        _check_features(self.config, features)
        num_patches = features.shape[2] - 1
        if patch_weights.shape != (features.shape[1], num_patches):
            raise ValueError(f"LocalMapper: patch weights must be (B, P) = "
                             f"{(features.shape[1], num_patches)}, got {patch_weights.shape}")
        total = 0.0
        for i in range(self.config.num_words):
            cls_mlp, patch_mlp = _mlp_pair(self.config, i)
            tokens = features[i]
            total = total + cls_mlp(tokens[:, :1]) + patch_mlp(tokens[:, 1:])
        local = total / self.config.num_words
        return local * patch_weights[..., None].astype(jnp.float32)


def _init_inputs(config: EncoderConfig) -> tuple[jax.Array, jax.Array]:
    # Param shapes do not depend on batch or token count: one CLS and one patch suffice.
    features = jnp.zeros((config.num_words, 1, 2, config.vision_width), jnp.float32)
    return features, jnp.ones((1, 1), jnp.float32)


def init_mapper_params(config: EncoderConfig, key: jax.Array, local: bool = False) -> dict:
    """Fresh params (PyTorch's default init) of the global or the local mapper."""
    features, weights = _init_inputs(config)
    if local:
        return LocalMapper(config).init(key, features, weights)["params"]
    return GlobalMapper(config).init(key, features)["params"]


def mapper_param_shapes(config: EncoderConfig) -> dict:
    """ShapeDtypeStructs of a mapper's params (the global and local mappers share them)."""
    return jax.eval_shape(lambda key: init_mapper_params(config, key), jax.random.key(0))
