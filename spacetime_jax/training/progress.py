"""Progress of a long job: one line every few steps, and the same numbers as JSON lines.

    progress = Progress(total_steps=5000, log_every=100, workdir=run_dir)
    for step in range(1, 5001):
        ...
        progress.update(step, loss=loss)  # loss may stay a device array

A line shows the step, each metric averaged over the steps since the previous line, the
speed over those steps and the time left at that speed. Metrics are fetched from the device
only when a line is written, so calling `update` every step does not stall the step's
asynchronous dispatch. With a workdir (local or gs://), the records go to
workdir/metrics.jsonl (a resumed run keeps the lines up to its start step) and, with
tensorboardX installed, to workdir/tensorboard (`tensorboard --logdir WORKDIR`). In a
multi-process run every process calls `update` and only process 0 prints and writes: one
line per step for the run, one file.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from spacetime_jax.paths import PathLike, as_path, is_remote, write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class TensorBoard:
    """A tensorboardX writer into workdir/tensorboard. tensorboardX writes local files only:
    for a gs:// workdir it writes into a local folder that `flush` copies to the bucket."""

    def __init__(self, writer_class, workdir: PathLike):
        self._target = as_path(workdir) / TENSORBOARD_DIR
        self._local = (tempfile.mkdtemp(prefix="spacetime-tb-") if is_remote(workdir)
                       else str(self._target))
        self._writer = writer_class(self._local)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self._writer.flush()
        self._mirror()

    def close(self) -> None:
        self._writer.close()
        self._mirror()
        if is_remote(self._target):
            shutil.rmtree(self._local, ignore_errors=True)

    def _mirror(self) -> None:
        if not is_remote(self._target):
            return
        self._target.mkdir(parents=True, exist_ok=True)
        for local in as_path(self._local).iterdir():
            (self._target / local.name).write_bytes(local.read_bytes())


def tensorboard_writer(workdir: PathLike) -> Optional[TensorBoard]:
    """A TensorBoard writer for workdir/tensorboard, or None without tensorboardX."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return TensorBoard(SummaryWriter, workdir)


def read_metrics(workdir: PathLike, up_to_step: Optional[int] = None) -> list[dict]:
    """The records of workdir/metrics.jsonl (those up to `up_to_step`), oldest first."""
    path = as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r.get("step", 0) <= up_to_step]


def format_duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """`update(step, **metrics)` after each step; `step` counts finished steps (1..total).

    Writes a line (and, with `workdir`, a JSON line to workdir/metrics.jsonl) every
    `log_every` steps and at the last one. Speeds leave out the first step of the run (its
    compilation); the first line of a run logged at its first step shows no speed.
    """

    def __init__(self, total_steps: int, log_every: int, workdir: Optional[PathLike] = None,
                 start_step: int = 0, log: Callable[[str], Any] = print):
        """`start_step`: the step a resumed run starts after (its steps count from there;
        metrics.jsonl keeps the lines up to it and drops those a killed run wrote later)."""
        if total_steps < 1 or log_every < 1:
            raise ValueError(f"total_steps ({total_steps}) and log_every ({log_every}) must "
                             "be >= 1")
        self.total_steps = total_steps
        self.log_every = log_every
        self.metrics_path = as_path(workdir) / METRICS_FILE if workdir is not None else None
        self.log = log
        self.start_time = time.perf_counter()
        # The speed window opens when the first step returns: that step's time is mostly
        # compilation and would distort the speed and the time left.
        self._window: Optional[tuple[int, float]] = None
        self._start_step = start_step
        self._pending: dict[str, list] = {}
        self._tensorboard = None
        # Every process of a multi-process run steps through here; process 0 speaks for all.
        self._writes = jax.process_index() == 0
        self._records: list[dict] = []
        if self.metrics_path is not None and self._writes:
            self._records = read_metrics(workdir, start_step)
            self._tensorboard = tensorboard_writer(workdir)

    def writes_at(self, step: int) -> bool:
        """Whether `update(step)` writes a line (and so reads the metrics on the host)."""
        return step % self.log_every == 0 or step == self.total_steps

    def update(self, step: int, **metrics: Any) -> Optional[dict]:
        """Records the step's metrics; returns the logged record on steps that write one."""
        if step <= self._start_step:
            raise ValueError(f"step {step} is not after the start step {self._start_step}")
        now = time.perf_counter()
        if self._window is None:
            self._window = (step, now)
        for name, value in metrics.items():
            self._pending.setdefault(name, []).append(value)
        if not self.writes_at(step):
            return None
        return self._write(step, now)

    def _write(self, step: int, now: float) -> dict:
        window_step, window_time = self._window
        steps_per_s = ((step - window_step) / max(now - window_time, 1e-9)
                       if step > window_step else None)
        record = {"step": step}
        # One fetch per metric for all the steps since the last line.
        record.update({name: float(np.mean(np.asarray(values, np.float64)))
                       for name, values in self._pending.items()})
        record["steps_per_s"] = steps_per_s
        record["elapsed_s"] = now - self.start_time
        self._pending = {}
        self._window = (step, now)
        if not self._writes:
            return record

        shown = " ".join(f"{name} {value:.4g}" for name, value in record.items()
                         if name not in ("step", "steps_per_s", "elapsed_s"))
        if steps_per_s:
            speed = (f"{steps_per_s:.2f} it/s, eta "
                     f"{format_duration((self.total_steps - step) / steps_per_s)}")
        else:
            speed = "? it/s"
        self.log(f"step {step}/{self.total_steps} {shown} | {speed}, "
                 f"elapsed {format_duration(record['elapsed_s'])}")
        if self.metrics_path is not None:
            # Rewritten whole: a GCS object cannot be appended to, and a reader never sees
            # half a line.
            self._records.append(record)
            write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self._records))
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and value is not None:
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()
            if step == self.total_steps:
                self.close()
        return record

    def close(self) -> None:
        """Finishes the TensorBoard file (its writer thread flushes asynchronously); the last
        step does it, a run that stops early calls it."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
