"""A destination's state: up, or down (the circuit breaker open, probed with C-ECHO), and why,
since when.

:class:`DestinationState` is what the workers of one destination know about the peer. After
each batch (:meth:`~DestinationState.update`) a connection-level failure (the association
refused, timed out, rejected, or aborted while a file was on it; not a DICOM failure status of
one file) counts against the destination. A failure to associate makes it *down* at once (its
workers pause with backoff, :func:`forwarder.daemon.outcomes.backoff`; the file tried is
charged, as any attempt). At ``DOWN_AFTER`` failures in a row, or at once for a permanent
rejection (the peer no longer knows our AE title...), the circuit breaker opens: its workers
claim nothing (its files wait, charged nothing), and one of them probes it
(:func:`forwarder.daemon.probe.probe`: C-ECHO, or a QIDO-RS GET for DICOMweb) after
``PROBE_FIRST`` seconds, then twice as long each time up to ``retry.max_delay``. The first
Success closes it and sending resumes ("up"). A change is logged once (one journal line per
change, never per file or per probe), exported as ``forwarder_destination_up`` and recorded in
the queue for ``forwarder status``; until this run's first change the metrics show the state
the previous run recorded (up or down), as ``forwarder status`` does. The threads and batches
that report to it are :mod:`forwarder.daemon.worker` and :mod:`forwarder.daemon.worker_batch`.
"""

from __future__ import annotations

import logging
import threading
import time

from forwarder.config import RetryPolicy
from forwarder.daemon.channels import SendChannel
from forwarder.daemon.outcomes import SendMetrics, backoff
from forwarder.errors import ForwarderError
from forwarder.queue import Queue

logger = logging.getLogger(__name__)

GATE_STATES = ("paused", "outside_window")
DOWN_AFTER = 3  # connection-level failures in a row that open the breaker
PROBE_FIRST = 1.0  # seconds before the first probe; doubled after each failed one


