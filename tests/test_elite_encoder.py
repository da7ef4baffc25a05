"""ELITE's encoder: CLIP feature sets, the global and local mappers against a PyTorch
implementation of the reference's Mapper / MapperLocal, parameter counts at SD 1.x sizes,
and the U-Net's trainable K/V trees."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from benchmarks.unet_step import SD15_UNET
from spacetime_jax.elite.encoder import (EncoderConfig, GlobalMapper, LocalMapper,
                                         encoder_config_for, image_features, init_mapper_params,
                                         mapper_param_shapes, patch_mask)
from spacetime_jax.elite.importer import unet_param_shapes
from spacetime_jax.elite.params import (count_params, cross_attention_kv, local_kv_init,
                                        merge_params)
from spacetime_jax.errors import UserError
from spacetime_jax.models.attention import (MIN_WORD_ATTENTION, LayerContexts, LocalBranch,
                                            local_gate)
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer
from spacetime_jax.models.pretrained import load_unet
from spacetime_jax.models.tiny_configs import TINY_CLIP_VISION
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_reference import randomize_

SD_ENCODER = EncoderConfig(feature_layers=(24, 4, 8, 12, 16), vision_width=1024,
                           hidden_width=1024, word_dim=768)
TINY_ENCODER = EncoderConfig(feature_layers=(3, 0, 2), vision_width=32, hidden_width=48,
                             word_dim=24)
BATCH, PATCHES = 2, 16


# ---------------------------------------------------------------------------- the reference

def reference_mlp(in_width: int, hidden: int, out_width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_width, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, out_width))


class ReferenceMapper(nn.Module):
    """ELITE's Mapper (train_global.py), sizes as arguments instead of 1024 / 768 / 5."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.num_sets = config.num_words
        for i in range(self.num_sets):
            for name in (f"mapping_{i}", f"mapping_patch_{i}"):
                setattr(self, name, reference_mlp(config.vision_width, config.hidden_width,
                                                  config.word_dim))

    def forward(self, embs):
        hidden_states = ()
        for i, emb in enumerate(embs):
            hidden_state = (getattr(self, f"mapping_{i}")(emb[:, :1])
                            + getattr(self, f"mapping_patch_{i}")(emb[:, 1:]).mean(dim=1,
                                                                                   keepdim=True))
            hidden_states += (hidden_state,)
        return torch.cat(hidden_states, dim=1)


class ReferenceLocalMapper(ReferenceMapper):
    """ELITE's MapperLocal (train_local.py): per-patch, averaged over the feature sets."""

    def forward(self, embs):
        hidden_states = ()
        for i, emb in enumerate(embs):
            hidden_state = (getattr(self, f"mapping_{i}")(emb[:, :1])
                            + getattr(self, f"mapping_patch_{i}")(emb[:, 1:]))
            hidden_states += (hidden_state.unsqueeze(0),)
        return torch.cat(hidden_states, dim=0).mean(dim=0)


def flax_params_of(module: nn.Module) -> dict:
    """The reference's Sequential params onto our names: Linear -> kernel (transposed),
    LayerNorm weight -> scale (indices 1 and 4)."""
    flat = {}
    for key, value in module.state_dict().items():
        mlp, index, leaf = key.split(".")
        value = value.numpy()
        if leaf == "weight":
            leaf, value = ("scale", value) if index in ("1", "4") else ("kernel", value.T)
        flat[(mlp, index, leaf)] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def random_features(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(TINY_ENCODER.num_words, BATCH, 1 + PATCHES,
                            TINY_ENCODER.vision_width)).astype(np.float32)


# ---------------------------------------------------------------------------- mappers

