"""Batch personalization: K concepts learned in one NeTI run.

The suite's own process keeps the single CPU device that other modules gave jax, so everything
on a mesh runs in child processes with 8 CPU devices, started together when the module starts
(compiling the tiny step is the cost, ~1 min cold on 2 cores):

- `python -m tests.test_neti_batch OUT`: Sessions built and stepped in process, as the job
  steps them. K = 8, 4 and 3 concepts on the mesh concept=8 (4 and 3 padded to 8) and each
  concept alone on one device; a padded batch saved, restored and stepped on; the layout of
  every leaf for K = 8, K = 3 (concept=8) and K = 1 (data=8); 7 concepts on concept=4 in two
  passes of one concept per device (train.concepts_per_pass=1). It pickles what it saw and the
  tests here assert on it. The padded runs share the K = 8 run's compiled step (same shapes:
  their text encoder knows all 8 placeholders), the single runs one step between them.
- The CLI on the same 8 concepts, once the child has compiled their step into the shared
  compilation cache (the CLI's step is the same program): a run stopped by SIGTERM, its rerun
  killed by SIGKILL after a checkpoint, a last rerun to the end with validation grids; its
  result must be the child's uninterrupted K = 8 run, bit for bit. Bad concept sets are
  refused before anything compiles.

Equality across meshes is to float tolerance, not bitwise: a concept's numbers are the same
math alone or among others, but XLA's CPU kernels for a batched (vmapped, K-stacked) matmul or
convolution and for an unbatched one block and order their sums differently, so losses and
gradients differ in the last bits (losses here by ~2e-7 relative: checked at rtol 1e-5). Adam
then divides each gradient element by its own running RMS, which turns that noise into a larger
relative change where an element's gradients nearly cancel: after 3 steps a param leaf differs
by up to ~4e-5 of the distance training moved it (norms), so params are checked at 2e-4 of
that distance, far below what any real difference (another seed, another learning rate, a
batch-mate's gradient) makes: that moves a leaf by its whole update. Runs of one compiled
program (resumed against uninterrupted) are compared bitwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.neti_batch import get_config as get_batch_config
from tests.cli_helpers import KILL_AFTER_LOGGING, complete_steps, error_line, saved_state

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
NUM_CONCEPTS = 8
IMAGES_PER_CONCEPT = 2
COMPARE_AT = 3  # steps before comparing batch runs with single runs
RESUME_AT = 2  # the padded run's in-process checkpoint
NAN_CONCEPT = 5  # the concept whose step is made non-finite
LOSS_RTOL = 1e-5
PARAM_TOLERANCE = 2e-4  # of the norm of what training changed in a leaf (see above)
# Both in process and on the command line: the random tiny model, one example per replica,
# no accumulation, no validation grids (their sampler is a second compile).
TINY = {"model": "builtin:tiny-random", "concept.super_category": "object",
        "train.batch_size": 1, "train.grad_accum": 1, "validation.every": 0}
CLI_STEPS = 6
CLI_RUN = {**TINY, "train.steps": CLI_STEPS, "train.checkpoint_every": 2, "train.log_every": 1}
# The last rerun also writes the end-of-run grids (validation may change on resume).
GRIDS = {"validation.every": CLI_STEPS, "validation.steps": 2,
         "validation.prompts": "('a photo of a {}',)", "validation.seeds": "(0,)"}
BATCH_COMPILED_MARK = "batch step compiled"  # the child prints it once that step is cached
COMPILED_MARK = "step compiled"  # train.py prints it once the step is compiled
MODEL_LOADED_MARK = "cross-attention layers"  # the model summary, printed once it is loaded
SIDE_NICE = 10


def batch_config(**overrides):
    config = get_batch_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


def write_concepts(root: Path, names: list[str]) -> None:
    """One folder of photos per name, from the toy world's held-out concepts (seeded by
    position, so repeated shapes still differ)."""
    from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images
    kinds = sorted(HELD_OUT_CONCEPTS)
    for index, name in enumerate(names):
        write_concept_images(HELD_OUT_CONCEPTS[kinds[index % len(kinds)]], root / name,
                             n=IMAGES_PER_CONCEPT, seed=index)


CONCEPT_NAMES = [f"c{i}" for i in range(NUM_CONCEPTS)]


# --- The 8-device child: in-process Sessions.

def _spec_tuple(spec) -> tuple:
    """A PartitionSpec as a plain tuple, trailing Nones dropped (P("data", None) == P("data"))."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _layout(tree) -> dict:
    """path -> (global shape, spec, shard shapes, how many distinct shards) of each leaf."""
    import jax
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): (
        tuple(leaf.shape), _spec_tuple(leaf.sharding.spec),
        sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
        len({str(s.index) for s in leaf.addressable_shards})) for path, leaf in leaves}


