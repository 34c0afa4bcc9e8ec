"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (how a cluster scheduler preempts a job).

The first signal asks the run to stop: the round in progress finishes (a round mutates the weights, the
optimizer and the logs, so it is either done whole or not at all), an evaluation in progress is
abandoned (it changes nothing, and the resumed run measures it again from the same state), a checkpoint
of the last completed round is written, and :class:`RunInterrupted` is raised. A second signal aborts at
once; the run then resumes from its last checkpoint, which is always whole (see fastrft.checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after writing a checkpoint of round ``round``; rerunning resumes it.
    A KeyboardInterrupt, so code that already handles Ctrl-C keeps working."""

    def __init__(self, signum: int, round_: int, checkpoint: str | None, resume: str = "rerun the same command"):
        self.signum, self.round, self.checkpoint = signum, round_, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing was completed)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after round {round_}; {where}; {resume} to "
                         "continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Abandon(Exception):
    """Raised inside an abandonable section (an evaluation) when a stop is requested."""


class StopRequest:
    """Catches SIGINT/SIGTERM while active; ``requested`` holds the first signal's number.

    ``describe(abandoning)`` says what the run does next, printed when the signal arrives: ``abandoning``
    is True when the signal interrupts an abandonable section (an evaluation)."""

    def __init__(self, describe=lambda abandoning: ("abandoning the evaluation" if abandoning
                                                     else "finishing the current round") + ", then writing a checkpoint"):
        self.requested: int | None = None
        self._describe = describe
        self._abandonable = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt  # the second signal: abort now
        self.requested = signum
        print(f"\nfastrft: {signal.Signals(signum).name} received: {self._describe(self._abandonable)} "
              "(send it again to abort at once)", file=sys.stderr, flush=True)
        if self._abandonable:
            self._abandonable = False
            raise _Abandon

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread; elsewhere the run keeps Python's
        # default behaviour (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process).
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def run_abandonable(self, fn):
        """``fn()``, unless a stop is requested before or during it: then None (what fn did is dropped)."""
        try:
            if self.requested is not None:
                return None
            self._abandonable = True
            try:
                return fn()
            finally:
                self._abandonable = False
        except _Abandon:
            return None
