"""Importing a concept saved by the official NeTI code, from a PyTorch mapper written to its spec.

The official checkpoint pickles its encoder module and (in some versions) its RunConfig object,
whose classes live in the official repository. Here they are classes registered under the
official module paths while saving and removed before loading, so the importer must read the
file without them.
"""
import contextlib
import dataclasses
import pathlib
import sys
import types
from functools import partial
from typing import Optional

import jax
import numpy as np
from flax import traverse_util
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spacetime_jax.errors import UserError
from spacetime_jax.neti.importer import StandIn, import_neti_checkpoint, load_torch_file
from spacetime_jax.neti.mapper import NeTIMapper

NUM_FREQUENCIES, NUM_LAYERS, ANCHORS, TOKEN_DIM, HIDDEN = 64, 16, 10, 32, 128
SIGMA_T, SIGMA_L = 0.05, 1.5
TARGET_NORM = 0.387
GRID_T = np.repeat([0.0, 1.0, 99.0, 250.0, 500.0, 731.0, 999.0], NUM_LAYERS).astype(np.float32)
GRID_L = np.tile(np.arange(NUM_LAYERS), 7).astype(np.float32)
FAKE_MODULES = ("models", "models.positional_encoding", "training", "training.config")


# ---------------------------------------------------------------------------- the official side

class NeTIPositionalEncoding(nn.Module):
    __module__ = "models.positional_encoding"

    def __init__(self, sigma_t: float, sigma_l: float, num_w: int, w_as_parameter: bool):
        super().__init__()
        self.sigma_t, self.sigma_l, self.num_w = sigma_t, sigma_l, num_w
        w = torch.randn(num_w, 2) * torch.tensor([sigma_t, sigma_l])
        # The reference's `nn.Parameter(w).cuda()` leaves a plain tensor attribute (not in the
        # state dict); a registered parameter shows up in the state dict as `encoder.w`.
        self.w = nn.Parameter(w) if w_as_parameter else w

    def encode(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        x = torch.stack([t, l], dim=1).T
        v = torch.cat([torch.sin(self.w.detach() @ x), torch.cos(self.w.detach() @ x)])
        return (v / v.norm(dim=0)).T

    def init_layer(self, num_time_anchors: int, num_layers: int) -> torch.Tensor:
        t = torch.arange(0, 1000, 1000 // num_time_anchors).repeat_interleave(num_layers)
        l = torch.arange(num_layers).repeat(num_time_anchors)
        return self.encode(t.float(), l.float())


class BasicEncoder(nn.Module):
    __module__ = "models.positional_encoding"

    def __init__(self, num_unet_layers: int):
        super().__init__()
        self.normalized_timesteps = torch.arange(1000) / 999 * 2 - 1
        self.normalized_unet_layers = torch.arange(num_unet_layers) / (num_unet_layers - 1) * 2 - 1

    def encode(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.normalized_timesteps[t.long()],
                            self.normalized_unet_layers[l.long()]]).T


class TorchNeTIMapper(nn.Module):
    """The reference mapper's forward pass at inference (eval, optional truncation)."""

    def __init__(self, encoder: nn.Module, fourier: bool):
        super().__init__()
        self.encoder = encoder
        input_dim = ANCHORS * NUM_LAYERS if fourier else 2
        if fourier:
            self.input_layer = nn.Linear(2 * NUM_FREQUENCIES, input_dim)
            self.input_layer.weight.data = encoder.init_layer(ANCHORS, NUM_LAYERS)
        else:
            self.input_layer = nn.Identity()
        self.net = nn.Sequential(self.input_layer,
                                 nn.Linear(input_dim, HIDDEN), nn.LayerNorm(HIDDEN), nn.LeakyReLU(),
                                 nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN), nn.LeakyReLU())
        self.output_layer = nn.Sequential(nn.Linear(HIDDEN, 2 * TOKEN_DIM))

    def forward(self, t, l, target_norm, truncation: Optional[int] = None):
        hidden = self.net(self.encoder.encode(t, l))
        if truncation is not None:
            hidden = hidden.clone()
            hidden[:, truncation:] = 0
        return F.normalize(self.output_layer(hidden), dim=-1) * target_norm


@dataclasses.dataclass
class DataConfig:
    __module__ = "training.config"
    train_data_dir: pathlib.Path = pathlib.Path("data/cat_toy")
    placeholder_token: str = "<cat-toy>"
    super_category_token: str = "toy"


@dataclasses.dataclass
class ModelConfig:
    __module__ = "training.config"
    pretrained_model_name_or_path: str = "CompVis/stable-diffusion-v1-4"
    use_nested_dropout: bool = True
    nested_dropout_prob: float = 0.3
    normalize_mapper_output: bool = True
    target_norm: Optional[float] = None
    use_positional_encoding: bool = True
    pe_sigmas: dict = dataclasses.field(
        default_factory=lambda: {"sigma_t": SIGMA_T, "sigma_l": SIGMA_L})
    num_pe_time_anchors: int = ANCHORS
    output_bypass: bool = True


