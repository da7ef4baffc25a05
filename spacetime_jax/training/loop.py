"""The one training loop of every job: NeTI (one concept or a batch), both ELITE stages and the
toy-world pretraining stages.

A job builds its state, shardings and compiled step, then hands the loop what differs:

    loop = TrainingLoop(workdir, LoopSettings.from_config(config.train, ...), config_dict,
                        metadata, topology)
    state, start = loop.restore_or_init(init_state, abstract_checkpoint)
    ... compile the step for `state` ...
    state = loop.run(state, start, step, validate=validate)
    ... write the artifacts (all processes gather, process 0 writes) ...

What the loop owns, once for all jobs: orbax checkpoints every n steps, at the end and on
SIGTERM (then exit 143, and the same command resumes); resume from the newest complete
checkpoint, refused when the device topology would change the batch or learning rate;
progress (a bar on a terminal, lines otherwise), metrics.jsonl, TensorBoard scalars and
validation images, and WORKDIR/loss.png at the end (process 0; training/progress.py);
validation every m steps; a non-finite loss stops the run at the step where it happened with
the last good checkpoint kept. The finite check reads a step's loss one step late (while the
next step runs), and at once on steps that log, validate or checkpoint, so no non-finite
state is ever saved and no step waits for the host otherwise.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable, Mapping, Optional

import numpy as np

from spacetime_jax.errors import UserError
from spacetime_jax.parallel.multihost import lead_print, to_host
from spacetime_jax.paths import PathLike, as_path
from spacetime_jax.training.checkpoint import Checkpointer
from spacetime_jax.training.preemption import StopSignal
from spacetime_jax.training.progress import Progress

# A run stopped by SIGTERM exits with the status a shell reports for a SIGTERM death: a
# supervisor (Kubernetes, a retry loop) sees an unfinished job and starts it again, which
# resumes; 0 would read as finished.
PREEMPTED_STATUS = 128 + signal.SIGTERM
# Topology facts that change what a step computes: a resume must keep them.
TOPOLOGY_INVARIANTS = {"global_batch": "global batch", "learning_rate": "learning rate"}

StepFn = Callable[[Any, int], tuple[Any, Mapping[str, Any]]]
# Validation results: metrics (floats) and images ((H, W, 3) uint8 arrays: grids for TensorBoard).
ValidateFn = Callable[[int, Any], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    validate_every: int = 0  # 0: never

    @classmethod
    def from_config(cls, train, validate_every: int = 0) -> LoopSettings:
        """From a config's `train` section (steps, log_every, checkpoint_every,
        keep_checkpoints, async_checkpoints)."""
        return cls(steps=train.steps, log_every=train.log_every,
                   checkpoint_every=train.checkpoint_every,
                   keep_checkpoints=train.keep_checkpoints,
                   async_checkpoints=train.async_checkpoints, validate_every=validate_every)


def describe_topology(topology: Mapping[str, Any]) -> str:
    """'2 processes x 4 devices, mesh concept=1 data=8 model=1, global batch 16, lr 0.016'."""
    mesh = " ".join(f"{k}={v}" for k, v in topology.get("mesh", {}).items())
    return (f"{topology.get('processes', '?')} process(es) x {topology.get('devices', '?')} "
            f"devices, mesh {mesh or '?'}, global batch {topology.get('global_batch', '?')}, "
            f"lr {topology.get('learning_rate', '?'):g}")


def check_topology(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                   workdir: PathLike) -> None:
    """UserError when resuming `saved` on `current` would change the global batch or the
    learning rate; a checkpoint without a recorded topology is accepted."""
    if not saved:
        return
    changed = [words for key, words in TOPOLOGY_INVARIANTS.items()
               if key in saved and key in current and
               not np.isclose(float(saved[key]), float(current[key]), rtol=1e-9, atol=0.0)]
    if changed:
        raise UserError(
            f"workdir {workdir} was trained on {describe_topology(saved)}; this run has "
            f"{describe_topology(current)}: resuming would change the "
            f"{' and the '.join(changed)}. Resume on the saved topology, or use a new "
            "--workdir")


class TrainingLoop:
    """One run's checkpoints, resume and step loop (see the module doc)."""

    def __init__(self, workdir: PathLike, settings: LoopSettings, config_dict: Mapping[str, Any],
                 metadata: Optional[Mapping[str, Any]] = None,
                 topology: Optional[Mapping[str, Any]] = None,
                 log: Callable[[str], Any] = lead_print, nonfinite_hint: str = ""):
        self.workdir = as_path(workdir)
        self.settings = settings
        self.config_dict = dict(config_dict)
        self.topology = dict(topology or {})
        self.metadata = {**(metadata or {}), "topology": self.topology}
        self.log = log
        self.nonfinite_hint = nonfinite_hint
        self.checkpointer = Checkpointer(self.workdir, keep=settings.keep_checkpoints,
                                         async_save=settings.async_checkpoints)
        self.last_saved = 0

    # --- Restore or init.

    def restore_or_init(self, init_state: Callable[[], Any], abstract_checkpoint: Any,
                        from_checkpoint: Callable[[Any], Any] = lambda state: state
                        ) -> tuple[Any, int]:
        """(state, start step): the newest complete checkpoint, placed for the step by
        `from_checkpoint`, or `init_state()` at step 0."""
        start = self.checkpointer.latest_step() or 0
        if not start:
            return init_state(), 0
        restored, _, metadata = self.checkpointer.restore(start,
                                                          abstract_state=abstract_checkpoint)
        check_topology(metadata.get("topology"), self.topology, self.workdir)
        self.last_saved = start
        self.log(f"resumed from step {start} in {self.workdir}")
        return from_checkpoint(restored), start

    # --- The loop.

    def run(self, state: Any, start: int, step_fn: StepFn, *,
            to_checkpoint: Callable[[Any], Any] = lambda state: state,
            validate: Optional[ValidateFn] = None, loss_key: str = "loss") -> Any:
        """Steps start+1 .. settings.steps; returns the final state.

        step_fn(state, step) runs step `step` (1-based) and returns (state, metrics): device
        values, read on the host only when logged or checked. validate(step, state) runs every
        settings.validate_every steps and at the last on every process (it gathers what it
        needs; process 0 writes) and returns extra metrics for that step's line and images
        ((H, W, 3) uint8) for TensorBoard.
        """
        s = self.settings
        progress = Progress(s.steps, s.log_every, self.workdir, start_step=start,
                            log=self.log)
        unchecked: Optional[tuple[int, Any]] = None  # a step whose loss is not yet read
        try:
            with StopSignal() as stop:
                for step in range(start + 1, s.steps + 1):
                    state, metrics = step_fn(state, step)
                    if unchecked is not None:
                        self._check_finite(*unchecked)
                    unchecked = (step, metrics[loss_key])
                    validating = bool(s.validate_every and validate is not None and
                                      (step % s.validate_every == 0 or step == s.steps))
                    stopping = step < s.steps and stop.requested()
                    saving = step % s.checkpoint_every == 0 or step == s.steps or stopping
                    if validating or saving or progress.writes_at(step):
                        self._check_finite(*unchecked)
                        unchecked = None
                    extra = dict(validate(step, state)) if validating else {}
                    progress.add_images(step, {name: extra.pop(name) for name in list(extra)
                                               if np.ndim(extra[name]) == 3})
                    progress.update(step, **metrics, **extra)
                    if saving:
                        self.checkpointer.save(step, to_checkpoint(state), self.config_dict,
                                               self.metadata)
                        self.last_saved = step
                    if stopping:
                        self.checkpointer.wait()
                        self.log(f"stopped by {stop.name} after step {step}: checkpoint {step} "
                                 f"is saved in {self.workdir}/checkpoints; run the same "
                                 "command to resume")
                        raise SystemExit(PREEMPTED_STATUS)
        finally:
            progress.close()
            self.checkpointer.close()
        return state

    def _check_finite(self, step: int, loss: Any) -> None:
        values = np.asarray(to_host(loss))
        if np.isfinite(values).all():
            return
        raise UserError(
            f"loss is {values.tolist()} at step {step}: training stopped; the last good "
            f"checkpoint (step {self.last_saved}) is kept in {self.workdir}/checkpoints"
            + (f". {self.nonfinite_hint}" if self.nonfinite_hint else ""))
