"""The attention kernels against the einsum path, and the switch that picks them.

On CPU: "xla" runs as itself; jax.nn.dot_product_attention(implementation="xla") stands in
for cuDNN (same entry point, another implementation); the splash kernel runs in Pallas's
interpret mode. Shapes are small but keep what matters on TPU: 77 keys (padded to 128),
query counts that are not multiples of 128, head dims 40, 64 and 160 (padded to 128 lanes).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_jax.models.attention import CrossAttention
from spacetime_jax.models.attention_kernels import (AttentionKernelError, apply_probabilities,
                                                    attend, attention_probabilities,
                                                    cudnn_unsupported, resolve_attention,
                                                    splash_attention, splash_block_sizes)
from spacetime_jax.models.tiny_configs import TINY_SD1_UNET
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig

REPO = Path(__file__).resolve().parents[1]

# (batch, heads, queries, keys, head dim): cross-attention over CLIP's 77 tokens; SD's
# 8x8 self-attention at head dim 40 (queries and keys padded); a 160-wide head at 200 tokens.
CROSS = (1, 2, 256, 77, 64)
SELF_40 = (1, 2, 64, 64, 40)
SELF_160 = (1, 1, 200, 200, 160)


def _qkv(shape, seed=0):
    b, n, tq, tk, h = shape
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.randn(b, t, n, h).astype(np.float32)) for t in (tq, tk, tk))


def einsum_attention(q, k, v):
    return apply_probabilities(attention_probabilities(q, k), v)


def _output_and_grads(fn, q, k, v):
    """fn's output and the gradients w.r.t. q, k, v of a random projection of it (so every
    output element's cotangent differs)."""
    weights = jnp.asarray(np.random.RandomState(9).randn(*q.shape).astype(np.float32))
    out = fn(q, k, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)
    return out, grads


def _assert_matches_einsum(fn, shape, atol):
    q, k, v = _qkv(shape)
    out, grads = _output_and_grads(fn, q, k, v)
    ref_out, ref_grads = _output_and_grads(einsum_attention, q, k, v)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=atol, rtol=0, err_msg=f"d/d{name}")


@pytest.mark.parametrize("shape", [CROSS, SELF_40], ids=["cross77", "self64"])
@pytest.mark.parametrize("upcast", [False, True])
def test_xla_kernel_is_the_einsum_path(shape, upcast):
    # Reached: exact (float32 in, so upcast changes nothing).
    _assert_matches_einsum(lambda q, k, v: attend(q, k, v, kernel="xla", upcast=upcast),
                           shape, atol=0)


@pytest.mark.parametrize("shape", [CROSS, SELF_40], ids=["cross77", "self64"])
def test_dot_product_attention_standing_in_for_cudnn_matches_einsum(shape):
    # cuDNN's own call cannot run on CPU; its entry point with the xla implementation can.
    # Reached: ~5e-7 (outputs and gradients).
    _assert_matches_einsum(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
        shape, atol=1e-5)


@pytest.mark.parametrize("shape", [CROSS, SELF_40, SELF_160],
                         ids=["cross77_h64", "self64_h40", "self200_h160"])
def test_splash_kernel_in_interpret_mode_matches_einsum(shape):
    # The kernel sees 128 keys where the einsum path sees 77 (or 64, or 200): parity says the
    # padded keys get no weight, and their padded query rows no cotangent.
    # Reached: ~1.5e-6 (outputs and gradients), float32.
    _assert_matches_einsum(lambda q, k, v: splash_attention(q, k, v, interpret=True),
                           shape, atol=1e-5)


