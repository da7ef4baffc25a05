"""Attention kernels behind one switch: `auto`, `xla`, `cudnn`, `splash`.

Every kernel computes softmax(q k^T / sqrt(H)) v on (B, T, N, H) queries, keys and values:

  xla     the einsum path: logits and softmax in float32, then probabilities @ values. It is
          also the only path that can hand the probabilities out, so ELITE's local branch and
          `return_probs` use it whatever the switch says.
  cudnn   cuDNN flash attention (jax.nn.dot_product_attention(implementation="cudnn")), GPU
          only. cuDNN runs bf16/fp16 inputs with a head dim that is a multiple of 8 and at most
          128 (256 from Hopper on); a call outside that (float32 compute, SD 1.x's head dim
          160 before Hopper) runs on the xla path instead, with one warning per reason.
  splash  the Pallas TPU splash-attention kernel, TPU only. Keys are padded to its 128-wide
          blocks and masked with segment ids (CLIP's 77 tokens become 128, the padding never
          attended); queries are padded alike and sliced off; head dims are zero-padded to a
          multiple of 128 lanes (SD's 40, 64, 80, 160 -> 128, 128, 128, 256), which leaves
          q.k and the values' leading columns unchanged.
  auto    cudnn on GPUs, splash on TPUs, xla elsewhere.

`upcast` (SD 2.x's upcast_attention) asks that half-precision logits not overflow. The xla
path runs the whole attention in float32 then; the fused kernels already accumulate the
logits and the softmax in float32 (what diffusers' upcast does too: only q and k are upcast),
so they take the inputs as they are.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as splash,
                                                              splash_attention_mask as splash_mask)
from jax.sharding import PartitionSpec as P

from spacetime_jax.errors import UserError

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")
_AUTO = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
_BACKENDS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}

# The mesh axes (parallel/mesh.py) a sharded batch and sharded heads live on.
_BATCH_AXIS, _HEAD_AXIS = "data", "model"

_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)  # the largest dividing a padded length is used

_log = logging.getLogger(__name__)


class AttentionKernelError(UserError, ValueError):
    """An attention kernel that is unknown or cannot run on this backend."""


def resolve_attention(name: str, backend: Optional[str] = None, what: str = "attention") -> str:
    """The concrete kernel ("xla", "cudnn" or "splash") that `name` means on `backend`
    (default: jax.default_backend()); AttentionKernelError, one line, if there is none."""
    backend = jax.default_backend() if backend is None else backend
    if name not in ATTENTION_KERNELS:
        raise AttentionKernelError(
            f"{what}={name!r} is unknown; use one of {', '.join(ATTENTION_KERNELS)}")
    if name == "auto":
        return _AUTO.get(backend, "xla")
    if name in _BACKENDS and backend not in _BACKENDS[name]:
        raise AttentionKernelError(
            f"{what}={name!r} runs only on {_BACKENDS[name][0]}, and this backend is "
            f"{backend!r}; use auto or xla")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: str = "auto",
           upcast: bool = False) -> jax.Array:
    """Attention output (B, Tq, N, H) of q (B, Tq, N, H), k and v (B, Tk, N, H), computed by
    `kernel` (any of ATTENTION_KERNELS; resolved for this backend while tracing)."""
    chosen = resolve_attention(kernel)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, upcast=upcast)
    if chosen == "splash":
        return splash_attention(q, k, v)
    return xla_attention(q, k, v, upcast=upcast)


# --- xla: the einsum path ----------------------------------------------------------------

def attention_probabilities(q: jax.Array, k: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) in float32; q (B,Tq,N,H), k (B,Tk,N,H) -> (B,N,Tq,Tk)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jax.nn.softmax(logits, axis=-1)


def apply_probabilities(probs: jax.Array, v: jax.Array) -> jax.Array:
    """(B,N,Tq,Tk) x (B,Tk,N,H) -> (B,Tq,N,H)."""
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False
                  ) -> jax.Array:
    return _xla_attention(q, k, v, upcast)


# A backward pass keeps q, k and v and recomputes the (B, N, Tq, Tk) probabilities, as the
# fused kernels do: kept, they were the biggest activations of SD's first U-Net level (32 MB
# per self-attention layer at 256 px, batch 1, fp32). A forward pass is unchanged.
@functools.partial(jax.checkpoint, static_argnums=(3,))
def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, upcast: bool) -> jax.Array:
    if upcast:
        dtype = q.dtype
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        return apply_probabilities(attention_probabilities(q, k), v).astype(dtype)
    return apply_probabilities(attention_probabilities(q, k), v)


# --- cudnn ---------------------------------------------------------------------------------

def cudnn_unsupported(dtype, head_dim: int, compute_capability: Optional[str]) -> Optional[str]:
    """Why cuDNN flash attention cannot take these inputs (None if it can): the limits
    jax's cuDNN lowering checks, known before tracing so that a fallback costs nothing."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs bfloat16 or float16 inputs, not {jnp.dtype(dtype)}"
    major = int(compute_capability.split(".")[0]) if compute_capability else 0
    max_head_dim = 256 if major >= 9 else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most "
                f"{max_head_dim} on this GPU, not {head_dim}")
    return None


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    # Cached: a U-Net traces ~32 attention layers, and one line per reason is enough.
    _log.warning("%s; those attention layers run on the xla kernel", reason)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False
                    ) -> jax.Array:
    capability = getattr(jax.local_devices()[0], "compute_capability", None)
    reason = cudnn_unsupported(q.dtype, q.shape[-1], capability)
    if reason is not None:
        _warn_fallback(reason)
        return xla_attention(q, k, v, upcast=upcast)
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


