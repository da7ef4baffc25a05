"""The NeTI mapper: shapes, encoding, anchor init, nested dropout, truncation, baselines."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_jax.errors import UserError
from spacetime_jax.neti.mapper import (
    MapperConfig, NeTIMapper, TextualInversionEmbedding, anchor_kernel, anchor_timesteps,
    build_mapper, fourier_encode, init_mapper_variables, nested_dropout_limits,
    plain_encode, split_output)

CONFIG = MapperConfig()
TARGET_NORM = 0.387  # about the norm of CLIP's "object" embedding
# 16 layers x 4 samples, layer-major as the conditioning code batches them.
BATCH = 4
ROW_LAYERS = np.repeat(np.arange(16), BATCH).astype(np.int32)
ROW_TIMESTEPS = np.tile(np.array([0.0, 250.0, 731.0, 999.0], np.float32), 16)


def param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(config: MapperConfig) -> dict:
    zeros = jnp.zeros((1,), jnp.float32)
    return jax.eval_shape(NeTIMapper(config).init, jax.random.key(0), zeros, zeros, 1.0)


@pytest.fixture(scope="module")
def mapper():
    return NeTIMapper(CONFIG)


@pytest.fixture(scope="module")
def variables(mapper):
    return init_mapper_variables(mapper, jax.random.key(7))


@pytest.fixture(scope="module")
def hidden_fn(mapper):
    return jax.jit(partial(mapper.apply, method=NeTIMapper.hidden),
                   static_argnames=("truncation",))


@pytest.fixture(scope="module")
def output_fn(mapper):
    return jax.jit(mapper.apply, static_argnames=("truncation",))


# ---------------------------------------------------------------------------- structure

def test_param_count_at_defaults_is_the_references():
    variables = abstract_variables(CONFIG)
    assert set(variables) == {"params", "encoding"}
    assert variables["encoding"]["W"].shape == (1024, 2)
    assert param_count(variables["params"]) == 563_616
    assert sorted(variables["params"]) == ["input_layer", "net_1", "net_2", "net_4", "net_5",
                                           "output_layer_0"]


def test_param_count_without_bypass_and_with_plain_encoder():
    # Output layer 128 -> 768 instead of 128 -> 1536: 563,616 - 128*768 - 768.
    no_bypass = abstract_variables(dataclasses.replace(CONFIG, use_bypass=False))
    assert param_count(no_bypass["params"]) == 464_544
    assert no_bypass["params"]["output_layer_0"]["kernel"].shape == (128, 768)
    # The plain encoder feeds (t, l) straight into net.1 (the reference's input layer is
    # the identity): no input layer, net.1 is 2 -> 128, no W.
    plain = abstract_variables(dataclasses.replace(CONFIG, encoder="plain"))
    assert "encoding" not in plain
    assert "input_layer" not in plain["params"]
    assert plain["params"]["net_1"]["kernel"].shape == (2, 128)
    assert param_count(plain["params"]) == 563_616 - (2048 * 160 + 160) - 160 * 128 + 2 * 128


def test_config_round_trips_and_rejects_unknown_keys():
    config = dataclasses.replace(CONFIG, token_dim=32, encoder="plain", sigma_t=0.1)
    assert MapperConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown keys \\['sigma_x'\\]"):
        MapperConfig.from_dict({"sigma_x": 1.0})
    with pytest.raises(UserError, match="encoder must be one of"):
        MapperConfig(encoder="sinusoid")


# ---------------------------------------------------------------------------- encoding & init

def test_encoding_rows_have_unit_norm():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1024, 2)) * [0.03, 2.0]).astype(np.float32)
    t = np.arange(0, 1000, 37, dtype=np.float32)
    for layer in (0.0, 7.0, 15.0):
        features = fourier_encode(w, t, np.full_like(t, layer))
        assert features.shape == (t.shape[0], 2048)
        np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, rtol=1e-5)


def test_host_init_input_kernel_columns_are_anchor_encodings_t_major(variables):
    w = np.asarray(variables["encoding"]["W"])
    kernel = np.asarray(variables["params"]["input_layer"]["kernel"])
    assert kernel.shape == (2048, 160)
    np.testing.assert_array_equal(anchor_timesteps(CONFIG), np.arange(0, 1000, 100))
    for k in (0, 1, 15, 16, 17, 100, 159):
        t_a, l_a = 100 * (k // 16), k % 16
        expected = fourier_encode(w, np.array([t_a], np.float32), np.array([l_a], np.float32))
        np.testing.assert_allclose(kernel[:, k], expected[0], atol=1e-6)
    # W: N(0, 1) columns scaled by sigma_t and sigma_l.
    np.testing.assert_allclose(w.std(axis=0), [0.03, 2.0], rtol=0.1)


def test_module_init_also_sets_anchor_kernel_and_w():
    """mapper.init (the Flax initializers) follows the same scheme as the host init. Only W
    and the input layer are initialized: each random draw is one more slow CPU compile."""
    config = MapperConfig(num_layers=3, num_anchor_timesteps=2, num_frequencies=8,
                          hidden_width=8, token_dim=4)
    zeros = jnp.zeros((1,), jnp.float32)
    first_layer = lambda mapper, t, l: mapper.input_layer(mapper.encode(t, l))
    variables = jax.jit(partial(NeTIMapper(config).init, method=first_layer))(
        jax.random.key(3), zeros, zeros)
    w = variables["encoding"]["W"]
    kernel = variables["params"]["input_layer"]["kernel"]
    np.testing.assert_allclose(kernel, anchor_kernel(np.asarray(w), config), atol=1e-6)
    t = np.repeat([0.0, 500.0], 3).astype(np.float32)
    l = np.tile([0.0, 1.0, 2.0], 2).astype(np.float32)
    np.testing.assert_allclose(kernel.T, fourier_encode(np.asarray(w), t, l), atol=1e-6)
    # The bias is PyTorch Linear's uniform(+-1/sqrt(fan_in)), not zeros.
    bias = np.asarray(variables["params"]["input_layer"]["bias"])
    assert np.all(bias != 0) and np.all(np.abs(bias) <= 1 / np.sqrt(16))


def test_output_has_target_norm_and_splits_into_token_and_bypass(variables, output_fn):
    for target_norm in (TARGET_NORM, 28.0):
        out = output_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, target_norm)
        assert out.shape == (64, 1536)
        np.testing.assert_allclose(np.linalg.norm(out, axis=-1), target_norm, rtol=1e-5)
    token, bypass = split_output(out, CONFIG)
    assert token.shape == bypass.shape == (64, 768)
    np.testing.assert_array_equal(np.concatenate([token, bypass], -1), out)
    # Different (t, l) give different outputs.
    assert np.abs(out[0] - out[1]).max() > 1e-3 and np.abs(out[0] - out[BATCH]).max() > 1e-3


def test_no_dropout_at_inference_without_truncation(variables, hidden_fn):
    hidden = np.asarray(hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS))
    assert hidden.shape == (64, 128)
    # LeakyReLU never gives exact zeros: any zero would be dropout.
    assert np.count_nonzero(hidden == 0) == 0


def test_nested_dropout_zeroes_exactly_a_suffix_per_row(variables, hidden_fn):
    base = np.asarray(hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS))
    limits_fn = jax.jit(lambda rng: nested_dropout_limits(rng, jnp.asarray(ROW_LAYERS), CONFIG))
    truncated_rows = 0
    for seed in range(3):
        rng = jax.random.key(seed)
        dropped = np.asarray(hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, dropout_rng=rng))
        limits = np.asarray(limits_fn(rng))
        for row in range(64):
            # The row is hidden[:limit] followed by zeros, nothing else.
            np.testing.assert_array_equal(dropped[row, :limits[row]], base[row, :limits[row]])
            assert not dropped[row, limits[row]:].any()
            assert np.count_nonzero(dropped[row]) == limits[row]
        truncated_rows += int((limits < 128).sum())
    assert 0 < truncated_rows < 3 * 64


def test_gradients_are_finite_under_nested_dropout(mapper, variables):
    def loss(params):
        out = mapper.apply({**variables, "params": params}, ROW_TIMESTEPS, ROW_LAYERS,
                           TARGET_NORM, dropout_rng=jax.random.key(0))
        return jnp.sum(out * jnp.arange(out.shape[-1]))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["output_layer_0"]["kernel"])).max() > 0


def test_truncation_zeroes_the_tail_and_keeps_the_norm(variables, hidden_fn, output_fn):
    base = np.asarray(hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS))
    hidden = np.asarray(hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, truncation=37))
    np.testing.assert_array_equal(hidden[:, :37], base[:, :37])
    assert not hidden[:, 37:].any()
    out = output_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, TARGET_NORM, truncation=37)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), TARGET_NORM, rtol=1e-5)
    full = output_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, TARGET_NORM)
    assert np.abs(out - full).max() > 1e-3
    # T = hidden_width keeps everything.
    np.testing.assert_array_equal(
        hidden_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, truncation=128), base)


def test_truncation_zero_gives_the_normalized_output_bias(variables, output_fn):
    """With every hidden unit zeroed the output layer returns its bias: normalized, the same
    vector for every (t, l), still of norm target_norm (the bias is not zero)."""
    out = np.asarray(output_fn(variables, ROW_TIMESTEPS, ROW_LAYERS, TARGET_NORM, truncation=0))
    bias = np.asarray(variables["params"]["output_layer_0"]["bias"])
    expected = bias / np.linalg.norm(bias) * TARGET_NORM
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-7)


def test_all_zero_output_stays_finite(mapper, variables):
    """A zero output bias and truncation 0: a zero vector, like torch's F.normalize, with
    finite gradients (no sqrt(0) in the normalization)."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    params["output_layer_0"] = {**params["output_layer_0"],
                                "bias": jnp.zeros_like(params["output_layer_0"]["bias"])}

    def total(params):
        out = mapper.apply({**variables, "params": params}, ROW_TIMESTEPS[:2], ROW_LAYERS[:2],
                           TARGET_NORM, truncation=0)
        return jnp.sum(out), out

    (value, out), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    assert not np.asarray(out).any()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_truncation_out_of_range_is_a_clear_error(mapper, variables):
    for bad in (200, -1):
        with pytest.raises(UserError, match=f"truncation index {bad} is outside 0..128"):
            mapper.apply(variables, ROW_TIMESTEPS, ROW_LAYERS, 1.0, truncation=bad)
    with pytest.raises(UserError, match="not both"):
        mapper.apply(variables, ROW_TIMESTEPS, ROW_LAYERS, 1.0, truncation=5,
                     dropout_rng=jax.random.key(0))


