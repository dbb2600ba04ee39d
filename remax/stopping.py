"""Stopping a run cleanly on SIGTERM or SIGINT (Ctrl-C): a complete checkpoint of the last finished step, then out.

Schedulers (SLURM, Kubernetes preemption) send SIGTERM and kill the process some seconds later; Ctrl-C sends SIGINT.
While ``Trainer.train`` runs, ``StopSignals`` turns either into a request that the loop honours at the next step
boundary, where it saves a checkpoint of the step just finished. Inside a phase that changes no training state (a
step's rollout and reward, an evaluation) the request takes effect at once: the handler raises ``StopNow``, the phase
is abandoned and the checkpoint is of the last finished step, as if the phase had never started (its RNG states are
restored from the boundary), so a resumed run equals an uninterrupted one. A second Ctrl-C raises
``KeyboardInterrupt`` at once: the previous complete checkpoint stays the latest.

Under torchrun the ranks agree on stopping at step boundaries only (one rank abandoning a phase would leave the others
waiting in a collective).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from remax.distributed import DistInfo, all_reduce_max

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(BaseException):
    """Raised by the signal handler inside an abandonable phase. A ``BaseException``, so that a reward function's
    ``except Exception`` (or the reward wrapper's) cannot swallow it."""


class TrainingStopped(Exception):
    """``Trainer.train`` stopped on a signal after checkpointing: ``signal_name`` ("SIGTERM"/"SIGINT"), ``step`` (the
    last finished step) and ``checkpoint`` (the latest complete checkpoint's directory, or None)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"a complete checkpoint at step {step} in {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"stopped by {signal_name} after {step} finished step(s); {where}")


class StopSignals:
    """Context manager installing the SIGINT/SIGTERM handlers (main thread only; elsewhere it does nothing) and
    restoring the previous ones on exit. ``abandon``: whether phases may be abandoned mid-way (single process)."""

    def __init__(self, *, abandon: bool):
        self.abandon = abandon
        self.received: str | None = None
        self._abandonable = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self._abandonable:
            self._abandonable = False
            raise StopNow

    @contextlib.contextmanager
    def abandonable(self):
        """A phase the stop request may cut short (raising ``StopNow``); one already requested stops it before it
        starts."""
        if self.abandon and self.received is not None:
            raise StopNow
        outer, self._abandonable = self._abandonable, self.abandon
        try:
            yield
        finally:
            self._abandonable = outer

    def requested(self, info: DistInfo) -> bool:
        """Whether a stop was requested on any rank (a collective under torchrun: every rank calls it at the same
        step boundary; the ranks then agree on the signal's name too)."""
        if info.enabled:
            number = signal.Signals[self.received].value if self.received is not None else 0
            number = int(all_reduce_max(torch.tensor([float(number)], dtype=torch.float64), info)[0])
            self.received = signal.Signals(number).name if number else None
        return self.received is not None
