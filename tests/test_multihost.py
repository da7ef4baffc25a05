"""Multi-process runs as a pod runs them: two processes on 127.0.0.1 that join through
`jax.distributed.initialize` (gloo CPU collectives), each with its own HOME and cache folder
(two workers with separate disks), sharing a gs:// workdir on a local GCS emulator, with
their inputs on gs:// too.

- A NeTI batch of K = 4 concepts on a mesh whose concept axis spans both processes
  (2 processes x 2 devices, concept=4): each process loads only its own concepts' images.
  SIGTERM reaches one process; both save the same step and exit 143; the rerun resumes and
  ends where one process with 4 devices ends; process 0 alone writes each concept.
- Processes whose workdirs are their own local folders stop at start with one line.
- ELITE stage 1 over two processes, its dataset source folder on gs://: each process builds
  the tfds dataset into its own cache and feeds its half of every batch.

The cost is compiling each tiny step cold in every process (no process shares a cache).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images
from tests.cli_helpers import error_line

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
CONCEPTS = ("arrow", "bolt", "crescent", "polka_heart")
STEPS, STOP_AT = 6, 3
NETI_BATCH = {"model": "builtin:tiny-random", "concept.super_category": "object",
              "train.steps": STEPS, "train.batch_size": 1, "train.grad_accum": 1,
              "train.checkpoint_every": 2, "train.log_every": 1, "validation.every": 0}
# Validation at the last step of the two-process run: process 0 draws each concept from the
# params gathered from both processes.
VALIDATION = {"validation.every": STEPS, "validation.steps": 2, "validation.seeds": "(0,)",
              "validation.prompts": "('a photo of a {}',)"}
# Process 1 gets SIGTERM while step STOP_AT - 1 is logged (a TPU VM's maintenance notice
# reaches one worker); both processes learn it through the loop's collective check at the
# next step and stop after it. Each process says which concept folders it decodes.
SIGTERM_ON_PROCESS_1 = f"""
import os, signal
import jax
from spacetime_jax.data import images
load_images = images.load_concept_images
def load_and_say(folder, resolution):
    print(f"process {{jax.process_index()}} reads {{folder}}", flush=True)
    return load_images(folder, resolution)
images.load_concept_images = load_and_say
from spacetime_jax.training import progress
update = progress.Progress.update
def update_then_stop(self, step, **metrics):
    record = update(self, step, **metrics)
    if step == {STOP_AT - 1} and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return record
progress.Progress.update = update_then_stop
from absl import app
from spacetime_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One CLI process; stdout and stderr go to files named after `log_stem`."""

    def __init__(self, config: str, args: dict, env: dict, log_stem: Path,
                 prelude: str | None = None):
        """args: config overrides, and "workdir"."""
        entry = ["-c", prelude] if prelude else ["-m", "spacetime_jax.main"]
        self.out, self.err = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
        overrides = {key: value for key, value in args.items() if key != "workdir"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, *entry, f"--config={config}", f"--workdir={args['workdir']}",
                 *(f"--config.{key}={value}" for key, value in overrides.items())],
                cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    def wait(self, deadline: float) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           self.out.read_text(), self.err.read_text())


def worker_env(root: Path, name: str, devices: int, gcs) -> dict:
    """A pod worker's environment: its own HOME and caches, the emulator, `devices` CPUs."""
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, **gcs.env, HOME=str(home), SPACETIME_JAX_CACHE=str(home / "cache"),
                JAX_COMPILATION_CACHE_DIR=str(home / "cache" / "xla"), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start_two(config: str, args: list[dict], envs: list[dict], logs: list[Path],
              prelude: str | None = None) -> list[Process]:
    address = f"127.0.0.1:{free_port()}"
    return [Process(config, {**args[i], "distributed.coordinator_address": address,
                             "distributed.num_processes": 2, "distributed.process_id": i},
                    envs[i], logs[i], prelude) for i in (0, 1)]


def wait_all(processes: list[Process], deadline: float) -> list[subprocess.CompletedProcess]:
    results = []
    try:
        for process in processes:
            results.append(process.wait(deadline))
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.process.kill()
    return results


def assert_ok(result: subprocess.CompletedProcess, status: int = 0) -> None:
    assert result.returncode == status, result.stderr[-3000:]


@pytest.fixture(scope="module")
def concepts_on_gcs(gcs, tmp_path_factory) -> str:
    """The four held-out concepts' photos (2 each), uploaded: gs://.../concepts/<name>/."""
    local = tmp_path_factory.mktemp("concepts")
    for name in CONCEPTS:
        write_concept_images(HELD_OUT_CONCEPTS[name], local / name, 2)
    for path in sorted(local.rglob("*.png")):
        gcs.path(f"multihost/concepts/{path.relative_to(local)}").write_bytes(path.read_bytes())
    return gcs.uri("multihost/concepts")


