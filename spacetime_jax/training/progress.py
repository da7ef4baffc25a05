"""Progress of a long job: a live bar on a terminal, plain lines elsewhere, and the same
numbers as JSON lines.

    progress = Progress(total_steps=5000, log_every=100, workdir=run_dir)
    for step in range(1, 5001):
        ...
        progress.update(step, loss=loss)  # loss may stay a device array
    progress.close()

Every `log_every` steps a line shows the step, each metric averaged over the steps since the
previous line, the speed over those steps and the time left at that speed:

    step 200/1000 loss 0.1234 | 3.21 it/s, eta 4m09s, elapsed 1m02s

When stdout is a terminal, a tqdm bar below those lines shows the step, the last logged
metrics, it/s and the ETA live, step by step (whatever is printed while it runs goes above
it). Metrics are fetched from the device only when a line is written, so calling `update`
every step does not stall the step's asynchronous dispatch. With a workdir (local or gs://),
the records go to workdir/metrics.jsonl (a resumed run keeps the lines up to its start step)
and, with tensorboardX installed, to workdir/tensorboard (`tensorboard --logdir WORKDIR`),
validation images too (`add_images`); `close` draws workdir/loss.png from the records. In a
multi-process run every process calls `update` and only process 0 prints and writes: one
line per step for the run, one file.

`track` is the same for any other loop (sampling batches, rendering a data set): a bar on a
terminal, else a plain line every LINE_EVERY_S seconds, nothing on processes other than 0.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TextIO, TypeVar

import jax
import numpy as np
from tqdm import tqdm

from spacetime_jax.paths import PathLike, as_path, is_remote, write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LINE_EVERY_S = 30.0  # `track`'s plain lines: at most one per this many seconds
# The training bar: "step 40/200, loss 0.1234 |#####     | 3.21it/s, eta 00:50, elapsed 00:12".
STEP_BAR_FORMAT = ("step {n_fmt}/{total_fmt}{postfix} |{bar}| {rate_fmt}, eta {remaining}, "
                   "elapsed {elapsed}")
T = TypeVar("T")


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

    def add_image(self, name: str, image: np.ndarray, step: int) -> None:
        """`image`: (H, W, 3) uint8."""
        self._writer.add_image(name, image, step, dataformats="HWC")

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


def speed_text(done: int, total: Optional[int], per_s: Optional[float],
               unit: str = "it") -> str:
    """'3.21 it/s, eta 4m09s' ('? it/s' before there is a speed; no eta without a total)."""
    if not per_s:
        return f"? {unit}/s"
    eta = f", eta {format_duration((total - done) / per_s)}" if total else ""
    return f"{per_s:.2f} {unit}/s{eta}"


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def is_lead_process() -> bool:
    return jax.process_index() == 0


class _AboveBars:
    """sys.stdout while a bar is drawn on it: each printed line goes above the bars
    (tqdm.write), so that prints do not break the bar's line."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        # print() writes its parts and its newline separately: whole lines only.
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False  # a bar opened meanwhile (validation sampling) writes lines instead

    def finish(self) -> None:
        if self._partial:
            tqdm.write(self._partial, file=self.stream)
            self._partial = ""

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...
        return getattr(self.stream, name)


