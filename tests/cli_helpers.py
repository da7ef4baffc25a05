"""What the command-line tests read back from a finished or interrupted run."""
from __future__ import annotations

import subprocess
from pathlib import Path


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one 'error:' line; no traceback around it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def complete_steps(workdir: Path) -> list[int]:
    """Checkpoint steps on disk that orbax finished (an unfinished save is a *-tmp folder)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
