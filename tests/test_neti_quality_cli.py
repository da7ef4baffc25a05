"""benchmarks/neti_quality.py's bad input: one line naming the problem, exit 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(*args, out):
    return subprocess.run([sys.executable, "benchmarks/neti_quality.py", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (("--methods", "elite"), "error: --methods elite: the ELITE rows need an encoder: pass "
                             "--elite-global DIR and/or --elite-local DIR"),
    (("--methods", "elite", "--elite-global", "no_such_run"),
     "error: ELITE encoder no_such_run does not exist (an ELITE training run or "),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    done = run_benchmark(*args, out=tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.json").exists()
