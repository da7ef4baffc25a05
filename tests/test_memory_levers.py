"""The NeTI step's memory levers: XLA:CPU's memory scheduler (set when spacetime_jax is
imported) and remat, as benchmarks/neti_step.py measures them on the tiny model.

One subprocess run of the benchmark without the PyTorch reference and untimed levers (one
compile per lever, each in its own process): the values are XLA's memory analysis of the
compiled step, so they are exact and repeatable, and the assertions are on them, not on time.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spacetime_jax.training.compiler import SCHEDULER_FLAG, prefer_memory_scheduler

REPO = Path(__file__).resolve().parents[1]


def test_importing_spacetime_jax_sets_the_memory_scheduler():
    assert f"{SCHEDULER_FLAG}=false" in os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("before, after", [
    ({}, f"{SCHEDULER_FLAG}=false"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     f"--xla_force_host_platform_device_count=8 {SCHEDULER_FLAG}=false"),
    ({"XLA_FLAGS": f"{SCHEDULER_FLAG}=true"}, f"{SCHEDULER_FLAG}=true"),  # the user's choice
])
def test_the_flag_is_added_once_and_a_users_choice_stays(before, after):
    environ = dict(before)
    prefer_memory_scheduler(environ)
    prefer_memory_scheduler(environ)
    assert environ["XLA_FLAGS"] == after


@pytest.fixture(scope="module")
def levers() -> dict[str, list[float]]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.neti_step", "--size", "tiny", "--no-torch",
         "--steps", "1", "--warmup", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout.split("memory levers", 1)[1].splitlines()
    rows = {}
    for line in table:
        match = re.match(r"(\S.*?)\s{2,}([\d,.]+)\s+([\d,.]+)\s+([\d,.]+)\s", line)
        if match:
            rows[match.group(1)] = [float(g.replace(",", "")) for g in match.groups()[1:]]
    return rows


def test_every_lever_is_measured(levers):
    assert len(levers) == 5, levers
    for arguments, temporaries, peak in levers.values():
        assert arguments > 0 and temporaries > 0 and peak >= arguments


def test_the_memory_scheduler_and_remat_lower_the_steps_memory(levers):
    default = levers["XLA:CPU's default scheduler (concurrency)"]
    ours = levers["memory scheduler (ours, the default)"]
    full = levers["+ remat full"]
    assert ours[0] == default[0] == full[0]  # the same arguments: weights, data, state
    assert ours[1] < 0.5 * default[1]  # temporaries: 17 vs 53 MB when measured
    assert full[1] < ours[1]
    assert levers["+ bf16 frozen weights and compute"][0] < ours[0]  # bf16 weights
