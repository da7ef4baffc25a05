"""Checkpointer: bitwise round trips, retention, resume safety, config compatibility."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_jax.errors import UserError
from spacetime_jax.training.checkpoint import Checkpointer, check_compatible

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model": "builtin:tiny", "train": {"steps": 100, "learning_rate": 1e-3,
                                             "betas": (0.9, 0.999)}}
METADATA = {"concepts": ["<cat>", "<dog>"]}


def example_state(seed: int = 0) -> dict:
    """A training-like state: f32/bf16/int32 leaves, a typed PRNG key, nested dicts."""
    rng = np.random.default_rng(seed)
    return {
        "trainable": {"mapper": {"kernel": jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16)}},
        "opt_state": {"count": jnp.asarray([seed, seed + 1], jnp.int32),
                      "mu": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},
        "step": jnp.int32(seed + 7),
        "rng": jax.random.split(jax.random.key(seed), 2),
        "data_position": jnp.asarray(rng.integers(0, 1000, size=(2,)), jnp.int32),
    }


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def assert_bitwise_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def saved_steps(workdir: Path) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints"))


def test_state_config_and_metadata_round_trip_bitwise(tmp_path):
    state = example_state(seed=3)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, CONFIG, METADATA)
        restored, config, metadata = ckpt.restore(abstract_state=abstract_of(state))
    assert_bitwise_equal(restored, state)
    assert restored["rng"].dtype == state["rng"].dtype  # a typed key array again
    assert config == {"model": "builtin:tiny",
                      "train": {"steps": 100, "learning_rate": 1e-3, "betas": [0.9, 0.999]}}
    assert metadata == METADATA


def test_keeps_the_last_n_and_a_new_checkpointer_resumes_from_the_latest(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            assert ckpt.save(step, example_state(seed=step), CONFIG, METADATA)
        assert not ckpt.save(40, example_state(seed=0), CONFIG, METADATA)  # already saved
        assert ckpt.latest_step() == 40
    assert [s for s in saved_steps(tmp_path) if s.isdigit()] == ["30", "40"]
    with Checkpointer(tmp_path, keep=2) as resumed:
        assert resumed.latest_step() == 40
        older, _, _ = resumed.restore(30, abstract_state=abstract_of(example_state()))
    assert_bitwise_equal(older, example_state(seed=30))


def test_restoring_a_missing_step_names_the_saved_ones(tmp_path):
    with Checkpointer(tmp_path / "fresh") as empty:
        with pytest.raises(UserError, match="no checkpoint in .*fresh/checkpoints"):
            empty.restore(abstract_state=abstract_of(example_state()))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, example_state(), CONFIG, METADATA)
        with pytest.raises(UserError, match=r"no checkpoint for step 2 in .*saved steps: \[1\]"):
            ckpt.restore(2, abstract_state=abstract_of(example_state()))


def test_a_different_config_is_refused_with_the_keys_that_differ(tmp_path):
    check_compatible(tmp_path, CONFIG)  # no checkpoints yet: anything goes
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, example_state(), CONFIG, METADATA)
    longer = {**CONFIG, "train": {**CONFIG["train"], "steps": 500}}
    check_compatible(tmp_path, longer)  # train.steps may differ by default
    changed = {"model": "other", "train": {**CONFIG["train"], "learning_rate": 5e-3},
               "sample": {"seeds": [1]}}
    with pytest.raises(UserError) as error:
        check_compatible(tmp_path, changed)
    assert str(error.value) == (
        f"workdir {tmp_path} holds a run with a different config "
        "(differs in: model, sample.seeds, train.learning_rate); "
        "use a new --workdir or the same config")
    check_compatible(tmp_path, changed, allowed_to_differ=("model", "train", "sample"))


# Runs in a child process: saves step 1 (small, complete), starts an async save of a ~200 MB
# step 2, prints the checkpoint folder and kills itself while the write is in flight.
_KILLED_DURING_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from tests.test_checkpoint import CONFIG, METADATA, example_state
from spacetime_jax.training.checkpoint import Checkpointer

workdir = sys.argv[1]
ckpt = Checkpointer(workdir)
ckpt.save(1, example_state(seed=1), CONFIG, METADATA)
ckpt.wait()
big = {"weights": jnp.full((50_000_000,), 1.5, jnp.float32)}  # 200 MB; not the fill value
ckpt.save(2, big, CONFIG, METADATA)
print("LISTING", sorted(os.listdir(os.path.join(workdir, "checkpoints"))), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_latest(tmp_path):
    child = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    listing = next(line for line in child.stdout.splitlines() if line.startswith("LISTING"))
    assert "'2'" not in listing  # step 2 was still being written when the process died
    with Checkpointer(tmp_path) as resumed:
        assert resumed.latest_step() == 1
        restored, config, _ = resumed.restore(abstract_state=abstract_of(example_state()))
        assert_bitwise_equal(restored, example_state(seed=1))
        assert config["train"]["steps"] == 100
        assert resumed.save(2, example_state(seed=2), CONFIG, METADATA)  # step 2 can be redone
    # The interrupted save's temporary folder is gone; only complete steps remain.
    assert saved_steps(tmp_path) == ["1", "2"]


# Runs on 8 CPU devices: a state sharded over the concept axis restores onto that sharding.
_SHARDED_RESTORE = """
import sys
import jax, numpy as np
from spacetime_jax.parallel import mesh as mesh_lib, sharding
from spacetime_jax.training.checkpoint import Checkpointer

