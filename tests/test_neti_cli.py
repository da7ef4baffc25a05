"""The NeTI job from the command line: bad input refused before any compile, sampling a trained
concept, a non-finite loss, and a bitwise resume after SIGKILL.

Every run is a subprocess of `python -m spacetime_jax.main` on the built-in random toy model
(6 steps, a checkpoint every 2). Compiling the tiny step is the cost (1-2 min cold, ~30 s from
the persistent compilation cache that every run here shares), so the long runs start as
background processes from module fixtures and overlap on the machine's cores: the reference
run compiles while the fast bad-input tests run; once it is done, the interrupted runs, the
NaN run and the sampling run go in parallel with the fast sampling tests. Tests only await
them. The reference and the interrupted runs are the critical path; every other run is
niced, so that it takes the cores they leave. Faults are injected by running the real main
under a `python -c` prelude that patches one function (a kill after a save starts, a kill
mid-way, NaN losses): no production hook.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image
from etils import epath
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import load_file

from tests.cli_helpers import complete_steps, error_line
from tests.gcs_emulator import forget_listings

from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images
from spacetime_jax.visualize import LABEL_HEIGHT, MIN_TILE

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
STEPS = 6
CHECKPOINT_EVERY = 2
# The tiny run on the random model (its tokenizer has the words of the messages below): a
# handful of steps, every step logged, no validation grids (their sampler
# would be a second compile).
TINY_RUN = {"model": "builtin:tiny-random", "concept.super_category": "object",
            "train.steps": STEPS, "train.checkpoint_every": CHECKPOINT_EVERY,
            "train.log_every": 1, "validation.every": 0, "train.grad_accum": 1}
# Braces other than the concept's slot "{}" are plain text (no str.format fields).
SAMPLE_PROMPTS = ("A photo of a {}", "App icon of {}, {shiny}")
SAMPLE_TRUNCATIONS = (0, 64)
SIDE_NICE = 10  # runs off the critical path yield the cores to those on it
COMPILED_MARK = "step compiled"  # train.py prints it once the step is compiled
MODEL_LOADED_MARK = "cross-attention layers"  # the model summary, printed once it is loaded

# `python -c PRELUDE + RUN_MAIN args...`: the CLI's own entry after the prelude's patch.
RUN_MAIN = """
from absl import app
from spacetime_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""
KILL_AFTER_SAVE_STARTS = """
import os, signal
from spacetime_jax.training import checkpoint
start_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
    started = start_save(self, step, *args, **kwargs)
    if step == {step}:  # the arrays are on the host, the async write is still in flight
        os.kill(os.getpid(), signal.SIGKILL)
    return started
checkpoint.Checkpointer.save = save
"""
KILL_AFTER_LOGGING = """
import os, signal
from spacetime_jax.training import progress
log_step = progress.Progress.update
def update(self, step, **metrics):
    record = log_step(self, step, **metrics)
    if step == {step}:  # its metrics line is written; no checkpoint covers it
        os.kill(os.getpid(), signal.SIGKILL)
    return record
progress.Progress.update = update
"""
# Checkpoint {saved} is complete (every save waits for its write), then SIGKILL once step
# {step} is logged: for a gs:// workdir, where no folder rename marks a finished save.
KILL_AFTER_CHECKPOINT = """
import os, signal
from spacetime_jax.training import checkpoint, progress
start_save = checkpoint.Checkpointer.save
def save_and_wait(self, step, *args, **kwargs):
    started = start_save(self, step, *args, **kwargs)
    self.wait()
    return started
checkpoint.Checkpointer.save = save_and_wait
log_step = progress.Progress.update
def update(self, step, **metrics):
    record = log_step(self, step, **metrics)
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return record
progress.Progress.update = update
"""
# Only the training step is compiled ahead of time (lower().compile()); its losses become NaN
# from step {step} on, its state stays what the real step computed.
NAN_LOSS_FROM = """
import jax, jax.numpy as jnp
compile_lowered = jax.stages.Lowered.compile
def compile(self, *args, **kwargs):
    compiled = compile_lowered(self, *args, **kwargs)
    def step_with_nan_loss(*step_args):
        state, losses = compiled(*step_args)
        if int(state.step) >= {step}:
            losses = jnp.full_like(losses, jnp.nan)
        return state, losses
    return step_with_nan_loss
jax.stages.Lowered.compile = compile
"""