def test_mapper_param_count_at_sd_sizes():
    # Per MLP: 2 x (1024*1024 + 1024) + 2 x 2048 + 1024*768 + 768 = 2,890,496; 10 MLPs.
    assert count_params(mapper_param_shapes(SD_ENCODER)) == 28_904_960
    features = jax.ShapeDtypeStruct((5, 1, 257, 1024), jnp.float32)
    weights = jax.ShapeDtypeStruct((1, 256), jnp.float32)
    local = jax.eval_shape(LocalMapper(SD_ENCODER).init, jax.random.key(0), features, weights)
    assert count_params(local) == 28_904_960


def test_mapper_param_names_follow_the_reference_sequential():
    shapes = mapper_param_shapes(TINY_ENCODER)
    assert sorted(shapes) == sorted([f"mapping_{i}" for i in range(3)]
                                    + [f"mapping_patch_{i}" for i in range(3)])
    mlp = jax.tree.map(lambda s: s.shape, shapes["mapping_patch_1"])
    assert mlp == {"0": {"kernel": (32, 48), "bias": (48,)}, "1": {"scale": (48,), "bias": (48,)},
                   "3": {"kernel": (48, 48), "bias": (48,)}, "4": {"scale": (48,), "bias": (48,)},
                   "6": {"kernel": (48, 24), "bias": (24,)}}
    params = init_mapper_params(TINY_ENCODER, jax.random.key(1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    # PyTorch's Linear init: uniform within +-1/sqrt(fan_in), biases included.
    bias = np.asarray(params["mapping_0"]["0"]["bias"])
    assert np.abs(bias).max() <= 32 ** -0.5 and np.abs(bias).max() > 0.5 * 32 ** -0.5


def test_global_mapper_matches_the_reference():
    torch.manual_seed(0)
    reference = randomize_(ReferenceMapper(TINY_ENCODER), seed=1, scale=0.2)
    features = random_features()
    with torch.no_grad():
        want = reference([torch.from_numpy(f) for f in features]).numpy()
    got = GlobalMapper(TINY_ENCODER).apply({"params": flax_params_of(reference)},
                                           jnp.asarray(features))
    assert got.shape == (BATCH, TINY_ENCODER.num_words, TINY_ENCODER.word_dim)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_local_mapper_matches_the_reference():
    torch.manual_seed(0)
    reference = randomize_(ReferenceLocalMapper(TINY_ENCODER), seed=2, scale=0.2)
    features = random_features(seed=3)
    mask = (np.random.default_rng(4).random((BATCH, PATCHES)) > 0.5).astype(np.float32)
    with torch.no_grad():
        local = reference([torch.from_numpy(f) for f in features])
        want = (local * torch.from_numpy(mask)[..., None]).numpy()
    got = LocalMapper(TINY_ENCODER).apply({"params": flax_params_of(reference)},
                                          jnp.asarray(features), jnp.asarray(mask))
    assert got.shape == (BATCH, PATCHES, TINY_ENCODER.word_dim)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[mask == 0] == 0.0)
    assert np.abs(np.asarray(got)[mask == 1]).min() > 0.0


# ---------------------------------------------------------------------------- features, masks

def test_image_features_picks_the_configured_layers():
    vision_config = CLIPVisionConfig.from_dict(TINY_CLIP_VISION)
    vision = CLIPVisionTransformer(vision_config)
    pixels = jax.random.normal(jax.random.key(0), (BATCH, 32, 32, 3))
    params = vision.init(jax.random.key(1), pixels)["params"]
    out = vision.apply({"params": params}, pixels, output_hidden_states=True)
    layers = (3, 0, 2)
    features = image_features(vision, params, pixels, layers)
    assert features.shape == (3, BATCH, 1 + PATCHES, 32)
    np.testing.assert_array_equal(features[0], out.last_hidden_state)
    np.testing.assert_array_equal(features[1], out.hidden_states[0])
    np.testing.assert_array_equal(features[2], out.hidden_states[2])
    assert not np.allclose(features[1], features[2])
    with pytest.raises(UserError, match="outside 0..3"):
        image_features(vision, params, pixels, (4, 0))


def test_encoder_config_for_defaults():
    vit_l = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, patch_size=14)
    assert encoder_config_for(vit_l, 768) == SD_ENCODER
    assert SD_ENCODER.num_words == 5
    toy = CLIPVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=256, image_size=64, patch_size=8)
    config = encoder_config_for(toy, 64)
    assert config == EncoderConfig((4, 0, 1, 2, 3), vision_width=64, hidden_width=64,
                                   word_dim=64)
    assert EncoderConfig.from_dict(config.to_dict()) == config
    tiny = CLIPVisionConfig.from_dict(TINY_CLIP_VISION)
    with pytest.raises(UserError, match="no default ELITE feature layers"):
        encoder_config_for(tiny, 32)
    with pytest.raises(UserError, match="outside"):
        encoder_config_for(tiny, 32, feature_layers=(3, 5))


