"""Housekeeping: pruning old FINISHED files and giving their space back to the filesystem.

The daemon prunes hourly. Rows are deleted in small batches so workers can ack in between; the
cumulative counters of :mod:`~forwarder.queue.stats` survive. Then freed pages go back with
``incremental_vacuum`` and the WAL is truncated by a checkpoint that waits only briefly for
readers. No job changes state here.
"""

from __future__ import annotations

import logging
import sqlite3

from forwarder.queue.sql import PRUNE
from forwarder.queue.store import Store, clock

logger = logging.getLogger(__name__)

_PRUNE_BATCH = 2000  # rows deleted per transaction, so workers can ack in between
_CHECKPOINT_BUSY_MS = 2000  # how long prune's checkpoint waits for readers before giving up


class Housekeeping(Store):
    """Pruning (a part of :class:`forwarder.queue.Queue`)."""

    def prune(self, older_than: float, *, now: float | None = None) -> int:
        """Delete FINISHED files (and their jobs) finished more than ``older_than`` seconds ago,
        in small transactions, then return freed pages to the filesystem and truncate the WAL.
        Returns how many files were deleted. Counters in stats() are kept."""
        params = {"cutoff": clock(now) - older_than, "batch": _PRUNE_BATCH}
        deleted = 0
        while True:
            with self._write("pruning finished files") as conn:
                n = conn.execute(PRUNE, params).rowcount
            deleted += n
            if n < _PRUNE_BATCH:
                break
        with self._lock:
            conn = self._connection("compacting after a prune")
            try:
                # The lock is first taken as every write takes it, so that a wait for another
                # process (one stopped inside a transaction) is seen by lock_waited() and not
                # spent in SQLite's own busy handler; executescript (which commits that empty
                # transaction first) steps the pragma to the end: execute() frees one page.
                self._begin_immediate(conn)
                conn.executescript("PRAGMA incremental_vacuum;")
                # A checkpoint waits for readers (forwarder status); do not hold the workers up
                # for the whole busy timeout: if it cannot finish now, the next prune will.
                conn.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_BUSY_MS}")
                try:
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    conn.execute(self._busy_pragma)
            except sqlite3.Error as exc:
                raise self._error(exc, "compacting after a prune") from exc
        if busy:
            logger.debug("WAL checkpoint of %s postponed: a reader is active", self._path)
        if deleted:
            logger.info("pruned %d finished files from %s", deleted, self._path)
        return deleted
