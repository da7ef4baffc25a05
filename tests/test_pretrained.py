"""Loading and writing diffusers-layout folders: ours, diffusers' and transformers' agree."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from spacetime_jax.errors import UserError
from spacetime_jax.models.pretrained import (ModelLoadError, load_clip_vision,
                                             load_stable_diffusion)
from spacetime_jax.tools.make_tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd1", style="sd1", vision=True)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_stable_diffusion(tiny_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_written_folder_has_the_diffusers_layout(tiny_dir):
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", "image_encoder/config.json",
                 "image_encoder/model.safetensors"):
        assert (tiny_dir / name).is_file(), name
    text_keys = load_file(tiny_dir / "text_encoder/model.safetensors")
    assert all(k.startswith("text_model.") for k in text_keys)  # the classic, portable layout


def test_diffusers_and_transformers_load_what_we_write(tiny_dir, tiny):
    unet = TorchUNet.from_pretrained(tiny_dir, subfolder="unet").eval()
    latents = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
    ids = np.asarray(tiny.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                                    return_tensors="np").input_ids)
    text = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder").eval()
    with torch.no_grad():
        torch_context = text(torch.from_numpy(ids)).last_hidden_state
        torch_eps = unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.tensor([500.0]),
                         torch_context).sample.permute(0, 2, 3, 1).numpy()
    context = jax.jit(tiny.text_encoder.apply)({"params": tiny.text_params},
                                               jnp.asarray(ids)).last_hidden_state
    np.testing.assert_allclose(np.asarray(context), torch_context.numpy(), atol=1e-4)
    eps = jax.jit(tiny.unet.apply)({"params": tiny.unet_params}, latents, jnp.array([500.0]),
                                   context)
    np.testing.assert_allclose(np.asarray(eps), torch_eps, atol=1e-4)
    assert np.abs(torch_eps).max() > 1e-2

    vae = TorchVAE.from_pretrained(tiny_dir, subfolder="vae").eval()
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    decode = jax.jit(lambda p, z: tiny.vae.apply({"params": p}, z, method=type(tiny.vae).decode))
    ours = decode(tiny.vae_params, latents)
    np.testing.assert_allclose(np.asarray(ours), decoded.permute(0, 2, 3, 1).numpy(), atol=1e-4)

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer", model_max_length=77)
    assert tokenizer("a photo of a cat").input_ids == tiny.tokenizer("a photo of a cat").input_ids


def test_sd2_style_folder_round_trips(tmp_path):
    folder = make_tiny_model(tmp_path / "sd2", style="sd2")
    sd = load_stable_diffusion(folder)
    assert sd.unet.config.use_linear_projection and sd.unet.config.upcast_attention
    assert sd.text_encoder.config.hidden_act == "gelu"
    assert sd.unet.config.heads_per_block == (2, 4, 4, 6)
    reference = TorchUNet.from_pretrained(folder, subfolder="unet")
    assert reference.config.use_linear_projection


def test_pytorch_bin_weights_load_like_safetensors(tiny_dir, tiny, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "bin")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: torch.from_numpy(v) for k, v in load_file(weights).items()}
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    loaded = load_stable_diffusion(folder)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded.unet_params, tiny.unet_params)
    assert all(jax.tree.leaves(same))


def test_transformers_flat_text_encoder_names_load(tiny_dir, tiny, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "flat")
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({k[len("text_model."):]: v for k, v in state.items()}, weights)
    loaded = load_stable_diffusion(folder)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded.text_params, tiny.text_params)
    assert all(jax.tree.leaves(same))


def test_clip_vision_loads_from_transformers_layout(tiny_dir):
    model, params = load_clip_vision(tiny_dir / "image_encoder")
    pixels = jnp.zeros((1, model.config.image_size, model.config.image_size, 3))
    out = model.apply({"params": params}, pixels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_hub_id_resolves_from_a_filled_cache_offline(tiny_dir, tmp_path):
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    code = ("from spacetime_jax.models.pretrained import load_stable_diffusion as load;"
            "sd = load('tiny-org/tiny-sd'); print('layers', sd.num_cross_attention_layers)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "layers 16" in result.stdout
    missing = subprocess.run([sys.executable, "-c", code.replace("tiny-org/tiny-sd", "tiny-org/absent")],
                             env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert missing.returncode != 0
    assert "could not resolve hub id 'tiny-org/absent'" in missing.stderr


# The files of a hub repo in diffusers layout as the hub lists them: both weight formats and
# fp16 variants in the sub-models, a bin-only VAE, a safety checker and root checkpoints.
HUB_FILES = ["model_index.json", "README.md", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.msgpack",
             "vae/config.json", "vae/diffusion_pytorch_model.bin",
             "vae/diffusion_pytorch_model.fp16.bin",
             "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
             "text_encoder/model-00001-of-00002.safetensors",
             "text_encoder/model-00002-of-00002.safetensors", "text_encoder/pytorch_model.bin",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
             "safety_checker/config.json", "safety_checker/model.safetensors"]


def test_hub_downloads_take_safetensors_and_bin_only_where_a_folder_has_no_safetensors():
    from spacetime_jax.models.pretrained import hub_allow_patterns
    assert hub_allow_patterns(HUB_FILES) == [
        "*.json", "*.txt", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors"]
    # A transformers repo (a CLIP vision tower): the weights at its root.
    assert hub_allow_patterns(["config.json", "model.safetensors", "pytorch_model.bin",
                               "tf_model.h5", "flax_model.msgpack"]) == [
        "*.json", "*.txt", "model.safetensors"]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's listing and snapshot_download, recorded; the snapshot is an empty
    folder (online) and the cache is empty (offline)."""
    import huggingface_hub
    calls = {"list": [], "download": []}

    def list_repo_files(repo_id, *, revision=None, **kwargs):
        calls["list"].append((repo_id, revision))
        if calls.get("offline"):
            raise ConnectionError("no network")
        return HUB_FILES

    def snapshot_download(repo_id, *, revision=None, local_files_only=False,
                          allow_patterns=None, **kwargs):
        calls["download"].append({"repo_id": repo_id, "revision": revision,
                                  "local_files_only": local_files_only,
                                  "allow_patterns": allow_patterns})
        if local_files_only:
            raise FileNotFoundError(f"{repo_id} is not in the cache")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_model_revision_reaches_the_hub_and_the_default_branch_is_none(fake_hub, tmp_path):
    from spacetime_jax.models.pretrained import resolve_model_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert resolve_model_dir("org/sd", revision=commit) == tmp_path
    assert resolve_model_dir("org/sd") == tmp_path
    assert fake_hub["list"] == [("org/sd", commit), ("org/sd", None)]
    assert [(d["revision"], d["allow_patterns"][2]) for d in fake_hub["download"]] == [
        (commit, "unet/diffusion_pytorch_model.safetensors"),
        (None, "unet/diffusion_pytorch_model.safetensors")]