class _StepBar:
    """The training bar on a terminal stream; prints go above it while it is open."""

    def __init__(self, total: int, done: int, stream: TextIO):
        self.bar = tqdm(total=total, initial=done, file=stream, bar_format=STEP_BAR_FORMAT,
                        dynamic_ncols=True)
        self._redirect = _AboveBars(stream) if sys.stdout is stream else None
        if self._redirect is not None:
            sys.stdout = self._redirect

    def advance_to(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def show(self, metrics: str) -> None:
        self.bar.set_postfix_str(metrics, refresh=True)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.finish()
            if sys.stdout is self._redirect:
                sys.stdout = self._redirect.stream
        self.bar.close()


class Progress:
    """`update(step, **metrics)` after each step; `step` counts finished steps (1..total).

    Writes a line (and, with `workdir`, a JSON line to workdir/metrics.jsonl) every
    `log_every` steps and at the last one, through `log`. Speeds leave out the first step of
    the run (its compilation); the first line of a run logged at its first step shows no
    speed. On a terminal `stream` (default: sys.stdout) a bar shows every step.
    """

    def __init__(self, total_steps: int, log_every: int, workdir: Optional[PathLike] = None,
                 start_step: int = 0, log: Callable[[str], Any] = print,
                 stream: Optional[TextIO] = None):
        """`start_step`: the step a resumed run starts after (its steps count from there;
        metrics.jsonl keeps the lines up to it and drops those a killed run wrote later)."""
        if total_steps < 1 or log_every < 1:
            raise ValueError(f"total_steps ({total_steps}) and log_every ({log_every}) must "
                             "be >= 1")
        self.total_steps = total_steps
        self.log_every = log_every
        self.workdir = workdir
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
        self._writes = is_lead_process()
        self._stream = sys.stdout if stream is None else stream
        self._bar: Optional[_StepBar] = None  # opened by the first update, on a terminal
        self._records: list[dict] = []
        self._logged = 0  # records written by this run (a finished run's rerun adds none)
        self._closed = False
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
            if self._writes and is_terminal(self._stream):
                self._bar = _StepBar(self.total_steps, step, self._stream)
        if self._bar is not None:
            self._bar.advance_to(step)
        for name, value in metrics.items():
            self._pending.setdefault(name, []).append(value)
        if not self.writes_at(step):
            return None
        return self._write(step, now)

    def add_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(H, W, 3) uint8 images (validation grids) into TensorBoard at `step`, when
        tensorboardX is installed; call it before `update(step)`."""
        if self._tensorboard is None or not images:
            return
        for name, image in images.items():
            self._tensorboard.add_image(name, np.asarray(image, np.uint8), step)
        self._tensorboard.flush()

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
        if self._bar is not None:
            self._bar.show(shown)
        self.log(f"step {step}/{self.total_steps} {shown} | "
                 f"{speed_text(step, self.total_steps, steps_per_s)}, "
                 f"elapsed {format_duration(record['elapsed_s'])}")
        if self.metrics_path is not None:
            # Rewritten whole: a GCS object cannot be appended to, and a reader never sees
            # half a line.
            self._records.append(record)
            self._logged += 1
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
        """Ends the bar, finishes the TensorBoard file (its writer thread flushes
        asynchronously) and draws workdir/loss.png; the last step does it, a run that stops
        early calls it. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._logged:
            from spacetime_jax.plots import write_loss_plot  # matplotlib: only when drawing
            write_loss_plot(self.workdir, self._records)


def track(items: Iterable[T], what: str, *, total: Optional[int] = None, unit: str = "it",
          size_of: Optional[Callable[[T], int]] = None, stream: Optional[TextIO] = None,
          every_s: float = LINE_EVERY_S) -> Iterator[T]:
    """Yields `items`, showing how far the loop over them is: a tqdm bar when `stream`
    (default: sys.stdout) is a terminal, else a line "WHAT n/total | 2.50 unit/s, eta 12s,
    elapsed 1m02s" at most every `every_s` seconds (and a last one if any was written);
    nothing on processes other than 0. Each item counts `size_of(item)` (default 1) towards
    `total` (default len(items)). Speeds leave out the first item (its compilation)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    stream = sys.stdout if stream is None else stream
    size_of = size_of or (lambda item: 1)
    if not is_lead_process():
        yield from items
        return
    if is_terminal(stream):
        with tqdm(total=total, desc=what, unit=unit, file=stream, dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update(size_of(item))
        return
    start = last_line = time.perf_counter()
    done, first, wrote = 0, None, False
    for item in items:
        yield item
        done += size_of(item)
        now = time.perf_counter()
        first = first or (done, now)
        finished = total is not None and done >= total
        if now - last_line >= every_s or (finished and wrote):
            per_s = (done - first[0]) / (now - first[1]) if done > first[0] else None
            print(f"{what} {done}/{total if total is not None else '?'} | "
                  f"{speed_text(done, total, per_s, unit)}, "
                  f"elapsed {format_duration(now - start)}", file=stream, flush=True)
            last_line, wrote = now, True
