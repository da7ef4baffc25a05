"""Progress as a person sees it: plain lines off a terminal, a live bar on one, silence on
processes other than 0, loss.png at the end of a run, and validation grids in TensorBoard."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spacetime_jax.plots import LOSS_PLOT
from spacetime_jax.training.loop import LoopSettings, TrainingLoop
from spacetime_jax.training.progress import Progress, track

# "step 3/6 loss 2 | 12.34 it/s, eta 0s, elapsed 0s": the line many tests and logs grep for.
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss [\d.e+-]+ \| [\d.]+ it/s, eta \d+s, "
                       r"elapsed \d+s$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(progress: Progress, steps: int) -> None:
    for step in range(1, steps + 1):
        progress.update(step, loss=float(step))
    progress.close()


def read_tensorboard_events(folder: Path) -> list:
    """Every event of the events files in `folder`, read from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4  # length, its crc, the record, its crc
    return events


def test_off_a_terminal_progress_prints_plain_lines_and_no_bar(capsys):
    run_steps(Progress(total_steps=6, log_every=3), 6)
    lines = capsys.readouterr().out.splitlines()
    # The first line of a run has a speed only from its second step on: 3 steps, 2 timed.
    assert len(lines) == 2 and all(STEP_LINE.match(line) for line in lines), lines
    assert [STEP_LINE.match(line).groups() for line in lines] == [("3", "6"), ("6", "6")]
    assert lines[0].startswith("step 3/6 loss 2 |")  # the mean of steps 1..3


def test_track_off_a_terminal_prints_a_line_per_interval_and_a_last_one(capsys):
    assert list(track(range(4), "rendering", unit="img", every_s=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == [f"rendering {n}/4" for n in range(1, 5)]
    assert lines[0].endswith("? img/s, elapsed 0s")  # the first item (compilation) is not timed
    assert re.fullmatch(r"rendering 4/4 \| [\d.]+ img/s, eta 0s, elapsed \d+s", lines[-1])
    # A short loop says nothing: a line at most every every_s seconds.
    sizes = list(track([[1, 2], [3]], "sampling", total=3, size_of=len))
    assert sizes == [[1, 2], [3]] and capsys.readouterr().out == ""


def test_processes_other_than_0_print_and_write_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    terminal = FakeTerminal()
    records = []
    progress = Progress(total_steps=4, log_every=1, workdir=tmp_path, stream=terminal)
    for step in range(1, 5):
        records.append(progress.update(step, loss=float(step)))
    progress.close()
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0]  # it still computes them
    assert list(track(range(3), "sampling", stream=terminal, every_s=0.0)) == [0, 1, 2]
    assert list(track(range(3), "sampling", every_s=0.0)) == [0, 1, 2]
    assert capsys.readouterr().out == "" and terminal.getvalue() == ""
    assert list(tmp_path.iterdir()) == []


def test_on_a_terminal_a_bar_shows_step_loss_and_speed():
    terminal, lines = FakeTerminal(), []
    progress = Progress(total_steps=6, log_every=3, log=lines.append, stream=terminal)
    run_steps(progress, 6)
    shown = terminal.getvalue()
    last_bar = shown.split("\r")[-1]
    assert last_bar.startswith("step 6/6, loss 5 |")  # the mean of steps 4..6
    assert re.search(r"\| [\d.]+it/s, eta 00:00, elapsed 00:\d\d", last_bar), last_bar
    # The plain lines still go to `log` (above the bar when log prints to the terminal).
    assert len(lines) == 2 and all(STEP_LINE.match(line) for line in lines)


def test_prints_during_a_terminal_bar_go_above_it_and_stdout_comes_back(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    progress = Progress(total_steps=2, log_every=1)  # log=print, stream=sys.stdout
    progress.update(1, loss=1.0)
    assert sys.stdout is not terminal  # prints go through the bar's writer now
    print("validation", "grid", "written")
    progress.update(2, loss=2.0)
    assert sys.stdout is terminal  # the last step closes the bar
    shown = terminal.getvalue()
    # Each printed line stands on its own line (the bar is cleared, then drawn again).
    assert "\nvalidation grid written\n" in shown.replace("\r", "\n")
    assert "step 2/2 loss 2 |" in shown and "step 2/2, loss 2 |" in shown


def test_track_on_a_terminal_draws_a_tqdm_bar():
    terminal = FakeTerminal()
    assert list(track(["a", "b", "c"], "sampling", unit="batch", stream=terminal)) == [
        "a", "b", "c"]
    last_bar = terminal.getvalue().split("\r")[-1]
    assert last_bar.startswith("sampling: 100%") and "3/3" in last_bar and "batch/s" in last_bar


def test_a_run_ends_with_loss_png_and_a_rerun_of_a_finished_run_leaves_it(tmp_path):
    run_steps(Progress(total_steps=4, log_every=2, workdir=tmp_path, log=lambda line: None), 4)
    plot = tmp_path / LOSS_PLOT
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (800, 300)  # one panel: loss
    written = plot.stat().st_mtime_ns
    Progress(total_steps=4, log_every=2, workdir=tmp_path, start_step=4).close()
    assert plot.stat().st_mtime_ns == written


def test_the_loop_puts_validation_grids_into_tensorboard_beside_the_scalars(tmp_path):
    grid = np.zeros((20, 30, 3), np.uint8)
    grid[:, :10] = (255, 0, 0)

    def step(state, step_number):
        return {"count": state["count"] + 1}, {"loss": jnp.float32(1.0 / step_number)}

    def validate(step_number, state):
        return {"score": float(step_number), "validation/crescent": grid}

    loop = TrainingLoop(tmp_path, LoopSettings(steps=4, log_every=1, checkpoint_every=4,
                                               async_checkpoints=False, validate_every=2),
                        {"test": 1}, log=lambda line: None)
    state = loop.run({"count": jnp.int32(0)}, 0, step, validate=validate)
    assert int(state["count"]) == 4
    images, scalars = {}, {}
    for event in read_tensorboard_events(tmp_path / "tensorboard"):
        for value in event.summary.value:
            if value.HasField("image"):
                images.setdefault(value.tag, []).append((event.step, value.image))
            else:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [s for s, _ in images["validation/crescent"]] == [2, 4]
    assert scalars["score"] == [(2, 2.0), (4, 4.0)]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    image = images["validation/crescent"][-1][1]
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert (image.height, image.width) == (20, 30)
    np.testing.assert_array_equal(decoded, grid)
    assert (tmp_path / LOSS_PLOT).is_file()


@pytest.mark.parametrize("steps", [1, 3])
def test_a_one_line_run_still_closes_cleanly(tmp_path, steps):
    lines = []
    run_steps(Progress(total_steps=steps, log_every=10, workdir=tmp_path, log=lines.append),
              steps)
    assert len(lines) == 1 and lines[0].startswith(f"step {steps}/{steps} ")
    assert (tmp_path / LOSS_PLOT).is_file()
