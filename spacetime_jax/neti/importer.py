"""Import a concept trained by the official NeTI code (PyTorch) as our mapper variables.

The official checkpoint (`torch.save` of a dict) holds:
  state_dict  the mapper's weights: input_layer.*, net.{0,1,2,4,5}.* (net.0 IS input_layer,
              saved twice), output_layer.0.*
  cfg         the run config: pyrallis.encode(RunConfig) (a dict) in the official code, a
              pickled RunConfig object in some forks
  encoder     the pickled positional-encoding module: NeTIPositionalEncoding with the random
              matrix `w` (and sigma_t, sigma_l, num_w), or BasicEncoder for the plain encoder
The pickled classes live in the official repository's modules, which are not installed here
and would not be trusted if they were. The file is read by elite/importer.py's read_torch_file
(both importers share it): torch.load(weights_only=True), whose restricted unpickler builds
tensors, storages and plain containers and nothing else, plus stand-ins registered under the
exact (module, name) pairs an official checkpoint names (OFFICIAL_CLASSES, PATH_CLASSES, each
justified there). A file that names any other Python global (os.system, builtins.eval, a numpy
or torch function, ...) is refused before any of it runs; nothing of the official package is
imported or executed.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.elite.importer import read_torch_file, torch_or_exit
from spacetime_jax.errors import UserError, exit_with
from spacetime_jax.models import convert
from spacetime_jax.neti.mapper import MapperConfig, NeTIMapper

REQUIRED_KEYS = ("state_dict", "cfg", "encoder")
DEFAULT_NUM_LAYERS = 16  # the reference's UNET_LAYERS
DEFAULT_ANCHORS = 10

# The classes an official checkpoint pickles, as exact (module, name) pairs; each is read as a
# StandIn that records its state. Torch's own weights-only list covers the rest (tensors,
# storages, nn.Parameter, OrderedDict, set).
OFFICIAL_CLASSES = (
    # The positional-encoding module the reference saves whole, as `encoder` (it holds W):
    # official models/positional_encoding.py.
    ("models.positional_encoding", "NeTIPositionalEncoding"),
    # The plain encoder of runs without positional encoding (normalized t and l tables).
    ("models.positional_encoding", "BasicEncoder"),
    # The run config as an object, in forks that pickle RunConfig instead of the official
    # pyrallis.encode(RunConfig) dict: official training/config.py ...
    ("training.config", "RunConfig"), ("training.config", "LogConfig"),
    ("training.config", "DataConfig"), ("training.config", "ModelConfig"),
    ("training.config", "EvalConfig"), ("training.config", "OptimConfig"),
    # ... and utils/types.py (ModelConfig.__post_init__ turns pe_sigmas into one).
    ("utils.types", "PESigmas"),
)
# The paths of such a config (LogConfig.exp_dir, DataConfig.train_data_dir) become pure paths:
# strings with path syntax, no file-system access. pathlib._local is their module from Python
# 3.13 on.
PATH_CLASSES = {("pathlib", "PosixPath"): pathlib.PurePosixPath,
                ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
                ("pathlib._local", "PosixPath"): pathlib.PurePosixPath,
                ("pathlib._local", "WindowsPath"): pathlib.PureWindowsPath}


@dataclasses.dataclass
class ImportedConcept:
    mapper_config: MapperConfig
    variables: dict             # {"params": ..., "encoding": {"W": ...}} (no encoding: plain)
    placeholder_token: Optional[str]
    super_category_token: Optional[str]
    base_model: Optional[str]
    # cfg.model.target_norm where the run saved it; None: the caller computes it as the norm
    # of the super-category token's input embedding.
    target_norm: Optional[float]
    raw_cfg_dict: dict          # the run config as plain data


class StandIn:
    """Whatever the pickle described, recorded: constructor args and state (attributes)."""
    _pickled_as = "?"
    _args: tuple = ()   # class defaults: unpickling may skip __init__
    _kwargs: dict = {}

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        # (dict state, slot state) for objects with __slots__; plain dict otherwise.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __repr__(self):
        return f"StandIn({self._pickled_as})"


@functools.lru_cache(maxsize=None)
def _stand_in_class(module: str, name: str) -> type:
    return type(name, (StandIn,), {"_pickled_as": f"{module}.{name}", "__module__": module})


def _official_globals() -> list[tuple[Any, str]]:
    """What safe_globals registers: stand-ins and pure paths under the official names."""
    stand_ins = [(_stand_in_class(module, name), f"{module}.{name}")
                 for module, name in OFFICIAL_CLASSES]
    return stand_ins + [(cls, f"{module}.{name}") for (module, name), cls in PATH_CLASSES.items()]


def load_torch_file(path: str | os.PathLike) -> Any:
    """The official file (local or gs://) through the hardened torch.load(weights_only=True)
    that both importers share, the official classes read as StandIns: a file naming any other
    global is refused (a one-line UserError) before anything of it runs."""
    return read_torch_file(path, what="NeTI checkpoint",
                           holds="tensors, its encoder and its run config only",
                           safe_globals=_official_globals())


# ---------------------------------------------------------------------------- cfg

def plain_data(value: Any) -> Any:
    """cfg objects (dataclasses, StandIns, enums, paths, tensors) -> JSON-like data."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain_data(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return plain_data(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if torch_or_exit().is_tensor(value):
        return value.tolist()
    if isinstance(value, StandIn):
        state = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        if state:
            return plain_data(state)
        if len(value._args) == 1 and not value._kwargs:  # e.g. an enum member: Cls(value)
            return plain_data(value._args[0])
        return repr(value)
    if dataclasses.is_dataclass(value):
        return plain_data(vars(value))
    return repr(value)


def _cfg_field(cfg: dict, section: str, name: str, default: Any = None) -> Any:
    value = (cfg.get(section) or {}).get(name, default)
    return default if value is None else value


# ---------------------------------------------------------------------------- encoder

def _encoder_attribute(encoder: Any, name: str) -> Any:
    """An attribute of the pickled encoder module: plain attribute, parameter or buffer.

    The reference keeps `w` as a plain tensor attribute (so it is missing from the mapper's
    state_dict); where it is a registered parameter, the state_dict's `encoder.w` has it too.
    """
    state = vars(encoder) if hasattr(encoder, "__dict__") else {}
    if name in state:
        return state[name]
    for registry in ("_parameters", "_buffers"):
        if name in (state.get(registry) or {}):
            return state[registry][name]
    return None


def _with_encoder_state(encoder: Any, state_dict: dict) -> Any:
    """The encoder, with `encoder.*` entries of the state dict filled in as attributes."""
    saved = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not saved:
        return encoder
    merged = StandIn()
    merged.__dict__.update(vars(encoder) if hasattr(encoder, "__dict__") else {})
    merged.__dict__.update(saved)
    return merged


def _encoder_kind(encoder: Any, state_dict: dict) -> str:
    if _encoder_attribute(encoder, "w") is not None:
        return "fourier"
    if _encoder_attribute(encoder, "normalized_timesteps") is not None:
        return "plain"
    if "input_layer.weight" in state_dict:
        raise UserError("NeTI checkpoint: the pickled encoder holds no matrix `w`; without "
                        "it the concept cannot be reproduced")
    return "plain"


def _as_numpy(value: Any) -> np.ndarray:
    torch = torch_or_exit()
    if torch.is_tensor(value):
        return value.detach().to(torch.float32).cpu().numpy()
    return np.asarray(value, np.float32)


# ---------------------------------------------------------------------------- config

def _token_dim(output_width: int, cfg: dict, token_dim: Optional[int]) -> tuple[int, bool]:
    """(token_dim, use_bypass) from the output layer's width."""
    if token_dim is None:
        bypass = bool(_cfg_field(cfg, "model", "output_bypass", True))
        if bypass and output_width % 2:
            raise UserError(f"NeTI checkpoint: cfg says output_bypass, but the output width "
                            f"{output_width} is odd")
        return (output_width // 2, True) if bypass else (output_width, False)
    if output_width == 2 * token_dim:
        return token_dim, True
    if output_width == token_dim:
        return token_dim, False
    raise UserError(f"NeTI checkpoint: output width {output_width} is neither token_dim "
                    f"{token_dim} nor twice it")


def _mapper_config(state_dict: dict, encoder: Any, cfg: dict, kind: str,
                   token_dim: Optional[int]) -> MapperConfig:
    net_1 = state_dict["net.1.weight"]  # (hidden, input width)
    hidden_width, input_width = (int(n) for n in net_1.shape)
    dim, use_bypass = _token_dim(int(state_dict["output_layer.0.weight"].shape[0]), cfg,
                                 token_dim)
    sigmas = _cfg_field(cfg, "model", "pe_sigmas", {}) or {}
    fields = dict(hidden_width=hidden_width, token_dim=dim, use_bypass=use_bypass,
                  nested_dropout=bool(_cfg_field(cfg, "model", "use_nested_dropout", True)),
                  nested_dropout_prob=float(_cfg_field(cfg, "model", "nested_dropout_prob", 0.5)),
                  encoder=kind)
    if kind == "fourier":
        w = _as_numpy(_encoder_attribute(encoder, "w"))
        anchors = int(_cfg_field(cfg, "model", "num_pe_time_anchors", DEFAULT_ANCHORS))
        if input_width % anchors:
            raise UserError(f"NeTI checkpoint: input width {input_width} is not a multiple of "
                            f"num_pe_time_anchors {anchors}")
        sigma_t = _encoder_attribute(encoder, "sigma_t")
        sigma_l = _encoder_attribute(encoder, "sigma_l")
        fields.update(
            num_frequencies=int(w.shape[0]), num_anchor_timesteps=anchors,
            num_layers=input_width // anchors,
            sigma_t=float(sigma_t if sigma_t is not None else sigmas.get("sigma_t", 0.03)),
            sigma_l=float(sigma_l if sigma_l is not None else sigmas.get("sigma_l", 2.0)))
    else:
        layer_table = _encoder_attribute(encoder, "normalized_unet_layers")
        fields["num_layers"] = (len(layer_table) if layer_table is not None
                                else DEFAULT_NUM_LAYERS)
    return MapperConfig(**fields)


# ---------------------------------------------------------------------------- weights

def _check_duplicate_input_layer(state_dict: dict) -> None:
    """net.0 is the same module as input_layer: equal weights, or the file is inconsistent."""
    for leaf in ("weight", "bias"):
        a, b = state_dict.get(f"input_layer.{leaf}"), state_dict.get(f"net.0.{leaf}")
        if a is not None and b is not None and not torch_or_exit().equal(a, b):
            raise UserError(f"NeTI checkpoint: net.0.{leaf} differs from input_layer.{leaf} "
                            f"(they are one module in the reference)")


def _variables(state_dict: dict, encoder: Any, config: MapperConfig) -> dict:
    mapper_weights = {k: _as_numpy(v) for k, v in state_dict.items()
                      if not k.startswith(("net.0.", "encoder."))}
    zeros = jnp.zeros((1,), jnp.float32)
    template = jax.eval_shape(NeTIMapper(config).init, jax.random.key(0), zeros, zeros, 1.0)
    variables = {"params": convert.torch_to_flax(mapper_weights, template["params"],
                                                 what="NeTI mapper")}
    if config.encoder == "fourier":
        variables["encoding"] = {"W": jnp.asarray(_as_numpy(_encoder_attribute(encoder, "w")))}
    return variables


def import_neti_checkpoint(path: str | os.PathLike, *,
                           token_dim: Optional[int] = None) -> ImportedConcept:
    """An official NeTI mapper checkpoint (e.g. `mapper-steps-1000.pt`) -> ImportedConcept.

    token_dim: the text encoder's width; None reads it off the output layer and the cfg's
    output_bypass (768 for SD 1.x with the bypass: an output of 1536).
    """
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a NeTI mapper checkpoint: it holds a "
                        f"{type(checkpoint).__name__}, not a dict with keys {list(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a NeTI mapper checkpoint: missing keys {missing} "
                        f"(found {sorted(map(str, checkpoint))})")
    state_dict = dict(checkpoint["state_dict"])
    missing = [k for k in ("net.1.weight", "output_layer.0.weight") if k not in state_dict]
    if missing:
        raise UserError(f"{path} is not a NeTI mapper checkpoint: its state_dict lacks "
                        f"{missing}")
    _check_duplicate_input_layer(state_dict)
    cfg = plain_data(checkpoint["cfg"])
    cfg = cfg if isinstance(cfg, dict) else {}
    encoder = _with_encoder_state(checkpoint["encoder"], state_dict)
    kind = _encoder_kind(encoder, state_dict)
    config = _mapper_config(state_dict, encoder, cfg, kind, token_dim)
    target_norm = _cfg_field(cfg, "model", "target_norm")
    return ImportedConcept(
        mapper_config=config,
        variables=_variables(state_dict, encoder, config),
        placeholder_token=_cfg_field(cfg, "data", "placeholder_token"),
        super_category_token=_cfg_field(cfg, "data", "super_category_token"),
        base_model=_cfg_field(cfg, "model", "pretrained_model_name_or_path"),
        target_norm=None if target_norm is None else float(target_norm),
        raw_cfg_dict=cfg)


# ---------------------------------------------------------------------------- into our artifact

def super_category_norm(model: str, word: str) -> float:
    """The norm of `word`'s input embedding in `model`'s text encoder (the reference's
    target_norm when the run saved none); `word` must be one token."""
    from spacetime_jax.models.builtin import resolve_builtin
    from spacetime_jax.models.pretrained import load_text_encoder, resolve_model_dir
    from spacetime_jax.models.tokenizer import load_tokenizer, single_token_id

    folder = resolve_model_dir(resolve_builtin(model))
    token_id = single_token_id(load_tokenizer(folder / "tokenizer"), word)
    _, params = load_text_encoder(folder / "text_encoder")
    table = np.asarray(params["embeddings"]["token_embedding"]["embedding"])
    return float(np.linalg.norm(table[token_id]))


def to_concept(imported: ImportedConcept, *, base_model: Optional[str] = None,
               placeholder: Optional[str] = None, super_category: Optional[str] = None,
               target_norm: Optional[float] = None):
    """Our concept artifact (neti.concept.Concept) from an import; each argument overrides what
    the official run's cfg says. Without a target norm anywhere, it is computed from the base
    model (super_category_norm)."""
    from spacetime_jax.neti.concept import Concept

    base_model = base_model or imported.base_model
    placeholder = placeholder or imported.placeholder_token
    super_category = super_category or imported.super_category_token
    for value, what, flag in ((base_model, "base model", "--base-model"),
                              (placeholder, "placeholder token", "--placeholder"),
                              (super_category, "super-category token", "--super-category")):
        if not value:
            raise UserError(f"the checkpoint's cfg does not name its {what}; pass {flag}")
    if target_norm is None:
        target_norm = imported.target_norm
    if target_norm is None:
        target_norm = super_category_norm(base_model, super_category)
    return Concept(kind="neti", mapper_config=imported.mapper_config,
                   variables=imported.variables, placeholder=placeholder,
                   super_category=super_category, target_norm=float(target_norm),
                   base_model=base_model, train_config={"imported_from_official_neti":
                                                        imported.raw_cfg_dict})


def main(argv: Optional[list[str]] = None) -> None:
    """python -m spacetime_jax.neti.importer mapper-steps-1000.pt --out runs/cat/concept"""
    import argparse

    from spacetime_jax.neti.concept import save_concept

    parser = argparse.ArgumentParser(
        description="Import an official NeTI mapper checkpoint as a spacetime-jax concept "
                    "(sample it with configs/sample.py:neti --config.concept=OUT).")
    parser.add_argument("checkpoint", help="the official run's mapper-steps-N.pt")
    parser.add_argument("--out", required=True, help="folder for the concept artifact")
    parser.add_argument("--base-model", help="diffusers folder or hub id (default: the cfg's)")
    parser.add_argument("--placeholder", help="placeholder token (default: the cfg's)")
    parser.add_argument("--super-category", help="super-category word (default: the cfg's)")
    parser.add_argument("--target-norm", type=float,
                        help="default: the cfg's, else the super-category embedding's norm")
    args = parser.parse_args(argv)
    try:
        imported = import_neti_checkpoint(args.checkpoint)
        concept = to_concept(imported, base_model=args.base_model, placeholder=args.placeholder,
                             super_category=args.super_category, target_norm=args.target_norm)
        folder = save_concept(args.out, concept)
    except UserError as err:
        exit_with(str(err))
    print(f"concept {concept.placeholder} (base model {concept.base_model}, target norm "
          f"{concept.target_norm:.4f}) -> {folder}")


if __name__ == "__main__":
    main()