class Job:
    """One CLI run, started now and awaited later; output goes to files (no pipe to fill)."""

    def __init__(self, args: list[str], cache: Path, log_stem: Path,
                 prelude: Optional[str] = None, nice: int = 0,
                 env: Optional[dict[str, str]] = None):
        entry = ["-c", prelude + RUN_MAIN] if prelude else ["-m", "spacetime_jax.main"]
        env = dict(os.environ, SPACETIME_JAX_CACHE=str(cache), **(env or {}))
        self._stdout_path = log_stem.with_suffix(".out")
        self._stderr_path = log_stem.with_suffix(".err")
        with self._stdout_path.open("w") as out, self._stderr_path.open("w") as err:
            self.process = subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env,
                                            stdout=out, stderr=err, text=True)
        if nice:
            os.setpriority(os.PRIO_PROCESS, self.process.pid, nice)

    def wait_for_output(self, text: str) -> None:
        """Blocks until `text` is on the run's stdout (or the run has ended)."""
        deadline = time.monotonic() + TIMEOUT_S
        while text not in self._stdout_path.read_text() and self.process.poll() is None:
            assert time.monotonic() < deadline, f"no {text!r} in {TIMEOUT_S} s"
            time.sleep(0.5)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=TIMEOUT_S)
        finally:
            self.kill()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           self._stdout_path.read_text(),
                                           self._stderr_path.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_cli(args: list[str], cache: Path, log_stem: Path, prelude: Optional[str] = None,
            nice: int = SIDE_NICE) -> subprocess.CompletedProcess:
    return Job(args, cache, log_stem, prelude, nice).wait()


def train_args(workdir: Path, images: Path, overrides: Optional[dict] = None) -> list[str]:
    config = {"data.images": images, "concept.placeholder": "<x>", **TINY_RUN,
              **(overrides or {})}
    return ["--config=configs/neti.py:tiny", f"--workdir={workdir}",
            *(f"--config.{key}={value}" for key, value in config.items())]


def sample_args(workdir: Path, concept: Path, prompts=SAMPLE_PROMPTS,
                truncations=SAMPLE_TRUNCATIONS) -> list[str]:
    return ["--config=configs/sample.py:neti", f"--workdir={workdir}",
            f"--config.concept={concept}", "--config.sample.steps=2",
            f"--config.sample.prompts={tuple(prompts)!r}",
            f"--config.sample.truncations={tuple(truncations)!r}"]


def saved_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Checkpoint `step`'s state as saved, read with orbax alone: path -> array."""
    import jax  # imported here, late: the runs start before this process pays for it
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves, _ = jax.tree_util.tree_flatten_with_path(restored["state"])
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_arrays_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    differing = [name for name in want if not np.array_equal(got[name], want[name])]
    assert not differing, f"not bitwise equal: {differing}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` -> (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_steps(workdir: Path) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


