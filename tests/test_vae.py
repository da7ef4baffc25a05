"""Our Flax AutoencoderKL against diffusers' AutoencoderKL on the same random weights."""
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import traverse_util

from spacetime_jax.models import convert
from spacetime_jax.models.config_utils import UnsupportedArchitectureError
from spacetime_jax.models.tiny_configs import TINY_VAE
from spacetime_jax.models.vae import LOGVAR_RANGE, AutoencoderKL, VAEConfig, sample_latents
from tests.torch_reference import randomize_, state_dict_numpy

BATCH, SIDE, LATENT_SIDE = 2, 64, 8

# SD 1.x / 2.x VAE (stabilityai/sd-vae-ft-mse, the SD 2.x vae/ folder at 768 px).
SD_VAE = dict(TINY_VAE, block_out_channels=[128, 256, 512, 512], norm_num_groups=32,
              sample_size=512)

# diffusers' legacy names of the mid-block attention projections (old SD 1.x VAE folders).
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


class Pair:
    """A diffusers VAE with random weights and our VAE holding the same weights."""

    def __init__(self, config: dict, seed: int):
        torch.manual_seed(seed)
        # scale 0.1: norms and biases get far enough from their 1 / 0 defaults to matter.
        self.torch = randomize_(TorchVAE(**_torch_kwargs(config)), seed, scale=0.1)
        self.config = VAEConfig.from_dict(config)
        self.model = AutoencoderKL(self.config)
        rng = np.random.RandomState(seed)
        self.images = rng.uniform(-1, 1, (BATCH, SIDE, SIDE, 3)).astype(np.float32)
        self.latents = rng.randn(BATCH, LATENT_SIDE, LATENT_SIDE, 4).astype(np.float32)
        self.template = jax.eval_shape(self.model.init, jax.random.key(0), self.images)["params"]
        self.params = convert.torch_to_flax(state_dict_numpy(self.torch), self.template,
                                            what="vae")
        self.encode = jax.jit(lambda p, x: self.model.apply(
            {"params": p}, x, method=AutoencoderKL.encode))
        self.decode = jax.jit(lambda p, z: self.model.apply(
            {"params": p}, z, method=AutoencoderKL.decode))

    def torch_encode(self, torch_model=None):
        with torch.no_grad():
            dist = (torch_model or self.torch).encode(_nchw(self.images)).latent_dist
        return _nhwc(dist.mean), _nhwc(dist.logvar)

    def torch_decode(self, torch_model=None):
        with torch.no_grad():
            return _nhwc((torch_model or self.torch).decode(_nchw(self.latents)).sample)


@pytest.fixture(scope="module")
def pair():
    return Pair(TINY_VAE, seed=0)


def test_tiny_vae_downsamples_64_to_8(pair):
    assert pair.config.downsample_factor == SIDE // LATENT_SIDE == 8


def test_encode_moments_match_diffusers(pair):
    mean, logvar = map(np.asarray, pair.encode(pair.params, pair.images))
    ref_mean, ref_logvar = pair.torch_encode()
    assert mean.shape == logvar.shape == (BATCH, LATENT_SIDE, LATENT_SIDE, 4)
    assert np.abs(ref_mean).max() > 0.1 and np.abs(ref_logvar).max() > 0.1
    # Reached: 5.4e-6 (mean), 5.0e-6 (logvar) in fp32, with values up to ~2.5.
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=0)


def test_decode_matches_diffusers(pair):
    images = np.asarray(pair.decode(pair.params, pair.latents))
    reference = pair.torch_decode()
    assert images.shape == (BATCH, SIDE, SIDE, 3)
    assert np.abs(reference).max() > 0.1
    # Reached: 7.9e-6 in fp32, with values up to ~3.9.
    np.testing.assert_allclose(images, reference, atol=1e-4, rtol=0)


def test_logvar_is_clipped_like_diffusers(pair):
    # A large bias on the logvar half of quant_conv pushes every logvar past the upper bound.
    params = jax.tree.map(np.array, pair.params)
    params["quant_conv"]["bias"][4:] += 100.0
    _, logvar = pair.encode(params, pair.images)
    np.testing.assert_array_equal(np.asarray(logvar), LOGVAR_RANGE[1])
    params["quant_conv"]["bias"][4:] -= 300.0
    _, logvar = pair.encode(params, pair.images)
    np.testing.assert_array_equal(np.asarray(logvar), LOGVAR_RANGE[0])


