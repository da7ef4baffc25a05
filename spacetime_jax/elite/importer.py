"""Import the official ELITE checkpoints (PyTorch state dicts) as our params and artifact.

global_mapper.pt holds the global Mapper's state dict plus the trainable K/V copies that the
reference registers on the mapper as modules named after the attn2 path:
  mapping_{i}.{0,1,3,4,6}.{weight,bias}, mapping_patch_{i}.{0,1,3,4,6}.{weight,bias}
  {attn2 module path, '.' -> '_'}_to_k.weight / _to_v.weight, e.g.
  down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight,
  mid_block_attentions_0_transformer_blocks_0_attn2_to_v.weight
local_mapper.pt has the same layout; its to_k / to_v are the local projections, which land
on our to_k_local / to_v_local. The attn2 path with '.' -> '_' is exactly our Flax path joined
by '_' (Flax names list members `down_blocks_0`), which gives the key table below.
Linear weights (out, in) become Dense kernels (in, out); LayerNorm weight becomes scale.
The .pt files are read by read_torch_file: torch.load(weights_only=True), nothing else
unpickled (the NeTI importer reads its official files through it too).

CLI (writes the encoder folder that personalization reads, see artifact.py):
  python -m spacetime_jax.elite.importer --global_mapper G.pt [--local_mapper L.pt] \
      --model MODEL --out DIR
"""
from __future__ import annotations

import _compat_pickle
import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from spacetime_jax.elite.encoder import (DENSE_INDICES, NORM_INDICES, EncoderConfig,
                                         encoder_config_for, mapper_param_shapes)
from spacetime_jax.elite.params import LOCAL_NAMES, cross_attention_kernel_paths
from spacetime_jax.errors import UserError, exit_with
from spacetime_jax.paths import as_path, is_remote

REFERENCE_IMAGE_ENCODER = "openai/clip-vit-large-patch14"  # the reference's CLIP tower
# Our projection name -> the reference's (its local file calls the local ones to_k / to_v).
_OFFICIAL_PROJECTION = {"to_k": "to_k", "to_v": "to_v", "to_k_local": "to_k",
                        "to_v_local": "to_v"}


# ---------------------------------------------------------------------------- key tables

def mapper_key_table(num_sets: int) -> dict[str, tuple[str, ...]]:
    """Official key -> path in the mapper params, for `num_sets` feature sets."""
    table = {}
    for i in range(num_sets):
        for mlp in (f"mapping_{i}", f"mapping_patch_{i}"):
            for index in DENSE_INDICES + NORM_INDICES:
                leaf = "kernel" if index in DENSE_INDICES else "scale"
                table[f"{mlp}.{index}.weight"] = (mlp, index, leaf)
                table[f"{mlp}.{index}.bias"] = (mlp, index, "bias")
    return table


def kv_official_key(path: Sequence[str]) -> str:
    """(..., 'attn2', 'to_k' | 'to_k_local', 'kernel') -> '..._attn2_to_k.weight'."""
    return "_".join(path[:-2]) + "_" + _OFFICIAL_PROJECTION[path[-2]] + ".weight"


def kv_key_table(unet_params_template: Any, local: bool) -> dict[str, tuple[str, ...]]:
    """Official key -> path in the kv tree (to_k/to_v, or to_k_local/to_v_local if local)."""
    table = {}
    for path in cross_attention_kernel_paths(unet_params_template):
        target = path[:-2] + (LOCAL_NAMES[path[-2]] if local else path[-2], "kernel")
        table[kv_official_key(path)] = target
    return table


# ---------------------------------------------------------------------------- import / export

def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bf16 / fp16 ones go through float32)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if flax_path[-1] == "kernel" else tuple(shape)


def _format_problems(what: str, missing, unexpected, misshaped) -> str:
    lines = [f"the {what} checkpoint does not fit the model:"]
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)"
                                            if len(items) > 8 else "")
            lines.append(f"  {label}: {shown}")
    lines.append("  Check that it was trained for this base model and CLIP image encoder "
                 "(sizes and feature layers).")
    return "\n".join(lines)