class DestinationState:
    """Up or down, why and since when, for one destination (shared by its worker threads)."""

    def __init__(
        self, name: str, retry: RetryPolicy, queue: Queue, metrics: SendMetrics | None
    ) -> None:
        self.name = name
        self.retry = retry
        self.queue = queue
        self.metrics = metrics
        self._down_until = 0.0
        self._down_failures = 0
        self._open = False  # the breaker: no claims, probes only
        self._probe_at = 0.0  # monotonic time of the next probe
        self._probes = 0  # failed probes since the breaker opened
        self._probing = False  # a thread is probing now
        self._breaker: str | None = None  # "up" or "down" once known
        self._breaker_error: str | None = None
        self._gate: str | None = None  # "paused" or "outside_window": shown over the breaker
        self._state: str | None = None  # what is published: the gate's, else the breaker's
        self._state_error: str | None = None
        self._state_since = 0.0
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()  # one state change at a time, log and queue alike
        # A gate state recorded by an earlier run (or before a reload): replaced by "up" as
        # soon as the gate opens, not left until the first association.
        self._stale_gate = False
        try:
            recorded = queue.destination_states().get(name)
        except ForwarderError:
            recorded = None
        self._stale_gate = recorded is not None and recorded.state in GATE_STATES
        if recorded is not None and recorded.state in ("up", "down") and metrics is not None:
            # Until this run's first attempt, the metrics say what the previous run recorded, as
            # ``forwarder status`` does: a restart fixes no peer, and a destination_up back at 1
            # would end an outage's alert (and claim "up" for good with nothing to send there).
            metrics.destination_up(name, recorded.state == "up")
            metrics.destination_state(name, recorded.state, recorded.since)

    @property
    def down_until(self) -> float:
        """Monotonic time before which no batch is claimed (0.0: not paused)."""
        return self._down_until

    @property
    def is_down(self) -> bool:
        """The breaker is open: claim nothing, probe when :meth:`take_probe` says so."""
        return self._open

    @property
    def unreachable(self) -> bool:
        """C-STORE holds back from the peer now: the breaker is open (until a probe answers)
        or a failed association is being waited out (until :attr:`down_until`). Both end on
        their own, so what waits on this (the proofs of delivery) never waits for good; but no
        probe goes out while the send window is closed, so outside it this is False and the
        proofs try for themselves (resting 30 s after a failure, as they did before)."""
        if self._gate == "outside_window":
            return False
        return self._open or time.monotonic() < self._down_until

    def update(self, channel: SendChannel, association_failed: bool, broke: bool = False) -> None:
        """After a batch: a failure to associate (``association_failed``, with ``channel.down``
        saying why) or an association that broke under a file (``broke``) counts against the
        destination; one that worked clears the count and closes the breaker. A batch that
        never tried to associate (every file failed before: unreadable...) changes nothing:
        ``channel.down`` is then an old error, and the files' failures are their own."""
        down = channel.down
        failed = association_failed and down is not None
        if not failed and not broke:
            if down is None and channel.associations_opened:
                with self._lock:
                    self._down_failures = 0
                    self._open = False
                self.set_state("up", None)
            return
        retryable = down.retryable if failed and down is not None else True
        reason = str(down) if failed else "the association broke while sending"
        # The peer's own wait (a STOW-RS 429/503 Retry-After): nothing is claimed or probed
        # before it. A shorter pause would claim files the channel can only hand back untried,
        # a batch that counts for nothing here, so the threads would claim them again at once.
        asked = max(0.0, down.not_before - time.monotonic()) if failed and down else 0.0
        with self._lock:
            self._down_failures += 1
            failures = self._down_failures
            trip = not retryable or failures >= DOWN_AFTER
            if trip:
                pause = self.probe_wait() or PROBE_FIRST
                if not self._open:
                    self._open = True
                    self._probes = 0
                    self._probe_at = time.monotonic() + PROBE_FIRST
                    pause = PROBE_FIRST
                if asked > pause:
                    self._probe_at = time.monotonic() + asked
                    pause = asked
            elif failed:
                pause = max(backoff(self.retry, failures), asked)
                self._down_until = max(self._down_until, time.monotonic() + pause)
        if not trip and not failed:
            # A broken association (the file was charged) counts towards the breaker but is
            # no reason to call the destination down yet: the next association may work.
            logger.debug("%s: %s (%d in a row)", self.name, reason, failures)
            return
        # The same text before and after the breaker opens: one journal line per change.
        held = "" if retryable else "; destination held, its files stay queued"
        if not self.set_state("down", f"{reason}{held}", pause):
            logger.debug(
                "%s: still down (%s, %d in a row%s); next try in %.1fs",
                self.name,
                reason,
                failures,
                ", probing with C-ECHO" if trip else "",
                pause,
            )

    def take_probe(self, now: float | None = None) -> bool:
        """True (once) when the breaker is open and a probe is due: the caller probes, then
        reports with :meth:`probed`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self._open or self._probing or now < self._probe_at:
                return False
            self._probing = True
            return True

    def probed(self, error: str | None) -> None:
        """The probe's answer: None (Success) closes the breaker; else the next probe waits
        twice as long (up to ``retry.max_delay``)."""
        with self._lock:
            self._probing = False
            if error is not None:
                self._probes += 1
                wait = min(self.retry.max_delay, PROBE_FIRST * 2.0 ** min(self._probes, 30))
                self._probe_at = time.monotonic() + max(wait, PROBE_FIRST)
            else:
                self._open = False
                self._down_failures = 0
                self._down_until = 0.0
        if error is not None:
            logger.debug("%s: still down (%s); next probe in %.1fs", self.name, error, wait)
            return
        self.set_state("up", None, reason="it answered C-ECHO")

    def probe_wait(self, now: float | None = None) -> float:
        """Seconds until the next probe is due (0 when due or not down)."""
        now = time.monotonic() if now is None else now
        return max(0.0, self._probe_at - now) if self._open else 0.0

    def set_state(
        self, state: str, error: str | None, pause: float = 0.0, *, reason: str = ""
    ) -> bool:
        """Record a change of the breaker's state ("up" or "down", with why). Returns False
        when nothing changed. See :meth:`_publish`."""
        with self._state_lock:
            with self._lock:
                if (state, error) == (self._breaker, self._breaker_error):
                    return False
                self._breaker, self._breaker_error = state, error
            self._publish(pause, reason)
            return True

    def set_gate(self, gate: str | None) -> None:
        """What holds the destination besides the breaker: "paused" (by an operator),
        "outside_window" (its send window is closed), or None."""
        with self._state_lock:
            with self._lock:
                if gate == self._gate and not self._stale_gate:
                    return
                self._gate = gate
            self._publish(0.0, "")

    def _paused_at(self, default: float) -> float:
        """When an operator paused it (the pause row's time, kept across restarts), so that a
        restart does not make the pause look new; ``default`` if it cannot be read."""
        try:
            return self.queue.paused().get(self.name, default)
        except ForwarderError:
            return default

    def _publish(self, pause: float, reason: str) -> None:
        """The state shown (the gate's, else the breaker's) changed, perhaps: logged once (an
        error when it goes down or its reason changes), exported, and written for ``forwarder
        status``. Called under the state lock, so the queue never keeps an older state than
        the last one logged."""
        with self._lock:
            # paused wins over down, down over outside_window
            shown: tuple[str | None, str | None] = (self._breaker, self._breaker_error)
            if self._gate == "paused" or (self._gate is not None and self._breaker != "down"):
                shown = (self._gate, None)
            state, error = shown
            if state is None and (self._stale_gate or self._state in GATE_STATES):
                # The gate opened before any association said how the peer is: nothing says
                # it is down, so "up" (not the gate's state left standing until a file goes).
                state = "up"
            self._stale_gate = False if state is not None else self._stale_gate
            if state is None or (state, error) == (self._state, self._state_error):
                return
            previous = self._state
            self._state, self._state_error = state, error
            self._state_since = time.time()
            since = self._state_since
            up = self._breaker != "down"
        fields = {"DESTINATION": self.name, "OUTCOME": state}
        if state == "down":
            logger.error("%s: DOWN: %s; next try in %.1fs", self.name, error, pause, extra=fields)
        elif state == "paused":
            logger.warning(
                "%s: PAUSED by an operator: nothing more is sent until `forwarder resume`",
                self.name,
                extra=fields,
            )
        elif state == "outside_window":
            logger.info("%s: outside its send window: sending waits", self.name, extra=fields)
        elif previous == "paused":
            logger.warning("%s: resumed by an operator; sending resumes", self.name, extra=fields)
        elif previous == "outside_window":
            logger.info("%s: inside its send window; sending resumes", self.name, extra=fields)
        elif previous is not None:
            logger.warning(
                "%s: up again: %s; sending resumes",
                self.name,
                reason or "an association was accepted",
                extra=fields,
            )
        if state == "paused":
            since = self._paused_at(since)
        if self.metrics is not None:
            self.metrics.destination_up(self.name, up)
            self.metrics.destination_state(self.name, state, since)
        try:
            self.queue.set_destination_state(self.name, state, error, since=since)
        except ForwarderError as exc:
            logger.warning("%s: cannot record its state for status: %s", self.name, exc)

    @property
    def state(self) -> tuple[str | None, str | None, float]:
        """(state shown, why it is down, since when as Unix time); state None until known."""
        with self._lock:
            return self._state, self._state_error, self._state_since