def _session_layout(session) -> dict:
    import jax

    from spacetime_jax.neti.step import draw_batches, step_rngs
    from spacetime_jax.parallel import sharding
    session.put()
    state = sharding.shard_put(session.initial_state, session.state_shardings)
    draw = jax.jit(lambda data, rngs: draw_batches(data, rngs, session.statics))
    batch = draw(session.data, step_rngs(session.data.seeds, 0))
    return {"mesh": dict(session.statics.batch_sharding.mesh.shape),
            "state": _layout(state), "data": _layout(session.data),
            "frozen": _layout(session.frozen), "batch": _layout(batch._asdict())}


def _host(tree) -> dict[str, np.ndarray]:
    """path -> host array of every leaf (".step", ".params['input_layer']['kernel']", ...)."""
    import jax
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
            for path, leaf in leaves}


def _start(session):
    from spacetime_jax.parallel import sharding
    session.put()
    return sharding.shard_put(session.initial_state, session.state_shardings)


def _train(session, compiled, steps: int, checkpoint_dir: Optional[Path] = None) -> dict:
    """`steps` steps of `session` through `compiled` (a step compiled for its shapes): params
    after COMPARE_AT and `steps` steps, losses, and what the padding rows did. With
    `checkpoint_dir`, the state after RESUME_AT steps is also saved, restored as the job does
    and stepped to the end again."""
    from spacetime_jax.training.checkpoint import Checkpointer
    state = _start(session)
    initial = _host(state)
    K, losses, params_at = len(session.specs), [], {}
    real_params = lambda params: {p: leaf[:K] for p, leaf in _host(params).items()}
    for step in range(1, steps + 1):
        state, loss = compiled(state, session.data, session.frozen, session.schedule)
        losses.append(np.asarray(loss))
        if step in (COMPARE_AT, steps):
            params_at[step] = real_params(state.params)
        if checkpoint_dir and step == RESUME_AT:
            with Checkpointer(checkpoint_dir, async_save=False) as checkpointer:
                checkpointer.save(step, session.checkpoint_state(state), {}, {})
    final = _host(state)
    saved = _host(session.checkpoint_state(state))
    result = {
        "initial_params": real_params(session.initial_state.params), "params_at": params_at,
        "losses": np.stack(losses), "lr": session.learning_rate,
        "real": np.asarray(session.data.real), "names": [s.name for s in session.specs],
        # How far anything of a padding row moved (params, optimizer state, its counter).
        "padding_moved": max(float(np.abs(final[p][K:] - initial[p][K:]).max(initial=0.0))
                             for p in final if final[p].ndim),
        "checkpoint_rows": {p: leaf.shape[0] for p, leaf in saved.items() if leaf.ndim},
        "checkpoint_is_real_rows": all(np.array_equal(leaf, final[p][:K] if leaf.ndim
                                                      else final[p])
                                       for p, leaf in saved.items()),
    }
    if checkpoint_dir:
        with Checkpointer(checkpoint_dir) as checkpointer:
            restored, _, _ = checkpointer.restore(RESUME_AT,
                                                  abstract_state=session.abstract_checkpoint())
        state = session.step_state(restored)
        result["restored_step"] = int(state.step)
        for _ in range(RESUME_AT, steps):
            state, _ = compiled(state, session.data, session.frozen, session.schedule)
        result["resumed_params"] = real_params(state.params)
    return result


