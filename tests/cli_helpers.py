"""What the command-line tests read back from a finished or interrupted run."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one 'error:' line; no traceback around it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def complete_steps(workdir) -> list[int]:
    """Checkpoint steps that orbax finished: on a local disk an unfinished save is a *-tmp
    folder; on GCS (no renames) a step folder without orbax's commit_success.txt."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


# A run as `python -c KILL_AFTER_LOGGING.format(...) ARGS`: the job, killed by SIGKILL once
# step `step` is logged and checkpoint `saved` is complete on disk.
KILL_AFTER_LOGGING = """
import os, signal, time
from pathlib import Path
from spacetime_jax.training import progress
log_step = progress.Progress.update
def update(self, step, **metrics):
    record = log_step(self, step, **metrics)
    if step == {step}:  # logged; let the previous checkpoint's async write finish, then die
        deadline = time.monotonic() + 120
        while not (Path({workdir!r}) / "checkpoints" / "{saved}").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return record
progress.Progress.update = update
from absl import app
from spacetime_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def saved_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Checkpoint `step`'s state, read onto this process's one device: path -> array."""
    import jax
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(workdir / "checkpoints", options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler()}
                               ) as manager:
        metadata = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=device), metadata)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
    leaves, _ = jax.tree_util.tree_flatten_with_path(restored["state"])
    # Restored as dicts: "['params']['x']" -> the TrainState path ".params['x']".
    return {"." + jax.tree_util.keystr(path)[2:].replace("']", "", 1): np.asarray(leaf)
            for path, leaf in leaves}
