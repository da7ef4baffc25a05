"""Our Flax U-Net against diffusers' UNet2DConditionModel on the same random weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from spacetime_jax.models import convert
from spacetime_jax.models.attention import LayerContexts
from spacetime_jax.models.config_utils import UnsupportedArchitectureError
from spacetime_jax.models.tiny_configs import TINY_SD1_UNET, TINY_SD2_UNET
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_reference import install_per_layer_processors, randomize_, state_dict_numpy

BATCH, TOKENS, SIDE = 2, 7, 8
TIMESTEPS = np.array([3.0, 731.0], np.float32)


def _torch_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class Pair:
    """A diffusers U-Net with random weights and our U-Net holding the same weights."""

    def __init__(self, config: dict, seed: int):
        torch.manual_seed(seed)
        self.torch = randomize_(TorchUNet(**_torch_kwargs(config)), seed)
        self.config = UNetConfig.from_dict(config)
        self.model = UNet2DConditionModel(self.config)
        rng = np.random.RandomState(seed)
        self.latents = rng.randn(BATCH, SIDE, SIDE, 4).astype(np.float32)
        self.context = rng.randn(BATCH, TOKENS, self.config.cross_attention_dim).astype(np.float32)
        template = jax.eval_shape(self.model.init, jax.random.key(0), self.latents, TIMESTEPS,
                                  self.context)["params"]
        self.params = convert.torch_to_flax(state_dict_numpy(self.torch), template, what="unet")
        self.apply = jax.jit(self.model.apply, static_argnames=("return_attention_probs",))

    def torch_forward(self, latents, context, **kwargs):
        with torch.no_grad():
            out = self.torch(torch.from_numpy(latents).permute(0, 3, 1, 2),
                             torch.from_numpy(TIMESTEPS), torch.from_numpy(context), **kwargs)
        return out.sample.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def sd1():
    return Pair(TINY_SD1_UNET, seed=0)


@pytest.fixture(scope="module")
def sd2():
    return Pair(TINY_SD2_UNET, seed=1)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_matches_diffusers(name, request):
    pair = request.getfixturevalue(name)
    ours = np.asarray(pair.apply({"params": pair.params}, pair.latents, TIMESTEPS, pair.context))
    reference = pair.torch_forward(pair.latents, pair.context)
    assert ours.shape == (BATCH, SIDE, SIDE, 4)
    assert np.abs(reference).max() > 0.1  # the comparison is not between near-zero outputs
    # Reached: ~1e-6 (sd1) and ~1e-6 (sd2) in fp32.
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_tiny_sd1_topology_has_16_cross_attention_layers(sd1):
    assert sd1.config.num_cross_attention_layers == 16
    _, probs = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context,
                         return_attention_probs=True)
    assert len(probs) == 16
    heads = sd1.config.heads_per_block
    # Queries per layer in forward order: 8x8 latents -> down 64,64,16,16,4,4; mid 1;
    # up blocks at 2x2 (block 1), 4x4 (block 2), 8x8 (block 3).
    queries = [64, 64, 16, 16, 4, 4, 1, 4, 4, 4, 16, 16, 16, 64, 64, 64]
    assert [p.shape[2] for p in probs] == queries
    assert all(p.shape[0] == BATCH and p.shape[3] == TOKENS for p in probs)
    assert probs[0].shape[1] == heads[0]
    np.testing.assert_allclose(np.asarray(probs[5]).sum(-1), 1.0, atol=1e-5)


def test_probabilities_path_equals_fused_path(sd1):
    fused = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context)
    explicit, _ = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context,
                            return_attention_probs=True)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), atol=1e-5)


def test_per_layer_contexts_match_diffusers_per_layer_processor(sd1):
    layers = sd1.config.num_cross_attention_layers
    rng = np.random.RandomState(7)
    shape = (layers, BATCH, TOKENS, sd1.config.cross_attention_dim)
    keys = rng.randn(*shape).astype(np.float32)
    values = rng.randn(*shape).astype(np.float32)
    ours = np.asarray(sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS,
                                LayerContexts(keys=keys, values=values)))
    previous = install_per_layer_processors(sd1.torch)
    try:
        reference = sd1.torch_forward(
            sd1.latents, sd1.context,
            cross_attention_kwargs={"layer_keys": torch.from_numpy(keys),
                                    "layer_values": torch.from_numpy(values)})
    finally:
        sd1.torch.set_attn_processor(previous)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    shared = np.asarray(sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context))
    assert np.abs(ours - shared).max() > 1e-2  # the per-layer contexts were really used


def test_one_context_everywhere_equals_shared_call_exactly(sd1):
    stacked = LayerContexts.shared(jnp.asarray(sd1.context), sd1.config.num_cross_attention_layers)
    a = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context)
    b = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, stacked)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_reach_every_layers_key_and_value_context(sd1):
    stacked = LayerContexts.shared(jnp.asarray(sd1.context), sd1.config.num_cross_attention_layers)

    def loss(contexts, params):
        out = sd1.model.apply({"params": params}, sd1.latents, TIMESTEPS, contexts)
        return jnp.mean(out ** 2)

    grads = jax.jit(jax.grad(loss))(stacked, sd1.params)
    key_norms = np.abs(np.asarray(grads.keys)).sum(axis=(1, 2, 3))
    value_norms = np.abs(np.asarray(grads.values)).sum(axis=(1, 2, 3))
    assert key_norms.shape == value_norms.shape == (16,)
    assert (key_norms > 0).all() and (value_norms > 0).all()


def test_weights_round_trip_into_diffusers(sd1):
    state = convert.flax_to_torch(sd1.params)
    fresh = TorchUNet(**_torch_kwargs(TINY_SD1_UNET))
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                strict=True)
    assert not missing and not unexpected
    for key, value in sd1.torch.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


def test_config_round_trips_through_diffusers(sd1):
    rebuilt = TorchUNet.from_config(sd1.config.to_dict())
    assert UNetConfig.from_dict(dict(rebuilt.config)) == sd1.config


def test_mismatched_weights_are_named(sd1):
    state = state_dict_numpy(sd1.torch)
    del state["conv_in.bias"]
    state["mid_block.extra.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sd1.params)
    with pytest.raises(convert.WeightMismatchError) as err:
        convert.torch_to_flax(state, template, what="unet")
    message = str(err.value)
    assert "missing: conv_in.bias" in message
    assert "unexpected: mid_block.extra.weight" in message
    assert "mis-shaped: conv_out.weight" in message


@pytest.mark.parametrize("override, named", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] + TINY_SD1_UNET["down_block_types"][1:]},
     "SimpleCrossAttnDownBlock2D"),
])
def test_unsupported_architecture_is_named(override, named):
    with pytest.raises(UnsupportedArchitectureError, match=named):
        UNetConfig.from_dict(dict(TINY_SD1_UNET, **override))


SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD21_UNET = dict(
    SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    use_linear_projection=True, upcast_attention=True, sample_size=96, dual_cross_attention=False,
    class_embed_type=None, num_class_embeds=None, only_cross_attention=False,
    resnet_time_scale_shift="default",
)


@pytest.mark.parametrize("config, param_count", [(SD15_UNET, 859_520_964),
                                                 (SD21_UNET, 865_910_724)])
def test_full_size_unet_maps_one_to_one_onto_diffusers(config, param_count):
    with torch.device("meta"):
        reference = TorchUNet(**_torch_kwargs(config))
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = UNetConfig.from_dict(config)
    assert ours.num_cross_attention_layers == 16
    side = ours.sample_size
    template = jax.eval_shape(
        UNet2DConditionModel(ours).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, side, side, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 77, ours.cross_attention_dim), jnp.float32))["params"]
    mapped = convert.torch_shapes_to_flax(torch_shapes, template, what="unet")
    flat_template = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(template).items()}
    assert mapped == flat_template  # every key maps to exactly one param of the same shape
    assert len(mapped) == len(torch_shapes)
    assert sum(int(np.prod(s)) for s in mapped.values()) == param_count


def test_bfloat16_compute_stays_close_to_float32(sd1):
    model = UNet2DConditionModel(sd1.config, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context)
    reference = sd1.apply({"params": sd1.params}, sd1.latents, TIMESTEPS, sd1.context)
    assert out.dtype == jnp.float32  # the noise prediction leaves the U-Net in fp32
    error = float(jnp.abs(out - reference).max() / jnp.abs(reference).max())
    assert 0 < error < 5e-2  # bf16 really ran, and stayed close