def _step_with_a_non_finite_concept(session, compiled, index: int) -> dict:
    """One step in which concept `index`'s target norm is NaN (its contexts, loss and
    gradient are not finite): what each concept's row did."""
    import jax
    state = _start(session)
    before = _host(state)
    norms = session.data.target_norms
    poisoned = np.asarray(norms).copy()
    poisoned[index] = np.nan
    data = session.data.replace(target_norms=jax.device_put(poisoned, norms.sharding))
    state, losses = compiled(state, data, session.frozen, session.schedule)
    after = _host(state)
    moved = [max(float(np.abs(after[p][k] - before[p][k]).max()) for p in after
                 if after[p].ndim and not p.startswith(".step"))
             for k in range(len(session.specs))]
    return {"losses": np.asarray(losses), "moved": moved}


def eight_device_child(out: Path) -> None:
    import jax

    from spacetime_jax.main import enable_compilation_cache
    from spacetime_jax.models.builtin import resolve_builtin
    from spacetime_jax.models.pretrained import load_stable_diffusion
    from spacetime_jax.neti.batch import read_concept_set
    from spacetime_jax.neti.concept import prepare_text_encoder
    from spacetime_jax.neti.train import build_session
    from spacetime_jax.parallel.mesh import make_mesh

    assert jax.device_count() == 8, jax.devices()
    enable_compilation_cache()  # the CLI runs load the K = 8 step from it
    write_concepts(out / "concepts", CONCEPT_NAMES)
    config = batch_config(**CLI_RUN)  # the CLI's config: the same compiled step
    sd = load_stable_diffusion(resolve_builtin(config.model))
    specs = read_concept_set(out / "concepts", "object")
    assert [s.name for s in specs] == CONCEPT_NAMES

    def text_for(some_specs):
        return prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                    [s.placeholder for s in some_specs],
                                    [s.super_category for s in some_specs])

    def compile_for(session):
        return session.step_fn().lower(_start(session), session.data, session.frozen,
                                       session.schedule).compile()

    # The CLI's K = 8 step first: the CLI runs start once it is in the compilation cache.
    concept_mesh = make_mesh(dict(config.mesh))
    work = out / "work"
    text_all = text_for(specs)
    batches = {k: build_session(config, sd, text_all, specs[:k], concept_mesh, work)
               for k in (8, 4, 3)}
    batch_step = compile_for(batches[8])
    print(BATCH_COMPILED_MARK, flush=True)

    alone_mesh = make_mesh({"concept": 1, "data": 1, "model": 1}, jax.devices()[:1])
    singles = [build_session(config, sd, text_for([spec]), [spec], alone_mesh, work)
               for spec in specs]
    data_mesh = make_mesh({"concept": 1, "data": 8, "model": 1})
    k1 = build_session(config, sd, text_for(specs[:1]), specs[:1], data_mesh, work)
    layouts = {name: _session_layout(session)
               for name, session in (("K8", batches[8]), ("K3", batches[3]), ("K1", k1))}

    # 7 concepts on 4 devices, one concept per device at a time: padded to 8, 2 passes.
    passes_mesh = make_mesh({"concept": 4, "data": 1, "model": 1}, jax.devices()[:4])
    in_passes = build_session(batch_config(**CLI_RUN, **{"train.concepts_per_pass": 1}), sd,
                              text_all, specs[:7], passes_mesh, work)

    single_step = compile_for(singles[0])
    results = {
        "layouts": layouts,
        "batches": {8: _train(batches[8], batch_step, CLI_STEPS),
                    4: _train(batches[4], batch_step, COMPARE_AT),
                    3: _train(batches[3], batch_step, COMPARE_AT, out / "resumed"),
                    "passes": {"passes": in_passes.statics.concept_passes,
                               "mesh": dict(passes_mesh.shape),
                               **_train(in_passes, compile_for(in_passes), COMPARE_AT)}},
        "singles": [_train(s, single_step, COMPARE_AT) for s in singles],
        "non_finite": _step_with_a_non_finite_concept(batches[8], batch_step, NAN_CONCEPT)}
    with (out / "results.pkl").open("wb") as f:
        pickle.dump(results, f)
    print("OK", flush=True)


# --- The command line.

