"""Signal handling that cannot deadlock.

A Python signal handler runs between two bytecodes of the main thread, possibly while that
thread holds a lock: a handler that calls ``threading.Event.set()`` (a lock and a condition)
can deadlock against itself when a second signal arrives (``make run``'s Ctrl-C delivers SIGINT
and then SIGTERM). Here the handlers only append to a list; the main thread sleeps in
``select`` on a socket that the interpreter writes to from C when a signal arrives
(``signal.set_wakeup_fd``), so it wakes at once. Install on the main thread only.
"""

from __future__ import annotations

import select
import signal
import socket
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any


class SignalWaiter:
    """``with SignalWaiter([SIGTERM, SIGINT]) as sigs: ... sigs.wait(1.0)``."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        self._received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._old_wakeup = -1
        self._reader, self._writer = socket.socketpair()
        for s in (self._reader, self._writer):
            s.setblocking(False)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)  # nothing that takes a lock

    def __enter__(self) -> SignalWaiter:
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        self._reader.close()
        self._writer.close()

    def wait(self, timeout: float) -> list[int]:
        """Sleep until a signal arrives, :meth:`wake` is called, or ``timeout``; return the
        signals received since the last call (oldest first)."""
        if not self._received:
            select.select([self._reader], [], [], timeout)
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        received, self._received = self._received, []
        return received

    def pending(self) -> tuple[int, ...]:
        """The signals received and not yet taken by :meth:`wait` (left for it)."""
        return tuple(self._received)

    def wake(self) -> None:
        """Wake :meth:`wait` from another thread."""
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already full: wait() will wake anyway
