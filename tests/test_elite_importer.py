"""Importing the official ELITE checkpoints, written here as the reference writes them: the
Mapper's state dict with the U-Net's attn2 K/V copies registered on it under the diffusers
module name with '.' -> '_' (train_global.py / train_local.py), at the toy world's sizes."""
import json
import sys
from pathlib import Path

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn

from spacetime_jax.elite.artifact import (GLOBAL_FILE, LOCAL_FILE, load_encoder,
                                          image_encoder_source, save_encoder)
from spacetime_jax.elite.encoder import GlobalMapper, LocalMapper, encoder_config_for
from spacetime_jax.elite.importer import (import_global, import_local, load_state_dict_file,
                                          main, read_vision_config, to_official,
                                          unet_param_shapes)
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import read_json
from spacetime_jax.models.unet import UNetConfig
from tests.test_elite_encoder import ReferenceLocalMapper, ReferenceMapper
from tests.torch_reference import randomize_

MODEL = "builtin:toyworld"
TOY = Path(resolve_builtin(MODEL))
HIDDEN = 48  # not the vision width: the CLI must read it off the checkpoint
BATCH = 2


@pytest.fixture(scope="module")
def sizes():
    vision = read_vision_config(TOY / "image_encoder")
    config = encoder_config_for(vision, 64, hidden_width=HIDDEN)
    unet_config = UNetConfig.from_dict(read_json(TOY / "unet" / "config.json", "unet"))
    return config, unet_param_shapes(unet_config), (vision.image_size // vision.patch_size) ** 2


@pytest.fixture(scope="module")
def torch_unet():
    return diffusers.UNet2DConditionModel.from_config(
        read_json(TOY / "unet" / "config.json", "unet"))


def official_module(mapper_class, config, unet, seed: int) -> nn.Module:
    """The reference's mapper with its K/V linears, as train_global.py builds it."""
    torch.manual_seed(seed)
    mapper = mapper_class(config)
    for name, module in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        for projection in ("to_k", "to_v"):
            weight = getattr(module, projection).weight
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight.data.clone()
            mapper.add_module(f"{name.replace('.', '_')}_{projection}", linear)
    return randomize_(mapper, seed=seed, scale=0.2)


def save_official(module: nn.Module, path: Path) -> dict:
    torch.save(module.state_dict(), path)
    return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory, sizes, torch_unet):
    config, _, _ = sizes
    folder = tmp_path_factory.mktemp("official")
    global_module = official_module(ReferenceMapper, config, torch_unet, seed=1)
    local_module = official_module(ReferenceLocalMapper, config, torch_unet, seed=2)
    return dict(global_path=folder / "global_mapper.pt", local_path=folder / "local_mapper.pt",
                global_module=global_module, local_module=local_module,
                global_state=save_official(global_module, folder / "global_mapper.pt"),
                local_state=save_official(local_module, folder / "local_mapper.pt"))


def random_features(config, num_patches, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(config.num_words, BATCH, 1 + num_patches,
                            config.vision_width)).astype(np.float32)


# ---------------------------------------------------------------------------- import

def test_global_checkpoint_lands_transposed_in_place(sizes, official_files):
    config, template, _ = sizes
    state = load_state_dict_file(official_files["global_path"])
    expected = official_files["global_state"]
    assert len(expected) == 10 * 10 + 32  # 10 MLPs of 5 layers x 2 leaves, 16 x (to_k, to_v)
    mapper, kv = import_global(state, config, template)
    np.testing.assert_array_equal(mapper["mapping_patch_2"]["3"]["kernel"],
                                  expected["mapping_patch_2.3.weight"].T)
    np.testing.assert_array_equal(mapper["mapping_0"]["6"]["bias"], expected["mapping_0.6.bias"])
    np.testing.assert_array_equal(mapper["mapping_4"]["1"]["scale"],
                                  expected["mapping_4.1.weight"])
    attn2 = kv["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    np.testing.assert_array_equal(
        attn2["to_v"]["kernel"],
        expected["mid_block_attentions_0_transformer_blocks_0_attn2_to_v.weight"].T)
    attn2 = kv["up_blocks_3"]["attentions_2"]["transformer_blocks_0"]["attn2"]
    np.testing.assert_array_equal(
        attn2["to_k"]["kernel"],
        expected["up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.weight"].T)
    # Every value: exporting back gives the checkpoint exactly.
    exported = to_official(mapper, kv)
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
        assert exported[key].flags["C_CONTIGUOUS"]