def _import(state_dict: Mapping[str, Any], encoder_config: EncoderConfig,
            unet_params_template: Any, local: bool) -> tuple[dict, dict]:
    what = "ELITE local mapper" if local else "ELITE global mapper"
    mapper_shapes = traverse_util.flatten_dict(mapper_param_shapes(encoder_config))
    unet_shapes = traverse_util.flatten_dict(unet_params_template)
    targets = {key: ("mapper", path, mapper_shapes[path].shape)
               for key, path in mapper_key_table(encoder_config.num_words).items()}
    for key, path in kv_key_table(unet_params_template, local).items():
        source = path[:-2] + (_OFFICIAL_PROJECTION[path[-2]], "kernel")
        targets[key] = ("kv", path, unet_shapes[source].shape)

    trees: dict[str, dict] = {"mapper": {}, "kv": {}}
    unexpected, misshaped = sorted(set(state_dict) - set(targets)), []
    for key, (tree, path, flax_shape) in targets.items():
        if key not in state_dict:
            continue
        value = _as_numpy(state_dict[key])
        want = _torch_shape(path, tuple(flax_shape))
        if value.shape != want:
            misshaped.append(f"{key}: checkpoint {value.shape}, model expects {want}")
            continue
        trees[tree][path] = jnp.asarray(value.T if path[-1] == "kernel" else value)
    missing = [key for key in targets if key not in state_dict]
    if missing or unexpected or misshaped:
        raise UserError(_format_problems(what, missing, unexpected, misshaped))
    return (traverse_util.unflatten_dict(trees["mapper"]),
            traverse_util.unflatten_dict(trees["kv"]))


def import_global(state_dict: Mapping[str, Any], encoder_config: EncoderConfig,
                  unet_params_template: Any) -> tuple[dict, dict]:
    """global_mapper.pt's state dict -> (mapper params, kv tree of attn2 to_k/to_v kernels).

    unet_params_template: the U-Net params or their ShapeDtypeStructs (paths and shapes only).
    Strict: every missing, unexpected or mis-shaped key is a UserError naming it.
    """
    return _import(state_dict, encoder_config, unet_params_template, local=False)


def import_local(state_dict: Mapping[str, Any], encoder_config: EncoderConfig,
                 unet_params_template: Any) -> tuple[dict, dict]:
    """local_mapper.pt's state dict -> (local mapper params, kv tree of to_k_local/to_v_local)."""
    return _import(state_dict, encoder_config, unet_params_template, local=True)


def to_official(mapper_params: Any, kv: Any) -> dict[str, np.ndarray]:
    """The inverse of import_global / import_local: our params -> the official key layout
    (contiguous float32 arrays, Linear weights (out, in))."""
    out = {}
    num_sets = sum(1 for name in mapper_params if name.startswith("mapping_patch_"))
    table = {path: key for key, path in mapper_key_table(num_sets).items()}
    for path, value in traverse_util.flatten_dict(mapper_params).items():
        value = np.asarray(value, np.float32)
        out[table[path]] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    for path, value in traverse_util.flatten_dict(kv).items():
        out[kv_official_key(path)] = np.ascontiguousarray(np.asarray(value, np.float32).T)
    return out


# ---------------------------------------------------------------------------- files

def torch_or_exit():
    """torch, which only the importers need (an extra: the install without it trains and
    samples)."""
    try:
        import torch
    except ImportError as err:
        raise UserError('reading an official checkpoint (.pt) needs PyTorch, an extra: '
                        'pip install -c constraints.txt -e ".[torch]" in the checkout') from err
    return torch


def _python3_name(name: str) -> str:
    """A global as Python 3 spells it: pickle protocol 2 writes Python 2 names
    (subprocess.check_call as commands.check_call), torch writes builtins.eval as `eval`."""
    if "." not in name:
        return f"builtins.{name}"
    module, attribute = name.rsplit(".", 1)
    module, attribute = _compat_pickle.NAME_MAPPING.get(
        (module, attribute), (_compat_pickle.IMPORT_MAPPING.get(module, module), attribute))
    return f"{module}.{attribute}"


