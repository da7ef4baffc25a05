"""Preemption: SIGTERM (what a TPU VM or a scheduler sends before taking the machine) turns
into a request the training loop honours at a step boundary: save a checkpoint, exit."""
from __future__ import annotations

import signal
from typing import Any, Optional

import jax
import numpy as np


class StopSignal:
    """Records SIGTERM (what a TPU VM or a scheduler sends before taking the machine) instead
    of dying, so the loop can save a checkpoint at a step boundary and exit.

        with StopSignal() as stop:
            for step in ...:
                ...
                if stop.requested(): save, exit
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self._received = signum

    def __enter__(self) -> StopSignal:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        """The signal's name ("SIGTERM"), also on processes that learned of it from another."""
        return signal.Signals(self._received).name if self._received else ""

    def requested(self) -> bool:
        """Whether a signal came, on this process or (multi-host) on any: every process must
        stop at the same step, or the checkpoint's collective write would hang."""
        if jax.process_count() == 1:
            return self._received is not None
        from jax.experimental import multihost_utils
        # Decided from the gathered values alone: a signal landing on this process after the
        # gather must not make it stop a step before the others.
        received = int(np.max(multihost_utils.process_allgather(np.int32(self._received or 0))))
        if received:
            self._received = received
        return bool(received)
