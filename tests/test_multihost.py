"""Multi-host NeTI: two processes on 127.0.0.1 train the same tiny job as one process.

Run (a) is one process with two forced CPU devices; run (b) is two processes of one CPU device
each that join through `jax.distributed.initialize` (config.distributed: a local coordinator,
gloo collectives). Both have the same global mesh (2 devices on `data`) and the same global
batch (each step draws its batch inside the jitted step from the step's key, so every process
computes the same global draw), so they must learn the same concept. Process 0 alone writes
the metrics, TensorBoard file and concept; orbax writes the checkpoint once for both.

The cost is compiling the tiny step, cold, in each of the three processes (80-115 s each on 2
busy CPU cores; about 2.5 min for the test); (b) starts once (a) has written the built-in
model into the shared cache, so the compiles overlap. Every process is bounded by one deadline
and killed in a finally block.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images
from tests.cli_helpers import complete_steps

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400
STEPS = 3
MODEL_LOADED_MARK = "cross-attention layers"  # the model summary, printed once it is loaded
RUN = {"model": "builtin:tiny-random", "concept.super_category": "object",
       "concept.placeholder": "<x>", "train.steps": STEPS, "train.batch_size": 1,
       "train.grad_accum": 1, "train.checkpoint_every": STEPS, "train.log_every": 1,
       "validation.every": 0, "mesh.data": -1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(entry: list[str], args: dict, workdir: Path, env: dict, log_stem: Path
          ) -> tuple[subprocess.Popen, Path]:
    """Starts one CLI process; its stdout goes to log_stem.out (returned), stderr to .err."""
    out_path = log_stem.with_suffix(".out")
    with out_path.open("w") as out, log_stem.with_suffix(".err").open("w") as err:
        process = subprocess.Popen(
            [sys.executable, *entry, "--config=configs/neti.py:tiny", f"--workdir={workdir}",
             *(f"--config.{key}={value}" for key, value in args.items())],
            cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    return process, out_path


def wait_all(processes: list[subprocess.Popen], deadline: float) -> None:
    for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 1))


def assert_succeeded(process: subprocess.Popen, log_stem: Path) -> None:
    assert process.returncode == 0, log_stem.with_suffix(".err").read_text()[-3000:]


def step_lines(stdout: Path) -> list[str]:
    """The progress lines ("step 2/3 loss ...") a run printed."""
    return re.findall(r"^step \d+/\d+ .*$", stdout.read_text(), re.MULTILINE)


def test_two_processes_learn_what_one_process_learns(tmp_path):
    images = tmp_path / "crescent"
    images.mkdir()
    write_concept_images(HELD_OUT_CONCEPTS["crescent"], images, 2)
    cache = tmp_path / "cache"
    base_env = dict(os.environ, SPACETIME_JAX_CACHE=str(cache),
                    JAX_COMPILATION_CACHE_DIR=str(cache / "xla"), JAX_PLATFORMS="cpu")
    args = {**RUN, "data.images": images}
    single, multi = tmp_path / "single", tmp_path / "multi"
    logs = {name: tmp_path / name for name in ("single_log", "process0_log", "process1_log")}

    deadline = time.monotonic() + TIMEOUT_S
    processes = []
    try:
        one, one_out = start(
            ["-m", "spacetime_jax.main"], args, single,
            dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
            logs["single_log"])
        processes.append(one)
        # The built-in model is written to the cache by (a): (b) reads it once it is there.
        while MODEL_LOADED_MARK not in one_out.read_text() and one.poll() is None:
            assert time.monotonic() < deadline, "run (a) loaded no model in time"
            time.sleep(0.5)
        address = f"127.0.0.1:{free_port()}"
        multi_env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        outs = []
        for process_id in (0, 1):
            process, out = start(
                ["-m", "spacetime_jax.main"],
                {**args, "distributed.coordinator_address": address,
                 "distributed.num_processes": 2, "distributed.process_id": process_id},
                multi, multi_env, logs[f"process{process_id}_log"])
            processes.append(process)
            outs.append(out)
        wait_all(processes, deadline)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, name in zip(processes, logs):
        assert_succeeded(process, logs[name])

    # Both runs saw a 2-device data mesh and learned the same mapper.
    for out in (one_out, outs[0]):
        assert "on mesh {'concept': 1, 'data': 2, 'model': 1}" in out.read_text()
    want = load_file(single / "concept" / "mapper.safetensors")
    got = load_file(multi / "concept" / "mapper.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    losses = lambda workdir: [json.loads(line)["loss"]
                              for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)

    # Process 0 spoke for the run: one metrics line per step, one TensorBoard file, the
    # concept; process 1 printed no progress and no artifact line.
    assert len(losses(multi)) == STEPS
    assert len(list((multi / "tensorboard").iterdir())) == 1
    assert len(step_lines(outs[0])) == STEPS
    assert step_lines(outs[1]) == []
    assert "concept <x> ->" not in outs[1].read_text()
    assert "concept <x> ->" in outs[0].read_text()
    # The checkpoint is written once and complete (orbax renames it from its temporary name
    # only when every process has written its part).
    assert complete_steps(multi) == [STEPS]
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == [str(STEPS)]
    assert (multi / "checkpoints" / str(STEPS) / "commit_success.txt").is_file()