mesh = mesh_lib.make_mesh({"concept": -1})
state = {"kernel": jax.numpy.arange(8 * 6, dtype=jax.numpy.float32).reshape(8, 6),
         "rng": jax.random.split(jax.random.key(0), 8)}
shardings = sharding.tree_shardings(state, mesh, sharding.CONCEPT_LEADING)
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, state, {}, {})  # saved from host arrays on device 0
    restored, _, _ = ckpt.restore(abstract_state=sharding.sharded_abstract(state, shardings))
for name in ("kernel", "rng"):
    assert restored[name].sharding == shardings[name], restored[name].sharding
    assert {s.data.shape[0] for s in restored[name].addressable_shards} == {1}
assert np.array_equal(restored["kernel"], state["kernel"])
assert np.array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
print("OK")
"""


def test_restore_places_the_state_on_the_target_shardings(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    child = subprocess.run([sys.executable, "-c", _SHARDED_RESTORE, str(tmp_path)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip().endswith("OK"), child.stderr[-3000:]


def test_dropped_orbax_write_tasks_are_not_logged_once_a_checkpointer_exists(tmp_path, caplog):
    """One failed parallel write ends the run with one line; the sibling tasks orbax drops
    must not print their tracebacks when asyncio collects them (a flaky CI failure)."""
    import asyncio
    import gc
    import importlib.util

    def task_dropped_unretrieved(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "writer.py").write_text(
            "async def write_fragment():\n    raise ValueError('OUT_OF_RANGE: disk full')\n")
        spec = importlib.util.spec_from_file_location(f"writer_{folder.parent.name}",
                                                      folder / "writer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        async def main():
            task = asyncio.ensure_future(module.write_fragment())
            # orbax also gathers its writes: the gathering future's failure is dropped too
            gathering = asyncio.gather(module.write_fragment())
            await asyncio.sleep(0.01)
            assert task.done() and gathering.done()
        asyncio.run(main())
        gc.collect()

    with caplog.at_level("ERROR", logger="asyncio"):
        task_dropped_unretrieved(tmp_path / "elsewhere" / "lib")
    messages = [r.getMessage() for r in caplog.records]
    assert any("Task exception was never retrieved" in m for m in messages)
    assert any("_GatheringFuture exception was never retrieved" in m for m in messages)
    caplog.clear()

    Checkpointer(tmp_path / "run").close()
    with caplog.at_level("ERROR", logger="asyncio"):
        task_dropped_unretrieved(tmp_path / "site-packages" / "orbax")
        task_dropped_unretrieved(tmp_path / "other" / "lib")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("/orbax/" in m for m in messages), messages
    assert any("Task exception was never retrieved" in m and "/other/lib/" in m
               for m in messages), messages
    # Two records per dropped write (the task and the gathering future) outside orbax only.
    assert sum("exception was never retrieved" in m for m in messages) == 2, messages
