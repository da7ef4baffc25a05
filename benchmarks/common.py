"""Timing, FLOP and memory helpers shared by the benchmarks.

Every number printed by a benchmark comes from one of these functions, so the U-Net, NeTI and
ELITE benchmarks measure the same way: the median of repeated calls after warm-up, each call
blocked on its result; compile time measured apart from the steps (AOT lower + compile); FLOPs
and memory as XLA reports them for the compiled step, or None ("n/a") where it reports nothing.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

# Matmul side used to measure the peak: big enough to saturate the device, small enough to
# run in about a second on a laptop CPU.
PEAK_MATMUL_SIDE_CPU = 2048
PEAK_MATMUL_SIDE_ACCELERATOR = 8192


def time_fn(fn: Callable[[], Any], *, steps: int, warmup: int,
            block: Callable[[Any], Any] = jax.block_until_ready) -> tuple[list[float], Any]:
    """Seconds per call of `fn()` for `steps` calls after `warmup` untimed ones, and the
    last call's result (for a correctness check that costs no extra call).

    `block` waits for the result (jax dispatches asynchronously); for synchronous work
    (PyTorch on CPU) pass `lambda out: out`.
    """
    for _ in range(warmup):
        block(fn())
    times, output = [], None
    for _ in range(steps):
        start = time.perf_counter()
        output = block(fn())
        times.append(time.perf_counter() - start)
    return times, output


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """AOT `jitted.lower(*args).compile()`; returns (compiled, seconds it took)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def cost_analysis_flops(compiled: Any) -> Optional[float]:
    """XLA's FLOP count of a compiled computation, or None if the backend gives none.

    `cost_analysis()` returns a dict, or (older jax / some backends) a list of dicts, one per
    computation: their 'flops' are summed.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # backends without cost analysis raise rather than return None
        return None
    if analysis is None:
        return None
    entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    flops = [entry["flops"] for entry in entries if entry and "flops" in entry]
    return float(sum(flops)) if flops else None


def _memory_stats(compiled: Any):
    try:
        return compiled.memory_analysis()
    except Exception:  # not implemented on some backends
        return None


def memory_analysis_bytes(compiled: Any) -> Optional[int]:
    """Device memory of one call of a compiled computation: arguments + outputs + temporaries
    (less outputs aliased to donated arguments), or None if the backend gives none."""
    stats = _memory_stats(compiled)
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def temporary_bytes(compiled: Any) -> Optional[int]:
    """Device memory of a compiled computation's temporaries (activations, gradients,
    intermediate copies), or None if the backend gives none."""
    stats = _memory_stats(compiled)
    return None if stats is None else int(stats.temp_size_in_bytes)


def memory_fields(compiled: Any) -> dict[str, Optional[int]]:
    """{"memory": memory_analysis_bytes, "arguments": ..., "temporaries": ...} in bytes
    (None where the backend gives none)."""
    stats = _memory_stats(compiled)
    return {"memory": memory_analysis_bytes(compiled),
            "arguments": None if stats is None else int(stats.argument_size_in_bytes),
            "temporaries": temporary_bytes(compiled)}


def memory_parts(compiled: Any) -> Optional[str]:
    """The same memory, itemized, in MB; None if the backend gives none."""
    stats = _memory_stats(compiled)
    if stats is None:
        return None
    mb = lambda n: f"{n / 2**20:.1f}"
    return (f"arguments {mb(stats.argument_size_in_bytes)} + outputs "
            f"{mb(stats.output_size_in_bytes)} + temporaries {mb(stats.temp_size_in_bytes)} "
            f"- aliased {mb(stats.alias_size_in_bytes)} MB")


def matmul_peak_flops(side: Optional[int] = None, *, steps: int = 5, warmup: int = 2,
                      dtype: Any = jnp.float32) -> tuple[float, int]:
    """Measured FLOP/s of a jitted square matmul on the default device; returns (FLOP/s, side).

    The fastest of `steps` calls is taken: it is the peak this device reaches on the
    friendliest possible workload, the yardstick for a model's achieved FLOP/s.
    """
    device = jax.devices()[0]
    if side is None:
        side = PEAK_MATMUL_SIDE_CPU if device.platform == "cpu" else PEAK_MATMUL_SIDE_ACCELERATOR
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (side, side), dtype)
    b = jax.random.normal(keys[1], (side, side), dtype)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    times, _ = time_fn(lambda: matmul(a, b), steps=steps, warmup=warmup)
    best = min(times)
    return 2.0 * side ** 3 / best, side


# Dense bf16 peak FLOP/s per chip of known accelerators, by jax's device_kind (matched whole,
# case-insensitively): the vendors' datasheet figures, without sparsity.
PEAK_BF16_FLOPS = (
    (r"TPU v4", 275e12, "TPU v4"),
    (r"TPU v5 ?(lite|e)", 197e12, "TPU v5e"),
    (r"TPU v5p?", 459e12, "TPU v5p"),
    (r"TPU v6 ?(lite|e)", 918e12, "TPU v6e"),
    (r"NVIDIA H100.*PCIe.*", 756e12, "H100 PCIe"),
    (r"NVIDIA H100.*NVL.*", 835e12, "H100 NVL"),
    (r"NVIDIA H100.*", 989e12, "H100 SXM"),
    (r"NVIDIA H200.*", 989e12, "H200"),
    (r"NVIDIA A100.*", 312e12, "A100"),
    (r"NVIDIA L4", 121e12, "L4"),
)


def known_peak_flops(device_kind: str) -> Optional[tuple[float, str]]:
    """(dense bf16 peak FLOP/s, the chip's name) of a known device kind, else None."""
    for pattern, flops, name in PEAK_BF16_FLOPS:
        if re.fullmatch(pattern, device_kind.strip(), flags=re.IGNORECASE):
            return flops, name
    return None


def device_peak_bytes(device: Any = None) -> Optional[int]:
    """The allocator's peak bytes in use on `device` (default: the first) since the process
    started, or None where the backend keeps no such count (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented on some backends
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def device_description() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} (platform {device.platform}, {jax.device_count()} device(s))"


def format_or_na(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio_or_none(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join([str(first).ljust(widths[0])]
                         + [str(c).rjust(w) for c, w in zip(rest, widths[1:])])

    rule = "-" * len(line(headers))
    return "\n".join([line(headers), rule] + [line(row) for row in rows])
