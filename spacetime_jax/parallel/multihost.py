"""The rules of a multi-process run (a pod slice, or several processes on one host).

- Every process runs the same program; process 0 alone prints and writes what is written
  once (metrics, grids, artifacts, JSON). orbax checkpoints are written by all processes
  together (orbax coordinates them), never under `if is_lead()`.
- Processes synchronize through the coordination service that `jax.distributed.initialize`
  started (barriers and a key-value store, each with a timeout), never by waiting for a file:
  a process that is gone or elsewhere ends the others with an error instead of a hang.
- A device value read on the host (a loss, a flag, a concept's params) goes through
  `to_host`, which gathers what other processes hold; every process must call it.
- The workdir must be one folder for all processes (`check_shared_workdir`): a bucket or a
  shared filesystem, not each worker's own disk.
"""
from __future__ import annotations

import itertools
import secrets
from typing import Any, Callable

import jax
import numpy as np

from spacetime_jax.errors import UserError
from spacetime_jax.paths import PathLike, as_path

SHARED_CHECK_TIMEOUT_S = 60
BARRIER_TIMEOUT_S = 3600  # a one-time build (a dataset) may take a while on process 0
_barrier_count = itertools.count()


def is_lead() -> bool:
    return jax.process_index() == 0


def lead_print(*args, **kwargs) -> None:
    """print() on process 0; the other processes stay silent (one line per event per run)."""
    if is_lead():
        print(*args, **{"flush": True, **kwargs})


def _client():
    from jax._src import distributed  # the coordination service's client; orbax uses it too
    return distributed.global_state.client


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier `name`; raises UserError after
    `timeout_s` (a process crashed or runs another program). No-op in a single process."""
    if jax.process_count() == 1:
        return
    # The service needs a fresh name per barrier; every process counts the same way.
    unique = f"spacetime_jax/{name}/{next(_barrier_count)}"
    try:
        _client().wait_at_barrier(unique, int(timeout_s * 1000))
    except Exception as err:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED, ...)
        raise UserError(f"the {jax.process_count()} processes did not all reach '{name}' "
                        f"within {timeout_s:.0f} s ({str(err).splitlines()[0]}): another "
                        "process failed or runs with other settings; see its log") from err


def _exchange(name: str, value: str, timeout_s: float) -> list[str]:
    """Every process's `value`, in process order (through the key-value store)."""
    client = _client()
    prefix = f"spacetime_jax/{name}/{next(_barrier_count)}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", value)
    try:
        return [client.blocking_key_value_get(f"{prefix}/{index}", int(timeout_s * 1000))
                for index in range(jax.process_count())]
    except Exception as err:
        raise UserError(f"the {jax.process_count()} processes did not all answer '{name}' "
                        f"within {timeout_s:.0f} s ({str(err).splitlines()[0]}): another "
                        "process failed; see its log") from err


def check_shared_workdir(workdir: PathLike, timeout_s: float = SHARED_CHECK_TIMEOUT_S) -> None:
    """Raises UserError on every process unless all of them see one and the same workdir.

    Process 0 writes a fresh token into workdir; each process reads the file at its own
    workdir and reports what it found. Per-worker local folders (or different paths) show
    up here, at start, instead of as a hang at the first checkpoint.
    """
    if jax.process_count() == 1:
        return
    token_file = as_path(workdir) / ".spacetime" / "processes"
    token = secrets.token_hex(16) if is_lead() else ""
    if is_lead():
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
    token = _exchange("workdir_token", token, timeout_s)[0]
    try:
        seen = token_file.read_text().strip() == token
    except OSError:
        seen = False
    answers = _exchange("workdir_seen", f"{int(seen)} {workdir}", timeout_s)
    blind = [index for index, answer in enumerate(answers) if not answer.startswith("1 ")]
    if blind:
        elsewhere = "; ".join(f"process {i}: {answers[i][2:]}" for i in blind)
        raise UserError(f"workdir {workdir} is not shared by the {jax.process_count()} "
                        f"processes ({elsewhere} cannot see process 0's files): use "
                        "gs://BUCKET/... or a shared filesystem")


def build_once(name: str, is_built: Callable[[], bool], build: Callable[[], Any]) -> None:
    """A one-time build (a dataset, files written on first use) that every process reads.

    Process 0 builds first while the others wait; then each process that still does not see
    the result (its own disk: a pod worker) builds its own copy, which is deterministic. On a
    shared disk the build runs once; never two builds into one folder at the same time. A
    UserError in a build stops every process with its message.
    """
    fail_together(f"{name}/first", lambda: None if not is_lead() or is_built() else build())
    fail_together(f"{name}/rest", lambda: None if is_built() else build())


def to_host(tree: Any) -> Any:
    """numpy copies of every leaf, whole, on every process: leaves that other processes hold
    parts of are gathered (a collective: every process must call this, in the same order)."""
    def one(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or \
                leaf.is_fully_replicated:
            return np.asarray(jax.device_get(leaf))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return jax.tree.map(one, tree)


def fail_together(name: str, check: Callable[[], Any],
                  timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Runs `check` on every process (each checks its own inputs); if it raises UserError on
    any process, every process raises it (the messages joined): a process that stopped alone
    would leave the others waiting in their next collective."""
    try:
        check()
        message = ""
    except UserError as err:
        if jax.process_count() == 1:
            raise
        message = str(err)
    if jax.process_count() == 1:
        return
    failed = [m for m in _exchange(f"fail_together/{name}", message, timeout_s) if m]
    if failed:
        raise UserError("; ".join(dict.fromkeys(failed)))


def addressable_rows(sharding: jax.sharding.Sharding, num_rows: int) -> list[int]:
    """The rows of a (num_rows, ...) array under `sharding` that this process's devices hold."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((num_rows,)).values():
        rows.update(range(*index[0].indices(num_rows)))
    return sorted(rows)


def put_process_rows(tree: Any, shardings: Any) -> Any:
    """Global arrays from host arrays of the full shape of which each process filled (at
    least) the parts its own devices hold: per-host input, without one process reading
    another's data."""
    def put(leaf, sharding):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
    return jax.tree.map(put, tree, shardings)