@dataclasses.dataclass
class RunConfig:
    __module__ = "training.config"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)


def encoded_cfg(cfg: RunConfig) -> dict:
    """What pyrallis.encode makes of the config: plain data."""
    return {"data": {**dataclasses.asdict(cfg.data), "train_data_dir": str(cfg.data.train_data_dir)},
            "model": dataclasses.asdict(cfg.model)}


@contextlib.contextmanager
def official_modules_importable():
    """The official module paths exist only inside this block."""
    assert not any(name in sys.modules for name in FAKE_MODULES)
    contents = {"models.positional_encoding": (NeTIPositionalEncoding, BasicEncoder),
                "training.config": (DataConfig, ModelConfig, RunConfig)}
    for name in FAKE_MODULES:
        module = types.ModuleType(name)
        for cls in contents.get(name, ()):
            setattr(module, cls.__name__, cls)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in FAKE_MODULES:
            del sys.modules[name]


def randomize_(mapper: nn.Module, seed: int) -> nn.Module:
    """Trained-looking weights: perturbed anchors, non-trivial LayerNorms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mapper.named_parameters():
            if name.startswith("encoder."):
                continue
            scale = 0.01 if name == "input_layer.weight" else 0.1
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return mapper.eval()


def save_official_checkpoint(path: pathlib.Path, *, fourier: bool, cfg_as_object: bool,
                             w_as_parameter: bool, target_norm: Optional[float],
                             seed: int) -> TorchNeTIMapper:
    torch.manual_seed(seed)
    encoder = (NeTIPositionalEncoding(SIGMA_T, SIGMA_L, NUM_FREQUENCIES, w_as_parameter)
               if fourier else BasicEncoder(NUM_LAYERS))
    mapper = randomize_(TorchNeTIMapper(encoder, fourier), seed)
    cfg = RunConfig(model=ModelConfig(target_norm=target_norm, use_positional_encoding=fourier))
    with official_modules_importable():
        torch.save({"state_dict": mapper.state_dict(),
                    "cfg": cfg if cfg_as_object else encoded_cfg(cfg),
                    "encoder": mapper.encoder}, path)
    return mapper


@partial(jax.jit, static_argnames=("config", "truncation"))
def jax_outputs(config, variables, truncation=None):
    return NeTIMapper(config).apply(variables, GRID_T, GRID_L, TARGET_NORM, truncation=truncation)


def torch_outputs(mapper: TorchNeTIMapper, truncation: Optional[int] = None) -> np.ndarray:
    with torch.no_grad():
        return mapper(torch.from_numpy(GRID_T), torch.from_numpy(GRID_L), TARGET_NORM,
                      truncation).numpy()


# ---------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official layout: cfg encoded to a dict, W a plain attribute of the encoder."""
    path = tmp_path_factory.mktemp("neti") / "mapper-steps-1000.pt"
    mapper = save_official_checkpoint(path, fourier=True, cfg_as_object=False,
                                      w_as_parameter=False, target_norm=None, seed=0)
    return mapper, path


def test_loads_without_the_official_classes(official):
    _, path = official
    assert not any(name in sys.modules for name in FAKE_MODULES)
    encoder = load_torch_file(str(path))["encoder"]
    assert isinstance(encoder, StandIn)
    assert repr(encoder) == "StandIn(models.positional_encoding.NeTIPositionalEncoding)"


def test_imported_config_and_metadata(official):
    torch_mapper, path = official
    concept = import_neti_checkpoint(str(path))
    config = concept.mapper_config
    assert (config.num_frequencies, config.num_layers, config.num_anchor_timesteps) == (64, 16, 10)
    assert (config.hidden_width, config.token_dim, config.use_bypass) == (128, 32, True)
    assert (config.encoder, config.nested_dropout, config.nested_dropout_prob) == ("fourier", True, 0.3)
    assert config.sigma_t == pytest.approx(SIGMA_T) and config.sigma_l == pytest.approx(SIGMA_L)
    assert concept.placeholder_token == "<cat-toy>"
    assert concept.super_category_token == "toy"
    assert concept.base_model == "CompVis/stable-diffusion-v1-4"
    assert concept.target_norm is None
    assert concept.raw_cfg_dict["data"]["train_data_dir"] == "data/cat_toy"
    np.testing.assert_array_equal(concept.variables["encoding"]["W"], torch_mapper.encoder.w.numpy())
    assert set(concept.variables) == {"params", "encoding"}


