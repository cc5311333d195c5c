"""Rate caps: a token bucket shared by every association (and STOW-RS request) of one
destination, charged by the bytes actually written to the socket.

:class:`Pacer` holds the destination's rate now (``max_rate``, or ``outside_window_rate`` while
its send window is closed; None: unlimited) and is charged with each write. A write is cut in
slices of about 1/20 s of the rate (1 KB to 64 KB) and each slice waits for its tokens, so a
500 MB file goes out smoothly, not in one burst followed by a long silence, and the watchdog sees
progress. The bucket holds at most ``BURST_SECONDS`` of tokens: an idle destination cannot save
up a burst, and over any long period the bytes sent stay within that burst of rate x time,
whatever the number of associations (they take their turns from one bucket: a slice's wait is
the debt it finds, so they interleave fairly).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST_SECONDS = 0.2  # tokens an idle bucket keeps, in seconds of its rate (absorbs late wake-ups)
MIN_SLICE = 1024
MAX_SLICE = 64 * 1024


class _Bucket:
    """One token bucket (not thread-safe: the Pacer's lock guards it)."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = 0.0
        self.last = now

    def refill(self, now: float) -> None:
        burst = max(self.rate * BURST_SECONDS, MIN_SLICE)
        self.tokens = min(burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def charge(self, nbytes: int, now: float) -> float:
        """Take ``nbytes``; how long to wait until the bucket covers them."""
        self.refill(now)
        self.tokens -= nbytes
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class Pacer:
    """Token buckets in bytes per second, shared across threads.

    ``rate`` is what every write is held to now (None: unlimited). While the send window is
    closed and urgent files may bypass it, :meth:`set_rate` holds urgent writes apart, to
    ``urgent_rate`` (the destination's ``max_rate``), and the others to both (``rate``, the
    outside-window rate, is the tighter): all of them together stay within ``max_rate``.
    """

    def __init__(
        self,
        rate: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        now = clock()
        self._main: _Bucket | None = None if rate is None else _Bucket(rate, now)
        self._urgent: _Bucket | None = None  # the cap urgent writes keep (None: the same)
        self._urgent_apart = False  # urgent writes are held to ``_urgent`` only

    @property
    def rate(self) -> float | None:
        """The rate ordinary writes are held to now (None: unlimited)."""
        return None if self._main is None else self._main.rate

    def set_rate(
        self, rate: float | None, *, urgent_apart: bool = False, urgent_rate: float | None = None
    ) -> None:
        """Change the rate (the window opened or closed); tokens and debt carry over. With
        ``urgent_apart``, urgent writes are held to ``urgent_rate`` (None: unlimited) instead,
        and the others to ``urgent_rate`` as well as ``rate``."""
        with self._lock:
            now = self._clock()
            self._main = self._retuned(self._main, rate, now)
            self._urgent_apart = urgent_apart
            self._urgent = self._retuned(self._urgent, urgent_rate if urgent_apart else None, now)

    @staticmethod
    def _retuned(bucket: _Bucket | None, rate: float | None, now: float) -> _Bucket | None:
        if rate is None:
            return None
        if bucket is None:
            return _Bucket(rate, now)
        if bucket.rate != rate:
            bucket.refill(now)
            bucket.rate = rate
        return bucket

    def slice_size(self, *, urgent: bool = False) -> int:
        """How many bytes to write between two waits at the rate now."""
        rate = self._effective(urgent)
        if rate is None:
            return 1 << 62
        return max(MIN_SLICE, min(MAX_SLICE, int(rate / 20)))

    def _effective(self, urgent: bool) -> float | None:
        bucket = self._urgent if urgent and self._urgent_apart else self._main
        return None if bucket is None else bucket.rate

    def limited(self, *, urgent: bool = False) -> bool:
        """Whether such a write is held to a rate at all now."""
        return self._effective(urgent) is not None

    def take(self, nbytes: int, *, urgent: bool = False) -> None:
        """Charge ``nbytes`` about to be written; sleeps until the buckets cover them. An urgent
        write while urgent files bypass the window is charged to the cap only; every other
        write to the rate now, and to the cap too while urgent writes are held apart."""
        with self._lock:
            now = self._clock()
            wait = 0.0
            if urgent and self._urgent_apart:
                if self._urgent is not None:
                    wait = self._urgent.charge(nbytes, now)
            else:
                if self._main is not None:
                    wait = self._main.charge(nbytes, now)
                if self._urgent_apart and self._urgent is not None:
                    wait = max(wait, self._urgent.charge(nbytes, now))
        if wait > 0:
            self._sleep(wait)
