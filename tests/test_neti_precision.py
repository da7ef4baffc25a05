"""Remat policies and bf16 compute change neither what NeTI learns nor what it keeps in fp32.

The U-Net under every remat policy gives the plain U-Net's outputs and gradients with the same
param tree. A NeTI step with compute_dtype bfloat16 runs the frozen U-Net in bf16 while the
mapper params, the optimizer state and the loss stay float32; a step with
train.remat_policy="full" equals one without remat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.neti import get_config
from spacetime_jax.errors import UserError
from spacetime_jax.models.attention import LayerContexts
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.models.tiny_configs import TINY_SD1_UNET
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from spacetime_jax.neti.concept import prepare_text_encoder
from spacetime_jax.neti.train import build_session, concept_specs
from spacetime_jax.parallel.mesh import make_mesh
from spacetime_jax.training.remat import REMAT_POLICIES, check_remat_policy

BATCH, TOKENS, SIDE = 2, 7, 8
TIMESTEPS = np.array([3.0, 731.0], np.float32)
# Every kind of block the policies wrap (down and up blocks with and without attention, the
# mid block), at the smallest depth: four compiles of its gradient stay cheap.
SMALL_UNET = dict(TINY_SD1_UNET, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
                  layers_per_block=1)


# ----------------------------------------------------------------------------- U-Net remat

@pytest.fixture(scope="module")
def tiny_unet():
    config = UNetConfig.from_dict(SMALL_UNET)
    rng = np.random.RandomState(0)
    latents = rng.randn(BATCH, SIDE, SIDE, 4).astype(np.float32)
    context = rng.randn(BATCH, TOKENS, config.cross_attention_dim).astype(np.float32)
    contexts = LayerContexts.shared(jnp.asarray(context), config.num_cross_attention_layers)
    # Random params drawn on the host: an init would cost one more compile.
    template = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0), latents,
                              TIMESTEPS, context)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.randn(*x.shape), jnp.float32),
                          template)
    return dict(config=config, latents=latents, contexts=contexts, params=params)


def output_and_grads(unet, policy: str):
    """The U-Net's output and the gradients (params, per-layer contexts) of a loss on it."""
    model = UNet2DConditionModel(unet["config"], remat_policy=policy)
    weights = np.random.RandomState(1).randn(BATCH, SIDE, SIDE, 4).astype(np.float32)

    def loss(params, contexts):
        out = model.apply({"params": params}, unet["latents"], TIMESTEPS, contexts)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        unet["params"], unet["contexts"])
    return out, grads


@pytest.fixture(scope="module")
def plain(tiny_unet):
    return output_and_grads(tiny_unet, "none")


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_unet_has_the_plain_param_tree(tiny_unet, policy):
    def shapes(p):
        model = UNet2DConditionModel(tiny_unet["config"], remat_policy=p)
        tree = jax.eval_shape(model.init, jax.random.key(0), tiny_unet["latents"], TIMESTEPS,
                              tiny_unet["contexts"])
        return jax.tree_util.tree_flatten_with_path(tree)

    remat_leaves, remat_structure = shapes(policy)
    plain_leaves, plain_structure = shapes("none")
    assert remat_structure == plain_structure
    assert [(path, leaf.shape, leaf.dtype) for path, leaf in remat_leaves] == \
        [(path, leaf.shape, leaf.dtype) for path, leaf in plain_leaves]


# "dots_saveable" keeps a superset of what "dots" keeps: the two ends and one between.
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_unet_gives_the_plain_outputs_and_gradients(tiny_unet, plain, policy):
    out, (param_grads, context_grads) = output_and_grads(tiny_unet, policy)
    plain_out, (plain_param_grads, plain_context_grads) = plain
    assert np.abs(np.asarray(plain_out)).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain_out), rtol=1e-6, atol=1e-6)
    # Recomputation regroups float32 sums: equal up to a few ulps of each array's scale.
    for got, want in zip(jax.tree.leaves((param_grads, context_grads)),
                         jax.tree.leaves((plain_param_grads, plain_context_grads))):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                                   atol=1e-5 * max(np.abs(want).max(), 1e-3))
    # The comparison covers gradients that reach every layer's context.
    assert (np.abs(np.asarray(plain_context_grads.values)).sum(axis=(1, 2, 3)) > 0).all()


def test_unknown_remat_policy_is_named(tiny_unet):
    with pytest.raises(UserError, match="train.remat_policy='dotz' is unknown; use one of none"):
        check_remat_policy("dotz", "train.remat_policy")
    model = UNet2DConditionModel(tiny_unet["config"], remat_policy="everything")
    with pytest.raises(UserError, match="'everything' is unknown"):
        jax.eval_shape(model.init, jax.random.key(0), tiny_unet["latents"], TIMESTEPS,
                       tiny_unet["contexts"])


# ----------------------------------------------------------------------- text encoder remat

def text_output_and_grads(policy: str):
    """The tiny CLIP text encoder's output and its gradient with respect to the input token
    embeddings (what NeTI's mapper output reaches) under `policy`."""
    from spacetime_jax.models.clip_text import (CLIPTextConfig, CLIPTextTransformer,
                                                clip_text_param_template)
    from spacetime_jax.models.tiny_configs import TINY_CLIP_TEXT
    config = CLIPTextConfig.from_dict(TINY_CLIP_TEXT)
    rng = np.random.RandomState(2)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.randn(*x.shape), jnp.float32),
                          clip_text_param_template(config))
    embeds = rng.randn(3, 9, config.hidden_size).astype(np.float32)
    weights = rng.randn(3, 9, config.hidden_size).astype(np.float32)
    model = CLIPTextTransformer(config, remat_policy=policy)

    def loss(embeds):
        out = model.apply({"params": params}, inputs_embeds=embeds).last_hidden_state
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(embeds)
    return np.asarray(out), np.asarray(grads)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_text_encoder_gives_the_plain_outputs_and_gradients(policy):
    plain_out, plain_grads = text_output_and_grads("none")
    out, grads = text_output_and_grads(policy)
    assert np.abs(plain_grads).max() > 0.1
    np.testing.assert_allclose(out, plain_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads, plain_grads, rtol=0,
                               atol=1e-5 * np.abs(plain_grads).max())


