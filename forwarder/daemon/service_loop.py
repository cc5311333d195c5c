"""The service once started: its main loop, its health checks and its shutdown sequence.

:class:`ServiceLoop` is the part of :class:`~forwarder.daemon.service.Service` that runs on the
main thread after start-up. Each tick it takes the signals (SIGTERM/SIGINT stop, SIGHUP
reloads), checks the threads' health (only a loop that finds nothing wrong feeds systemd's
watchdog; what is wrong is logged when it changes and twice a minute), refreshes the status
line and the status page's rates, retries files that could not be moved and prunes the queue.
The shutdown stops taking files first: the watch-and-ingest process is told to stop watching
and the listener stops (new associations refused, open ones drained then aborted); then it
lets each worker finish the file it is sending and put claimed-but-unsent jobs back, then stops
proof of delivery; then the process, which finishes what they handed over and exits; then
metrics, and closes the queue and its lock.

Start-up, the wiring and SIGHUP's reload are :mod:`forwarder.daemon.service`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from forwarder.daemon.commitment import CommitmentKeeper
from forwarder.daemon.finish_relay import ChildFinisher
from forwarder.daemon.ingest_process import IngestProcess
from forwarder.daemon.listener import Listener
from forwarder.daemon.notify import Notifier
from forwarder.daemon.outcomes import LastOutcome
from forwarder.daemon.signals import SignalWaiter
from forwarder.daemon.status_page import StatusPage
from forwarder.daemon.verify_query import QueryVerifier
from forwarder.daemon.worker import DestinationWorkers
from forwarder.errors import ForwarderError
from forwarder.queue import Queue

logger = logging.getLogger(__name__)

_TICK = 1.0
_STATUS_EVERY = 5.0
_FINISH_RETRY_EVERY = 5.0  # files that could not be moved (disk full...): a cheap query
_PRUNE_EVERY = 3600.0
_PRUNE_AFTER = 7 * 86400.0
# Files one prune deletes at most (about a second): a backlog (the first prune after days
# stopped, the week-old burst of an outage) goes on at the next tick, not inside this one,
# which signals, reloads and systemd's watchdog wait for.
_PRUNE_SLICE = 10_000
_STOP_TIMEOUT = 10.0
_UNHEALTHY_LOG_EVERY = 30.0  # repeat "not feeding the watchdog" this often while it lasts
_LISTEN_DRAIN = 5.0  # seconds open listen associations have to end at SIGTERM, then aborted
# Seconds after a reload to look again for jobs of destinations it removed: a file routed by
# the old routes just before the swap (the listener's receiving process and the watch-and-ingest
# process get the new ones a moment later) may be queued for one after the reload's own look.
_ORPHANS_AGAIN = 2.0


class ServiceLoop:
    """The main loop and the shutdown (a part of :class:`~forwarder.daemon.service.Service`)."""

    # Set by Service (queue, finisher and watcher during start-up).
    notifier: Notifier
    metrics: Any
    commitment: CommitmentKeeper | None
    verifier: QueryVerifier | None
    status_page: StatusPage | None
    listener: Listener | None
    queue: Queue
    finisher: ChildFinisher
    watcher: IngestProcess
    _stop: threading.Event
    _reload: bool
    _signals: SignalWaiter | None
    _workers: dict[str, DestinationWorkers]
    _last: LastOutcome | None
    _unhealthy: list[str]
    _lock_fd: int | None

    def _do_reload(self) -> None:
        """SIGHUP: re-read and apply the config (:class:`~forwarder.daemon.service.Service`)."""
        raise NotImplementedError

    def _fail_orphans(self) -> None:
        """Jobs of destinations no longer configured to failed/ (Service)."""
        raise NotImplementedError

    def _sample_rates(self) -> None:
        if self.status_page is not None:
            try:
                self.status_page.sample()
            except ForwarderError as exc:
                logger.warning("status page: cannot sample the done counters: %s", exc)

    def _status_line(self) -> str:
        try:
            # stats(), not counts(): this runs every 5 s, and counting every job by status
            # read 7 days of finished ones each time.
            stats = self.queue.stats().values()
        except ForwarderError:
            return "queue unavailable"
        pending, in_flight = sum(s.pending for s in stats), sum(s.in_flight for s in stats)
        line = f"{pending} pending, {in_flight} in flight"
        down = [name for name, w in self._workers.items() if w.state[0] == "down"]
        if down:
            line += f"; DOWN: {', '.join(sorted(down))}"
        if self._last is not None:
            at = time.strftime("%H:%M:%S", time.localtime(self._last.at))
            line += f"; last: {self._last.destination} {self._last.outcome} at {at}"
        return line

    def _loop(self) -> None:
        next_status = next_finish = time.monotonic()
        next_prune = time.monotonic() + 60.0
        next_unhealthy_log = 0.0
        orphans_again: float | None = None
        assert self._signals is not None
        while not self._stop.is_set():
            for sig in self._signals.wait(_TICK):
                if sig == signal.SIGHUP:
                    self._reload = True
                elif sig == signal.SIGUSR1:
                    self.watcher.dump_threads()  # this process's stacks are written already
                else:
                    self._stop.set()
            if self._stop.is_set():
                break
            if self._reload:
                self._reload = False
                self._do_reload()
                orphans_again = time.monotonic() + _ORPHANS_AGAIN
            now = time.monotonic()
            if orphans_again is not None and now >= orphans_again:
                orphans_again = None
                try:
                    self._fail_orphans()
                except ForwarderError as exc:
                    logger.error("failing the jobs of removed destinations: %s", exc)
            problems = self._health_problems(now)
            if not problems:
                # Only a loop that is really making progress keeps systemd's watchdog fed.
                self.notifier.watchdog()
                if self._unhealthy:
                    logger.warning("healthy again; feeding systemd's watchdog")
                    self._unhealthy = []
            elif problems != self._unhealthy or now >= next_unhealthy_log:
                # Said when it changes and twice a minute, not every second until the restart.
                logger.error("not feeding systemd's watchdog: %s", "; ".join(problems))
                self._unhealthy = problems
                next_unhealthy_log = now + _UNHEALTHY_LOG_EVERY
            if self.listener is not None:
                self.listener.space.check()  # logs when the watermark is crossed, not per object
            if now >= next_status:
                self.notifier.status(self._status_line())
                self._sample_rates()
                next_status = now + _STATUS_EVERY
            if now >= next_finish:
                try:
                    self.finisher.retry_pending()
                except ForwarderError as exc:
                    logger.error("finishing files: %s", exc)
                next_finish = now + _FINISH_RETRY_EVERY
            if now >= next_prune:
                more = False
                try:
                    more = self.queue.prune(_PRUNE_AFTER, limit=_PRUNE_SLICE) >= _PRUNE_SLICE
                except ForwarderError as exc:
                    logger.error("pruning the queue: %s", exc)
                next_prune = now + (_TICK if more else _PRUNE_EVERY)

    def _health_problems(self, now: float) -> list[str]:
        problems = []
        if not self.watcher.healthy:
            problems.append(
                "the watcher of incoming is not running (its process died and is being "
                "restarted, a watch thread died, or the folder was removed)"
            )
        if not self.finisher.healthy:
            problems.append(
                "the finisher is not running (it runs in the watch-and-ingest process, which "
                "died and is being restarted; logged above)"
            )
        if self.listener is not None and not self.listener.healthy:
            problems.append("the listener no longer accepts associations (logged above)")
        for workers in list(self._workers.values()):
            problems += workers.problems(now)
        return problems

    def _shutdown(self) -> None:
        self.notifier.stopping()
        logger.info("stopping: finishing files in flight")
        # Proof of delivery first: its network waits are aborted now, in parallel with the
        # listener's drain and the workers' last files, not after them.
        for proof in (self.commitment, self.verifier):
            if proof is not None:
                proof.request_stop()
        # First: nothing new is taken. The watch-and-ingest process stops while the listener
        # drains; what the listener answered Success for is already queued.
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            watcher.request_stop()
        if self.listener is not None:
            self.listener.stop(_LISTEN_DRAIN)
            self.listener = None
        for w in self._workers.values():
            w.stop(_STOP_TIMEOUT)
        self._workers.clear()
        if self.commitment is not None:
            self.commitment.stop()
        if self.verifier is not None:
            self.verifier.stop()
        # Then the process finishes what the senders and proof of delivery handed over (its
        # finisher), and exits: the second message.
        finisher = getattr(self, "finisher", None)
        if finisher is not None:
            finisher.stop()
        if watcher is not None:
            watcher.stop()
        if self.metrics is not None:
            self.metrics.stop()
        queue = getattr(self, "queue", None)
        if queue is not None:
            queue.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        logger.info("stopped")
