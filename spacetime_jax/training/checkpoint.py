"""Checkpoints of a training run, through orbax: what is saved and how a run resumes.

Layout: <workdir>/checkpoints/<step>/ with three items:
  state     the pytree the caller passes (trainable params, optimizer state, step, PRNG key,
            data position ...), written by orbax's StandardCheckpointHandler;
  config    the run's config as a JSON dict;
  metadata  JSON facts about the run (concept names, placeholder tokens ...).

Atomicity (orbax's own protocol, not ours): a save writes into
`<step>.orbax-checkpoint-tmp` and, once every item is on disk, writes a commit_success file
and renames the folder to `<step>` (orbax's AtomicRenameTemporaryPath, the default on local and
POSIX filesystems; on GCS orbax marks completion with the commit file instead). Step listing
skips unfinished folders, so a process killed during an async save leaves the previous
checkpoint as the latest complete one; the next Checkpointer on the workdir removes the
leftover temporary folder.

PRNG keys: orbax stores plain arrays, so a typed key (jax.random.key) in `state` is written as
its uint32 `jax.random.key_data` and wrapped back with `jax.random.wrap_key_data` using the
key dtype of the matching leaf of `abstract_state`. Callers just keep typed keys in the state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from spacetime_jax.errors import UserError

# Keys a resumed run may change: extending a run to more steps must not need a new workdir.
RESUMABLE_KEYS = ("train.steps",)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the message says which complete one is kept."""


class _OrbaxErrorsAsOneLine(logging.Filter):
    """orbax logs a failed background write at ERROR, traceback and all, from each of its
    threads, then raises it to the caller; Checkpointer._writing turns that into one line
    with the reason. The log records would bury that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "/orbax/" not in record.pathname


class _OrbaxTasksNeverRetrieved(logging.Filter):
    """When one of a save's parallel writes fails, orbax raises the first failure and drops
    the other write tasks and their gathering future; asyncio logs each dropped failure,
    traceback and all, whenever it is garbage-collected. The first failure already ended the
    run with one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message.splitlines()[0]:
            return True
        return not ("/orbax/" in message or _raised_in_orbax(record.exc_info))


def _raised_in_orbax(exc_info) -> bool:
    traceback = exc_info[2] if isinstance(exc_info, tuple) else None
    while traceback is not None:
        if "/orbax/" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _late_callback_onto_a_closed_loop(kind, value, traceback) -> bool:
    """After a failed write, tensorstore completes the writes still in flight on its own
    threads and calls back into orbax's event loop, which has closed: harmless, and printed
    once per write in flight."""
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return (kind is RuntimeError and str(value) == "Event loop is closed" and
            traceback is not None and traceback.tb_frame.f_code.co_name == "_check_closed")


