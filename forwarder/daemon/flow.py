"""What a destination may claim now, besides its breaker: paused by an operator, or outside its
send window (nothing, urgent files only, or all of them at ``outside_window_rate``), and at
which rate (``max_rate``), per :class:`FlowGate`.

A pause is a row in the queue database (``forwarder pause``, :mod:`forwarder.queue.control`),
read at most every ``PAUSE_POLL`` seconds, so a running daemon stops claiming within a second
(a file being sent finishes) and starts again within a second of ``forwarder resume``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from forwarder.config.flow import Window, window_open
from forwarder.errors import ForwarderError
from forwarder.queue import Queue

logger = logging.getLogger(__name__)

# Every FAIR_EVERY-th claim of a destination takes its oldest due jobs whatever their priority:
# the share reserved so that low (and normal) jobs are never starved by a stream of urgent ones.
FAIR_EVERY = 4
PAUSE_POLL = 0.25  # seconds between reads of the paused destinations
ALL_RANKS = 2  # claim every priority (PRIORITY_RANK: 0 urgent .. 2 low)
URGENT_ONLY = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to claim, up to which priority rank, and the state to show (None: the
    breaker's)."""

    claim: bool
    max_rank: int = ALL_RANKS
    state: str | None = None
    rate: float | None = None  # bytes per second now (None: unlimited)
    # Outside the window at outside_window_rate with urgent_bypasses_window: urgent files go
    # at urgent_rate (max_rate; None: unlimited), apart from the others.
    urgent_apart: bool = False
    urgent_rate: float | None = None


class FlowGate:
    """The pause and the send windows of one destination (shared by its worker threads).

    ``windows`` (none: always open) are judged against ``local_now()``, the local wall clock
    unless a test injects another; ``urgent_bypasses`` lets urgent files through a closed
    window."""

    def __init__(
        self,
        name: str,
        queue: Queue,
        *,
        windows: Sequence[Window] = (),
        urgent_bypasses: bool = False,
        max_rate: float | None = None,
        outside_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        local_now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.name = name
        self.queue = queue
        self.windows = tuple(windows)
        self.urgent_bypasses = urgent_bypasses
        self.max_rate = max_rate
        # Outside the window, with outside_window_rate: that rate (max_rate still caps it).
        self.outside_rate = outside_rate
        if outside_rate is not None and max_rate is not None:
            self.outside_rate = min(outside_rate, max_rate)
        self._clock = clock
        self._local_now = local_now
        self._lock = threading.Lock()
        self._paused = False
        self._read_at = -1e9
        self._claims = 0  # claims made, for the FAIR_EVERY share

    def paused(self, *, fresh: bool = False) -> bool:
        """Whether an operator paused it (read again after ``PAUSE_POLL`` seconds, or now when
        ``fresh``: before a claim, so that files queued after a pause are never claimed)."""
        now = self._clock()
        with self._lock:
            if not fresh and now - self._read_at < PAUSE_POLL:
                return self._paused
            self._read_at = now
        try:
            paused = self.name in self.queue.paused()
        except ForwarderError as exc:
            logger.warning("%s: cannot read whether it is paused: %s", self.name, exc)
            return self._paused
        with self._lock:
            self._paused = paused
        return paused

    def in_window(self) -> bool:
        """Whether the send window is open now (always, without windows)."""
        if not self.windows:
            return True  # no clock read: this is asked before every file
        return window_open(self.windows, self._local_now())

    def decide(self, *, fresh: bool = True) -> Decision:
        """What the workers may claim now: nothing when paused; outside the window every
        file at ``outside_window_rate`` if set (urgent files at ``max_rate`` with
        ``urgent_bypasses_window``), else urgent files only (``urgent_bypasses_window``), else
        nothing; inside it, every file at ``max_rate``. The pause is read from the queue each
        time (once a claim, one indexed read of a small table): a file queued after
        ``forwarder pause`` returned is never claimed (between files, ``may_send`` reads it at
        most every ``PAUSE_POLL``)."""
        # Claiming nothing, the file being sent (by a sibling thread) finishes at max_rate.
        if self.paused(fresh=fresh):
            return Decision(claim=False, state="paused", rate=self.max_rate)
        if self.in_window():
            return Decision(claim=True, rate=self.max_rate)
        if self.outside_rate is not None:
            return Decision(
                claim=True,
                state="outside_window",
                rate=self.outside_rate,
                urgent_apart=self.urgent_bypasses,
                urgent_rate=self.max_rate,
            )
        if self.urgent_bypasses:
            return Decision(
                claim=True, max_rank=URGENT_ONLY, state="outside_window", rate=self.max_rate
            )
        return Decision(claim=False, state="outside_window", rate=self.max_rate)

    def may_send(self, priority: int) -> bool:
        """Whether a claimed job of ``priority`` (rank) may still go: a pause (or a window
        closing) takes effect between two files, not only between two batches."""
        if not self.windows:  # the common case, before every file: no Decision built
            return not self.paused()
        decision = self.decide(fresh=False)
        return decision.claim and priority <= decision.max_rank

    def fair_turn(self) -> bool:
        """Whether this claim is one of the share taken oldest first, whatever the priority."""
        with self._lock:
            self._claims += 1
            return self._claims % FAIR_EVERY == 0
