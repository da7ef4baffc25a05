"""CLIP text transformer (transformers' CLIPTextModel) in flax.linen.

The param tree is the content of the PyTorch `text_model.` prefix: embeddings/
{token_embedding, position_embedding}, encoder/layers_N/{self_attn/{q,k,v,out}_proj,
layer_norm1, mlp/{fc1, fc2}, layer_norm2}, final_layer_norm. The encoder layers here are
shared with the vision tower (clip_vision.py).

Callers that edit the prompt embeddings (NeTI's placeholder token, ELITE's word injection)
use the pieces: `embed_tokens` -> edit -> `__call__(inputs_embeds=...)`; NeTI's textual
bypass adds to `last_hidden_state_pre_norm` and then calls `final_norm`.

SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H, but its text_encoder/config.json
already has num_hidden_layers=23, so `last_hidden_state` is the right context for SD 1.x and
SD 2.x alike.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.models import convert
from spacetime_jax.models.config_utils import UnsupportedArchitectureError
from spacetime_jax.training.remat import remat_module

Dtype = Any

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation (SD 1.x text encoder)."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        # transformers' "gelu" is the exact erf form, not the tanh approximation.
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise UnsupportedArchitectureError(
        f"hidden_act={name!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")


def check_model_type(what: str, config: Mapping[str, Any], model_type: str) -> None:
    if config.get("model_type", model_type) != model_type:
        raise UnsupportedArchitectureError(
            f"{what}: model_type={config['model_type']!r} (supported: {model_type!r})")


def dataclass_kwargs(cls, config: Mapping[str, Any]) -> dict:
    """The config entries that are fields of dataclass `cls` (the rest are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names}


