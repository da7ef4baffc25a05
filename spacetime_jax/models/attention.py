"""Attention with diffusers' parameter names, and cross-attention with per-layer contexts.

A cross-attention layer takes its context either as one array shared by every layer, or as
a `LayerContexts` structure stacked over the U-Net's cross-attention layers: a key context
and a value context per layer (NeTI gives each layer its own, and its textual bypass touches
only the values), and an optional `LocalBranch` (ELITE's local mapper tokens). Each layer
knows its static index and slices its own entry.

`attention` picks the kernel of every layer that does not need the probabilities (see
attention_kernels.py: auto, xla, cudnn, splash); the layers that do (ELITE's local branch,
`return_probs`) always take the einsum path.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_jax.models.attention_kernels import (apply_probabilities, attend,
                                                    attention_probabilities)

Dtype = Any


@flax.struct.dataclass
class LocalBranch:
    """ELITE's local injection: extra tokens seen through each layer's to_k_local/to_v_local.

    tokens: (B, N, D) local-mapper tokens (the same for every layer).
    word_position: (B,) int, the primary word's position in the global context; its global
      attention map, normalized per sample, gates the local term.
    scale: (B,) float lambda per sample (0 for rows that must not get the local term, such
      as the unconditional half of classifier-free guidance).
    """
    tokens: jax.Array
    word_position: jax.Array
    scale: jax.Array


# Below this, a layer's primary-word map is not a map: a U-Net whose attention logits span
# more than ~90 gives the word probabilities of 1e-36 or an exact 0 in some layers, which the
# reference's m / max(m) turns into noise scaled to 1 or 0 / 0 = NaN (and 1 / max^2 into an
# infinite gradient); such a layer's local term fades out instead.
MIN_WORD_ATTENTION = 1e-6


def local_gate(global_probs: jax.Array, word_position: jax.Array) -> jax.Array:
    """ELITE's gate of the local term: the primary word's global attention map (B, N, Tq),
    normalized per sample over heads and queries (the reference's batch-wide max couples
    batch-mates; see METHODS.md), with the max floored at MIN_WORD_ATTENTION."""
    word_map = jnp.take_along_axis(
        global_probs, word_position[:, None, None, None].astype(jnp.int32), axis=-1)[..., 0]
    peak = jnp.max(word_map, axis=(1, 2), keepdims=True)
    return word_map / jnp.maximum(peak, MIN_WORD_ATTENTION)


@flax.struct.dataclass
class LayerContexts:
    """Per-layer text contexts: keys and values are (num_layers, B, T, D)."""
    keys: jax.Array
    values: jax.Array
    local: Optional[LocalBranch] = None

    @classmethod
    def shared(cls, context: jax.Array, num_layers: int) -> "LayerContexts":
        stacked = jnp.broadcast_to(context[None], (num_layers,) + context.shape)
        return cls(keys=stacked, values=stacked)


Context = Union[jax.Array, LayerContexts]


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


def multihead_attention(q, k, v, upcast: bool = False) -> jax.Array:
    """jax.nn.dot_product_attention, for the VAE (the U-Net's layers go through `attend`)."""
    if upcast:
        dtype = q.dtype
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v).astype(dtype)
    return jax.nn.dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Self-attention (context None) or cross-attention with one context.

    Projections named as diffusers' `Attention`: to_q, to_k, to_v, to_out_0.
    """
    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        q = _split_heads(dense("to_q", self.qkv_bias)(x), self.heads)
        k = _split_heads(dense("to_k", self.qkv_bias)(context), self.heads)
        v = _split_heads(dense("to_v", self.qkv_bias)(context), self.heads)
        out = attend(q, k, v, kernel=self.attention, upcast=self.upcast)
        out = out.reshape(x.shape[:-1] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class CrossAttention(nn.Module):
    """The U-Net's attn2, aware of its layer index for per-layer contexts.

    `local_branch=True` adds ELITE's bias-free to_k_local / to_v_local projections; they are
    used only when the context carries a LocalBranch.
    """
    heads: int
    head_dim: int
    layer_index: int
    upcast: bool = False
    local_branch: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: Context,
                 return_probs: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
        inner = self.heads * self.head_dim
        dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
        if isinstance(context, LayerContexts):
            key_context = context.keys[self.layer_index]
            value_context = context.values[self.layer_index]
            local = context.local
        else:
            key_context = value_context = context
            local = None
        q = _split_heads(dense("to_q")(x), self.heads)
        k = _split_heads(dense("to_k")(key_context.astype(self.dtype)), self.heads)
        v = _split_heads(dense("to_v")(value_context.astype(self.dtype)), self.heads)

        if local is not None and not self.local_branch:
            raise ValueError("a LocalBranch context needs a U-Net built with local_branch=True")
        probs = None
        if local is not None or return_probs:
            probs = attention_probabilities(q, k)
            out = apply_probabilities(probs, v)
            if local is not None:
                out = out + self._local_term(q, probs, local, dense("to_k_local"),
                                             dense("to_v_local"))
        else:
            out = attend(q, k, v, kernel=self.attention, upcast=self.upcast)
        out = out.reshape(x.shape[:-1] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out), probs

    def _local_term(self, q, global_probs, local: LocalBranch, to_k_local, to_v_local):
        tokens = local.tokens.astype(self.dtype)
        k_local = _split_heads(to_k_local(tokens), self.heads)
        v_local = _split_heads(to_v_local(tokens), self.heads)
        local_probs = attention_probabilities(q, k_local)  # (B,N,Tq,Tl)
        gated = local_probs * local_gate(global_probs, local.word_position)[..., None]
        scale = jnp.asarray(local.scale, jnp.float32).reshape(-1, 1, 1, 1)
        return apply_probabilities(gated * scale, v_local)
