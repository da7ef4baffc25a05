"""The README's commands, run exactly as written, the way a new user runs them: from the root
of a checkout (here a temporary folder holding the checkout's configs/), with the README's
relative paths. The main command (NeTI on the bundled crescent) and the sampling command
after it are read out of README.md, so that the test and the README cannot drift apart; CI's
script must run the README's test command.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def readme_commands() -> list[str]:
    """The bash blocks of the README's "Two commands" section, line continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [block.replace("\\\n", " ").strip() for block in blocks]


def test_the_readme_names_the_main_sampling_and_test_commands():
    setup_and_main, sample, tests = readme_commands()
    assert "pip install -c constraints.txt" in setup_and_main
    assert setup_and_main.split("&&")[-1].strip().startswith("spacetime-jax --config=neti:")
    assert sample.startswith("spacetime-jax --config=sample:neti")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines, "CI must run the README's test command"


@pytest.fixture(scope="module")
def checkout_root(tmp_path_factory) -> Path:
    """A folder laid out as a fresh checkout's root, where the README's commands start."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def run_in(root: Path, command: str) -> subprocess.CompletedProcess:
    # `python` and `spacetime-jax` are this test's environment's (what the install made).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float64)


def test_main_command_then_sampling_command_as_written(checkout_root):
    setup_and_main, sample, _ = readme_commands()
    main = setup_and_main.split("&&")[-1].strip()  # the install is this test's environment
    assert "--workdir=runs/" in main  # relative, as a user types it

    trained = run_in(checkout_root, main)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = checkout_root / "runs" / "crescent"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["100", "150", "200"]
    assert "step 200/200" in trained.stdout
    grid = image(run / "validation" / "step_000200" / "crescent.png")
    assert grid.shape[0] > 4 * 64 and grid.shape[1] > 4 * 64 and grid.std() > 10
    assert (run / "concept" / "mapper.safetensors").is_file()

    sampled = run_in(checkout_root, sample)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    samples = run / "samples"
    grids = sorted(samples.glob("grid_seed*.png"))
    assert [p.name for p in grids] == ["grid_seed42.png"]
    cells = sorted(samples.glob("p00_seed42_trunc*.png"))
    assert len(cells) == 3  # untruncated, 8, 32
    assert all(image(cell).std() > 10 for cell in cells)