def _report_write_failures_once() -> None:
    """A failed checkpoint write ends the run with Checkpointer._writing's one line, not with
    pages of orbax's logs and tensorstore's late callbacks."""
    absl_logger = logging.getLogger("absl")
    if any(isinstance(f, _OrbaxErrorsAsOneLine) for f in absl_logger.filters):
        return
    absl_logger.addFilter(_OrbaxErrorsAsOneLine())
    logging.getLogger("asyncio").addFilter(_OrbaxTasksNeverRetrieved())
    # tensorstore reports an exception in a callback through either hook.
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not _late_callback_onto_a_closed_loop(kind, value, traceback):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable):
        if not _late_callback_onto_a_closed_loop(unraisable.exc_type, unraisable.exc_value,
                                                 unraisable.exc_traceback):
            previous_unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class Checkpointer:
    """Saves and restores a run's (state, config, metadata) under workdir/checkpoints.

    Use as a context manager, or call close(): an async save still in flight at exit would
    otherwise be lost.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
        )
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
        _report_write_failures_once()

    def save(self, step: int, state: Any, config_dict: Mapping[str, Any],
             metadata: Mapping[str, Any]) -> bool:
        """Starts writing checkpoint `step`; returns False, writing nothing, when `step` or a
        later step is already saved.

        With async_save the call returns once the arrays are copied to host memory (so the
        caller may donate or overwrite them); the files are written in a background thread.
        """
        with self._writing():
            return self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_keys_to_data(state)),
                config=ocp.args.JsonSave(dict(config_dict)),
                metadata=ocp.args.JsonSave(dict(metadata)),
            ))

    def latest_step(self) -> int | None:
        """The newest saved step (one still being written by this process included)."""
        return self._manager.latest_step()

    def restore(self, step: int | None = None, *,
                abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Reads (state, config_dict, metadata) of `step` (default: the latest).

        abstract_state: the state's structure as jax.ShapeDtypeStruct leaves (or arrays); each
        leaf's dtype and sharding say how it comes back (a leaf without a sharding gets the
        one it was saved with).
        """
        self.wait()  # a step this process is still writing can be read only once complete
        steps = self._manager.all_steps()
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self._manager.directory}")
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {self._manager.directory}; "
                            f"saved steps: {sorted(steps)}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_keys_to_data(abstract_state)),
            config=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore(),
        ))
        state = _data_to_keys(restored["state"], abstract_state)
        return state, restored["config"], restored["metadata"]

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is complete on disk."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self._manager.close()

    def complete_steps(self) -> list[int]:
        """The steps whose checkpoints orbax finished writing, as they are on disk now."""
        return sorted(ocp.path.step.checkpoint_steps(self._manager.directory))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk, a folder that became unwritable) as one UserError: an
        async save's failure surfaces at the next save, wait or close."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:  # orbax and tensorstore raise many types for I/O failures
            complete = self.complete_steps()
            kept = (f"the newest complete checkpoint, step {complete[-1]}, is kept"
                    if complete else "no checkpoint was complete")
            reason = next((line.strip() for line in str(err).splitlines() if line.strip()),
                          type(err).__name__)
            raise CheckpointWriteError(
                f"writing a checkpoint to {self._manager.directory} failed ({reason[:300]}): "
                f"training stopped; {kept}. Free space or fix the folder's permissions, then "
                "run the same command to resume") from err

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_compatible(workdir: str | os.PathLike, config_dict: Mapping[str, Any],
                     allowed_to_differ: Iterable[str] = RESUMABLE_KEYS) -> None:
    """Raises UserError if workdir holds checkpoints of a run with a different config.

    Configs are compared as flattened dotted keys; an entry of allowed_to_differ names a key
    or a whole section ("sample" allows "sample.seeds").
    """
    saved_config = _latest_saved_config(checkpoint_dir(workdir))
    if saved_config is None:
        return
    allowed = tuple(allowed_to_differ)
    differing = [key for key in _differing_keys(saved_config, _as_json(config_dict))
                 if not any(key == a or key.startswith(a + ".") for a in allowed)]
    if differing:
        raise UserError(f"workdir {workdir} holds a run with a different config "
                        f"(differs in: {', '.join(differing)}); "
                        "use a new --workdir or the same config")


def _latest_saved_config(directory: epath.Path) -> dict[str, Any] | None:
    if not directory.exists():
        return None
    # Not read_only: orbax warns "Given directory is read only" for every such manager, a
    # line each run would print; this manager only reads (create=False, no cleanup, no save).
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]


def _as_json(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The dict as it reads back from JSON (tuples become lists), so equal configs compare equal."""
    return json.loads(json.dumps(dict(tree)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    flat_a, flat_b = _flatten(a), _flatten(b)
    missing = object()
    return sorted(key for key in flat_a.keys() | flat_b.keys()
                  if flat_a.get(key, missing) != flat_b.get(key, missing))


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _keys_to_data(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract_keys_to_data(abstract_state: Any) -> Any:
    def key_data_target(leaf):
        if not _is_key(leaf):
            return leaf
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        # A key's NamedSharding spec also fits its data: the trailing key-data dim is replicated.
        return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                    sharding=getattr(leaf, "sharding", None))

    return jax.tree.map(key_data_target, abstract_state)


def _data_to_keys(restored: Any, abstract_state: Any) -> Any:
    def wrap(data, leaf):
        return jax.random.wrap_key_data(data, dtype=leaf.dtype) if _is_key(leaf) else data

    return jax.tree.map(wrap, restored, abstract_state)