# ---------------------------------------------------------------------------- statistics

def test_nested_dropout_statistics_one_coin_per_layer():
    """2000 steps x 16 layers x 4 rows, rows in shuffled order: each layer's coin falls about
    half the time, coins are independent across layers, a layer's rows share the coin, and
    the drop index is uniform over 0..127."""
    steps, layers = 2000, 16
    row_layers = jax.random.permutation(jax.random.key(99), jnp.asarray(ROW_LAYERS))
    rngs = jax.random.split(jax.random.key(1), steps)
    limits = np.asarray(jax.jit(jax.vmap(
        lambda rng: nested_dropout_limits(rng, row_layers, CONFIG)))(rngs))  # (steps, 64)
    dropped = limits < 128
    row_layers = np.asarray(row_layers)

    # All rows of a layer share its coin at every step.
    coins = np.zeros((steps, layers), bool)
    for layer in range(layers):
        rows = dropped[:, row_layers == layer]
        assert (rows == rows[:, :1]).all()
        coins[:, layer] = rows[:, 0]
    # Each coin falls with probability 0.5: within 5 binomial standard deviations.
    sd = np.sqrt(0.25 / steps)
    assert np.all(np.abs(coins.mean(0) - 0.5) < 5 * sd), coins.mean(0)
    # Independent across layers: P(both) ~ 0.25 for every pair.
    both = (coins[:, :, None] & coins[:, None, :]).mean(0)[np.triu_indices(layers, 1)]
    sd_pair = np.sqrt(0.25 * 0.75 / steps)
    assert np.all(np.abs(both - 0.25) < 5 * sd_pair), both
    # Drop index uniform over 0..127: chi-square with 127 degrees of freedom.
    indices = limits[dropped]
    counts = np.bincount(indices, minlength=128)
    assert counts.shape == (128,) and counts.min() > 0
    expected = indices.size / 128
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 127 + 6 * np.sqrt(2 * 127), chi2


