"""Graceful stop on SIGTERM / SIGINT: the handler only records the request; the work stops at a safe point.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM and allow a grace
period. Saving from inside a signal handler could interrupt a half-written
file; instead the handler sets a flag, and each long loop asks ``stop()`` at the
points where stopping loses nothing (after a training step, an extraction
chunk, a mining block, a shard) and raises :class:`wildreid.core.errors.Stopped`.
A second signal means "now": the default action is restored and the signal
re-raised, so the process ends at once with 128 + the signal's number (what
resumes then is whatever the last checkpoint or finished block holds).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["GracefulStop", "ignore_stop_signals", "fault_point"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager installing the handlers; calling the object says whether a stop was asked for."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def fault_point(name: str) -> None:
    """The one fault-injection hook of the tests: WILDREID_SIGNAL_AT=<name> sends this process a SIGTERM
    here, as a scheduler would; WILDREID_KILL_AT=<name> a SIGKILL (the OOM killer).

    Points: ``step:N`` (after the N-th training step of the process), ``after-step:N`` (the same, once its
    checkpoint, if any, is written), ``extract:E`` and ``mine:E`` (training, epoch E), ``refresh:E:B``
    (after batch B of epoch E's dictionary rebuild), ``knn:B`` and ``rules:B`` (a mining block),
    ``knn-complete`` (the graph done, the rules not started), ``scanned``, ``mid-shard:FILE``,
    ``shard:FILE`` and ``manifest`` (``wildreid shard``), ``embed:R`` (``wildreid embed``, after the
    chunk that ends at row R).
    WILDREID_HANG_AT=<name> makes the process hang there (a stuck rank, for collective timeouts).
    WILDREID_SIGNAL_RANK=<r> limits these to rank r of a distributed run (torchrun's RANK).
    """
    rank = os.environ.get("WILDREID_SIGNAL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get("WILDREID_SIGNAL_AT") == name:
        os.kill(os.getpid(), signal.SIGTERM)
    if os.environ.get("WILDREID_KILL_AT") == name:  # a kill -9 at the same points
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("WILDREID_HANG_AT") == name:
        signal.pause()  # until a signal ends the process (the launcher's, when the group is stopped)


def ignore_stop_signals(*_args) -> None:
    """Worker initializer: a DataLoader or pool worker ignores SIGTERM/SIGINT and leaves stopping to its parent.

    A terminal's Ctrl-C and SLURM's scancel signal every process of the job; a worker
    that died of it would turn a graceful stop into a "worker exited unexpectedly" crash.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