def test_local_checkpoint_lands_on_the_local_projections(sizes, official_files):
    config, template, _ = sizes
    expected = official_files["local_state"]
    mapper, kv = import_local(load_state_dict_file(official_files["local_path"]), config,
                              template)
    flat = traverse_util.flatten_dict(kv)
    assert len(flat) == 32 and {path[-2] for path in flat} == {"to_k_local", "to_v_local"}
    attn2 = kv["down_blocks_1"]["attentions_1"]["transformer_blocks_0"]["attn2"]
    np.testing.assert_array_equal(
        attn2["to_k_local"]["kernel"],
        expected["down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k.weight"].T)
    exported = to_official(mapper, kv)
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_imported_mappers_reproduce_the_reference(sizes, official_files):
    config, template, num_patches = sizes
    features = random_features(config, num_patches)
    mask = (np.random.default_rng(1).random((BATCH, num_patches)) > 0.3).astype(np.float32)
    with torch.no_grad():
        inputs = [torch.from_numpy(f) for f in features]
        want_words = official_files["global_module"](inputs).numpy()
        want_local = (official_files["local_module"](inputs)
                      * torch.from_numpy(mask)[..., None]).numpy()
    mapper, _ = import_global(official_files["global_state"], config, template)
    words = GlobalMapper(config).apply({"params": mapper}, jnp.asarray(features))
    np.testing.assert_allclose(np.asarray(words), want_words, atol=1e-5, rtol=1e-5)
    local_mapper, _ = import_local(official_files["local_state"], config, template)
    local = LocalMapper(config).apply({"params": local_mapper}, jnp.asarray(features),
                                      jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(local), want_local, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- bad checkpoints

def test_checkpoint_for_another_size_is_a_user_error(sizes, official_files):
    config, template, _ = sizes
    other = encoder_config_for(read_vision_config(TOY / "image_encoder"), 32, hidden_width=HIDDEN)
    with pytest.raises(UserError, match=r"mis-shaped: .*mapping_0\.6\.weight"):
        import_global(official_files["global_state"], other, template)
    # Another U-Net: the attn2 K/V shapes differ.
    narrow = UNetConfig.from_dict(dict(read_json(TOY / "unet" / "config.json", "unet"),
                                       cross_attention_dim=32))
    with pytest.raises(UserError, match="attn2_to_k.weight: checkpoint"):
        import_global(official_files["global_state"], config, unet_param_shapes(narrow))


def test_missing_and_unexpected_keys_are_named(sizes, official_files):
    config, template, _ = sizes
    state = dict(official_files["global_state"])
    del state["mapping_patch_3.4.bias"]
    del state["down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v.weight"]
    state["mapping_5.0.weight"] = np.zeros((HIDDEN, 64), np.float32)
    with pytest.raises(UserError) as err:
        import_global(state, config, template)
    message = str(err.value)
    assert "missing: mapping_patch_3.4.bias, " \
           "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v.weight" in message
    assert "unexpected: mapping_5.0.weight" in message


def test_unreadable_files_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_state_dict_file(tmp_path / "junk.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="not an ELITE mapper state dict"):
        load_state_dict_file(tmp_path / "tensor.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(UserError, match="needs PyTorch"):
        load_state_dict_file(tmp_path / "tensor.pt")


# ---------------------------------------------------------------------------- CLI and artifact

def test_cli_writes_an_artifact_that_loads_back_bytewise(tmp_path, sizes, official_files,
                                                         capsys):
    config, template, _ = sizes
    out = tmp_path / "encoder"
    main(["--global_mapper", str(official_files["global_path"]),
          "--local_mapper", str(official_files["local_path"]),
          "--model", MODEL, "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    artifact = load_encoder(out)
    assert artifact.config == config  # hidden width 48 read off the checkpoint
    assert artifact.base_model == MODEL
    assert artifact.image_encoder is None
    assert image_encoder_source(artifact) == str(TOY / "image_encoder")
    for stage, (state_key, importer) in {"global": ("global_state", import_global),
                                         "local": ("local_state", import_local)}.items():
        mapper, kv = importer(official_files[state_key], config, template)
        want = traverse_util.flatten_dict({"mapper": mapper, "kv": kv})
        loaded = artifact.global_params if stage == "global" else artifact.local_params
        got = traverse_util.flatten_dict(loaded)
        assert sorted(got) == sorted(want)
        for path, value in want.items():
            assert got[path].dtype == np.float32
            assert got[path].tobytes() == np.ascontiguousarray(value).tobytes(), path
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["has_local"] and meta["extra"]["imported_from"]["global_mapper"].endswith(
        "global_mapper.pt")


def test_cli_reports_a_bad_checkpoint(tmp_path, official_files, capsys):
    state = dict(official_files["global_state"])
    del state["mapping_0.0.bias"]
    bad = tmp_path / "bad.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["--global_mapper", str(bad), "--model", MODEL, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing: mapping_0.0.bias" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_artifact_errors_and_global_only_resave(tmp_path, sizes, official_files):
    config, template, _ = sizes
    with pytest.raises(UserError, match="does not exist"):
        load_encoder(tmp_path / "absent")
    mapper, kv = import_global(official_files["global_state"], config, template)
    local_mapper, local_kv = import_local(official_files["local_state"], config, template)
    folder = save_encoder(tmp_path / "enc", config, {"mapper": mapper, "kv": kv},
                          {"mapper": local_mapper, "kv": local_kv}, MODEL, {"steps": 3})
    assert load_encoder(folder).extra == {"steps": 3}
    # A global-only save into the same folder drops the old local stage.
    save_encoder(folder, config, {"mapper": mapper, "kv": kv}, None, MODEL, {})
    assert not (folder / LOCAL_FILE).exists() and load_encoder(folder).local_params is None
    # The kv trees of the two stages are not interchangeable.
    with pytest.raises(UserError, match="to_k_local/to_v_local"):
        save_encoder(tmp_path / "mixed", config, {"mapper": mapper, "kv": kv},
                     {"mapper": local_mapper, "kv": kv}, MODEL, {})
    # Corruption.
    data = (folder / GLOBAL_FILE).read_bytes()
    (folder / GLOBAL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_encoder(folder)
    (folder / "encoder.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_encoder(folder)
    # An encoder config that does not match the weights.
    save_encoder(folder, config, {"mapper": mapper, "kv": kv}, None, MODEL, {})
    meta = json.loads((folder / "encoder.json").read_text())
    meta["encoder_config"]["word_dim"] = 32
    (folder / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the encoder config"):
        load_encoder(folder)
