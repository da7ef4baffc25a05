"""What the command line adds around absl's flags: built-in config names (`--config=neti:tiny`),
the help text that lists them, the printed config (`--print_config`), and an unknown
`--config.KEY` named with the closest keys the config has.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path
from types import ModuleType

import ml_collections

from spacetime_jax.errors import exit_with

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?")


def configs_dir() -> Path:
    """The built-in configs: the checkout's configs/, installed as spacetime_jax.configs
    (setup.py's package_dir), so that a name resolves from any current directory."""
    import spacetime_jax.configs  # imported here: a --config=PATH run does not need it
    return Path(spacetime_jax.configs.__file__).parent


def builtin_configs() -> dict[str, Path]:
    """Built-in config name -> its file: neti -> .../configs/neti.py."""
    return {path.stem: path for path in sorted(configs_dir().glob("*.py"))
            if path.stem != "__init__"}


def load_config_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"spacetime_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- --config=NAME[:VARIANT]

def _config_value_index(argv: list[str]) -> int | None:
    """Index in argv of --config's value (`--config=V` or `--config V`), or None."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(("--config=", "-config=")):
            return i
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return i + 1
    return None


def config_source(argv: list[str]) -> str | None:
    """--config's value as typed: `neti:tiny` or `configs/neti.py:tiny`."""
    i = _config_value_index(argv)
    if i is None:
        return None
    return argv[i].split("=", 1)[1] if argv[i].startswith("-") else argv[i]


def is_config_name(source: str) -> bool:
    """`neti:tiny` is a name; `configs/neti.py:tiny`, `/abs/x.py` and an existing file are
    files."""
    file_part = source.split(":", 1)[0]
    return not ("/" in file_part or file_part.endswith(".py") or Path(file_part).is_file())


def resolve_config_name(argv: list[str]) -> list[str]:
    """argv with a built-in config name replaced by its packaged file; a path unchanged."""
    source = config_source(argv)
    if source is None or not is_config_name(source):
        return argv
    name, colon, variant = source.partition(":")
    configs = builtin_configs()
    if name not in configs:
        close = difflib.get_close_matches(name, configs, n=1)
        exit_with(f"--config={source}: no built-in config {name!r}"
                  f"{f'; did you mean {close[0]}?' if close else ''} (built-in: "
                  f"{', '.join(configs)}; or a file such as configs/neti.py:tiny)")
    i = _config_value_index(argv)
    resolved = f"{configs[name]}{colon}{variant}"
    value = f"{argv[i].split('=', 1)[0]}={resolved}" if argv[i].startswith("-") else resolved
    return [*argv[:i], value, *argv[i + 1:]]


# ---------------------------------------------------------------- --help

def help_text() -> str:
    lines = [
        "usage: spacetime-jax --config=NAME[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]",
        "       (the same as python -m spacetime_jax.main ...)",
        "",
        "Runs one job of a config: NeTI or ELITE personalization, sampling, or pretraining the",
        "toy-world model. --config takes a built-in NAME[:VARIANT] (no VARIANT: the default)",
        "or a config file, e.g. --config=configs/neti.py:tiny.",
        "",
        "Built-in configs (NAME) and their variants (:VARIANT):",
    ]
    for name, path in builtin_configs().items():
        module = load_config_module(path)
        summary = " ".join(inspect.getdoc(module).split("\n\n")[0].split())
        lines += _wrapped(name, summary)
        default = inspect.signature(module.get_config).parameters["arg"].default
        for variant, description in module.VARIANTS.items():
            lines += _wrapped(f"  :{variant}",
                              f"(default) {description}" if variant == default else description)
    lines += [
        "",
        "Flags:",
        *_wrapped("--workdir=DIR", "the run's outputs and checkpoints (a folder or gs://...)"),
        *_wrapped("--config.KEY=VALUE", "overrides one key: --config.train.steps=50 "
                  "--config.sample.seeds='(0,1)'; an unknown key is an error"),
        *_wrapped("--print_config", "prints the config (every key, after the overrides) and "
                  "exits without running; no --workdir needed"),
        "",
        "A config's keys and defaults:  spacetime-jax --config=neti:tiny --print_config",
        "Every flag, absl's included:   spacetime-jax --helpfull",
    ]
    return "\n".join(lines)


def _wrapped(label: str, text: str) -> list[str]:
    """`  label    text...` with the text wrapped in a column of its own."""
    return textwrap.wrap(text, 92, initial_indent=f"  {label:<21}", subsequent_indent=" " * 23)


# ---------------------------------------------------------------- --print_config

def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Every leaf as dotted key -> value: {"train.steps": 200, ...}."""
    items = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            items.update(flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def format_config(config: ml_collections.ConfigDict, source: str) -> str:
    lines = [f"# --config={source} after the command line's overrides (--config.KEY=VALUE)"]
    lines += [f"{key} = {value!r}" for key, value in flat_items(config).items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- unknown keys

def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key, sections included: ["data", "data.images", ...]."""
    keys = []
    for key, value in config.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, ml_collections.ConfigDict):
            keys += _all_keys(value, f"{prefix}{key}.")
    return keys


def closest_keys(key: str, keys: list[str]) -> list[str]:
    """The keys most like `key` (difflib's ratio at least 0.7, and within 0.1 of the best)."""
    ratios = {other: difflib.SequenceMatcher(None, key, other).ratio() for other in keys}
    best = max(ratios.values(), default=0.0)
    close = [other for other, ratio in ratios.items() if ratio >= max(0.7, best - 0.1)]
    return sorted(close, key=ratios.get, reverse=True)[:3]


def unknown_key_error(argv: list[str], source: str) -> str | None:
    """The first `--config.KEY=...` whose KEY the config lacks, named with the closest keys;
    None when every key exists (or the config itself does not load)."""
    path, _, variant = config_source(argv).partition(":")
    try:
        module = load_config_module(Path(path))
        config = module.get_config(variant) if variant else module.get_config()
    except Exception:  # the config's own error is reported instead
        return None
    for arg in argv[1:]:
        override = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
        key = override and override.group(1)
        if key and not _has_key(config, key):
            close = closest_keys(key, _all_keys(config))
            hint = (f"did you mean {' or '.join(close)}?" if close else
                    f"its keys: spacetime-jax --config={source} --print_config")
            return f"--config.{key}: no such key in {source}; {hint}"
    return None