def _weights_only_refusal(err: Exception) -> str:
    """torch's weights-only error (paragraphs of advice) -> its one-line reason."""
    text = str(err)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"it names {_python3_name(named.group(1))}"
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        names = {op.code: op.name for op in pickletools.opcodes}
        code = int(opcode.group(1))
        return (f"it uses pickle opcode {names.get(chr(code), code)}, which the weights-only "
                f"loader does not run")
    advice = ("Weights only load failed", "Check the documentation", "Please file", "(1)", "(2)")
    reasons = [line.strip() for line in text.splitlines()
               if line.strip() and not line.strip().startswith(advice)]
    return " ".join((reasons[-1] if reasons else text).split())[:200]


def read_torch_file(path: str | os.PathLike, *, what: str, holds: str,
                    safe_globals: Sequence[tuple[Any, str]] = ()) -> Any:
    """torch.load(weights_only=True) of a local or gs:// .pt file that nobody vouches for; both
    importers read the official checkpoints through it.

    Torch's restricted unpickler builds tensors, storages and plain containers (OrderedDict,
    set, ...) and nothing else; `safe_globals` adds exact (object, "module.name") pairs (the
    NeTI importer's stand-ins). A file naming any other Python global (os.system, eval, a numpy
    or torch function) is refused before any of it runs. Only the zip archive torch.save writes
    since PyTorch 1.6 is read (not the legacy pickle-stream and tar formats), its records
    stored uncompressed as torch.save stores them, so loading takes no more memory than the
    file. Every refusal is a one-line UserError naming the file; `what` names its kind
    ("NeTI checkpoint"), `holds` what an official one holds ("tensors only").
    """
    torch = torch_or_exit()
    try:
        raw = as_path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        raise UserError(f"{path} is not a readable PyTorch file: not the zip archive torch.save "
                        f"writes (PyTorch >= 1.6)")
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        compressed = [i.filename for i in archive.infolist()
                      if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise UserError(f"{path} refused: its record {compressed[0]} is compressed, which "
                        f"torch.save never writes; nothing in it was read")
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            with warnings.catch_warnings():  # torch's notices (pickle protocol, ...): one line
                warnings.simplefilter("ignore")
                return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(f"{path} refused: an official {what} holds {holds}, but "
                            f"{_weights_only_refusal(err)}; nothing in it was run") from None
        except Exception as err:  # torch raises many kinds for a file that is not its own
            reason = " ".join(str(err).split())[:200]
            raise UserError(f"{path} is not a readable PyTorch file: {type(err).__name__}: "
                            f"{reason}") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (local or gs://) -> name -> float32 numpy array. Read by
    read_torch_file with nothing added to torch's list: an official ELITE file is
    `torch.save(mapper.state_dict())`, tensors only."""
    torch = torch_or_exit()
    state = read_torch_file(path, what="ELITE checkpoint", holds="tensors only")
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not an ELITE mapper state dict (a dict of tensors, as "
                        f"torch.save(mapper.state_dict()) writes)")
    return {str(key): _as_numpy(value) for key, value in state.items()}


def unet_param_shapes(unet_config) -> dict:
    """The U-Net's param ShapeDtypeStructs, computed without weights."""
    from spacetime_jax.models.unet import UNet2DConditionModel

    side = unet_config.sample_size
    return jax.eval_shape(
        UNet2DConditionModel(unet_config).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, side, side, unet_config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, unet_config.cross_attention_dim), jnp.float32))["params"]


def read_vision_config(name_or_path: str | os.PathLike):
    """A CLIP vision tower's config from its folder (local or gs://) or hub id (config.json
    only, no weights)."""
    from spacetime_jax.models.clip_vision import CLIPVisionConfig
    from spacetime_jax.models.pretrained import ModelLoadError, read_json

    folder = as_path(name_or_path).expanduser()
    if is_remote(folder) or folder.is_dir():
        config_path = folder / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download
            config_path = as_path(hf_hub_download(str(name_or_path), "config.json"))
        except Exception as err:  # network, auth, missing cache
            raise ModelLoadError(
                f"could not read the image encoder config of {name_or_path!r}: "
                f"{type(err).__name__}: {err}. Pass --image_encoder with a local folder") from err
    raw = read_json(config_path, "CLIP vision")
    if raw.get("model_type") == "clip":  # a full CLIPModel: its vision half
        raw = dict(raw.get("vision_config", {}), model_type="clip_vision_model")
    return CLIPVisionConfig.from_dict(raw)