# ---------------------------------------------------------------------------- variants

def test_plain_encoder_maps_t_and_l_to_unit_interval_and_runs():
    np.testing.assert_allclose(plain_encode(jnp.array([0.0, 999.0]), jnp.array([0.0, 15.0]), 16),
                               [[-1.0, -1.0], [1.0, 1.0]], atol=1e-6)
    config = MapperConfig(encoder="plain", token_dim=32, hidden_width=16)
    mapper = NeTIMapper(config)
    variables = init_mapper_variables(mapper, 0)
    assert set(variables) == {"params"}
    out = jax.jit(mapper.apply)(variables, ROW_TIMESTEPS, ROW_LAYERS, 2.0)
    assert out.shape == (64, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 2.0, rtol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-4


def test_textual_inversion_returns_one_vector_for_every_t_and_l():
    init_embedding = np.linspace(-1, 1, 768).astype(np.float32)
    baseline = build_mapper("textual_inversion", CONFIG, init_embedding=init_embedding)
    assert isinstance(baseline, TextualInversionEmbedding)
    variables = init_mapper_variables(baseline, jax.random.key(0))
    np.testing.assert_array_equal(variables["params"]["embedding"], init_embedding)
    out = baseline.apply(variables, ROW_TIMESTEPS, ROW_LAYERS, TARGET_NORM)
    np.testing.assert_array_equal(out, np.broadcast_to(init_embedding, (64, 768)))
    token, bypass = split_output(out, CONFIG)
    assert bypass is None and token.shape == (64, 768)


def test_build_mapper_checks_its_arguments():
    assert isinstance(build_mapper("neti", CONFIG), NeTIMapper)
    with pytest.raises(UserError, match="needs init_embedding"):
        build_mapper("textual_inversion", CONFIG)
    with pytest.raises(UserError, match="unknown mapper kind"):
        build_mapper("lora", CONFIG)


def test_concepts_of_one_kind_and_shape_share_one_sampling_mapper():
    from spacetime_jax.neti.concept import Concept

    def concept(kind, placeholder, config=CONFIG):
        return Concept(kind=kind, mapper_config=config, variables=None,
                       placeholder=placeholder, super_category="cat", target_norm=1.0,
                       base_model="m")

    # One module object, so a jitted sampler keyed on it compiles once for all of them.
    assert concept("textual_inversion", "<a>").mapper is concept("textual_inversion", "<b>").mapper
    assert concept("neti", "<a>").mapper is concept("neti", "<b>").mapper
    assert concept("neti", "<a>").mapper is not concept("textual_inversion", "<a>").mapper
    other = dataclasses.replace(CONFIG, hidden_width=64)
    assert concept("neti", "<a>", other).mapper is not concept("neti", "<a>").mapper
