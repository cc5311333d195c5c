"""A destination's state: up, down (paused with backoff) or held, and why, since when.

:class:`DestinationState` is what the workers of one destination know about the peer: after each
batch (:meth:`~DestinationState.update`) it is *up* when the channel's last association worked,
*down* when the batch failed to associate: paused with backoff, or *held* for ``retry.max_delay``
after a permanent rejection (the peer no longer knows our AE title...), its files staying queued.
A change is logged once, exported as ``forwarder_destination_up`` and recorded in the queue for
``forwarder status``. The pause follows :func:`forwarder.daemon.outcomes.backoff`. The threads
and batches that report to it are :mod:`forwarder.daemon.worker`.
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
        self._state: str | None = None  # "up" or "down" once known
        self._state_error: str | None = None
        self._state_since = 0.0
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()  # one state change at a time, log and queue alike

    @property
    def down_until(self) -> float:
        """Monotonic time before which no batch is claimed (0.0: not paused)."""
        return self._down_until

    def update(self, channel: SendChannel, association_failed: bool) -> None:
        """After a batch: the destination is down (paused with backoff, or held for
        ``retry.max_delay`` after a permanent rejection) if this batch failed to associate, up
        if the channel's last association worked. A batch that never tried to associate (every
        file failed before: unreadable...) changes nothing: ``channel.down`` is then an old
        error, and the files' failures are their own."""
        down = channel.down
        if not association_failed or down is None:
            if down is None and channel.associations_opened:
                with self._lock:
                    self._down_failures = 0
                self.set_state("up", None)
            return
        with self._lock:
            self._down_failures += 1
            if down.retryable:
                pause = backoff(self.retry, self._down_failures)
            else:
                pause = self.retry.max_delay
            self._down_until = max(self._down_until, time.monotonic() + pause)
        held = "" if down.retryable else "; destination held, its files stay queued"
        error = f"{down}{held}"
        if not self.set_state("down", error, pause):
            logger.debug("%s: still down (%s); next try in %.1fs", self.name, down, pause)

    def set_state(self, state: str, error: str | None, pause: float = 0.0) -> bool:
        """Record a change of the destination's state: logged once (an error when it goes
        down or its reason changes), exported, and written for ``forwarder status``. Returns
        False when nothing changed. Serialised, so the queue never keeps an older state than
        the last one logged."""
        with self._state_lock:
            return self._set_state_locked(state, error, pause)

    def _set_state_locked(self, state: str, error: str | None, pause: float) -> bool:
        with self._lock:
            if (state, error) == (self._state, self._state_error):
                return False
            previous = self._state
            self._state, self._state_error = state, error
            self._state_since = time.time()
            since = self._state_since
        if state == "down":
            logger.error(
                "%s: DOWN: %s; next try in %.1fs",
                self.name,
                error,
                pause,
                extra={"DESTINATION": self.name, "OUTCOME": "down"},
            )
        elif previous is not None:
            logger.warning(
                "%s: up again: an association was accepted; sending resumes",
                self.name,
                extra={"DESTINATION": self.name, "OUTCOME": "up"},
            )
        if self.metrics is not None:
            self.metrics.destination_up(self.name, state == "up")
        try:
            self.queue.set_destination_state(self.name, state, error, since=since)
        except ForwarderError as exc:
            logger.warning("%s: cannot record its state for status: %s", self.name, exc)
        return True

    @property
    def state(self) -> tuple[str | None, str | None, float]:
        """(state, why it is down, since when as Unix time); state None until known."""
        with self._lock:
            return self._state, self._state_error, self._state_since