# ----------------------------------------------------------------------------- NeTI steps

def tiny_config(**overrides):
    config = get_config("demo")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return dict(specs=concept_specs(tiny_config()),
                mesh=make_mesh({"concept": 1, "data": 1, "model": 1}, jax.devices()[:1]),
                workdir=tmp_path_factory.mktemp("neti_precision"))


def toy_session(toy, dtype, **overrides):
    """A Session of the tiny config through the job's own load path at `dtype`."""
    config = tiny_config(**overrides)
    sd = load_stable_diffusion(resolve_builtin(config.model), dtype)
    specs = toy["specs"]
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [s.placeholder for s in specs], [s.super_category for s in specs])
    session = build_session(config, sd, text, specs, toy["mesh"], toy["workdir"])
    session.put()
    return session


def compiled_steps(session, steps: int):
    """Compiles the session's step once (AOT, like the job), runs it `steps` times; returns
    (traced step, compiled step, final state, per-step losses)."""
    state = session.initial_state
    traced = session.step_fn().trace(state, session.data, session.frozen, session.schedule)
    compiled = traced.lower().compile()
    losses = []
    for _ in range(steps):
        state, loss = compiled(state, session.data, session.frozen, session.schedule)
        losses.append(loss)
    return traced, compiled, state, losses


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


# What jax.checkpoint leaves in a jaxpr (its name varies across jax versions).
REMAT_PRIMITIVE = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name


def primitive_input_dtypes(jaxpr, primitive: str) -> list:
    """Input dtypes of every `primitive` equation of `jaxpr`, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(tuple(v.aval.dtype for v in eqn.invars))
        for inner in sub_jaxprs(eqn):
            found.extend(primitive_input_dtypes(inner, primitive))
    return found


@pytest.fixture(scope="module")
def bf16_run(toy):
    session = toy_session(toy, jnp.bfloat16, compute_dtype="bfloat16")
    traced, _, state, losses = compiled_steps(session, steps=2)
    return dict(session=session, jaxpr=traced.jaxpr.jaxpr, state=state, losses=losses)


def test_bf16_run_keeps_the_trainable_state_float32(bf16_run):
    state = bf16_run["state"]
    floating = [x for x in jax.tree.leaves((state.params, state.opt_state))
                if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floating) == 3 * len(jax.tree.leaves(state.params))  # params, Adam mu and nu
    assert {x.dtype for x in floating} == {jnp.dtype(jnp.float32)}
    data = bf16_run["session"].data
    assert data.target_norms.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(data.encoding)} == {jnp.dtype(jnp.float32)}


def test_bf16_run_reports_a_finite_float32_loss_that_moves(bf16_run):
    first, second = (np.asarray(loss) for loss in bf16_run["losses"])
    assert first.dtype == second.dtype == np.float32
    assert np.isfinite(first).all() and np.isfinite(second).all()
    assert first[0] != second[0]  # a new draw and new params: the step really trained


def test_bf16_run_computes_the_frozen_unet_in_bf16(bf16_run):
    statics = bf16_run["session"].statics
    assert statics.unet.dtype == jnp.bfloat16 and statics.text_encoder.dtype == jnp.bfloat16
    frozen_dtypes = {x.dtype for x in jax.tree.leaves(bf16_run["session"].frozen)}
    assert frozen_dtypes == {jnp.dtype(jnp.bfloat16)}
    # Convolutions live only in the U-Net (the VAE is not in the step): forward and backward.
    convolutions = primitive_input_dtypes(bf16_run["jaxpr"], "conv_general_dilated")
    assert len(convolutions) > 20
    assert set(convolutions) == {(jnp.dtype(jnp.bfloat16),) * 2}
    # The mapper's matmuls stay float32.
    matmuls = primitive_input_dtypes(bf16_run["jaxpr"], "dot_general")
    assert (jnp.dtype(jnp.float32),) * 2 in matmuls
    assert (jnp.dtype(jnp.bfloat16),) * 2 in matmuls


def test_remat_policy_reaches_the_neti_step(toy):
    """The config key reaches the step's U-Net (traced, not compiled: that the rematerialized
    U-Net gives the plain outputs and gradients is tested above)."""
    counts = {}
    for policy in ("none", "full"):
        session = toy_session(toy, jnp.float32, **{"train.remat_policy": policy})
        assert session.statics.unet.remat_policy == policy
        assert session.statics.text_encoder.remat_policy == policy
        traced = session.step_fn().trace(session.initial_state, session.data, session.frozen,
                                         session.schedule)
        counts[policy] = len(primitive_input_dtypes(traced.jaxpr.jaxpr, REMAT_PRIMITIVE))
    # Under any policy each attention core recomputes its probabilities (16 transformer
    # blocks x self and cross attention, and each text layer's): remat by design.
    text_layers = session.statics.text_encoder.config.num_hidden_layers
    assert counts["none"] >= 32 + text_layers
    # "full" adds 22 ResNet and 16 transformer blocks and the text encoder's layers.
    assert counts["full"] >= counts["none"] + 38 + text_layers