def _parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--feature_layers {text!r}: expected comma-separated ints, e.g. "
                        f"24,4,8,12,16") from None


def import_to_artifact(global_mapper: str, model: str, out: str,
                       local_mapper: Optional[str] = None,
                       image_encoder: Optional[str] = None,
                       feature_layers: Optional[Sequence[int]] = None) -> epath.Path:
    """Official checkpoints -> the encoder folder at `out` (see artifact.save_encoder).

    image_encoder None: MODEL's image_encoder/ folder when it has one (recorded as None,
    meaning "the base model's"), else the reference's openai/clip-vit-large-patch14.
    """
    from spacetime_jax.elite.artifact import save_encoder
    from spacetime_jax.models.builtin import resolve_builtin
    from spacetime_jax.models.clip_text import CLIPTextConfig
    from spacetime_jax.models.pretrained import read_json, resolve_model_dir
    from spacetime_jax.models.unet import UNetConfig

    # The checkpoints first: a file that is refused costs no model resolution or download.
    global_state = load_state_dict_file(global_mapper)
    local_state = None if local_mapper is None else load_state_dict_file(local_mapper)
    model_dir = resolve_model_dir(resolve_builtin(model))
    unet_config = UNetConfig.from_dict(read_json(model_dir / "unet" / "config.json", "unet"))
    text_config = CLIPTextConfig.from_dict(
        read_json(model_dir / "text_encoder" / "config.json", "text_encoder"))
    if image_encoder is None and not (model_dir / "image_encoder").is_dir():
        image_encoder = REFERENCE_IMAGE_ENCODER
    vision_config = read_vision_config(image_encoder or model_dir / "image_encoder")

    # The reference hard-codes the MLPs' hidden width; read it off the checkpoint.
    first = global_state.get("mapping_0.0.weight")
    config = encoder_config_for(vision_config, text_config.hidden_size, feature_layers,
                                hidden_width=None if first is None else int(first.shape[0]))
    template = unet_param_shapes(unet_config)
    mapper, kv = import_global(global_state, config, template)
    local = None
    if local_state is not None:
        local_mapper_params, local_kv = import_local(local_state, config, template)
        local = {"mapper": local_mapper_params, "kv": local_kv}
    extra = {"imported_from": {"global_mapper": str(global_mapper),
                               "local_mapper": None if local_mapper is None else str(local_mapper)}}
    return save_encoder(out, config, {"mapper": mapper, "kv": kv}, local, base_model=model,
                        extra=extra, image_encoder=image_encoder)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="Import official ELITE checkpoints (global_mapper.pt, local_mapper.pt) as "
                    "a spacetime-jax ELITE encoder folder.")
    parser.add_argument("--global_mapper", required=True, help="the reference's global_mapper.pt")
    parser.add_argument("--local_mapper", help="the reference's local_mapper.pt (optional)")
    parser.add_argument("--model", required=True,
                        help="the base model the checkpoints were trained on (folder, hub id "
                             "or builtin:NAME)")
    parser.add_argument("--out", required=True, help="folder for the encoder artifact")
    parser.add_argument("--image_encoder",
                        help="CLIP vision tower (folder or hub id); default: MODEL/image_encoder "
                             f"if present, else {REFERENCE_IMAGE_ENCODER}")
    parser.add_argument("--feature_layers",
                        help="comma-separated CLIP layers, last layer first (default: "
                             "24,4,8,12,16 for a 24-layer tower)")
    args = parser.parse_args(argv)
    try:
        folder = import_to_artifact(args.global_mapper, args.model, args.out,
                                    local_mapper=args.local_mapper,
                                    image_encoder=args.image_encoder,
                                    feature_layers=_parse_layers(args.feature_layers))
    except UserError as err:
        exit_with(str(err))
    print(f"ELITE encoder ({'global + local' if args.local_mapper else 'global'}) for "
          f"{args.model} -> {folder}")


if __name__ == "__main__":
    main()
