"""XLA:CPU schedules for memory in this project, not for concurrency.

XLA:CPU orders a computation's operations for concurrency by default: it makes every value as
early as it can, and so keeps many alive at once. A training step's backward pass has
thousands of such values (every conv kernel reversed for its input gradient, activations),
and the step's memory nearly doubles: the NeTI step at SD 1.5 size, 256 px, batch 1 needs
3.92 GB of temporaries scheduled for concurrency and 1.23 GB scheduled for memory, and runs
no slower on 2 cores (benchmarks/neti_step.py prints both). GPUs and TPUs schedule for
memory already.

XLA reads the flag from XLA_FLAGS once, when jax starts its first backend; the same option
given to jax.jit(compiler_options=) is accepted and ignored by XLA:CPU's scheduler (measured:
no change). So importing spacetime_jax adds it to XLA_FLAGS, unless XLA_FLAGS names it
already (a user's choice stays).
"""
from __future__ import annotations

import os
from typing import MutableMapping

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def prefer_memory_scheduler(environ: MutableMapping[str, str] = os.environ) -> None:
    """XLA_FLAGS += SCHEDULER_FLAG=false, unless XLA_FLAGS already sets that flag."""
    flags = environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG not in flags:
        environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()