class Job:
    """One CLI run on 8 CPU devices, started now and awaited later; its output goes to files
    (no pipe to fill)."""

    def __init__(self, args: list[str], env: dict, log_stem: Path,
                 prelude: Optional[str] = None, nice: int = 0):
        entry = ["-c", prelude] if prelude else ["-m", "spacetime_jax.main"]
        self.stdout_path = log_stem.with_suffix(".out")
        self.stderr_path = log_stem.with_suffix(".err")
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env,
                                            stdout=out, stderr=err, text=True)
        if nice:
            os.setpriority(os.PRIO_PROCESS, self.process.pid, nice)

    def wait_for_output(self, text: str) -> bool:
        """Blocks until `text` is on the run's stdout; False if the run ended without it."""
        return wait_for_text(self.stdout_path, text, self.process)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           self.stdout_path.read_text(),
                                           self.stderr_path.read_text())


def wait_for_text(path: Path, text: str, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in path.read_text():
        if process.poll() is not None:
            return text in path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {path} in {TIMEOUT_S} s"
        time.sleep(0.1)
    return True


def cli_args(workdir: Path, concepts: Path, overrides: Optional[dict] = None) -> list[str]:
    config = {"data.concepts": concepts, **CLI_RUN, **(overrides or {})}
    return ["--config=configs/neti_batch.py:tiny", f"--workdir={workdir}",
            *(f"--config.{key}={value}" for key, value in config.items())]


def logged_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"]
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@dataclasses.dataclass
class Interrupted:
    result: subprocess.CompletedProcess
    complete_steps: list[int]
    has_artifacts: bool


@dataclasses.dataclass
class CliRuns:
    """One workdir: stopped by SIGTERM, rerun and killed by SIGKILL, rerun to the end."""
    workdir: Path
    sigterm: Interrupted
    sigkill: Interrupted
    finished: subprocess.CompletedProcess


def interrupt_twice_then_finish(workdir: Path, concepts: Path, env: dict,
                                logs: Path) -> CliRuns:
    def interrupted(job: Job) -> Interrupted:
        result = job.wait()
        return Interrupted(result, complete_steps(workdir), (workdir / "concepts").exists())

    job = Job(cli_args(workdir, concepts), env, logs / "sigterm")
    if job.wait_for_output(f"step 1/{CLI_STEPS} "):
        job.process.send_signal(signal.SIGTERM)
    stopped = interrupted(job)
    prelude = KILL_AFTER_LOGGING.format(step=5, saved=4, workdir=str(workdir))
    killed = interrupted(Job(cli_args(workdir, concepts), env, logs / "sigkill", prelude))
    finished = Job(cli_args(workdir, concepts, GRIDS), env, logs / "finished").wait()
    return CliRuns(workdir, stopped, killed, finished)


# --- Everything starts with the module, side by side.

@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("neti_batch")


@pytest.fixture(scope="module")
def cache(tmp) -> Path:
    """The built-in model, written once here (the children would race to write it); the
    compilation cache the child and the CLI runs share."""
    folder = tmp / "cache"
    with mock.patch.dict(os.environ, SPACETIME_JAX_CACHE=str(folder)):
        from spacetime_jax.models.builtin import resolve_builtin
        resolve_builtin(TINY["model"])
    return folder


def child_env(cache: Path) -> dict:
    return dict(os.environ, SPACETIME_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def eight_devices(tmp, cache):
    """The in-process experiments' child (see the module doc); awaited by `results`."""
    out = tmp / "eight_devices"
    out.mkdir()
    with (out / "child.out").open("w") as stdout, (out / "child.err").open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "tests.test_neti_batch", str(out)],
                                 cwd=REPO, env=child_env(cache), stdout=stdout, stderr=stderr)
    yield child, out
    if child.poll() is None:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def cli_runs(tmp, cache, eight_devices):
    """The interrupted CLI runs, in a thread from the moment the child has compiled their
    step; `.result()` awaits them."""
    child, out = eight_devices
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    outcome = {}

    def run():
        try:
            assert wait_for_text(out / "child.out", BATCH_COMPILED_MARK, child), \
                (out / "child.err").read_text()[-3000:]
            outcome["runs"] = interrupt_twice_then_finish(tmp / "cli", out / "concepts",
                                                          child_env(cache), logs)
        except BaseException as error:  # re-raised in the test that awaits it
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> CliRuns:
        thread.join(timeout=3 * TIMEOUT_S)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["runs"]
    return result


