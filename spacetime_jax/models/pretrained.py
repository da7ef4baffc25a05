"""Load and save Stable Diffusion in the layouts users have.

A model is a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) holding PyTorch `.safetensors` or `.bin` weights, local or `gs://`,
or a hub id that huggingface_hub resolves at a revision (a branch, tag or commit; "" = the
default branch), downloading only the files loaded here (a filled local cache works offline
with HF_HUB_OFFLINE=1). A CLIP vision tower comes from a transformers-layout folder.
Everything here reads and writes files; the model code in this package knows nothing of files.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath

from spacetime_jax.diffusion.schedules import SchedulerConfig
from spacetime_jax.errors import UserError
from spacetime_jax.models import convert
from spacetime_jax.models.attention_kernels import resolve_attention
from spacetime_jax.models.clip_text import (CLIPTextConfig, CLIPTextTransformer,
                                            clip_text_param_template)
from spacetime_jax.models.clip_vision import (CLIPVisionConfig, CLIPVisionTransformer,
                                              clip_vision_param_template)
from spacetime_jax.models.tokenizer import load_tokenizer
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from spacetime_jax.models.vae import AutoencoderKL, VAEConfig
from spacetime_jax.paths import as_path, copy_tree, is_remote

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Weight file names, most preferred first (safetensors before pickles, full before sharded).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "vision": ("model.safetensors", "pytorch_model.bin"),
}
SHARD_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# The sub-folders of a diffusers repo whose weights are read (ELITE reads image_encoder/);
# others, such as safety_checker/, are not downloaded.
HUB_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "image_encoder")


class ModelLoadError(UserError):
    """A model folder or hub id that cannot be loaded: says what is missing and where."""


@dataclasses.dataclass
class StableDiffusion:
    """A frozen Stable Diffusion: modules, their params, tokenizer and scheduler settings."""
    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    vae_config: VAEConfig
    text_encoder: CLIPTextTransformer
    text_params: Any
    tokenizer: Any
    scheduler_config: SchedulerConfig
    source: str

    @property
    def num_cross_attention_layers(self) -> int:
        return self.unet.config.num_cross_attention_layers


# ---------------------------------------------------------------------------------------
# Resolving and reading.

def resolve_model_dir(name_or_path: str | os.PathLike, revision: str = "") -> epath.Path:
    """A local or gs:// folder as is (`revision` does not apply to it); otherwise a hub id
    through huggingface_hub at `revision` ("" = the default branch), its cache first."""
    path = as_path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; give the model's folder")
        return path
    name = str(name_or_path)
    if is_remote(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"model folder {name} does not exist (and it is not a hub id like 'org/model')")
    try:
        return as_path(_hub_snapshot(name, revision or None))
    except Exception as err:  # network, auth, missing cache: all say the same to a user
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"could not resolve hub id {name!r}{at}: {type(err).__name__}: {err}. Without a "
            "network, fill the huggingface_hub cache first or pass a local folder") from err


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The local snapshot folder of a hub repo: the files hub_allow_patterns picks from its
    listing, or, offline or unreachable, what the cache holds for that revision."""
    import huggingface_hub
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as listing_error:
        try:
            return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                     local_files_only=True)
        except Exception:
            raise listing_error from None  # the hub's reason, not the cache's
    return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                             allow_patterns=hub_allow_patterns(files))


def hub_allow_patterns(files: Sequence[str]) -> list[str]:
    """What to download of a hub repo holding `files`: every .json and .txt file (configs,
    tokenizer) and, per weight folder, its .safetensors weights, or its .bin ones when it has
    none: never both formats, never variants (`*.fp16.safetensors`, `*.non_ema.bin`). The
    weight folders are HUB_WEIGHT_FOLDERS in a diffusers repo (it has model_index.json; its
    root's single-file checkpoints are left out), else the root (a transformers repo, such
    as a CLIP vision tower)."""
    folders = HUB_WEIGHT_FOLDERS if "model_index.json" in files else ("",)
    patterns = ["*.json", "*.txt"]
    for folder in folders:
        weights = [f for f in files if posixpath.dirname(f) == folder and _is_plain_weight(f)]
        patterns += (sorted(f for f in weights if f.endswith(".safetensors"))
                     or sorted(f for f in weights if f.endswith(".bin")))
    return patterns


def _is_plain_weight(file: str) -> bool:
    """model.safetensors, model-00001-of-00002.safetensors, pytorch_model.bin: not a variant
    such as model.fp16.safetensors."""
    stem, _, extension = posixpath.basename(file).rpartition(".")
    return extension in ("safetensors", "bin") and "." not in stem


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = as_path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{what}: {path} is not valid JSON ({err})") from err


