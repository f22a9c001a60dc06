"""Signals during a run: every one ends it with exit code 128 + N, never mid-write.

Start-up (`startup_signals`): SIGTERM and SIGHUP raise Interrupted, as SIGINT raises
KeyboardInterrupt, so the run stops with one line instead of a traceback or a kill.
The loop (`StopSignals`): SIGINT, SIGTERM and SIGHUP ask it to stop after the current step
(it writes resume.pt); a second signal raises Interrupted and stops it at once, unsaved.
Only the main thread can install handlers; elsewhere both do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run at once; exit code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _install(handler) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def startup_signals():
    """Every stop signal raises Interrupted until the block ends (or the loop takes over)."""
    previous = _install(_raise_interrupted)
    try:
        yield
    finally:
        _restore(previous)


class StopSignals:
    """The first stop signal sets `signum` (the loop stops after its step); a second one
    raises Interrupted (it stops now)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self._previous = _install(self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def restore(self) -> None:
        _restore(self._previous)
        self._previous = {}