@pytest.fixture(scope="module")
def results(eight_devices) -> dict:
    child, out = eight_devices
    child.wait(timeout=TIMEOUT_S)
    assert child.returncode == 0, (out / "child.err").read_text()[-5000:]
    with (out / "results.pkl").open("rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def concept_sets(tmp) -> dict[str, Path]:
    """Bad concept sets: each three good concepts and one fault."""
    good = tmp / "sets" / "good"
    write_concepts(good, ["arrow", "bolt", "crescent"])
    sets = {}
    for name in ("empty", "broken", "duplicate", "two_word"):
        sets[name] = tmp / "sets" / name
        shutil.copytree(good, sets[name])
    (sets["empty"] / "nothing").mkdir()
    png = next((good / "arrow").glob("*.png")).read_bytes()
    (sets["broken"] / "bolt" / "broken.png").write_bytes(png[:len(png) // 2])
    manifests = {"duplicate": ["arrow, <a>, object", "bolt, <b>, object", "crescent, <a>, object"],
                 "two_word": ["folder, placeholder, super-category", "arrow, <a>, object",
                              "bolt, <b>, teddy bear"]}
    for name, lines in manifests.items():
        (sets[name] / "concepts.csv").write_text("\n".join(lines) + "\n")
    return sets


# --- Bad concept sets: one line naming the concept, exit 2, before any compile.

BAD_SETS = [
    pytest.param("empty", "concept 'nothing' ({set}/nothing): no images (.jpg, .jpeg, .png, "
                 ".webp, .bmp, .gif) in {set}/nothing", id="folder-without-images"),
    pytest.param("broken", "concept 'bolt' ({set}/bolt): cannot read image {set}/bolt/broken.png:"
                 " truncated or malformed", id="broken-image"),
    pytest.param("duplicate", "concept 'a' ({set}/crescent): placeholder '<a>' is also that of "
                 "concept 'a' ({set}/arrow)", id="duplicate-placeholder"),
    pytest.param("two_word", "concept 'b' ({set}/bolt): super-category 'teddy bear' is 7 tokens;"
                 " it must be exactly one (one-token words of this model: object, cat, dog, "
                 "toy, circle, square, star)", id="two-word-super-category"),
]


# cli_runs starts the long runs (the child, then the CLI's): these fast ones overlap them.
@pytest.mark.usefixtures("cli_runs")
@pytest.mark.parametrize("bad_set, message", BAD_SETS)
def test_a_bad_concept_is_named_in_one_line_before_compiling(tmp, cache, concept_sets, bad_set,
                                                             message, request):
    workdir = tmp / f"bad_{bad_set}"
    result = Job(cli_args(workdir, concept_sets[bad_set]), child_env(cache),
                 tmp / request.node.callspec.id, nice=SIDE_NICE).wait()
    assert result.returncode == 2, result.stderr
    assert message.format(set=concept_sets[bad_set]) in error_line(result)
    assert COMPILED_MARK not in result.stdout
    # Image, manifest and token faults are all found before the model loads (tokens need
    # its tokenizer alone).
    assert MODEL_LOADED_MARK not in result.stdout
    assert not (workdir / "checkpoints").exists() and not (workdir / "cache").exists()


# --- Reading a concept set (no jax).

def test_sub_folders_become_concepts_with_the_configs_defaults(tmp_path):
    from spacetime_jax.neti.batch import ConceptSpec, read_concept_set
    for name in ("my cat", "dog", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a concept")
    assert read_concept_set(tmp_path, "animal", "style") == [
        ConceptSpec("dog", str(tmp_path / "dog"), "<dog>", "animal", "style"),
        ConceptSpec("my-cat", str(tmp_path / "my cat"), "<my-cat>", "animal", "style")]


def test_a_manifest_names_folders_relative_to_itself(tmp_path):
    from spacetime_jax.neti.batch import ConceptSpec, read_concept_set
    (tmp_path / "concepts.csv").write_text(
        "folder, placeholder, super-category, property\n"
        "# a comment, then a blank line\n\n"
        "photos/cat, <my-cat>, cat\n"
        "monet, <monet>, painting, style\n")
    expected = [ConceptSpec("my-cat", str(tmp_path / "photos/cat"), "<my-cat>", "cat"),
                ConceptSpec("monet", str(tmp_path / "monet"), "<monet>", "painting", "style")]
    assert read_concept_set(tmp_path, "object") == expected  # DIR/concepts.csv
    assert read_concept_set(tmp_path / "concepts.csv", "object") == expected


@pytest.mark.parametrize("manifest, message", [
    ("a, <a>\n", "concepts.csv, line 1: expected 'folder, placeholder, super-category"
                 "[, object|style]', got 'a,<a>'"),
    ("a, <a>, cat, texture\n", "concept 'a' ({dir}/a): learnable property 'texture': use "
                               "'object' or 'style'"),
    ("a, <a b>, cat\nb, <a_b>, cat\n", "concept 'a_b' ({dir}/b): name 'a_b' is also that of "
                                        "concept 'a_b' ({dir}/a)"),
    ("# nothing\n", "concepts.csv lists no concepts"),
])
def test_a_bad_manifest_is_refused_with_its_line_or_concept(tmp_path, manifest, message):
    from spacetime_jax.errors import UserError
    from spacetime_jax.neti.batch import read_concept_set
    (tmp_path / "concepts.csv").write_text(manifest)
    with pytest.raises(UserError) as error:
        read_concept_set(tmp_path, "object")
    assert message.format(dir=tmp_path) in str(error.value)


@pytest.mark.parametrize("value, backend, resolved", [
    (0, "cpu", 2), (0, "gpu", -1), (0, "tpu", -1), (-1, "cpu", -1), (3, "gpu", 3)])
def test_concepts_per_pass_auto_is_two_on_a_cpu_and_all_at_once_elsewhere(value, backend,
                                                                           resolved):
    from spacetime_jax.neti.batch import concepts_per_pass
    assert concepts_per_pass(value, backend) == resolved


@pytest.mark.parametrize("value", [-2, 1.5, True])
def test_an_unusable_concepts_per_pass_is_named(value):
    from spacetime_jax.errors import UserError
    from spacetime_jax.neti.batch import concepts_per_pass
    with pytest.raises(UserError, match=r"train.concepts_per_pass=.*: it takes a whole number"):
        concepts_per_pass(value, "cpu")


@pytest.mark.parametrize("k, concept_axis, per_pass, passes, padded", [
    (8, 1, 4, 2, 8), (8, 1, -1, 1, 8), (4, 1, 4, 1, 4), (5, 1, 4, 2, 6), (7, 4, 1, 2, 8),
    (3, 8, 4, 1, 8), (9, 2, 2, 3, 12)])
def test_passes_split_each_devices_concepts_evenly(k, concept_axis, per_pass, passes, padded):
    from types import SimpleNamespace

    from spacetime_jax.neti.batch import concept_passes, padded_count
    mesh = SimpleNamespace(shape={"concept": concept_axis})
    assert concept_passes(k, mesh, per_pass) == passes
    assert padded_count(k, mesh, passes) == padded
    per_device = padded // concept_axis
    assert per_device % passes == 0 and per_device // passes <= max(per_pass, per_device)


def test_a_missing_or_empty_concept_set_is_refused(tmp_path):
    from spacetime_jax.errors import UserError
    from spacetime_jax.neti.batch import read_concept_set
    with pytest.raises(UserError, match="does not exist"):
        read_concept_set(tmp_path / "missing", "object")
    with pytest.raises(UserError, match="holds no concept folders"):
        read_concept_set(tmp_path, "object")


# --- Layout on the 8-device mesh.

def effective(spec: tuple, mesh: dict) -> tuple:
    """`spec` without the mesh axes of size 1 (which split nothing: XLA drops them from the
    shardings it reports), trailing Nones dropped."""
    entries = [axes if isinstance(axes, str) and mesh[axes] > 1 else None for axes in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def expected_shard(shape: tuple, spec: tuple, mesh: dict) -> tuple:
    """The shape each device holds of an array of `shape` split as `spec` says."""
    split = [1] * len(shape)
    for dim, axes in enumerate(spec):
        for axis in ((axes,) if isinstance(axes, str) else axes or ()):
            split[dim] *= mesh[axis]
    return tuple(size // parts for size, parts in zip(shape, split))


@pytest.mark.parametrize("run, padded, mesh, batch", [
    ("K8", 8, {"concept": 8, "data": 1, "model": 1}, 1),
    ("K3", 8, {"concept": 8, "data": 1, "model": 1}, 1),  # 3 concepts padded to 8
    ("K1", 1, {"concept": 1, "data": 8, "model": 1}, 8),  # one concept over all 8 devices
])
def test_every_leaf_has_its_intended_sharding(results, run, padded, mesh, batch):
    layout = results["layouts"][run]
    assert layout["mesh"] == mesh
    intended = {"state": ("concept",), "data": ("concept",), "frozen": (),
                "batch": ("concept", "data")}
    for part, spec in intended.items():
        assert layout[part], part
        for path, (shape, got_spec, shard_shapes, distinct) in layout[part].items():
            want_spec = () if path == ".step" else spec
            assert effective(got_spec, mesh) == effective(want_spec, mesh), (part, path,
                                                                             got_spec)
            assert shard_shapes == [expected_shard(shape, want_spec, mesh)], (part, path)
            if part in ("state", "data", "batch") and path != ".step":
                assert shape[0] == padded, (part, path, shape)
            if part == "batch":  # (K, B, ...): B = batch_size x the concept's replicas
                assert shape[1] == batch, (path, shape)
                assert distinct == 8, path  # every device draws its own examples
    # K = 8 and 3: one concept's state per device; K = 1: a copy of it on every device.
    kernel = layout["state"][".params['input_layer']['kernel']"]
    assert kernel[3] == (8 if run != "K1" else 1)


# --- Numbers: a concept learns the same alone or in a batch.

def rows(params: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {path: leaf[index] for path, leaf in params.items()}


def assert_same_concept(batch_run: dict, index: int, single_run: dict) -> None:
    got = rows(batch_run["params_at"][COMPARE_AT], index)
    want = rows(single_run["params_at"][COMPARE_AT], 0)
    initial = rows(single_run["initial_params"], 0)
    assert sorted(got) == sorted(want) and got
    for path in want:
        trained = np.linalg.norm(want[path] - initial[path])
        assert trained > 0, path
        difference = np.linalg.norm(got[path] - want[path])
        assert difference <= PARAM_TOLERANCE * trained, (path, difference / trained)
    np.testing.assert_allclose(batch_run["losses"][:COMPARE_AT, index],
                               single_run["losses"][:, 0], rtol=LOSS_RTOL, err_msg="losses")


def test_eight_concepts_on_eight_devices_learn_what_each_learns_alone(results):
    run = results["batches"][8]
    assert run["real"].all() and run["padding_moved"] == 0.0
    for index, single in enumerate(results["singles"]):
        assert run["names"][index] == single["names"][0] == CONCEPT_NAMES[index]
        assert single["lr"] == run["lr"]
        assert_same_concept(run, index, single)


def test_a_non_finite_concept_keeps_its_state_and_reports_nan_while_the_others_step(results):
    step = results["non_finite"]
    assert np.isnan(step["losses"][NAN_CONCEPT])
    assert np.isfinite(np.delete(step["losses"], NAN_CONCEPT)).all()
    assert step["moved"][NAN_CONCEPT] == 0.0  # params and optimizer state as they were
    assert all(moved > 0 for k, moved in enumerate(step["moved"]) if k != NAN_CONCEPT)


def test_one_concept_learns_the_same_alone_and_among_four(results):
    # Same seed (the placeholder's), same lr: the scaling counts the concept's own replicas
    # (1 here, with 8 devices on the mesh), and the vmapped step keeps concepts apart.
    run = results["batches"][4]
    assert run["lr"] == results["singles"][2]["lr"] == 1e-3
    assert_same_concept(run, 2, results["singles"][2])


def test_three_concepts_padded_to_eight_leave_no_trace(results):
    run = results["batches"][3]
    np.testing.assert_array_equal(run["real"], [True] * 3 + [False] * 5)
    for index in range(3):
        assert_same_concept(run, index, results["singles"][index])
    # Padding rows: no loss out of the step; params and optimizer state as they started.
    assert (run["losses"][:, 3:] == 0).all() and (run["losses"][:, :3] > 0).all()
    assert run["padding_moved"] == 0.0
    # A checkpoint holds the three concepts alone, exactly as the step left them ...
    assert set(run["checkpoint_rows"].values()) == {3}
    assert run["checkpoint_is_real_rows"]
    # ... and a run restored from it and padded again continues exactly where it stopped.
    assert run["restored_step"] == RESUME_AT
    for path, leaf in run["params_at"][COMPARE_AT].items():
        np.testing.assert_array_equal(run["resumed_params"][path][:3], leaf[:3], err_msg=path)


def test_concepts_learned_in_passes_learn_what_each_learns_alone(results):
    # train.concepts_per_pass=1 on 4 devices: 7 concepts padded to 8, two passes of one
    # concept per device; each pass is a vmapped group under a lax.map.
    run = results["batches"]["passes"]
    assert run["passes"] == 2 and run["mesh"] == {"concept": 4, "data": 1, "model": 1}
    np.testing.assert_array_equal(run["real"], [True] * 7 + [False])
    for index in range(7):
        assert run["names"][index] == CONCEPT_NAMES[index]
        assert_same_concept(run, index, results["singles"][index])
    assert run["losses"].shape == (COMPARE_AT, 7)  # the step reports the real concepts only
    assert run["padding_moved"] == 0.0


# --- Preemption and resume on the command line.

def test_sigterm_saves_a_complete_checkpoint_and_the_rerun_resumes_from_it(cli_runs):
    runs = cli_runs()
    stopped = runs.sigterm.result
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    step = int(stopped.stdout.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 1 <= step < 4, stopped.stdout  # the signal came after step 1
    # The stop's checkpoint is complete (an unfinished one would be a *-tmp folder) and the
    # latest; no artifact of an unfinished run.
    assert runs.sigterm.complete_steps[-1] == step, runs.sigterm.complete_steps
    assert not runs.sigterm.has_artifacts
    assert f"resumed from step {step} in" in runs.sigkill.result.stdout


def test_batch_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(cli_runs,
                                                                                  results):
    runs = cli_runs()
    killed = runs.sigkill
    assert killed.result.returncode == -signal.SIGKILL, killed.result.stderr
    assert f"step 5/{CLI_STEPS}" in killed.result.stdout
    assert killed.complete_steps[-1] == 4 and not killed.has_artifacts
    finished = runs.finished
    assert finished.returncode == 0, finished.stderr
    assert "resumed from step 4 in" in finished.stdout
    assert "8 concept(s) on mesh {'concept': 8, 'data': 1, 'model': 1}" in finished.stdout
    assert logged_steps(runs.workdir) == list(range(1, CLI_STEPS + 1))

    # The whole batch is in the checkpoint, and it is the child's uninterrupted run, bitwise.
    uninterrupted = results["batches"][8]["params_at"][CLI_STEPS]
    state = saved_state(runs.workdir, CLI_STEPS)
    assert int(state[".step"]) == CLI_STEPS
    assert uninterrupted
    for path, leaf in uninterrupted.items():  # "['input_layer']['kernel']", ...
        np.testing.assert_array_equal(state[".params" + path], leaf, err_msg=path)
    # Each concept's artifact and grid, as a single-concept run writes them.
    assert sorted(p.name for p in (runs.workdir / "concepts").iterdir()) == CONCEPT_NAMES
    grids = runs.workdir / "validation" / f"step_{CLI_STEPS:06d}"
    assert sorted(p.name for p in grids.iterdir()) == [f"{c}.png" for c in CONCEPT_NAMES]
    for index, name in enumerate(CONCEPT_NAMES):
        folder = runs.workdir / "concepts" / name
        assert json.loads((folder / "concept.json").read_text())["placeholder"] == f"<{name}>"
        weights = load_file(str(folder / "mapper.safetensors"))
        for path, leaf in uninterrupted.items():
            key = "params/" + path[2:-2].replace("']['", "/")
            np.testing.assert_array_equal(weights[key], leaf[index], err_msg=f"{name} {key}")


if __name__ == "__main__":
    eight_device_child(Path(sys.argv[1]))