# --- splash ----------------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def splash_block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
    """Tiles for padded lengths (multiples of 128): the largest of 512, 256, 128 that
    divides each, for the forward and both backward kernels."""
    bq = next(b for b in _SPLASH_BLOCKS if q_len % b == 0)
    bkv = next(b for b in _SPLASH_BLOCKS if kv_len % b == 0)
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash attention on one device's (B, T, N, H) arrays."""
    _, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad, dim_pad = (_round_up(n, _LANES) for n in (q_len, kv_len, head_dim))
    # The kernel does not scale the logits; scaling q before padding keeps sqrt(H) the real
    # head dim's.
    q = q * (head_dim ** -0.5)
    q, k, v = (_pad_axis(_pad_axis(x, 1, n), 3, dim_pad).transpose(0, 2, 1, 3)
               for x, n in ((q, q_pad), (k, kv_pad), (v, kv_pad)))
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.FullMask((q_pad, kv_pad))] * heads),
        block_sizes=splash_block_sizes(q_pad, kv_pad), head_shards=1, q_seq_shards=1,
        interpret=interpret)
    segment_ids = None
    if kv_pad != kv_len:
        # Padded keys get their own segment, which no query has: they are never attended.
        # Padded queries share the real keys' segment, so no row is fully masked.
        segment_ids = splash.SegmentIds(q=jnp.zeros((q_pad,), jnp.int32),
                                        kv=(jnp.arange(kv_pad) >= kv_len).astype(jnp.int32))
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segment_ids))(q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]


def _mesh_spec(mesh, free_axes: tuple[str, ...], batch: int, heads: int) -> P:
    """Batch over the mesh's data axis and heads over its model axis, where they divide."""
    def axis(name: str, size: int):
        return name if name in free_axes and size % mesh.shape[name] == 0 else None
    return P(axis(_BATCH_AXIS, batch), None, axis(_HEAD_AXIS, heads), None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False
                     ) -> jax.Array:
    """Splash attention of (B, T, N, H) arrays. `interpret` runs the Pallas kernel in
    interpret mode (any backend; slow: for tests).

    A Mosaic kernel cannot be partitioned by XLA, so under a multi-device mesh set with
    `jax.set_mesh` the kernel runs in a shard_map, each device on its share of the batch
    (mesh axis `data`) and heads (`model`); under vmap(spmd_axis_name=...) shard_map adds
    that axis itself.
    """
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    free_axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                      if kind != jax.sharding.AxisType.Manual)
    if math.prod(mesh.shape[name] for name in free_axes) == 1:
        return local(q, k, v)
    spec = _mesh_spec(mesh, free_axes, q.shape[0], q.shape[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names=set(free_axes), check_vma=False)(q, k, v)