def test_imported_mapper_matches_the_torch_mapper(official):
    torch_mapper, path = official
    concept = import_neti_checkpoint(str(path))
    for truncation in (None, 40):
        ours = np.asarray(jax_outputs(concept.mapper_config, concept.variables, truncation))
        ref = torch_outputs(torch_mapper, truncation)
        assert ours.shape == ref.shape == (112, 64)
        assert np.abs(ours - ref).max() <= 1e-5, (truncation, np.abs(ours - ref).max())
    # The truncated output differs from the full one: the test can see truncation.
    assert np.abs(torch_outputs(torch_mapper, 40) - torch_outputs(torch_mapper)).max() > 1e-3


def test_cfg_object_and_registered_w_parameter(tmp_path):
    """A fork's layout: the RunConfig object pickled, W a registered parameter (so also in the
    state dict as encoder.w), target_norm saved in the cfg."""
    path = tmp_path / "mapper.pt"
    torch_mapper = save_official_checkpoint(path, fourier=True, cfg_as_object=True,
                                            w_as_parameter=True, target_norm=0.5, seed=1)
    concept = import_neti_checkpoint(str(path))
    assert concept.placeholder_token == "<cat-toy>" and concept.super_category_token == "toy"
    assert concept.target_norm == 0.5
    assert concept.raw_cfg_dict["model"]["pe_sigmas"] == {"sigma_t": SIGMA_T, "sigma_l": SIGMA_L}
    ours = np.asarray(jax_outputs(concept.mapper_config, concept.variables))
    assert np.abs(ours - torch_outputs(torch_mapper)).max() <= 1e-5


def test_plain_encoder_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch_mapper = save_official_checkpoint(path, fourier=False, cfg_as_object=False,
                                            w_as_parameter=False, target_norm=None, seed=2)
    concept = import_neti_checkpoint(str(path))
    assert concept.mapper_config.encoder == "plain"
    assert concept.mapper_config.num_layers == NUM_LAYERS
    assert set(concept.variables) == {"params"}
    ours = np.asarray(jax_outputs(concept.mapper_config, concept.variables))
    assert np.abs(ours - torch_outputs(torch_mapper)).max() <= 1e-5


def test_token_dim_override_is_checked(tmp_path):
    path = tmp_path / "mapper.pt"
    save_official_checkpoint(path, fourier=True, cfg_as_object=False, w_as_parameter=False,
                             target_norm=None, seed=3)
    assert import_neti_checkpoint(str(path), token_dim=64).mapper_config.use_bypass is False
    with pytest.raises(UserError, match="output width 64 is neither token_dim 48"):
        import_neti_checkpoint(str(path), token_dim=48)


def test_files_that_are_not_neti_checkpoints_are_clear_errors(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(UserError, match=r"missing keys \['state_dict', 'cfg', 'encoder'\]"):
        import_neti_checkpoint(str(other))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(UserError, match="holds a Tensor"):
        import_neti_checkpoint(str(tensor))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a readable PyTorch file"):
        import_neti_checkpoint(str(text))
    with pytest.raises(UserError, match="not found"):
        import_neti_checkpoint(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spacetime_jax.tools.make_tiny_model import make_tiny_model
    folder = tmp_path_factory.mktemp("tiny_sd")
    make_tiny_model(folder, style="sd1", seed=0)  # text width 32, the test mapper's token_dim
    return folder


def test_command_line_writes_a_concept_the_sampler_loads(official, tiny_model, tmp_path, capsys):
    from safetensors.numpy import load_file

    from spacetime_jax.models.tokenizer import load_tokenizer, single_token_id
    from spacetime_jax.neti.concept import load_concept
    from spacetime_jax.neti.importer import main

    _, path = official
    out = tmp_path / "concept"
    main([str(path), "--out", str(out), "--base-model", str(tiny_model),
          "--super-category", "object"])
    concept = load_concept(out)
    imported = import_neti_checkpoint(str(path))
    assert (concept.placeholder, concept.super_category) == ("<cat-toy>", "object")
    assert concept.base_model == str(tiny_model) and concept.kind == "neti"
    assert concept.mapper_config == imported.mapper_config
    ours = traverse_util.flatten_dict(concept.variables, sep="/")
    theirs = traverse_util.flatten_dict(jax.device_get(imported.variables), sep="/")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():  # the artifact stores float32
        np.testing.assert_array_equal(ours[key], np.asarray(value, np.float32), err_msg=key)
    # No target norm in the run's cfg: the norm of the super-category's input embedding.
    token = single_token_id(load_tokenizer(tiny_model / "tokenizer"), "object")
    table = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))[
        "text_model.embeddings.token_embedding.weight"]
    assert concept.target_norm == pytest.approx(float(np.linalg.norm(table[token])), rel=1e-6)
    assert f"-> {out}" in capsys.readouterr().out


def test_command_line_errors_are_one_line_exit_2(official, tiny_model, tmp_path, capsys):
    from spacetime_jax.neti.importer import main

    _, path = official
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--out", str(tmp_path / "c"), "--base-model", str(tiny_model),
              "--super-category", "teddy bear"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: super-category 'teddy bear' is") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