def test_sample_latents_has_the_moments_asked_for():
    shape = (200_000, 2)
    mean = np.broadcast_to(np.array([1.0, -2.0], np.float32), shape)
    logvar = np.broadcast_to(np.log(np.array([1.0, 4.0], np.float32)), shape)
    draws = np.asarray(sample_latents(jax.random.key(0), mean, logvar))
    np.testing.assert_allclose(draws.mean(0), [1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(draws.std(0), [1.0, 2.0], atol=0.02)
    again = np.asarray(sample_latents(jax.random.key(0), mean, logvar))
    np.testing.assert_array_equal(draws, again)


def test_weights_round_trip_into_diffusers(pair):
    state = convert.flax_to_torch(pair.params)
    fresh = TorchVAE(**_torch_kwargs(pair.config.to_dict()))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    fresh.eval()
    for key, value in pair.torch.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())
    np.testing.assert_array_equal(pair.torch_decode(fresh), pair.torch_decode())
    for ours, reference in zip(pair.torch_encode(fresh), pair.torch_encode()):
        np.testing.assert_array_equal(ours, reference)


def test_config_round_trips_through_diffusers(pair):
    rebuilt = TorchVAE.from_config(pair.config.to_dict())
    assert VAEConfig.from_dict(dict(rebuilt.config)) == pair.config


def _legacy_state_dict(state: dict, as_1x1_conv: bool) -> dict:
    """Renames the mid-block attention projections as old checkpoints do."""
    out = {}
    for key, value in state.items():
        if ".attentions.0." in key:
            for new, old in LEGACY_ATTENTION_NAMES.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            if as_1x1_conv and value.ndim == 2:
                value = value[:, :, None, None]
        out[key] = value
    return out


@pytest.mark.parametrize("as_1x1_conv", [False, True])
def test_legacy_attention_names_load(pair, as_1x1_conv):
    legacy = _legacy_state_dict(state_dict_numpy(pair.torch), as_1x1_conv)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert "decoder.mid_block.attentions.0.query.bias" in legacy
    params = convert.torch_to_flax(legacy, pair.template, what="vae")
    jax.tree.map(np.testing.assert_array_equal, params, pair.params)


def _flax_shapes_as_torch(template) -> dict[str, tuple[int, ...]]:
    """flax_to_torch applied leaf by leaf to zero-stride stand-ins: never holds the full model."""
    shapes = {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        stand_in = np.broadcast_to(np.zeros((), np.float32), leaf.shape)
        ((key, value),) = convert.flax_to_torch(traverse_util.unflatten_dict({path: stand_in})).items()
        shapes[key] = tuple(value.shape)
    return shapes


def test_full_size_sd_vae_shapes_match_diffusers():
    with torch.device("meta"):
        reference = TorchVAE(**_torch_kwargs(SD_VAE))
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    model = AutoencoderKL(VAEConfig.from_dict(SD_VAE))
    template = jax.eval_shape(model.init, jax.random.key(0),
                              np.zeros((1, SIDE, SIDE, 3), np.float32))["params"]
    template_shapes = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(template).items()}
    # torch -> ours: every key lands on a distinct param of the template's shape.
    mapped = convert.torch_shapes_to_flax(torch_shapes, template, what="vae")
    assert len(mapped) == len(torch_shapes) == len(template_shapes)
    assert mapped == template_shapes
    # ours -> torch: every param lands on a diffusers key of that key's shape.
    assert _flax_shapes_as_torch(template) == torch_shapes
    assert sum(np.prod(s) for s in torch_shapes.values()) == 83_653_863  # SD's VAE, 83.7M


@pytest.mark.parametrize("override, named", [
    ({"use_quant_conv": False}, "use_quant_conv"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "down_block_types"),
])
def test_unsupported_architecture_is_named(override, named):
    with pytest.raises(UnsupportedArchitectureError, match=named):
        VAEConfig.from_dict(dict(TINY_VAE, **override))
