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


class Pacer:
    """A token bucket in bytes per second, shared across threads; ``rate`` None: unlimited."""

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
        self._rate = rate
        self._tokens = 0.0
        self._last = clock()

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Change the rate (the window opened or closed); tokens and debt carry over."""
        with self._lock:
            if rate == self._rate:
                return
            self._refill(self._clock())
            self._rate = rate

    def slice_size(self) -> int:
        """How many bytes to write between two waits at the rate now."""
        rate = self._rate
        if rate is None:
            return 1 << 62
        return max(MIN_SLICE, min(MAX_SLICE, int(rate / 20)))

    def _refill(self, now: float) -> None:
        if self._rate is not None:
            burst = max(self._rate * BURST_SECONDS, MIN_SLICE)
            self._tokens = min(burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def take(self, nbytes: int) -> None:
        """Charge ``nbytes`` about to be written; sleeps until the bucket covers them."""
        with self._lock:
            rate = self._rate
            if rate is None:
                return
            self._refill(self._clock())
            self._tokens -= nbytes
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