def _read_weight_file(path: epath.Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        # A local file is memory-mapped (an SD U-Net is 3.4 GB); a bucket's is read whole.
        if is_remote(path):
            return safetensors.numpy.load(path.read_bytes())
        return safetensors.numpy.load_file(os.fspath(path))
    try:
        import torch
    except ImportError as err:
        raise ModelLoadError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or "
            "convert it to .safetensors") from err
    state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()}


def read_state_dict(folder: str | os.PathLike, kind: str) -> dict[str, np.ndarray]:
    """The PyTorch state dict of one sub-model folder (single file or sharded)."""
    folder = as_path(folder)
    for name in WEIGHT_FILES[kind]:
        if (folder / name).is_file():
            return _read_weight_file(folder / name)
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index, kind)["weight_map"].values()))
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                state.update(_read_weight_file(folder / shard))
            return state
    raise ModelLoadError(
        f"{kind}: no weights in {folder} (looked for {', '.join(WEIGHT_FILES[kind])})")


def _subfolder(model_dir: epath.Path, name: str) -> epath.Path:
    folder = model_dir / name
    if not folder.is_dir():
        raise ModelLoadError(
            f"{model_dir} is not a complete diffusers model: sub-folder {name}/ is missing "
            f"(expected {', '.join(SUBFOLDERS)})")
    return folder


def _to_dtype(params: Any, dtype) -> Any:
    # Frozen modules may compute in bf16; their params follow the compute dtype to halve the
    # memory they take (they receive no gradient).
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


# ---------------------------------------------------------------------------------------
# Loading.

def load_unet(folder: str | os.PathLike, dtype=jnp.float32, local_branch: bool = False):
    folder = as_path(folder)
    config = UNetConfig.from_dict(read_json(folder / "config.json", "unet"))
    model = UNet2DConditionModel(config, local_branch=local_branch, dtype=dtype)
    side = config.sample_size
    template = jax.eval_shape(
        UNet2DConditionModel(config).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32))["params"]
    params = convert.torch_to_flax(read_state_dict(folder, "unet"), template, what="unet")
    return model, params


def load_vae(folder: str | os.PathLike, dtype=jnp.float32):
    folder = as_path(folder)
    config = VAEConfig.from_dict(read_json(folder / "config.json", "vae"))
    model = AutoencoderKL(config, dtype=dtype)
    side = 8 * config.downsample_factor
    template = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, side, side, config.in_channels),
                                                   jnp.float32))["params"]
    params = convert.torch_to_flax(read_state_dict(folder, "vae"), template, what="vae")
    return model, params, config


def load_text_encoder(folder: str | os.PathLike, dtype=jnp.float32):
    folder = as_path(folder)
    config = CLIPTextConfig.from_dict(read_json(folder / "config.json", "text_encoder"))
    params = convert.torch_to_flax(read_state_dict(folder, "text_encoder"),
                                   clip_text_param_template(config), strip_prefix="text_model.",
                                   what="text_encoder")
    return CLIPTextTransformer(config, dtype=dtype), params


def load_clip_vision(name_or_path: str | os.PathLike, dtype=jnp.float32):
    """A transformers-layout CLIP vision folder (CLIPVisionModel or a full CLIPModel)."""
    folder = resolve_model_dir(name_or_path)
    raw = read_json(folder / "config.json", "CLIP vision")
    if raw.get("model_type") == "clip":
        raw = dict(raw.get("vision_config", {}), model_type="clip_vision_model")
    config = CLIPVisionConfig.from_dict(raw)
    state = {k: v for k, v in read_state_dict(folder, "vision").items()
             if not k.startswith(("text_model.", "text_projection", "visual_projection",
                                  "logit_scale"))}
    params = convert.torch_to_flax(state, clip_vision_param_template(config),
                                   strip_prefix="vision_model.", what="CLIP vision")
    return CLIPVisionTransformer(config, dtype=dtype), _to_dtype(params, dtype)


def load_scheduler_config(folder: str | os.PathLike) -> SchedulerConfig:
    folder = as_path(folder)
    raw = read_json(folder / "scheduler_config.json", "scheduler")
    try:
        return SchedulerConfig.from_dict(raw)
    except ValueError as err:
        raise ModelLoadError(f"scheduler: {err}") from err


def load_model_tokenizer(name_or_path: str | os.PathLike, revision: str = ""):
    """The tokenizer of a diffusers-layout folder or hub id alone: token checks need no
    weights in memory."""
    return load_tokenizer(_subfolder(resolve_model_dir(name_or_path, revision), "tokenizer"))


