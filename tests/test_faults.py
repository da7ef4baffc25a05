"""Faults a preemptible machine meets, on the NeTI job from the command line (the tiny run of
tests/test_neti_cli.py: 6 steps, a checkpoint every 2, on the built-in random model):

- the disk fills up (simulated: from step 3 on, no file may grow past 512 KiB, as the kernel
  enforces with RLIMIT_FSIZE; the writes fail with EFBIG) while checkpoint 4 is written in
  the background: the run ends with one line and exit status 2, checkpoint 2 is intact, and
  the rerun on a free disk resumes from it to the uninterrupted run's result, bitwise;
- SIGKILL at 10 moments drawn from a seed the test prints (a step and a phase: right after a
  checkpoint's save started, so its async write is in flight, or after a step is logged):
  every rerun resumes from the newest complete checkpoint, and the final concept equals the
  uninterrupted run's, bitwise.

Faults come from a `python -c` prelude that patches one function before running the real
main: no production hook.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.cli_helpers import complete_steps, error_line
from tests.test_neti_cli import STEPS, Job, assert_arrays_equal, saved_state, train_args

from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images

# Kills while a save is in flight at the checkpoints before the last (a run killed while its
# last checkpoint is written may find it complete: then no step would be left to kill).
SAVING_STEPS = (2, 4)
KILLS = 10
# From step {step} on the disk is full: checkpoint {saved} is complete first (its folder is
# renamed into place only once whole), then files stop at 512 KiB and a write past it fails
# with EFBIG instead of killing the process (SIGXFSZ ignored).
DISK_FULL_FROM = """
import resource, signal, time
from pathlib import Path
from spacetime_jax.training import progress
log_step = progress.Progress.update
def update(self, step, **metrics):
    record = log_step(self, step, **metrics)
    if step == {step}:
        deadline = time.monotonic() + 120
        while not (Path({workdir!r}) / "checkpoints" / "{saved}").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))
    return record
progress.Progress.update = update
"""
# SIGKILL at step {step}: "saving" right after that step's checkpoint save started (arrays on
# the host, the async write in flight), "logged" right after its progress line.
KILL_AT = """
import os, signal
from spacetime_jax.training import checkpoint, progress
if "{phase}" == "saving":
    start_save = checkpoint.Checkpointer.save
    def save(self, step, *args, **kwargs):
        started = start_save(self, step, *args, **kwargs)
        if step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return started
    checkpoint.Checkpointer.save = save
else:
    log_step = progress.Progress.update
    def update(self, step, **metrics):
        record = log_step(self, step, **metrics)
        if step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return record
    progress.Progress.update = update
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crescent")
    write_concept_images(HELD_OUT_CONCEPTS["crescent"], folder, n=4)
    return folder


@pytest.fixture(scope="module")
def reference(cache, images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result = Job(train_args(workdir, images), cache, workdir.parent / "reference_log").wait()
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def concept(workdir) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "concept" / "mapper.safetensors"))


def test_a_full_disk_ends_the_run_with_one_line_and_the_rerun_resumes(reference, cache, images,
                                                                      tmp_path):
    workdir = tmp_path / "run"
    args = train_args(workdir, images)
    full = Job(args, cache, tmp_path / "full",
               prelude=DISK_FULL_FROM.format(step=3, saved=2, workdir=str(workdir))).wait()
    assert full.returncode == 2, full.stderr[-3000:]
    line = error_line(full)
    assert f"writing a checkpoint to {workdir}/checkpoints failed" in line
    assert "the newest complete checkpoint, step 2, is kept" in line
    assert "run the same command to resume" in line
    assert complete_steps(workdir) == [2]
    assert not (workdir / "concept").exists()

    rerun = Job(args, cache, tmp_path / "rerun").wait()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 2 in" in rerun.stdout
    assert_arrays_equal(saved_state(workdir, STEPS), saved_state(reference, STEPS))
    assert_arrays_equal(concept(workdir), concept(reference))


def kill_plan(seed: int) -> list[tuple[int, str]]:
    """KILLS (step, phase) pairs, before any resume point is known."""
    rng = random.Random(seed)
    return [(rng.randint(1, STEPS), rng.choice(["saving", "logged"])) for _ in range(KILLS)]


def reachable(step: int, phase: str, resume_from: int) -> tuple[int, str]:
    """The planned moment moved to one the run reaches: after its resume point, a save at a
    checkpoint step."""
    step = max(step, resume_from + 1)
    if phase == "saving":
        later = [s for s in SAVING_STEPS if s >= step]
        return (later[0], phase) if later else (step, "logged")
    return step, phase


def test_sigkill_at_ten_random_moments_resumes_to_the_uninterrupted_result(reference, cache,
                                                                          images, tmp_path):
    seed = int(os.environ.get("SPACETIME_TEST_KILL_SEED", time.time_ns() % 10_000))
    print(f"kill plan seed {seed} (rerun with SPACETIME_TEST_KILL_SEED={seed})")
    workdir = tmp_path / "run"
    args = train_args(workdir, images)
    for attempt, planned in enumerate(kill_plan(seed)):
        resume_from = (complete_steps(workdir) or [0])[-1] if (workdir / "checkpoints").exists() \
            else 0
        step, phase = reachable(*planned, resume_from)
        result = Job(args, cache, tmp_path / f"kill{attempt}",
                     prelude=KILL_AT.format(step=step, phase=phase)).wait()
        context = f"seed {seed}, kill {attempt} at step {step} ({phase}): {result.stderr[-2000:]}"
        assert result.returncode == -signal.SIGKILL, context
        resumed = re.findall(r"resumed from step (\d+)", result.stdout)
        assert resumed == ([str(resume_from)] if resume_from else []), context
    final = Job(args, cache, tmp_path / "final").wait()
    assert final.returncode == 0, final.stderr[-3000:]
    assert complete_steps(workdir)[-1] == STEPS
    assert_arrays_equal(concept(workdir), concept(reference))
    assert_arrays_equal(saved_state(workdir, STEPS), saved_state(reference, STEPS))