def test_patch_mask_is_nearest_downsampling():
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[0, 2:6, 4:8] = 1.0       # rows 2..5, columns 4..7
    mask[0, 0, 1] = 1.0           # never sampled at grid 4 (reads rows/columns 0, 2, 4, 6)
    got = np.asarray(patch_mask(jnp.asarray(mask), 4)).reshape(4, 4)
    want = np.array([[0, 0, 0, 0],
                     [0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(got, want)
    # As the reference computes it: F.interpolate(nearest), then row-major flattening; also
    # for sizes that are not multiples of the grid.
    rng = np.random.default_rng(0)
    for height, width, grid in ((64, 64, 8), (10, 13, 4), (512, 512, 16)):
        mask = (rng.random((2, height, width, 1)) > 0.5).astype(np.float32)
        reference = F.interpolate(torch.from_numpy(mask).permute(0, 3, 1, 2), (grid, grid),
                                  mode="nearest")[:, 0].reshape(2, -1).numpy()
        np.testing.assert_array_equal(np.asarray(patch_mask(jnp.asarray(mask), grid)),
                                      reference)


# ---------------------------------------------------------------------------- U-Net K/V trees

def test_kv_copies_param_count_at_sd15_sizes():
    template = unet_param_shapes(UNetConfig.from_dict(SD15_UNET))
    kv = jax.eval_shape(cross_attention_kv, template)
    # 768 x (320+320+640+640+1280+1280 | 1280 | 1280x3 + 640x3 + 320x3) x (to_k, to_v)
    assert count_params(kv) == 19_169_280
    paths = traverse_util.flatten_dict(kv)
    assert len(paths) == 32
    assert ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k",
            "kernel") in paths
    assert paths[("up_blocks_3", "attentions_2", "transformer_blocks_0", "attn2", "to_v",
                  "kernel")].shape == (768, 320)
    local = jax.eval_shape(local_kv_init, template)
    assert count_params(local) == 19_169_280
    assert {path[-2] for path in traverse_util.flatten_dict(local)} == {"to_k_local",
                                                                       "to_v_local"}


@pytest.fixture(scope="module")
def tiny_unet():
    """The toy world's U-Net: SD 1.x's topology (16 attn2 layers) at toy widths, with real
    weights (loading them is much cheaper than initializing)."""
    model, params = load_unet(Path(resolve_builtin("builtin:toyworld")) / "unet")
    return model.config, params


def test_kv_trees_start_from_the_original_projections(tiny_unet):
    _, params = tiny_unet
    flat = traverse_util.flatten_dict(params)
    kv = traverse_util.flatten_dict(cross_attention_kv(params))
    local = traverse_util.flatten_dict(local_kv_init(params))
    assert len(kv) == len(local) == 32
    for path, value in kv.items():
        np.testing.assert_array_equal(value, flat[path])
        assert value.dtype == jnp.float32
    for path, value in local.items():
        source = path[:-2] + ({"to_k_local": "to_k", "to_v_local": "to_v"}[path[-2]], "kernel")
        np.testing.assert_array_equal(value, flat[source])
    assert count_params(kv) == count_params(local)


def test_merge_params_overrides_adds_and_shares(tiny_unet):
    _, params = tiny_unet
    kv = jax.tree.map(lambda x: x + 1.0, cross_attention_kv(params))
    local = local_kv_init(params)
    merged = merge_params(params, kv, local)
    flat_merged = traverse_util.flatten_dict(merged)
    flat_params = traverse_util.flatten_dict(params)
    assert len(flat_merged) == len(flat_params) + 32
    for path, value in traverse_util.flatten_dict(kv).items():
        assert flat_merged[path] is value
    for path, value in traverse_util.flatten_dict(local).items():
        assert flat_merged[path] is value
    # Untouched subtrees are the originals, not copies; the input is not modified.
    assert merged["conv_in"] is params["conv_in"]
    assert merged["down_blocks_3"] is params["down_blocks_3"]
    attn2 = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")
    assert flat_merged[attn2 + ("to_q", "kernel")] is flat_params[attn2 + ("to_q", "kernel")]
    assert attn2 + ("to_k_local", "kernel") not in flat_params
    np.testing.assert_array_equal(flat_params[attn2 + ("to_k", "kernel")] + 1.0,
                                  flat_merged[attn2 + ("to_k", "kernel")])
    originals = [v for p, v in flat_params.items()
                 if p[-3:-1] in {("attn2", "to_k"), ("attn2", "to_v")}]
    assert count_params(local) == sum(v.size for v in originals)


def test_local_kv_tree_fits_the_local_branch_unet(tiny_unet):
    config, params = tiny_unet
    unet = UNet2DConditionModel(config, local_branch=True)
    merged = merge_params(params, local_kv_init(params))
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 5, config.cross_attention_dim)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(2, 4, config.cross_attention_dim)), jnp.float32)
    apply = jax.jit(unet.apply)
    plain = apply({"params": params}, latents, jnp.array([10.0, 500.0]), context)

    def with_local(scale):
        contexts = LayerContexts.shared(context, config.num_cross_attention_layers)
        contexts = contexts.replace(local=LocalBranch(tokens=tokens,
                                                      word_position=jnp.array([1, 2]),
                                                      scale=jnp.asarray(scale, jnp.float32)))
        return apply({"params": merged}, latents, jnp.array([10.0, 500.0]), contexts)

    np.testing.assert_allclose(with_local([0.0, 0.0]), plain, atol=1e-5)
    mixed = np.asarray(with_local([0.0, 1.0]))
    np.testing.assert_allclose(mixed[0], plain[0], atol=1e-5)
    assert np.abs(mixed[1] - np.asarray(plain[1])).max() > 1e-4


