"""Stopping a long job cleanly when the cluster asks it to.

SLURM sends SIGTERM (or the signal named by `sbatch --signal=SIG@SECONDS`) some time before it
kills a job at its time limit, or when it preempts it. Inside `handle_signals()` such a signal only
sets a flag; the prune job's layer loop and the rotation training poll it (`check`) at points
where the state on the host is consistent, write a checkpoint of every finished layer, and stop
with `Preempted`, so the retry resumes and an attempt loses at most the layer in progress
(`pipeline.run_pipeline`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []


class Preempted(RuntimeError):
    """The job was asked to stop (a signal in `SIGNALS`); its progress is checkpointed."""


def requested() -> str | None:
    """The name of the signal received inside `handle_signals`, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise Preempted if a stop was requested."""
    name = requested()
    if name is not None:
        raise Preempted(f"received {name}")


def step_callback(*_args: object) -> bool:
    """A `rotation.train.train_rotation` callback that stops the training when asked to."""
    check()
    return False


@contextlib.contextmanager
def handle_signals(signals: tuple[signal.Signals, ...] = SIGNALS) -> Iterator[None]:
    """Within the block, `signals` set the flag `requested` reads instead of ending the process;
    the previous handlers come back afterwards. Outside the main thread (where Python cannot
    install handlers) nothing is installed."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not _received:
            log.warning("%s received: checkpointing the finished layers, then stopping", name)
        _received.append(name)

    previous = {sig: signal.signal(sig, note) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
