"""The ELITE encoder folder: what a training run (or the importer) writes and personalization
reads.

  encoder.json        version, the EncoderConfig, base model, image encoder, has_local, extra
  global.safetensors  the global stage: "mapper/mapping_0/0/kernel", ...,
                      "kv/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel", ...
  local.safetensors   the local stage (optional): "mapper/...", ".../attn2/to_k_local/kernel"

image_encoder None means the base model's own image_encoder/ folder (see image_encoder_source).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util
from safetensors import SafetensorError

from spacetime_jax.elite.encoder import EncoderConfig, mapper_param_shapes
from spacetime_jax.elite.params import differing_paths
from spacetime_jax.errors import UserError
from spacetime_jax.paths import as_path, write_atomic

ARTIFACT_VERSION = 1
CONFIG_FILE = "encoder.json"
GLOBAL_FILE = "global.safetensors"
LOCAL_FILE = "local.safetensors"
STAGE_KEYS = ("mapper", "kv")
KV_LEAVES = {"global": ("to_k", "to_v"), "local": ("to_k_local", "to_v_local")}

# The encoder folder inside a training workdir (WORKDIR/encoder).
ENCODER_DIR = "encoder"

@dataclasses.dataclass
class EncoderArtifact:
    config: EncoderConfig
    global_params: dict            # {"mapper": ..., "kv": ...} (numpy arrays)
    local_params: Optional[dict]   # same layout, or None for a global-only encoder
    base_model: str
    image_encoder: Optional[str]   # None: the base model's image_encoder/ folder
    extra: dict


def image_encoder_source(artifact: EncoderArtifact) -> str:
    """Where to load the CLIP vision tower from (a folder or hub id)."""
    if artifact.image_encoder is not None:
        return artifact.image_encoder
    from spacetime_jax.models.builtin import resolve_builtin
    return str(as_path(resolve_builtin(artifact.base_model)) / "image_encoder")


def _check_stage(params: Any, config: EncoderConfig, stage: str, where: str) -> None:
    """The stage's tree has the mapper the config describes and only K/V kernels of its kind."""
    if not isinstance(params, Mapping) or set(params) != set(STAGE_KEYS):
        found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise UserError(f"{where}: the {stage} params must hold exactly {list(STAGE_KEYS)}, "
                        f"found {found}")
    want = {path: s.shape for path, s in
            traverse_util.flatten_dict(mapper_param_shapes(config)).items()}
    have = {path: np.shape(v) for path, v in traverse_util.flatten_dict(params["mapper"]).items()}
    if want != have:
        wrong = differing_paths(want, have)
        raise UserError(f"{where}: the {stage} mapper does not match the encoder config "
                        f"({config}); differing params: {wrong[:6]}")
    kv_paths = list(traverse_util.flatten_dict(params["kv"]))
    bad = ["/".join(p) for p in kv_paths
           if len(p) < 3 or p[-3] != "attn2" or p[-2] not in KV_LEAVES[stage] or p[-1] != "kernel"]
    if not kv_paths or bad:
        raise UserError(f"{where}: the {stage} kv params must be attn2 "
                        f"{'/'.join(KV_LEAVES[stage])} kernels; "
                        f"{'none found' if not kv_paths else f'unexpected: {bad[:6]}'}")


def _write_stage(path: epath.Path, params: dict) -> None:
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    # Contiguous: safetensors writes an array's buffer as is, so a transposed view (an
    # imported PyTorch weight) would be saved untransposed.
    write_atomic(path, safetensors.numpy.save(
        {key: np.ascontiguousarray(value, np.float32) for key, value in flat.items()}))


def save_encoder(folder: str | os.PathLike, encoder_config: EncoderConfig, global_params: dict,
                 local_params: Optional[dict], base_model: str, extra: Optional[dict] = None,
                 *, image_encoder: Optional[str] = None) -> epath.Path:
    """Writes the encoder folder, local or gs:// (see the module docstring); encoder.json is
    written last, so a folder with it is complete. extra: JSON-serializable facts (train
    config, provenance)."""
    folder = as_path(folder)
    where = f"ELITE encoder {folder}"
    _check_stage(global_params, encoder_config, "global", where)
    if local_params is not None:
        _check_stage(local_params, encoder_config, "local", where)
    folder.mkdir(parents=True, exist_ok=True)
    _write_stage(folder / GLOBAL_FILE, global_params)
    if local_params is not None:
        _write_stage(folder / LOCAL_FILE, local_params)
    elif (folder / LOCAL_FILE).exists():
        (folder / LOCAL_FILE).unlink()  # a previous save's local stage is not this encoder's
    meta = {
        "version": ARTIFACT_VERSION,
        "encoder_config": encoder_config.to_dict(),
        "base_model": base_model,
        "image_encoder": image_encoder,
        "has_local": local_params is not None,
        "extra": extra or {},
    }
    write_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _read_stage(path: epath.Path, config: EncoderConfig, stage: str, where: str) -> dict:
    if not path.is_file():
        raise UserError(f"{where}: {path.name} is missing (encoder.json says it is there); "
                        f"rewrite the folder")
    try:
        flat = safetensors.numpy.load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{where}: {path.name} is not a readable safetensors file "
                        f"({err})") from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    _check_stage(params, config, stage, where)
    return params


def load_encoder(folder: str | os.PathLike) -> EncoderArtifact:
    """Reads an encoder folder written by save_encoder (local or gs://); UserError on a missing
    or corrupt one."""
    folder = as_path(folder)
    where = f"ELITE encoder {folder}"
    meta_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"{where} does not exist (an ELITE training run or "
                        f"`python -m spacetime_jax.elite.importer` writes it)")
    if not meta_path.is_file():
        raise UserError(f"{where}: {CONFIG_FILE} is missing; this is not a complete ELITE "
                        f"encoder folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: {CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("version") != ARTIFACT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise UserError(f"{where}: artifact version {version!r} is not supported (expected "
                        f"{ARTIFACT_VERSION})")
    try:
        config = EncoderConfig.from_dict(meta["encoder_config"])
        base_model = meta["base_model"]
    except (KeyError, TypeError) as err:
        raise UserError(f"{where}: {CONFIG_FILE} lacks {err}") from None
    global_params = _read_stage(folder / GLOBAL_FILE, config, "global", where)
    local_params = (_read_stage(folder / LOCAL_FILE, config, "local", where)
                    if meta.get("has_local") else None)
    return EncoderArtifact(config=config, global_params=global_params,
                           local_params=local_params, base_model=base_model,
                           image_encoder=meta.get("image_encoder"),
                           extra=meta.get("extra") or {})