def test_neti_batch_over_two_processes_stops_together_resumes_and_equals_one_process(
        gcs, concepts_on_gcs, tmp_path):
    workdir, single = gcs.uri("multihost/neti"), gcs.uri("multihost/neti_single")
    args = {**NETI_BATCH, "data.concepts": concepts_on_gcs, "mesh.concept": 4}
    envs = [worker_env(tmp_path, f"worker{i}", 2, gcs) for i in (0, 1)]
    logs = lambda stem: [tmp_path / f"{stem}{i}" for i in (0, 1)]
    deadline = time.monotonic() + TIMEOUT_S

    reference = Process("configs/neti_batch.py:tiny", {**args, "workdir": single},
                        worker_env(tmp_path, "single", 4, gcs), tmp_path / "single")
    stopped = wait_all(start_two("configs/neti_batch.py:tiny", [{**args, "workdir": workdir}] * 2,
                                 envs, logs("stopped"), prelude=SIGTERM_ON_PROCESS_1), deadline)
    for result in stopped:
        assert_ok(result, 128 + signal.SIGTERM)
    assert "stopped by SIGTERM after step 3" in stopped[0].stdout
    # Each process decoded (and cached) the photos of its own two concepts only.
    read = [set(re.findall(rf"process {i} reads {concepts_on_gcs}/(\w+)", result.stdout))
            for i, result in enumerate(stopped)]
    assert len(read[0]) == len(read[1]) == 2 and read[0] | read[1] == set(CONCEPTS), read
    assert [p.name for p in gcs.path("multihost/neti/checkpoints").iterdir()
            if p.name.isdigit()] == ["2", "3"]
    assert not gcs.path("multihost/neti/concepts").exists()

    resumed = wait_all(start_two("configs/neti_batch.py:tiny",
                                 [{**args, **VALIDATION, "workdir": workdir}] * 2, envs,
                                 logs("resumed")), deadline)
    for result in resumed:
        assert_ok(result)
    assert_ok(reference.wait(deadline))
    assert f"resumed from step {STOP_AT}" in resumed[0].stdout
    assert "on mesh {'concept': 4, 'data': 1, 'model': 1}" in resumed[0].stdout

    # Process 0 spoke and wrote for the run: each concept once, one metrics line per step.
    for name in CONCEPTS:
        assert f"concept <{name}> -> {workdir}/concepts/{name}" in resumed[0].stdout
    assert "concept <" not in resumed[1].stdout and "step 4/6" not in resumed[1].stdout
    metrics = [json.loads(line) for line in
               gcs.path("multihost/neti/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    grids = sorted(p.name for p in gcs.path(f"multihost/neti/validation/step_{STEPS:06d}")
                   .iterdir())
    assert grids == [f"{name}.png" for name in CONCEPTS]

    # The same concepts as one process with 4 devices learns. Not bitwise: the processes'
    # gloo reductions may add in another order than one process does.
    single_metrics = [json.loads(line) for line in
                      gcs.path("multihost/neti_single/metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["loss"] for m in metrics],
                               [m["loss"] for m in single_metrics], rtol=1e-5)
    for name in CONCEPTS:
        read = lambda run: load_safetensors(gcs.path(f"multihost/{run}/concepts/{name}/"
                                                     "mapper.safetensors").read_bytes())
        got, want = read("neti"), read("neti_single")
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}: {key}")


def test_processes_that_do_not_share_the_workdir_stop_with_one_line(gcs, tmp_path):
    envs = [worker_env(tmp_path, f"worker{i}", 1, gcs) for i in (0, 1)]
    args = [{**NETI_BATCH, "workdir": tmp_path / f"own{i}", "data.concepts": tmp_path}
            for i in (0, 1)]
    start = time.monotonic()
    results = wait_all(start_two("configs/neti_batch.py:tiny", args, envs,
                                 [tmp_path / f"own{i}_log" for i in (0, 1)]),
                       start + TIMEOUT_S)
    assert time.monotonic() - start < 60
    for index, result in enumerate(results):
        assert result.returncode == 2, result.stderr[-3000:]
        line = error_line(result)
        assert f"workdir {tmp_path}/own{index} is not shared by the 2 processes" in line
        assert "use gs://BUCKET/... or a shared filesystem" in line


def test_elite_stage_one_over_two_processes_with_its_data_on_gcs(gcs, tmp_path):
    from spacetime_jax.elite.toyworld_data import write_toyworld_objects
    local = tmp_path / "objects"  # the toy world's objects in OpenImages' layout
    write_toyworld_objects(local, 16, 4, seed=1, size=128)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        gcs.path(f"multihost/objects/{path.relative_to(local)}").write_bytes(path.read_bytes())
    workdir = gcs.uri("multihost/elite")
    args = {"data.root": gcs.uri("multihost/objects"), "workdir": workdir, "train.steps": 2,
            "train.batch_size": 2, "train.checkpoint_every": 2, "train.log_every": 1,
            "validation.every": 0, "data.split": "train", "data.validation_split": "test",
            "evaluation.num_examples": 2}
    envs = [worker_env(tmp_path, f"worker{i}", 1, gcs) for i in (0, 1)]
    results = wait_all(start_two("configs/elite_global.py:tiny", [args] * 2, envs,
                                 [tmp_path / f"elite{i}" for i in (0, 1)]),
                       time.monotonic() + TIMEOUT_S)
    for result in results:
        assert_ok(result)
    assert "on mesh {'concept': 1, 'data': 2, 'model': 1}" in results[0].stdout
    assert "encoder (global stage) ->" in results[0].stdout
    assert "encoder (global stage) ->" not in results[1].stdout
    assert gcs.path("multihost/elite/encoder/encoder.json").exists()
    for index in (0, 1):  # each worker built the dataset on its own disk
        assert any((tmp_path / f"worker{index}" / "cache" / "tfds").iterdir())
