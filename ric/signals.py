"""Stopping long generation cleanly on SIGTERM (what a cluster scheduler sends before preemption) or SIGINT.

Lightning's own SIGTERM handler only records the signal and acts at the next training batch, which inside
an online round or a sweep can be an hour away. Generation loops call :func:`check_stop` between chunks:
after a stop request it raises :class:`StopRequested`, once what was generated is on disk.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_requested: list[int] = []


class StopRequested(SystemExit):
    """A stop signal arrived; raised at the next chunk boundary of a generation loop. A ``SystemExit`` with
    the shell's status for the signal (143 for SIGTERM, 130 for SIGINT), so Lightning tears down cleanly and
    the process ends without a traceback, non-zero."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(128 + int(signum))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"stopped by {self.name}: what was generated so far is kept"


def request_stop(signum: int = signal.SIGTERM, frame: Any = None) -> None:
    """Signal handler: remember the request (the loop acts on it at its next chunk boundary)."""
    if not _requested:
        _requested.append(int(signum))


def stop_requested() -> int | None:
    """The signal number of a pending stop request, if any."""
    return _requested[0] if _requested else None


def check_stop(trainer: Any = None) -> None:
    """Raise :class:`StopRequested` if a stop was requested (here, or by SIGTERM through Lightning)."""
    if not _requested and trainer is not None and getattr(trainer, "received_sigterm", False):
        request_stop(signal.SIGTERM)
    if _requested:
        raise StopRequested(_requested[0])


def clear_stop() -> None:
    _requested.clear()


@contextlib.contextmanager
def graceful_stop(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn ``signals`` into stop requests for the duration (main thread only; elsewhere nothing changes).
    A second SIGINT interrupts at once, as Ctrl-C twice usually does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and _requested:
            raise KeyboardInterrupt
        if not _requested:
            print(f"\n{signal.Signals(signum).name}: stopping after the chunk being generated (Ctrl-C again stops now)",
                  flush=True)  # fmt: skip
        request_stop(signum, frame)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
