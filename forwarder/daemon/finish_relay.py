"""The daemon's finisher: file ids handed to the watch-and-ingest process, which moves them.

:class:`ChildFinisher` stands where the :class:`~forwarder.daemon.finisher.Finisher` stood in
the daemon, for its callers there (the senders' and proof of delivery's ``submit``, the
orphans' ``finish_ids``, the main loop's ``retry_pending``, ``healthy`` and ``stop``), and
sends each batch of ids to :mod:`forwarder.daemon.ingest_child` in one message
(:meth:`IngestProcess.finish <forwarder.daemon.ingest_process.IngestProcess.finish>`). There
the real Finisher runs on that process's queue connection: on a backlog of small files the
moves, their fsyncs and queue transactions no longer share the daemon's interpreter with the
senders.

Nothing is lost: a file's jobs are terminal in the queue before its id is handed over, so
an id sent while the process is down, restarting, or killed with it in hand is found by
the next process's sweep of the whole queue at its start (and a move it left half done, a
FINISHING row, by every sweep). The periodic sweep runs there too, every few seconds.

The listener's files (under ``incoming/.listen``) are known by the daemon's own Ingest:
the process sends back the paths there it moved (one message per batch that has any), and
after a restart the daemon's Ingest drops what it still holds of files finished meanwhile
(:meth:`~forwarder.daemon.ingest.Ingest.relearn`): a message lost with the process must not
leave a path known, or a modality's resend of that object would be refused.

Problems are as before: a move that fails records the queue's ``finish`` problem (from the
process, on its connection), which ``forwarder status`` and the status page read; a dead
finisher ends the process, whose restart the daemon logs and reports as unhealthy.

Before the process exists (start-up: the orphans failed at start, the first senders' ids)
ids wait here, and go to it once it runs (:meth:`ChildFinisher.attach`). At a stop while
the process is down, the daemon's own Finisher sweeps the queue instead: a clean stop leaves
no finished file in incoming.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from forwarder.daemon.finisher import Finisher
from forwarder.daemon.ingest_process import IngestProcess
from forwarder.errors import ForwarderError

logger = logging.getLogger(__name__)

_TAKE_OVER_AFTER = 30.0  # seconds without a finishing process before the daemon sweeps


class ChildFinisher:
    """Thread-safe. Hands file ids to the watch-and-ingest process's finisher."""

    def __init__(self, local: Finisher) -> None:
        # The daemon's own, for when no process finishes: start-up's recovery, and a stop
        # while the process is down.
        self._local = local
        self._process: IngestProcess | None = None
        self._early: list[int] = []  # ids handed over before the process runs
        self._lock = threading.Lock()
        self._down_since: float | None = None  # since when no process finishes
        self._took_over = False  # the daemon sweeps meanwhile (said once, and when it ends)

    def attach(self, process: IngestProcess) -> None:
        """The process runs: it finishes from now on (what was handed over before too)."""
        with self._lock:
            self._process = process
            early, self._early = self._early, []
        process.finish(early)

    def submit(self, file_ids: Sequence[int]) -> None:
        """Files whose jobs are all terminal: the process moves them (asynchronously)."""
        if not file_ids:
            return
        with self._lock:
            process = self._process
            if process is None:
                self._early.extend(file_ids)
                return
        process.finish(file_ids)

    def finish_ids(self, file_ids: Sequence[int]) -> None:
        """As :meth:`submit`: the move happens in the process, a moment later."""
        self.submit(file_ids)

    def retry_pending(self) -> None:
        """The process sweeps the queue itself, every few seconds. When it has not been
        finishing for :data:`_TAKE_OVER_AFTER` seconds (it keeps failing to start: the
        watcher cannot watch...), a slice of the sweep runs here: files keep leaving incoming
        (two finishers on one row are safe: each step is guarded by the row's state, and a
        target already there is not moved over)."""
        process = self._process
        if process is None or process.finishing:
            self._down_since = None
            if self._took_over:
                self._took_over = False
                logger.info("finish: a watch-and-ingest process finishes files again")
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= _TAKE_OVER_AFTER:
            if not self._took_over:
                self._took_over = True
                logger.warning(
                    "finish: no watch-and-ingest process has finished files for %.0f s; the "
                    "daemon finishes them itself until one does",
                    now - self._down_since,
                )
            self._local.retry_pending()

    @property
    def healthy(self) -> bool:
        """The process that finishes runs (before it is attached: start-up, healthy)."""
        process = self._process
        return process is None or process.finishing

    def stop(self, timeout: float = 10.0) -> None:
        """The senders have drained: the process finishes what it was handed, then exits.
        When it is not running (it died, and is not restarted once stopping), what it would
        have finished is finished here."""
        with self._lock:
            process = self._process
            early, self._early = self._early, []
        running = process is not None and process.finishing
        if process is not None:
            process.stop(timeout)
            # Killed at the deadline, or its finisher stuck: what it held is finished here.
            running = running and process.exit_code == 0
        if not running:
            try:
                self._local.finish_ids(early)
                found = self._local.sweep_all()
            except ForwarderError as exc:  # the next start's sweep finishes them
                logger.error("finishing files: %s", exc)
                return
            if found:
                logger.info("finish: %d file(s) finished here, the process being down", found)