@pytest.mark.parametrize("kernel", [
    lambda q, k, v: splash_attention(q, k, v, interpret=True),
    lambda q, k, v: attend(q, k, v, kernel="xla", upcast=True),
], ids=["splash", "xla_upcast"])
def test_bfloat16_inputs_stay_bfloat16_and_near_float32(kernel):
    q, k, v = _qkv(CROSS)
    out = kernel(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    # Reached: ~5e-3 for both (bf16 rounding of inputs and output).
    np.testing.assert_allclose(out.astype(jnp.float32), einsum_attention(q, k, v), atol=2e-2,
                               rtol=0)


def test_splash_block_sizes_tile_the_padded_lengths():
    # SD at 512 px: 4096, 1024, 256 and 64 (-> 128) queries; 77 (-> 128) keys; SD 2.x at
    # 768 px: 576 (-> 640) queries.
    sizes = {(q, kv): splash_block_sizes(q, kv) for q, kv in
             [(4096, 4096), (1024, 128), (256, 256), (128, 128), (640, 640)]}
    assert [(s.block_q, s.block_kv) for s in sizes.values()] == [
        (512, 512), (512, 128), (256, 256), (128, 128), (128, 128)]
    assert all(s.has_backward_blocks for s in sizes.values())


def test_auto_resolves_per_backend():
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("auto", "cpu") == "xla"
    assert resolve_attention("xla", "tpu") == "xla"
    assert resolve_attention("splash", "tpu") == "splash"
    assert resolve_attention("cudnn", "gpu") == "cudnn"


@pytest.mark.parametrize("name, backend, words", [
    ("flash", "cpu", "unknown; use one of auto, xla, cudnn, splash"),
    ("cudnn", "cpu", "runs only on gpu"),
    ("splash", "gpu", "runs only on tpu"),
])
def test_a_kernel_that_cannot_run_is_refused_in_one_line(name, backend, words):
    with pytest.raises(AttentionKernelError) as error:
        resolve_attention(name, backend)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_choosing_cudnn_on_cpu_is_refused_when_attending():
    q, k, v = _qkv(CROSS)
    with pytest.raises(AttentionKernelError, match="runs only on gpu"):
        attend(q, k, v, kernel="cudnn")


@pytest.mark.parametrize("dtype, head_dim, capability, supported", [
    (jnp.bfloat16, 64, "8.0", True),
    (jnp.float16, 40, "8.0", True),
    (jnp.bfloat16, 160, "8.0", False),   # SD 1.x's deepest blocks before Hopper
    (jnp.bfloat16, 160, "9.0", True),
    (jnp.float32, 64, "9.0", False),     # float32 compute runs on xla
    (jnp.bfloat16, 36, "9.0", False),
])
def test_cudnn_limits(dtype, head_dim, capability, supported):
    assert (cudnn_unsupported(dtype, head_dim, capability) is None) == supported


def test_cross_attention_probabilities_take_the_einsum_path_whatever_the_switch():
    # cuDNN cannot run here; asking for probabilities must not reach it.
    layer = CrossAttention(2, 8, layer_index=0, attention="cudnn")
    x, context = jnp.ones((1, 4, 16)), jnp.ones((1, 5, 12))
    params = layer.init(jax.random.key(0), x, context, return_probs=True)
    _, probs = layer.apply(params, x, context, return_probs=True)
    assert probs.shape == (1, 2, 4, 5)


@pytest.fixture(scope="module")
def tiny_unet():
    model = UNet2DConditionModel(UNetConfig.from_dict(TINY_SD1_UNET))
    rng = np.random.RandomState(0)
    latents = rng.randn(2, 8, 8, 4).astype(np.float32)
    context = rng.randn(2, 7, 32).astype(np.float32)
    timesteps = np.array([3.0, 731.0], np.float32)
    # Random weights on eval_shape's tree: compiling `init` would take longer than the test.
    template = jax.eval_shape(model.init, jax.random.key(0), latents, timesteps, context)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.randn(*leaf.shape), leaf.dtype),
                          template)
    return model, params, (latents, timesteps, context)


def test_unet_with_xla_attention_equals_the_default_on_cpu(tiny_unet):
    model, params, inputs = tiny_unet
    xla = model.clone(attention="xla")
    assert xla.attention == "xla" and model.attention == "auto"
    default = np.asarray(jax.jit(model.apply)(params, *inputs))
    switched = np.asarray(jax.jit(xla.apply)(params, *inputs))
    assert np.abs(default).max() > 0.1
    np.testing.assert_array_equal(switched, default)


@pytest.mark.parametrize("name, words", [("flashy", "unknown"), ("cudnn", "runs only on gpu")])
def test_unet_refuses_a_kernel_it_cannot_run(tiny_unet, name, words):
    model, params, inputs = tiny_unet
    with pytest.raises(AttentionKernelError, match=words):
        model.clone(attention=name).apply(params, *inputs)


def _mesh_parity() -> dict:
    """Splash (interpret mode) on 8 devices: K=2 concepts vmapped over `concept`, B=2 over
    `data`, heads over `model`, the mesh set with jax.set_mesh as a step would be traced;
    the loss and its gradients against the einsum path on the same mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from spacetime_jax.parallel.mesh import make_mesh
    mesh = make_mesh({"concept": 2, "data": 2, "model": 2})
    q, k, v = (jax.device_put(x.reshape((2, 2) + x.shape[1:]),
                              NamedSharding(mesh, P("concept", "data")))
               for x in _qkv((4, 2, 128, 77, 64)))

    def loss(attention):
        per_concept = jax.vmap(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2),
                               spmd_axis_name="concept")
        return jax.jit(jax.value_and_grad(lambda q, k, v: per_concept(q, k, v).sum(),
                                          argnums=(0, 1, 2)))

    with jax.set_mesh(mesh):
        splash_loss, splash_grads = loss(
            lambda q, k, v: splash_attention(q, k, v, interpret=True))(q, k, v)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: splash_attention(q, k, v, interpret=True))(
            q[0], k[0], v[0]))
    ref_loss, ref_grads = loss(einsum_attention)(q, k, v)
    return {"devices": jax.device_count(), "shard_map": "shard_map" in jaxpr,
            "loss": abs(float(splash_loss) - float(ref_loss)) / abs(float(ref_loss)),
            "grads": max(float(jnp.abs(a - b).max()) for a, b in zip(splash_grads, ref_grads))}


def test_splash_runs_per_device_under_a_mesh():
    # A Mosaic kernel cannot be partitioned by XLA: on a real multi-device mesh it must sit in
    # a shard_map. On 8 CPU devices the same code runs in interpret mode.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-m", "tests.test_attention_kernels"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["shard_map"]
    # Reached: loss ~1e-7 relative, gradients ~5e-6.
    assert result["loss"] < 1e-5 and result["grads"] < 1e-4


if __name__ == "__main__":
    print(json.dumps(_mesh_parity()))
