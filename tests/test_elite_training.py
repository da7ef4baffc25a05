"""ELITE's two training stages on the shipped toy-world model and toy objects.

- In process: stage 1 lowers its loss on a fixed held-out batch (held-out objects, fixed noise
  and timesteps) and, after it, the words of two different held-out objects lie farther apart
  than those of two augmentations of one object; stage 2 (on stage 1's saved encoder) lowers
  its own held-out loss.
- On the command line: a stage-1 run killed by SIGKILL after a checkpoint and run again ends
  with bitwise the params of an uninterrupted run, and logs the same losses for the steps after
  the checkpoint (the same examples, noise and params); bad input ends with one line.
- In a child with 8 CPU devices (#6): one data-parallel stage-1 step over 8 devices, and over
  4 x 2 with the frozen U-Net's kernels over `model`, equals the 1-device step on the same
  global batch (to float tolerance: the sums over the batch are ordered differently).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.cli_helpers import KILL_AFTER_LOGGING, complete_steps, error_line, saved_state

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
TRAIN_OBJECTS, TEST_OBJECTS = 64, 16
# Stage 2 learns slowly at the tiny config's rate (its held-out loss falls ~3.5% in 150
# steps, steadily): enough steps that the drop is well past float noise.
GLOBAL_STEPS, LOCAL_STEPS = 40, 150


def load_config(stage: str, **overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        f"elite_{stage}_config", REPO / "configs" / f"elite_{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elite")


@pytest.fixture(scope="module")
def objects(tmp) -> Path:
    from spacetime_jax.elite.toyworld_data import write_toyworld_objects
    root = tmp / "objects"
    write_toyworld_objects(root, TRAIN_OBJECTS, TEST_OBJECTS, seed=1, size=128)
    return root


def data_overrides(tmp: Path, objects: Path) -> dict:
    return {"data.root": str(objects), "data.tfds_dir": str(tmp / "tfds"),
            "data.prefetch_workers": 1, "evaluation.num_examples": 16, "validation.every": 0}


def train_in_process(session, source, config, steps: int):
    """`steps` compiled steps from the initial state; returns (params before, after)."""
    from spacetime_jax.elite import train
    from spacetime_jax.parallel import sharding
    t = config.train
    state = sharding.shard_put(session.initial_state, session.state_shardings)
    initial = jax.device_get(state.params)
    spec = train.pipeline_spec(config, session.model, t.seed, t.batch_size)
    step = session.step_fn()
    for s in range(steps):
        batch = train.to_global(train.batch_arrays(source, spec, s, t.grad_accum),
                                session.batch_sharding, t.batch_size)
        state, metrics = step(state, batch, session.frozen, session.schedule, jnp.uint32(t.seed))
    assert np.isfinite(float(metrics["loss"]))
    trained = jax.device_get(state.params)
    # Both stages: a step whose loss is not finite reports NaN and applies no update.
    arrays = train.batch_arrays(source, spec, steps, t.grad_accum)
    pixels = next(key for key, value in sorted(arrays.items())
                  if np.issubdtype(value.dtype, np.floating) and value.ndim >= 4)
    arrays[pixels] = np.full_like(arrays[pixels], np.nan)
    poisoned, metrics = step(state, train.to_global(arrays, session.batch_sharding, t.batch_size),
                             session.frozen, session.schedule, jnp.uint32(t.seed))
    assert np.isnan(float(metrics["loss"])), (pixels, metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(poisoned.params), trained)
    return initial, trained


@pytest.fixture(scope="module")
def global_stage(tmp, objects):
    from spacetime_jax.elite import train
    from spacetime_jax.parallel.mesh import make_mesh
    config = load_config("global", **data_overrides(tmp, objects))
    mesh = make_mesh({"concept": 1, "data": 1, "model": 1}, jax.devices()[:1])
    model = train.load_model(config)
    session = train.build_session(config, model, mesh)
    source = train.open_split(config, config.data.split)
    held_out = train.open_split(config, config.data.validation_split)
    eval_batch = train.evaluation_batch(held_out, config, model, session)
    before, after = train_in_process(session, source, config, GLOBAL_STEPS)
    losses = [session.evaluate(p, eval_batch, config.evaluation.seed)["mse"]
              for p in (before, after)]
    folder = train.save_trained_encoder(tmp / "global_run" / train.ENCODER_DIR, session,
                                        session.encoder_params(after), config)
    return dict(config=config, model=model, session=session, held_out=held_out, params=after,
                losses=losses, folder=folder)


def test_global_stage_lowers_the_held_out_loss(global_stage):
    before, after = global_stage["losses"]
    assert after < 0.9 * before, (before, after)


def test_global_words_separate_objects_more_than_augmentations(global_stage):
    from spacetime_jax.elite import pipeline
    from spacetime_jax.elite.step import global_words
    session, held_out = global_stage["session"], global_stage["held_out"]
    size = session.model.clip_size
    objects = [np.asarray(held_out[i]["image"]) for i in range(8)]

    def augmented(image, seed):
        return pipeline.augment_for_clip(image, np.random.default_rng(seed), size)

    pixels = np.stack([augmented(image, seed) for image in objects for seed in (1, 2)])
    words = np.asarray(jax.jit(global_words, static_argnums=0)(
        session.statics, global_stage["params"]["mapper"], session.frozen.vision,
        jnp.asarray(pixels))).reshape(len(objects), 2, -1)
    within = np.linalg.norm(words[:, 0] - words[:, 1], axis=-1).mean()
    between = np.mean([np.linalg.norm(words[i, 0] - words[j, 0])
                       for i in range(len(objects)) for j in range(len(objects)) if i != j])
    assert between > 1.5 * within, (between, within)


def test_local_stage_lowers_its_held_out_loss(tmp, objects, global_stage):
    from spacetime_jax.elite import train
    from spacetime_jax.parallel.mesh import make_mesh
    config = load_config("local", **data_overrides(tmp, objects),
                         global_checkpoint=str(tmp / "global_run"))
    mesh = make_mesh({"concept": 1, "data": 1, "model": 1}, jax.devices()[:1])
    model = global_stage["model"]
    session = train.build_session(config, model, mesh)
    # The frozen global stage is what stage 1 saved.
    np.testing.assert_array_equal(
        jax.tree.leaves(session.frozen.global_mapper)[0],
        jax.tree.leaves(global_stage["params"]["mapper"])[0])
    source = train.open_split(config, config.data.split)
    eval_batch = train.evaluation_batch(train.open_split(config, config.data.validation_split),
                                        config, model, session)
    assert set(eval_batch) >= {"local_pixels", "local_mask", "valid_mask"}
    before, after = train_in_process(session, source, config, LOCAL_STEPS)
    loss_before, loss_after = (session.evaluate(p, eval_batch, config.evaluation.seed)["mse"]
                               for p in (before, after))
    assert loss_after < 0.98 * loss_before, (loss_before, loss_after)
    # Only the local tree trains: to_k_local / to_v_local and the local mapper.
    assert all(path[-2] in ("to_k_local", "to_v_local")
               for path, _ in jax.tree_util.tree_flatten_with_path(after["kv"])[0]
               for path in [[k.key for k in path]])


# --- The command line.

CLI_STEPS = 6


def cli_args(workdir: Path, tmp: Path, objects: Path, **overrides) -> list[str]:
    config = {**data_overrides(tmp, objects), "train.steps": CLI_STEPS,
              "train.checkpoint_every": 2, "train.log_every": 1, **overrides}
    return ["--config=configs/elite_global.py:tiny", f"--workdir={workdir}",
            *(f"--config.{key}={value}" for key, value in config.items())]


def run_cli(args: list[str], env: dict, prelude: str | None = None
            ) -> subprocess.CompletedProcess:
    entry = ["-c", prelude] if prelude else ["-m", "spacetime_jax.main"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def cli_env(tmp) -> dict:
    # One compilation cache for the runs: the reruns load the step instead of compiling it.
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "xla"))


def logged_losses(workdir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in
            map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp, objects, cli_env, global_stage):
    straight, resumed = tmp / "straight", tmp / "resumed"
    done = run_cli(cli_args(straight, tmp, objects), cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    prelude = KILL_AFTER_LOGGING.format(step=5, saved=4, workdir=str(resumed))
    killed = run_cli(cli_args(resumed, tmp, objects), cli_env, prelude)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert complete_steps(resumed)[-1] == 4 and not (resumed / "encoder").exists()
    rerun = run_cli(cli_args(resumed, tmp, objects), cli_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 4" in rerun.stdout
    final_a, final_b = saved_state(straight, CLI_STEPS), saved_state(resumed, CLI_STEPS)
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        np.testing.assert_array_equal(final_a[key], final_b[key], err_msg=key)
    # Steps 5 and 6 drew the same examples, noise and timesteps from the same params.
    losses_a, losses_b = logged_losses(straight), logged_losses(resumed)
    assert sorted(losses_b) == list(range(1, CLI_STEPS + 1))
    for step in (5, 6):
        assert losses_a[step] == losses_b[step]
    from safetensors.numpy import load_file
    saved = load_file(straight / "encoder" / "global.safetensors")
    again = load_file(resumed / "encoder" / "global.safetensors")
    assert saved.keys() == again.keys()
    assert all(np.array_equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize("overrides, words", [
    ({"stage": "middle"}, "stage='middle' is unknown"),
    ({"data.root": "/nonexistent/objects"}, "/nonexistent/objects"),
    ({"data.validation_split": "val"}, "no split 'val'"),
    ({"validation.token_index": "first"}, "validation.token_index='first'"),
    ({"train.remat_policy": "most"}, "train.remat_policy='most' is unknown"),
    ({"train.steps": 0}, "train.steps=0: it takes a whole number >= 1"),
    ({"train.batch_size": -2}, "train.batch_size=-2: it takes a whole number >= 1"),
    ({"train.learning_rate": -0.1}, "train.learning_rate=-0.1: it takes a positive finite"),
    ({"train.learning_rate": float("nan")}, "train.learning_rate=nan: it takes a positive"),
    ({"validation.every": 5, "validation.sampler": "heun"},
     "validation.sampler='heun' is unknown; use one of ddim, dpmpp_2m, euler, lms"),
])
def test_bad_input_is_one_line(tmp, objects, cli_env, overrides, words):
    workdir = tmp / f"bad_{len(os.listdir(tmp))}"
    result = run_cli(cli_args(workdir, tmp, objects, **overrides), cli_env)
    assert result.returncode == 2
    assert words in error_line(result)
    assert not (workdir / "checkpoints").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp, objects, cli_env):
    workdir = tmp / "diverged"
    # Adam's first update moves every param by about the learning rate: 1e30 overflows.
    result = run_cli(cli_args(workdir, tmp, objects, **{"train.learning_rate": 1e30}), cli_env)
    assert result.returncode == 2
    line = error_line(result)
    assert "loss is" in line and "at step 2" in line and "step 0" in line, line
    assert not (workdir / "encoder").exists()


def test_stage_two_needs_a_matching_stage_one(tmp, objects, cli_env, global_stage):
    args = lambda **o: ["--config=configs/elite_local.py:tiny", f"--workdir={tmp / 'local_bad'}",
                        *(f"--config.{k}={v}" for k, v in
                          {**data_overrides(tmp, objects), **o}.items())]
    missing = run_cli(args(), cli_env)
    assert missing.returncode == 2 and "global_checkpoint is not set" in error_line(missing)
    other = run_cli(args(**{"global_checkpoint": str(tmp / "global_run"),
                            "encoder.hidden_width": 64}), cli_env)
    assert other.returncode == 2 and "does not match" in error_line(other)


# --- Data parallel on 8 CPU devices (a child process: the device count is fixed at start).

def test_data_parallel_step_equals_the_one_device_step(tmp, objects, global_stage):
    out = tmp / "data_parallel.pkl"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-m", "tests.test_elite_training", str(tmp),
                             str(objects), str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pickle.loads(out.read_bytes())
    reference = runs.pop("data=1")
    assert set(runs) == {"data=8", "data=4,model=2"}
    moved = jax.tree.map(lambda new, old: np.linalg.norm(new - old), reference["params"],
                         reference["initial"])
    for name, run in runs.items():
        assert run["data_shards"] == {"data=8": 8, "data=4,model=2": 4}[name]
        np.testing.assert_allclose(run["loss"], reference["loss"], rtol=1e-5, err_msg=name)
        for (path, a), b, d in zip(jax.tree_util.tree_flatten_with_path(run["params"])[0],
                                   jax.tree.leaves(reference["params"]), jax.tree.leaves(moved)):
            assert np.linalg.norm(a - b) <= 1e-3 * d + 1e-7, (name, jax.tree_util.keystr(path))
    assert runs["data=4,model=2"]["unet_kernel_spec"] == (None, "model")


def _data_parallel_child(tmp: Path, objects: Path, out: Path) -> None:
    """One stage-1 step from the same state on the same global batch, on three meshes."""
    from spacetime_jax.elite import train
    from spacetime_jax.parallel import sharding
    from spacetime_jax.parallel.mesh import make_mesh
    assert jax.device_count() == 8
    config = load_config("global", **data_overrides(tmp, objects))
    model = train.load_model(config)
    source = train.open_split(config, config.data.split)
    t = config.train
    spec = train.pipeline_spec(config, model, t.seed, t.batch_size)
    arrays = train.batch_arrays(source, spec, 0, t.grad_accum)
    runs = {}
    for name, axes, devices in (("data=1", {"data": 1}, jax.devices()[:1]),
                                ("data=8", {"data": 8}, jax.devices()),
                                ("data=4,model=2", {"data": 4, "model": 2}, jax.devices())):
        mesh = make_mesh({"concept": 1, "model": 1, **axes}, devices)
        session = train.build_session(config, model, mesh)
        state = sharding.shard_put(session.initial_state, session.state_shardings)
        frozen = sharding.shard_put(session.frozen, session.frozen_shardings)
        batch = train.to_global(arrays, session.batch_sharding, t.batch_size)
        initial = jax.device_get(state.params)
        state, metrics = session.step_fn()(state, batch, frozen, session.schedule,
                                           jnp.uint32(t.seed))
        kernel = frozen.unet["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"][
            "to_q"]["kernel"]
        runs[name] = dict(params=jax.device_get(state.params), initial=initial,
                          loss=float(metrics["loss"]),
                          data_shards=len({str(s.index) for s in
                                           batch["pixels"].addressable_shards}),
                          unet_kernel_spec=tuple(kernel.sharding.spec))
    out.write_bytes(pickle.dumps(runs))


if __name__ == "__main__":
    _data_parallel_child(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