def load_stable_diffusion(name_or_path: str | os.PathLike, dtype=jnp.float32,
                          local_branch: bool = False, revision: str = "",
                          attention: str = "auto") -> StableDiffusion:
    """Loads every sub-model of a diffusers-layout folder or hub id (at `revision`, "" = the
    default branch; a folder ignores it).

    `dtype` is the compute dtype of the frozen modules (fp32, or bf16 on accelerators);
    `attention` the U-Net's attention kernel (models/attention_kernels.py), checked first.
    """
    resolve_attention(attention)
    model_dir = resolve_model_dir(name_or_path, revision)
    read_json(model_dir / "model_index.json", "model")
    unet, unet_params = load_unet(_subfolder(model_dir, "unet"), dtype, local_branch)
    unet = unet.clone(attention=attention)
    vae, vae_params, vae_config = load_vae(_subfolder(model_dir, "vae"), dtype)
    text_encoder, text_params = load_text_encoder(_subfolder(model_dir, "text_encoder"), dtype)
    tokenizer = load_tokenizer(_subfolder(model_dir, "tokenizer"))
    scheduler = load_scheduler_config(_subfolder(model_dir, "scheduler"))
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelLoadError(
            f"{model_dir}: the unet's cross_attention_dim ({unet.config.cross_attention_dim}) "
            f"differs from the text encoder's width ({text_encoder.config.hidden_size})")
    return StableDiffusion(
        unet=unet, unet_params=_to_dtype(unet_params, dtype),
        vae=vae, vae_params=_to_dtype(vae_params, dtype), vae_config=vae_config,
        text_encoder=text_encoder, text_params=_to_dtype(text_params, dtype),
        tokenizer=tokenizer, scheduler_config=scheduler, source=str(name_or_path))


# ---------------------------------------------------------------------------------------
# Saving (what diffusers and transformers load back).

def _write_json(path: epath.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(path: epath.Path, params: Any, prefix: str = "", dtype=np.float32) -> None:
    state = {k: v.astype(dtype) for k, v in convert.flax_to_torch(params, prefix=prefix).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors.numpy.save(state, metadata={"format": "pt"}))


def save_stable_diffusion(out_dir: str | os.PathLike, *, unet_config: UNetConfig, unet_params,
                          vae_config: VAEConfig, vae_params, text_config: CLIPTextConfig,
                          text_params, tokenizer_dir: str | os.PathLike,
                          scheduler_config: SchedulerConfig,
                          weight_dtype=np.float32) -> epath.Path:
    """Writes a diffusers-layout folder (local or gs://): classic `text_model.`-prefixed
    CLIP names, which every version of diffusers and transformers loads."""
    out = as_path(out_dir)
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })
    _write_json(out / "unet" / "config.json", unet_config.to_dict())
    _write_weights(out / "unet" / WEIGHT_FILES["unet"][0], unet_params, dtype=weight_dtype)
    _write_json(out / "vae" / "config.json", vae_config.to_dict())
    _write_weights(out / "vae" / WEIGHT_FILES["vae"][0], vae_params, dtype=weight_dtype)
    _write_json(out / "text_encoder" / "config.json", text_config.to_dict())
    _write_weights(out / "text_encoder" / WEIGHT_FILES["text_encoder"][0], text_params,
                   prefix="text_model.", dtype=weight_dtype)
    tokenizer_out = out / "tokenizer"
    if not _same_folder(as_path(tokenizer_dir), tokenizer_out):
        copy_tree(tokenizer_dir, tokenizer_out)
    _write_json(out / "scheduler" / "scheduler_config.json",
                dict(scheduler_config.to_dict(), _class_name="PNDMScheduler",
                     skip_prk_steps=True))
    return out


def _same_folder(a: epath.Path, b: epath.Path) -> bool:
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return a.resolve() == b.resolve()


def save_clip_vision(out_dir: str | os.PathLike, config: CLIPVisionConfig, params,
                     weight_dtype=np.float32) -> epath.Path:
    out = as_path(out_dir)
    _write_json(out / "config.json", config.to_dict())
    _write_weights(out / WEIGHT_FILES["vision"][0], params, prefix="vision_model.",
                   dtype=weight_dtype)
    return out


def model_summary(sd: StableDiffusion) -> str:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return (f"{sd.source}: unet {count(sd.unet_params) / 1e6:.2f}M, vae "
            f"{count(sd.vae_params) / 1e6:.2f}M, text encoder {count(sd.text_params) / 1e6:.2f}M "
            f"params; {sd.num_cross_attention_layers} cross-attention layers")