def test_a_local_folder_ignores_the_revision(fake_hub, tiny_dir):
    from spacetime_jax.models.pretrained import resolve_model_dir
    assert resolve_model_dir(tiny_dir, revision="v1.0") == tiny_dir
    assert fake_hub == {"list": [], "download": []}


def test_an_unreachable_hub_uses_the_cache_and_names_the_hubs_reason(fake_hub):
    from spacetime_jax.models.pretrained import resolve_model_dir
    fake_hub["offline"] = True
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("org/sd", revision="v2")
    assert fake_hub["download"] == [{"repo_id": "org/sd", "revision": "v2",
                                     "local_files_only": True, "allow_patterns": None}]
    assert ("could not resolve hub id 'org/sd' at revision 'v2': ConnectionError: no network"
            in str(err.value))


def test_configs_with_a_model_have_a_revision_key_and_hub_defaults_that_resolve():
    from spacetime_jax.cli import builtin_configs, load_config_module
    configs = builtin_configs()
    defaults = {name: load_config_module(configs[name]).get_config()
                for name in ("neti", "neti_batch", "sample", "elite_global", "elite_local",
                             "elite_personalize")}
    assert all(config.model_revision == "" for config in defaults.values())
    assert defaults["neti"].model == "CompVis/stable-diffusion-v1-4"  # the reference's
    assert defaults["elite_global"].model == "CompVis/stable-diffusion-v1-4"
    assert defaults["sample"].model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# ----------------------------------------------------------------------------------------
# Bad input: each names the problem.

def _break(folder: Path, how: str) -> None:
    if how == "no unet folder":
        shutil.rmtree(folder / "unet")
    elif how == "no weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "bad json":
        (folder / "unet" / "config.json").write_text("{not json")
    elif how == "unsupported":
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["class_embed_type"] = "timestep"
        (folder / "unet" / "config.json").write_text(json.dumps(config))
    elif how == "weights":
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(path)
        del state["conv_in.bias"]
        state["conv_out.weight"] = np.zeros((4, 4, 1, 1), np.float32)
        state["extra.weight"] = np.zeros(2, np.float32)
        save_file(state, path)
    elif how == "tokenizer":
        (folder / "tokenizer" / "vocab.json").unlink()
    elif how == "scheduler":
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), beta_schedule="cosine")))


@pytest.mark.parametrize("how, message", [
    ("no unet folder", "sub-folder unet/ is missing"),
    ("no weights", "vae: no weights in"),
    ("bad json", "is not valid JSON"),
    ("unsupported", "class_embed_type='timestep'"),
    ("weights", r"missing: conv_in.bias(.|\n)*unexpected: extra.weight(.|\n)*mis-shaped: conv_out.weight"),
    ("tokenizer", "vocab.json"),
    ("scheduler", "beta_schedule='cosine'"),
])
def test_broken_model_folders_are_named(tiny_dir, tmp_path, how, message):
    folder = _copy(tiny_dir, tmp_path / "broken")
    _break(folder, how)
    with pytest.raises(Exception) as err:
        load_stable_diffusion(folder)
    assert isinstance(err.value, UserError), err.value
    assert re.search(message, str(err.value)), str(err.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_stable_diffusion(tmp_path / "nowhere")
