"""Stop requests: preemption and time-limit signals end a run cleanly after the current step.

SLURM sends SIGTERM at a time limit (then SIGKILL after KillWait) and, when asked (``--signal``,
submitit's ``slurm_signal_delay_s``), SIGUSR1/SIGUSR2 ahead of it; Ctrl-C sends SIGINT. While a run
trains, these set a flag instead of killing the process: the loop finishes its optimizer step, saves
a checkpoint, and the run is recorded as ``interrupted`` (a relaunch resumes it). A second Ctrl-C
interrupts at once. After the run the previous handlers come back, and a signal that arrived is
handed on to the handler that was there before (submitit's requeue handler, for example) once the
checkpoint is on disk.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("lorasweep")

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")) if s)

_received: int | None = None


class Interrupted(Exception):
    """The run stopped on a signal after ``step`` (checkpoint saved)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; "
                         f"relaunch the same command to resume")


def requested() -> int | None:
    """The signal number that asked this process to stop, or None."""
    return _received


def _handler(signum, frame) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: now
    if _received is not None:
        return  # the first request decides (SLURM may follow USR2 with TERM)
    _received = signum
    log.warning("%s received: stopping after the current optimizer step (checkpoint saved)",
                signal.Signals(signum).name)


class StopOnSignal:
    """Context manager around one run (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        global _received
        _received = None
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, _handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        got = _received
        if got is not None and got != signal.SIGINT:
            prev = self.previous.get(got)
            if callable(prev):
                prev(got, None)  # e.g. submitit's handler: requeue now that the checkpoint exists
