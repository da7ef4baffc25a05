"""The `spacetime-jax` console command: built-in configs by name from any folder, the help that
lists them, --print_config, and an unknown key or variant named with what exists."""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cli_helpers import error_line

REPO = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).parent / "spacetime-jax"
CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def console(*args, cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    assert CONSOLE.exists(), "the console command is missing: run `pip install -e .` again"
    env = dict(os.environ, SPACETIME_JAX_CACHE=str(cache))
    return subprocess.run([str(CONSOLE), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(name: str) -> dict[str, str]:
    return config_module(name).VARIANTS


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_variants_names_exactly_what_get_config_accepts_default_first(name):
    module = config_module(name)
    default = inspect.signature(module.get_config).parameters["arg"].default
    assert list(module.VARIANTS)[0] == default
    for variant in module.VARIANTS:
        assert module.get_config(variant).method
    with pytest.raises(ValueError, match="unknown variant 'nope'") as raised:
        module.get_config("nope")
    assert str(raised.value).endswith(f"({', '.join(module.VARIANTS)})")


def test_console_command_samples_by_config_name_from_a_folder_without_configs(cache, tmp_path):
    assert not (tmp_path / "configs").exists()
    result = console("--config=sample:tiny", "--workdir=out", "--config.sample.steps=2",
                     "--config.sample.seeds=(0,)", cwd=tmp_path, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "000_seed0.png", "001_seed0.png", "002_seed0.png", "003_seed0.png", "grid.png"]


@pytest.mark.parametrize("command", [[str(CONSOLE)],
                                     [sys.executable, "-m", "spacetime_jax.main"]])
def test_help_lists_every_config_and_variant_and_how_to_print_a_config(tmp_path, command):
    result = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {}  # config name -> the variants listed under it
    for line in result.stdout.splitlines():
        if line.startswith("  ") and line.split()[0] in CONFIG_NAMES:
            name = line.split()[0]
            listed[name] = []
        elif line.startswith("    :"):
            listed[name].append(line.split()[0][1:])
    assert sorted(listed) == CONFIG_NAMES
    for name in CONFIG_NAMES:
        assert listed[name] == list(variants(name)), name
    assert "--print_config" in result.stdout


def test_print_config_prints_the_overrides_and_writes_nothing(cache, tmp_path):
    result = console("--config=neti:demo", "--workdir=run", "--config.train.steps=7",
                     "--config.data.resolution=32", "--print_config", cwd=tmp_path, cache=cache,
                     timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "train.steps = 7" in lines and "data.resolution = 32" in lines
    assert "concept.super_category = 'circle'" in lines  # the variant's own value
    assert not (tmp_path / "run").exists()


def test_a_config_file_path_still_works_and_needs_no_workdir_to_print(cache, tmp_path):
    result = console(f"--config={REPO / 'configs' / 'sample.py'}:tiny", "--print_config",
                     cwd=tmp_path, cache=cache, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model = 'builtin:toyworld'" in result.stdout.splitlines()


@pytest.mark.parametrize("override, suggestion", [
    ("train.stepz=5", "train.steps"),
    ("data.imagez=x", "data.images"),
    ("modle=x", "model"),
    ("dat.images=x", "data.images"),
])
def test_an_unknown_key_is_named_with_the_closest_keys(cache, tmp_path, override, suggestion):
    key = override.split("=")[0]
    for config in ("neti:tiny", f"{REPO / 'configs' / 'neti.py'}:tiny"):
        result = console(f"--config={config}", "--workdir=run", f"--config.{override}",
                         cwd=tmp_path, cache=cache, timeout=120)
        assert result.returncode == 2
        assert error_line(result) == (f"error: --config.{key}: no such key in {config}; "
                                      f"did you mean {suggestion}?")


def test_an_unknown_variant_lists_the_variants(cache, tmp_path):
    result = console("--config=neti:tny", "--workdir=run", cwd=tmp_path, cache=cache,
                     timeout=120)
    assert result.returncode == 2
    assert error_line(result) == ("error: --config=neti:tny: unknown variant 'tny' of "
                                  "configs/neti.py (sd15, tiny, demo)")


def test_an_unknown_config_name_lists_the_built_in_configs(cache, tmp_path):
    result = console("--config=nett:tiny", "--workdir=run", cwd=tmp_path, cache=cache,
                     timeout=120)
    assert result.returncode == 2
    line = error_line(result)
    assert "no built-in config 'nett'; did you mean neti?" in line
    assert all(name in line for name in CONFIG_NAMES)


def test_a_wheel_ships_the_configs_and_the_console_command(tmp_path):
    source = tmp_path / "source"  # built from a copy: an in-tree build would write build/
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    for folder in ("configs", "spacetime_jax"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("spacetime_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    for name in ["__init__", *CONFIG_NAMES]:
        assert f"spacetime_jax/configs/{name}.py" in names, name
    assert "spacetime-jax = spacetime_jax.main:console" in entry_points