def check_heads(what: str, hidden_size: int, num_attention_heads: int) -> None:
    if hidden_size % num_attention_heads:
        raise UnsupportedArchitectureError(
            f"{what}: hidden_size={hidden_size} is not a multiple of "
            f"num_attention_heads={num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig; defaults are transformers' own, so that a config.json
    missing a key means the same model here and there. Dropout is not modelled: the text
    encoder is frozen in every use of this project."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512  # kept for the round trip; used by no module here
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        check_model_type("CLIP text", config, "clip_text_model")
        cfg = cls(**dataclass_kwargs(cls, config))
        activation(cfg.hidden_act)
        check_heads("CLIP text", cfg.hidden_size, cfg.num_attention_heads)
        if not isinstance(cfg.eos_token_id, int):
            raise UnsupportedArchitectureError(
                f"CLIP text: eos_token_id={cfg.eos_token_id!r} (supported: one int)")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = ["CLIPTextModel"]
        d["model_type"] = "clip_text_model"
        return d


class CLIPAttention(nn.Module):
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        width = x.shape[-1]
        split = lambda h: h.reshape(h.shape[:-1] + (self.heads, width // self.heads))
        dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
        q, k, v = (split(dense(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        # A backward pass keeps q, k and v and recomputes the probabilities: NeTI's step runs
        # this encoder over 16 x B rows, and their (rows, heads, 77, 77) probabilities were
        # most of its memory on the toy model. A forward pass is unchanged.
        attend = jax.checkpoint(functools.partial(jax.nn.dot_product_attention,
                                                  is_causal=causal))
        out = attend(q, k, v)
        return dense("out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = activation(self.hidden_act)(h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + CLIPAttention(self.heads, self.dtype, name="self_attn")(norm("layer_norm1")(x),
                                                                       causal)
        mlp = CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The layer stack; returns (last output, every hidden state) where the hidden states
    are transformers' tuple: the encoder input first, then each layer's output. Each layer
    is rematerialized under `remat_policy` (spacetime_jax/training/remat.py)."""
    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        hidden_states = [x]
        layer = remat_module(CLIPEncoderLayer, self.remat_policy, static_argnums=(2,))
        for i in range(self.num_layers):
            x = layer(self.heads, self.intermediate_size, self.hidden_act,
                      self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, causal)
            hidden_states.append(x)
        return x, tuple(hidden_states)


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state_pre_norm: jax.Array  # (B, T, D) last layer output, before final LN
    last_hidden_state: jax.Array  # (B, T, D) after final LN: SD's text context
    pooled_output: Optional[jax.Array] = None  # (B, D) final-LN features at the EOS token
    hidden_states: Optional[tuple[jax.Array, ...]] = None  # embeddings output, then each layer


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) index of the token whose features transformers pools.

    transformers' rule: configs with the pre-2023 eos_token_id=2 (e.g. SD 1.x's
    text_encoder/config.json) take the largest token id (CLIP's EOS is the last entry of its
    vocabulary); any other eos_token_id takes its first occurrence.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    def setup(self):
        embed = lambda n: nn.Embed(n, self.hidden_size, dtype=self.dtype,
                                   embedding_init=nn.initializers.normal(0.02))
        self.token_embedding = embed(self.vocab_size)
        self.position_embedding = embed(self.max_position_embeddings)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids)

    def add_positions(self, token_embeds: jax.Array) -> jax.Array:
        length = token_embeds.shape[-2]
        if length > self.max_position_embeddings:
            raise ValueError(f"CLIP text: sequence length {length} exceeds "
                             f"max_position_embeddings={self.max_position_embeddings}")
        return token_embeds.astype(self.dtype) + self.position_embedding(jnp.arange(length))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.add_positions(self.embed_tokens(input_ids))


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel (causal self-attention, no projection head).

    Pass `input_ids` (B,T) or `inputs_embeds` (B,T,D) token embeddings (positions are added
    here). When both are given, the embeddings are used and the ids only locate the EOS token
    for `pooled_output` (None when no ids are given).
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    # Activation checkpointing of each encoder layer in a backward pass (NeTI's step runs
    # the encoder over 16 x B rows): "none" | "full" | "dots" | "dots_saveable".
    remat_policy: str = "none"

    def setup(self):
        c = self.config
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings,
                                             c.hidden_size, self.dtype)
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.num_attention_heads,
                                   c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                                   self.dtype, self.remat_policy)
        self.final_layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings (no positions): what `inputs_embeds` expects."""
        return self.embeddings.embed_tokens(input_ids)

    def final_norm(self, hidden: jax.Array) -> jax.Array:
        return self.final_layer_norm(hidden)

    def __call__(self, input_ids: Optional[jax.Array] = None,
                 inputs_embeds: Optional[jax.Array] = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("CLIPTextTransformer needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        elif input_ids is not None and input_ids.shape != inputs_embeds.shape[:-1]:
            raise ValueError(f"input_ids {input_ids.shape} do not match inputs_embeds "
                             f"{inputs_embeds.shape}")
        pre_norm, hidden_states = self.encoder(self.embeddings.add_positions(inputs_embeds),
                                               causal=True)
        last = self.final_norm(pre_norm)
        pooled = None
        if input_ids is not None:
            rows = jnp.arange(last.shape[0])
            pooled = last[rows, eos_positions(input_ids, self.config.eos_token_id)]
        return CLIPTextOutput(
            last_hidden_state_pre_norm=pre_norm,
            last_hidden_state=last,
            pooled_output=pooled,
            hidden_states=hidden_states if output_hidden_states else None,
        )


def clip_text_param_template(config: CLIPTextConfig) -> Any:
    """The param tree's shapes and dtypes (ShapeDtypeStructs), without computing anything."""
    model = CLIPTextTransformer(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def load_clip_text_params(state_dict: Mapping[str, Any], config: CLIPTextConfig) -> Any:
    """PyTorch CLIPTextModel weights -> our params. Accepts the classic `text_model.`-prefixed
    names (SD checkpoints) and transformers 5's unprefixed ones."""
    return convert.torch_to_flax(state_dict, clip_text_param_template(config),
                                 strip_prefix="text_model.", what="CLIP text encoder")
