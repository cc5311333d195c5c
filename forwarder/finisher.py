"""Finishing files whose jobs are all terminal: the crash-safe two-step move out of incoming.

1. ``queue.begin_finish(id, final_path)`` records where the file goes (durable);
2. ``NAME.error.json`` is written (failed files), the file is moved, folders are fsynced;
3. ``queue.complete_finish(id)``.
A crash between the steps is repaired by :meth:`Finisher.finish` on the rows ``recover()``
returns: a file still in incoming is moved, one already at its final path is just completed.
If the move fails (disk full, permissions), the file stays in incoming, the row stays
FINISHING, and :meth:`Finisher.retry_pending` tries again later: nothing is lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder.crashpoints import crash_point
from forwarder.errors import QueueError
from forwarder.queue import FileState, FileToFinish, JobStatus, Outcome, Queue
from forwarder.spool import DestinationResult, Spool, SpoolError

logger = logging.getLogger(__name__)


class Finisher:
    """Thread-safe: workers of every destination call :meth:`finish_ids`."""

    def __init__(
        self, queue: Queue, spool: Spool, on_finished: Callable[[Sequence[str]], None]
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def finish_ids(self, file_ids: Sequence[int]) -> None:
        if file_ids:
            self.finish(self.queue.to_finish(file_ids))

    def retry_pending(self) -> None:
        """Finish whatever is terminal but not moved yet (after a disk-full, or at start)."""
        self.finish(self.queue.to_finish(None))

    def finish(self, items: Sequence[FileToFinish]) -> None:
        with self._lock:
            completed: list[FileToFinish] = []
            dirs: set[Path] = set()
            for item in items:
                try:
                    if self._move(item, dirs):
                        completed.append(item)
                except (SpoolError, QueueError) as exc:
                    self.last_error = str(exc)
                    logger.error("%s: could not finish: %s", item.rel_path, exc)
            self.spool.sync_dirs(dirs)
            for item in completed:
                self.queue.complete_finish(item.file_id)
            if completed:
                self.on_finished([i.path for i in completed])

    def _move(self, item: FileToFinish, dirs: set[Path]) -> bool:
        failed = item.outcome == Outcome.FAILED
        source = Path(item.path)
        if item.state == FileState.QUEUED or item.final_path is None:
            target = self.spool.target(item.rel_path, failed=failed)
            self.queue.begin_finish(item.file_id, str(target))
        else:
            target = Path(item.final_path)
        if failed:
            results = [
                DestinationResult(
                    destination=r.destination,
                    outcome="stored" if r.status == JobStatus.DONE else "failed",
                    status=r.last_status,
                    error=r.last_error,
                    attempts=r.attempts,
                    first_queued=r.created_at,
                    finished=r.finished_at,
                )
                for r in item.results
            ]
            bad = [r for r in results if r.outcome == "failed"]
            reason = "; ".join(f"{r.destination}: {r.error or 'failed'}" for r in bad)
            self.spool.write_error(target, item.rel_path, reason, results)
        crash_point("finish-before-move")
        if source.exists():
            self.spool.move(source, target, sync=False)
            dirs.update((source.parent, target.parent))
            crash_point("finish-after-move")
        elif not target.exists():
            logger.error(
                "%s: neither in incoming nor at %s: removed by someone else?",
                item.rel_path,
                target,
            )
        where = "failed" if failed else "done"
        logger.info("%s: moved to %s/ (%s)", item.rel_path, where, target)
        return True