def test_local_gate_is_finite_where_the_word_gets_no_attention():
    # (B=3, N=2 heads, Tq=4 queries, Tk=5 keys); the word sits at key 1 (sample 0: exactly
    # unattended, as a float32 softmax gives it behind a logit gap of ~100; sample 1: 1e-36;
    # sample 2: an ordinary map).
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.05, 1.0, size=(3, 2, 4, 5)).astype(np.float32)
    probs[0, :, :, 1] = 0.0
    probs[1, :, :, 1] *= 1e-36
    probs /= probs.sum(-1, keepdims=True)
    probs = jnp.asarray(probs)
    positions = jnp.array([1, 1, 1])
    gate = np.asarray(local_gate(probs, positions))
    assert gate.shape == (3, 2, 4) and np.isfinite(gate).all()
    np.testing.assert_array_equal(gate[0], 0.0)
    assert gate[1].max() < 1e-29  # faded out, not scaled up to 1
    word = np.asarray(probs)[2, :, :, 1]
    np.testing.assert_allclose(gate[2], word / word.max(), rtol=1e-6)  # the reference's m / max(m)
    assert word.max() > MIN_WORD_ATTENTION
    grads = jax.grad(lambda p: jnp.sum(local_gate(p, positions) * jnp.arange(4.0)))(probs)
    assert np.isfinite(np.asarray(grads)).all()
