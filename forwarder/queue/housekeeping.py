"""Housekeeping: pruning old FINISHED files and giving their space back to the filesystem.

The daemon prunes hourly (a large backlog a slice a second). Rows are deleted in small
batches and freed pages go back with ``incremental_vacuum`` a few at a time, each its own short
transaction with a pause after it, so that workers ack and the listener's receiving process
queues what it received in between; the cumulative counters of :mod:`~forwarder.queue.stats`
survive. Then the WAL is truncated by
a checkpoint that waits for no reader. No job changes state here.
"""

from __future__ import annotations

import logging
import sqlite3

from forwarder.queue.sql import PRUNE
from forwarder.queue.store import Store, clock

logger = logging.getLogger(__name__)

_PRUNE_BATCH = 100  # files (with their jobs) deleted per transaction: 1-2 ms of the lock
_VACUUM_PAGES = 64  # freed pages given back per transaction: as long


class Housekeeping(Store):
    """Pruning (a part of :class:`forwarder.queue.Queue`)."""

    def prune(self, older_than: float, *, now: float | None = None, limit: int = 0) -> int:
        """Delete FINISHED files (and their jobs) finished more than ``older_than`` seconds ago,
        oldest first, in small transactions, then return freed pages to the filesystem and
        truncate the WAL. At most ``limit`` files (0: all), so that a caller's loop is not held
        for long: it calls again while this returns ``limit``. Returns how many files were
        deleted. Counters in stats() are kept."""
        params = {"cutoff": clock(now) - older_than, "batch": _PRUNE_BATCH}
        deleted = 0

        def step(conn: sqlite3.Connection) -> bool:
            nonlocal deleted
            if limit:
                params["batch"] = min(_PRUNE_BATCH, limit - deleted)
            n = conn.execute(PRUNE, params).rowcount
            deleted += n
            return n < params["batch"] or deleted == limit

        self._in_slices("pruning finished files", step)
        if deleted:
            self._give_back()
        self._checkpoint()
        if deleted:
            logger.info("pruned %d finished files from %s", deleted, self._path)
        return deleted

    def _give_back(self) -> None:
        """Freed pages back to the filesystem, ``_VACUUM_PAGES`` a transaction (all of them in
        one held the write lock for seconds after a large prune)."""

        def step(conn: sqlite3.Connection) -> bool:
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            # execute() steps the pragma once, which gives one page back
            for _ in range(min(free, _VACUUM_PAGES)):
                conn.execute("PRAGMA incremental_vacuum")
            return free <= _VACUUM_PAGES

        self._in_slices("compacting after a prune", step)

    def _checkpoint(self) -> None:
        """Truncate the WAL. The checkpoint waits for no one: while a reader (forwarder status,
        the status page) holds an older snapshot, or another process writes, a wait would hold
        the lock every claim and ack takes and keep other writers out; it then copies what it
        can and the next prune finishes it."""
        with self._lock:
            conn = self._connection("checkpointing after a prune")
            try:
                conn.execute("PRAGMA busy_timeout = 0")
                try:
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    conn.execute(self._busy_pragma)
            except sqlite3.Error as exc:
                raise self._error(exc, "checkpointing after a prune") from exc
        if busy:
            logger.debug("WAL checkpoint of %s postponed: a reader is active", self._path)
