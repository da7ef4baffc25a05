"""`python -m benchmarks.suite`: the accelerator suite's CPU path on the shipped toy-world model.

One run at the smallest settings (one timed call, K = 1 and 2, float32 frozen modules: XLA's
CPU backend compiles the bf16 step about twice as slowly; the GPU/TPU default is bfloat16), as
a subprocess from the repository root: the printed table has every row with finite positive
numbers, names the device, and the JSON is written. Benchmarks are never timed assertions:
presence and sanity only, not speed.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks.common import known_peak_flops

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
# Row name -> the columns (after Benchmark and Setting) that must hold a number.
REQUIRED = {
    "NeTI step": ("Time", "Compile", "FLOPs", "MFU", "Peak memory", "Throughput"),
    "ELITE encode": ("Time", "Compile", "FLOPs", "MFU", "Throughput"),
    "NeTI, K": ("Time", "Compile", "Throughput"),
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--size", "tiny", "--dtype", "float32",
         "--steps", "1", "--warmup", "0", "--ks", "1,2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, out


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    headers, separator, *rows = cells
    assert set("".join(separator)) <= set("-:"), separator
    return headers, rows


def positive(cell: str) -> float:
    match = NUMBER.search(cell)
    assert match, cell
    value = float(match.group().replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_the_table_has_every_row_with_positive_numbers(suite):
    stdout, _ = suite
    headers, rows = table(stdout)
    names = [(row[0], row[1].split(";")[0]) for row in rows]
    assert names[0][0] == "NeTI step"
    for encoder in ("global", "global+local"):
        for batch in (1, 8):
            assert (f"ELITE encode, {encoder}", f"batch {batch}") in names, names
    assert [name for name, _ in names if name.startswith("NeTI, K")] == [
        "NeTI, K = 1", "NeTI, K = 2"]
    for row in rows:
        columns = next(cols for prefix, cols in REQUIRED.items() if row[0].startswith(prefix))
        for column in columns:
            positive(row[headers.index(column)])
    assert "concepts/h" in rows[-1][headers.index("Throughput")]


def test_the_device_is_named(suite):
    stdout, _ = suite
    device = jax.devices()[0]
    heading = stdout.splitlines()[0]
    assert f"`{device.device_kind}` × {jax.device_count()} ({jax.default_backend()})" in heading
    # A device kind not in the table of known peaks (a CPU): the peak is measured, and the
    # heading says so.
    known = known_peak_flops(device.device_kind) is not None
    assert ("datasheet" if known else "measured") in heading


def test_the_json_holds_the_numbers_beside_the_table(suite):
    stdout, out = suite
    record = json.loads((out / "suite.json").read_text())
    assert (out / "suite.md").read_text().strip() == stdout.strip()
    assert record["table"].strip() == stdout.strip()
    assert record["device"]["kind"] == jax.devices()[0].device_kind
    neti = record["neti_step"]
    for key in ("seconds", "compile_s", "flops", "micro_batch_flops", "peak_memory"):
        assert neti[key] > 0, (key, neti[key])
    assert neti["flops"] == pytest.approx(neti["grad_accum"] * neti["micro_batch_flops"])
    assert math.isfinite(neti["loss"])
    assert [(r["encoder"], r["batch"]) for r in record["elite_encode"]] == [
        ("global", 1), ("global+local", 1), ("global", 8), ("global+local", 8)]
    assert all(r["seconds_per_image"] > 0 and r["flops_per_image"] > 0
               for r in record["elite_encode"])
    assert [r["k"] for r in record["concepts"]] == [1, 2]
    assert all(r["concepts_per_hour"] > 0 for r in record["concepts"])
    assert record["peak_flops"]["flops"] > 0