# --- Shared inputs and the runs that start in the background.

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crescent")
    write_concept_images(HELD_OUT_CONCEPTS["crescent"], folder, n=4)
    return folder


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory, images) -> dict[str, Path]:
    """The good concept folder and bad ones: missing, empty, one truncated PNG among good."""
    root = tmp_path_factory.mktemp("bad_images")
    (root / "empty").mkdir()
    shutil.copytree(images, root / "broken")
    png = next(images.glob("*.png")).read_bytes()
    (root / "broken" / "broken.png").write_bytes(png[:len(png) // 2])
    return {"good": images, "missing": root / "missing", "empty": root / "empty",
            "broken": root / "broken"}


@pytest.fixture(scope="module")
def reference_job(cache, images, logs, tmp_path_factory):
    """Run (a): 6 uninterrupted steps. Started here, awaited by `reference`. Being first, it
    writes the built-in model into the cache."""
    workdir = tmp_path_factory.mktemp("reference")
    job = Job(train_args(workdir, images), cache, logs / "reference")
    yield job, workdir
    job.kill()


@pytest.fixture(scope="module")
def model_written(reference_job) -> None:
    """The built-in model is complete in the cache (the reference run loaded it): other runs
    may read it; started earlier, they would race to write it."""
    reference_job[0].wait_for_output(MODEL_LOADED_MARK)


@pytest.fixture(scope="module")
def reference(reference_job) -> Path:
    """Run (a)'s workdir, once it has finished."""
    job, workdir = reference_job
    result = job.wait()
    assert result.returncode == 0, result.stderr
    assert complete_steps(workdir) == [2, 4, 6]
    return workdir


@dataclasses.dataclass
class GcsRun:
    workdir: epath.Path  # gs://...
    killed: subprocess.CompletedProcess
    complete_after_kill: list[int]
    finished: subprocess.CompletedProcess


def kill_then_finish_on_gcs(workdir: epath.Path, images: str, cache: Path,
                            logs: Path) -> GcsRun:
    """Run (a)'s command on a gs:// workdir with gs:// images, killed after logging step 3
    (checkpoint 2 complete), then rerun to the end."""
    args = train_args(workdir, images)
    killed = run_cli(args, cache, logs / "gcs_killed",
                     prelude=KILL_AFTER_CHECKPOINT.format(step=3), nice=0)
    after_kill = complete_steps(workdir)
    finished = run_cli(args, cache, logs / "gcs_finished", nice=0)
    return GcsRun(workdir, killed, after_kill, finished)


@pytest.fixture(scope="module")
def gcs_run(reference, gcs, images, cache, logs):
    """Run (a) on GCS, in a thread beside the other tests: its images uploaded, its workdir a
    bucket path, as on a pod."""
    for path in sorted(images.glob("*.png")):
        gcs.path(f"neti_cli/images/{path.name}").write_bytes(path.read_bytes())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(kill_then_finish_on_gcs, gcs.path("neti_cli/run"),
                          gcs.uri("neti_cli/images"), cache, logs).result(timeout=3 * TIMEOUT_S)


@pytest.fixture(scope="module")
def sample_job(gcs_run, cache, logs, tmp_path_factory):
    """Samples the concept that the GCS run wrote, from its gs:// folder."""
    out = tmp_path_factory.mktemp("samples")
    job = Job(sample_args(out, gcs_run.workdir / "concept"), cache, logs / "sample",
              nice=SIDE_NICE)
    yield job, out
    job.kill()


@pytest.fixture(scope="module")
def nan_job(reference, cache, images, logs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nan")
    job = Job(train_args(workdir, images), cache, logs / "nan",
              prelude=NAN_LOSS_FROM.format(step=4), nice=SIDE_NICE)
    yield job, workdir
    job.kill()


@dataclasses.dataclass
class InterruptedRun:
    workdir: Path
    killed_in_save: subprocess.CompletedProcess
    complete_after_save_kill: list[int]
    killed_between_checkpoints: subprocess.CompletedProcess
    complete_after_mid_kill: list[int]
    finished: subprocess.CompletedProcess


def interrupt_twice_then_finish(workdir: Path, images: Path, cache: Path,
                                logs: Path) -> InterruptedRun:
    """Run (a)'s command killed right after the step-4 save starts, resumed and killed after
    logging step 5, then rerun plainly to the end."""
    args = train_args(workdir, images)
    killed_in_save = run_cli(args, cache, logs / "killed_in_save",
                             prelude=KILL_AFTER_SAVE_STARTS.format(step=4), nice=0)
    after_save_kill = complete_steps(workdir)
    killed_between = run_cli(args, cache, logs / "killed_between",
                             prelude=KILL_AFTER_LOGGING.format(step=5), nice=0)
    after_mid_kill = complete_steps(workdir)
    finished = run_cli(args, cache, logs / "finished", nice=0)
    return InterruptedRun(workdir, killed_in_save, after_save_kill, killed_between,
                          after_mid_kill, finished)


@pytest.fixture(scope="module")
def interrupted_run(reference, cache, images, logs, tmp_path_factory):
    """Runs (b) and (c) in a thread: three runs in a row, beside the other tests."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(interrupt_twice_then_finish, tmp_path_factory.mktemp("interrupted"),
                          images, cache, logs)


# --- Bad input: one line, exit 2, before the step is compiled.

BAD_TRAINING_INPUT = [
    pytest.param("missing", {}, "image folder {missing} does not exist", id="missing-folder"),
    pytest.param("empty", {}, "no images (.jpg, .jpeg, .png, .webp, .bmp, .gif) in {empty}",
                 id="empty-folder"),
    pytest.param("broken", {}, "cannot read image {broken}/broken.png: truncated or malformed",
                 id="truncated-png"),
    pytest.param("good", {"concept.placeholder": "star"}, "placeholder 'star' is already a token",
                 id="placeholder-star"),
    pytest.param("good", {"concept.super_category": "teddy bear"},
                 "super-category 'teddy bear' is 7 tokens; it must be exactly one",
                 id="two-word-super-category"),
    pytest.param("good", {"train.no_such": 1}, "--config.train.no_such: no such key",
                 id="unknown-key"),
    pytest.param("good", {"concept.learnable_property": "texture"},
                 "concept.learnable_property='texture': use 'object' or 'style'",
                 id="learnable-property"),
    pytest.param("good", {"train.steps": 0}, "train.steps=0: it takes a whole number >= 1",
                 id="zero-steps"),
    pytest.param("good", {"train.learning_rate": -1e-3},
                 "train.learning_rate=-0.001: it takes a positive finite number",
                 id="negative-lr"),
    pytest.param("good", {"validation.every": 2, "validation.sampler": "euler_x"},
                 "validation.sampler='euler_x' is unknown; use one of", id="unknown-sampler"),
    pytest.param("good", {"mesh.data": 3}, "needs 3 devices; 1 are present",
                 id="mesh-bigger-than-devices"),
    pytest.param("good", {"attention": "flash"},
                 "attention='flash' is unknown; use one of auto, xla, cudnn, splash",
                 id="unknown-attention-kernel"),
    pytest.param("good", {"train.concepts_per_pass": -2},
                 "train.concepts_per_pass=-2: it takes a whole number >= 1, 0 (auto",
                 id="concepts-per-pass"),
]


# model_written starts the reference run first: its cold compile overlaps these fast tests.
@pytest.mark.usefixtures("model_written")
@pytest.mark.parametrize("folder, overrides, message", BAD_TRAINING_INPUT)
def test_bad_training_input_ends_with_one_line_before_compiling(cache, logs, image_folders,
                                                                tmp_path, folder, overrides,
                                                                message, request):
    result = run_cli(train_args(tmp_path / "run", image_folders[folder], overrides), cache,
                     logs / request.node.callspec.id)
    assert result.returncode == 2
    assert message.format(**image_folders) in error_line(result)
    assert COMPILED_MARK not in result.stdout
    if folder != "good":  # a folder typo is refused before the model loads
        assert MODEL_LOADED_MARK not in result.stdout


# The background runs start as soon as the reference is done, beside this test.
@pytest.mark.usefixtures("interrupted_run", "nan_job", "sample_job")
def test_workdir_of_a_different_config_is_refused_and_left_untouched(reference, cache, images,
                                                                     logs):
    before = snapshot(reference)
    result = run_cli(train_args(reference, images, {"train.learning_rate": 0.01}), cache,
                     logs / "other_config")
    assert result.returncode == 2
    assert ("holds a run with a different config (differs in: train.learning_rate)"
            in error_line(result))
    assert MODEL_LOADED_MARK not in result.stdout
    assert snapshot(reference) == before
    assert complete_steps(reference) == [2, 4, 6]


def test_resuming_on_another_device_count_is_refused_naming_both_topologies(reference,
                                                                          cache, images,
                                                                          logs):
    # mesh.data=-1 takes every device: on 2 devices each concept's batch and the learning
    # rate would double.
    before = snapshot(reference)
    job = Job(train_args(reference, images, {"train.steps": STEPS + 2}), cache,
              logs / "two_devices", nice=SIDE_NICE,
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    result = job.wait()
    assert result.returncode == 2
    line = error_line(result)
    assert (f"workdir {reference} was trained on 1 process(es) x 1 devices, mesh concept=1 "
            "data=1 model=1, global batch 2, lr 0.002; this run has 1 process(es) x 2 "
            "devices, mesh concept=1 data=2 model=1, global batch 4, lr 0.004: resuming "
            "would change the global batch and the learning rate") in line
    assert COMPILED_MARK not in result.stdout
    assert snapshot(reference) == before


# --- Sampling a trained concept.

@pytest.mark.parametrize("prompts, truncations, message", [
    pytest.param(("A photo of a cat",), (0,),
                 "prompt 'A photo of a cat' must hold the concept's slot '{}' exactly once",
                 id="no-slot"),
    pytest.param(("{} next to {}",), (0,),
                 "prompt '{} next to {}' must hold the concept's slot '{}' exactly once",
                 id="two-slots"),
    pytest.param(("A photo of a {} " + "red " * 80,), (0,),
                 "longer than 77 (75 + bos/eos), and would be truncated", id="too-long"),
    pytest.param(SAMPLE_PROMPTS, (0, 200), "truncation index 200 is outside 0..128",
                 id="truncation-200"),
])
def test_bad_sampling_input_ends_with_one_line(reference, cache, logs, tmp_path, prompts,
                                               truncations, message, request):
    result = run_cli(sample_args(tmp_path, reference / "concept", prompts, truncations), cache,
                     logs / f"sample_{request.node.callspec.id}")
    assert result.returncode == 2
    assert message in error_line(result)
    assert not list(tmp_path.glob("*.png"))


def test_sampling_a_missing_concept_folder_names_it(cache, logs, tmp_path):
    missing = tmp_path / "no_such_concept"
    result = run_cli(sample_args(tmp_path / "out", missing), cache, logs / "sample_missing")
    assert result.returncode == 2
    assert f"{missing} is not a NeTI concept: concept.json is missing" in error_line(result)


def test_sampling_writes_a_prompt_by_truncation_grid_and_each_image(sample_job):
    job, out = sample_job
    result = job.wait()
    assert result.returncode == 0, result.stderr
    columns = ["none", *map(str, SAMPLE_TRUNCATIONS)]
    singles = {f"p{row:02d}_seed42_trunc{column}.png": (row, col)
               for row in range(len(SAMPLE_PROMPTS)) for col, column in enumerate(columns)}
    assert sorted(p.name for p in out.glob("*.png")) == sorted([*singles, "grid_seed42.png"])

    grid = np.asarray(Image.open(out / "grid_seed42.png").convert("RGB"))
    # The title and column-label strips, then each row: its prompt's label strip, then images.
    header = 2 * LABEL_HEIGHT
    row_height = MIN_TILE + LABEL_HEIGHT
    assert grid.shape == (header + len(SAMPLE_PROMPTS) * row_height,
                          len(columns) * MIN_TILE, 3)
    for name, (row, col) in singles.items():
        image = np.asarray(Image.open(out / name))
        assert image.shape == (64, 64, 3)
        top = header + row * row_height + LABEL_HEIGHT
        tile = grid[top:top + MIN_TILE, col * MIN_TILE:(col + 1) * MIN_TILE]
        # Tiles are the 64 px images enlarged 2x (nearest): row = prompt, column = truncation.
        assert np.array_equal(tile, image.repeat(2, axis=0).repeat(2, axis=1)), name

    # The truncation acts: T=0 keeps none of the mapper's hidden units.
    for row in range(len(SAMPLE_PROMPTS)):
        full = np.asarray(Image.open(out / f"p{row:02d}_seed42_truncnone.png"), np.float64)
        none_kept = np.asarray(Image.open(out / f"p{row:02d}_seed42_trunc0.png"), np.float64)
        assert np.abs(full - none_kept).mean() > 5.0  # ~25 of 255 on the toy model


# --- A non-finite loss.

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(nan_job, reference):
    job, workdir = nan_job
    result = job.wait()
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    # Step 4 is a checkpoint step: its state must not be saved.
    assert "loss is [nan] at step 4" in line
    assert "the last good checkpoint (step 2) is kept" in line
    assert "step 3/6" in result.stdout and "step 4/6" not in result.stdout
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert not (workdir / "concept").exists()
    # The kept checkpoint reads back, and it is the step-2 state of an uninterrupted run.
    assert_arrays_equal(saved_state(workdir, 2), saved_state(reference, 2))


# --- Resume after SIGKILL.

def test_run_on_gcs_killed_after_a_checkpoint_resumes_to_the_local_result_bitwise(gcs_run,
                                                                                   reference):
    forget_listings()  # this process listed the checkpoints after the kill
    assert gcs_run.killed.returncode == -signal.SIGKILL, gcs_run.killed.stderr
    assert gcs_run.complete_after_kill == [2]
    finished = gcs_run.finished
    assert finished.returncode == 0, finished.stderr
    assert f"resumed from step 2 in {gcs_run.workdir}" in finished.stdout
    assert complete_steps(gcs_run.workdir) == [2, 4, 6]
    assert_arrays_equal(saved_state(gcs_run.workdir, STEPS), saved_state(reference, STEPS))
    read = lambda workdir: load_safetensors((workdir / "concept" / "mapper.safetensors")
                                            .read_bytes())
    assert_arrays_equal(read(gcs_run.workdir), read(reference))
    assert logged_steps(gcs_run.workdir) == list(range(1, STEPS + 1))



def test_run_killed_twice_resumes_to_the_uninterrupted_result_bitwise(interrupted_run,
                                                                       reference):
    run = interrupted_run.result(timeout=3 * TIMEOUT_S)

    killed = run.killed_in_save
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "step 4/6" in killed.stdout
    # Step 2 is complete; step 4's write was in flight (finished only if it beat the kill).
    assert run.complete_after_save_kill in ([2], [2, 4])
    first_resume = run.complete_after_save_kill[-1]

    killed = run.killed_between_checkpoints
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert f"resumed from step {first_resume} in" in killed.stdout
    assert "step 5/6" in killed.stdout
    assert run.complete_after_mid_kill in ([2], [2, 4])
    second_resume = run.complete_after_mid_kill[-1]

    finished = run.finished
    assert finished.returncode == 0, finished.stderr
    assert re.findall(r"resumed from step (\d+)", finished.stdout) == [str(second_resume)]
    # Unfinished saves were cleaned up; the kept checkpoints are those of run (a).
    assert sorted(p.name for p in (run.workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert_arrays_equal(load_file(str(run.workdir / "concept" / "mapper.safetensors")),
                        load_file(str(reference / "concept" / "mapper.safetensors")))
    assert_arrays_equal(saved_state(run.workdir, STEPS), saved_state(reference, STEPS))
    assert logged_steps(run.workdir) == list(range(1, STEPS + 1))
