"""The command line: the sample job end to end, and bad input ending in one clear line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPACETIME_JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "spacetime_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_sample_job_on_the_shipped_model_draws_the_prompted_backgrounds(cache, tmp_path):
    from spacetime_jax.toyworld.measure import measure_background_color

    result = run_main("--config=configs/sample.py:tiny", f"--workdir={tmp_path}", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "16 cross-attention layers" in result.stdout
    singles = sorted(tmp_path.glob("0*_seed*.png"))
    assert len(singles) == 16  # 4 prompts x 4 seeds
    images = [np.asarray(Image.open(path)) for path in singles]
    assert images[0].shape == (64, 64, 3)
    # Prompts (rows of 4 seeds) ask for green, yellow, purple and black backgrounds.
    prompted = [color for color in ("green", "yellow", "purple", "black") for _ in range(4)]
    hits = sum(measure_background_color(img) == color for img, color in zip(images, prompted))
    assert hits >= 12, hits
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] == 4 * 128  # four seeds, tiles enlarged to 128 px


@pytest.mark.parametrize("override, message", [
    ("--config.sample.no_such_key=1", "no_such_key"),
    ("--config.model=/definitely/not/here", "model folder /definitely/not/here does not exist"),
    ("--config.sample.sampler=heun", "sample.sampler='heun' is unknown"),
    ("--config.compute_dtype=float8", "compute_dtype='float8' is unknown"),
])
def test_bad_input_ends_with_one_clear_line_and_nonzero_exit(cache, tmp_path, override, message):
    result = run_main("--config=configs/sample.py:tiny", f"--workdir={tmp_path}", override,
                      cache=cache)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_variant_is_named_with_the_variants(cache, tmp_path):
    result = run_main("--config=configs/sample.py:huge", f"--workdir={tmp_path}", cache=cache)
    assert result.returncode == 2
    assert ("error: --config=configs/sample.py:huge: unknown variant 'huge' of "
            "configs/sample.py (sd15, tiny, neti, neti_tiny)") in result.stderr


def test_unknown_config_key_is_named_with_the_closest_key(cache, tmp_path):
    result = run_main("--config=configs/sample.py:tiny", f"--workdir={tmp_path}",
                      "--config.sample.stepz=2", cache=cache)
    assert result.returncode == 2
    assert ("error: --config.sample.stepz: no such key in configs/sample.py:tiny; did you "
            "mean sample.steps?") in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py", "--workdir=W"], "No such file or directory: 'configs/nope.py'"),
    (["--config=configs/sample.py:tiny", "--config.sample.steps=abc", "--workdir=W"],
     "invalid literal for int()"),
    (["--workdir=W"], "--config and --workdir are required"),
])
def test_bad_command_lines_are_one_line(cache, args, message):
    result = run_main(*args, cache=cache)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
