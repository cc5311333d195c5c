"""Putting failed files back in the queue (``forwarder retry``): listing them and requeuing one.

A file that ended in failed/ keeps its FINISHED row. :meth:`Requeue.failed_files` lists those not
retried yet; :meth:`Requeue.requeue_failed` queues one again as a NEW row with fresh ``READY``
jobs and marks the old row retried. Moving the file back into incoming is the CLI's
(:mod:`forwarder.cli.retry`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from forwarder.errors import PathQueuedError, QueueError
from forwarder.queue.records import NORMAL_RANK, FailedFile
from forwarder.queue.sql import (
    FAILED_FILES,
    INSERT_JOBS,
    KEEP_FAILED_JOBS,
    REQUEUE_FILE,
    RETRIED_FROM,
    RETRIED_QUEUED,
)
from forwarder.queue.store import Store, clock, ranked_json, routed_to

logger = logging.getLogger(__name__)


class Requeue(Store):
    """``forwarder retry``'s part of :class:`forwarder.queue.Queue`."""

    def failed_files(self, destination: str | None = None) -> list[FailedFile]:
        """FINISHED files that went to failed/ and were not retried yet; with ``destination``,
        only those whose job for it FAILED. Each lists every destination that failed."""
        with self._scan("listing failed files") as conn:
            rows = conn.execute(FAILED_FILES, {"destination": destination}).fetchall()
        grouped: dict[int, tuple[Any, list[str]]] = {}
        for file_id, final_path, rel_path, finished_at, dest in rows:
            grouped.setdefault(file_id, ((final_path, rel_path, finished_at), []))[1].append(dest)
        return [
            FailedFile(
                file_id=file_id,
                final_path=head[0],
                rel_path=head[1],
                destinations=tuple(dests),
                finished_at=head[2],
            )
            for file_id, (head, dests) in grouped.items()
        ]

    def retried_queued(self) -> list[tuple[int, str, str, int, int]]:
        """(file id, path, relative path, size, mtime in ns) of each file put back by
        ``forwarder retry`` that is still queued. Its file is in incoming (with that size and
        mtime: a move keeps them), unless that retry was killed between
        :meth:`requeue_failed` and moving the file back: then it is still in failed/
        (:meth:`retried_from` says where)."""
        with self._scan("listing retried files") as conn:
            rows = conn.execute(RETRIED_QUEUED).fetchall()
        return [
            (int(i), str(path), str(rel), int(size), int(mtime))
            for i, path, rel, size, mtime in rows
        ]

    def retried_from(self, file_id: int) -> list[tuple[str, str, int, int]]:
        """(final path, SOP Instance UID, size, mtime in ns) of the files that ``file_id`` was
        retried from, the nearest first: a retry killed before its move leaves the file at
        such a path in failed/ (and a retry of that one may have been killed as well). The
        path may hold another file since, even one with the same UID: check all three."""
        with self._read(f"finding what file {file_id} was retried from") as conn:
            rows = conn.execute(RETRIED_FROM, {"id": file_id}).fetchall()
        return [(str(path), str(uid), int(size), int(mtime)) for path, uid, size, mtime in rows]

    def requeue_failed(
        self,
        file_id: int,
        new_path: str,
        rel_path: str,
        destinations: Sequence[str],
        *,
        still_failed: Sequence[str] = (),
        now: float | None = None,
    ) -> int:
        """Queue a failed file again: a NEW QUEUED row at ``new_path`` (header values copied)
        with fresh READY jobs for ``destinations`` (each at the priority it had), and the old
        row marked retried so :meth:`failed_files` no longer lists it. Returns the new file id.
        Do this before moving the file to ``new_path`` so the watcher sees it as already queued.

        ``still_failed``: other destinations whose failure stands (not retried now): their
        FAILED jobs are copied to the new row, so that the file goes back to failed/ (and is
        listed for them again) rather than to done/ once ``destinations`` store it.

        Raises :class:`PathQueuedError` when an unfinished file holds ``new_path`` (nothing
        changed), :class:`QueueError` for the rest."""
        routed_to(destinations)  # a file must go somewhere: refused before any write
        at = clock(now)
        params = {"id": file_id, "new_path": new_path, "rel_path": rel_path, "now": at}
        with self._write(f"requeuing failed file {file_id} as {new_path}") as conn:
            try:
                row = conn.execute(REQUEUE_FILE, params).fetchall()
            except sqlite3.IntegrityError as exc:
                raise PathQueuedError(
                    f"queue database {self._path}: cannot requeue file {file_id} as {new_path}: "
                    "a file with that path is already queued"
                ) from exc
            if not row:
                raise QueueError(
                    f"queue database {self._path}: cannot requeue file {file_id}: it is not a "
                    "finished, failed file (or it was retried already)"
                )
            new_id = int(row[0][0])
            # Each destination keeps the priority its failed job had (its route's); a
            # destination the file was not queued for before is normal.
            was = dict(
                conn.execute(
                    "SELECT destination, priority FROM jobs WHERE file_id = :id", {"id": file_id}
                ).fetchall()
            )
            ranks = {d: int(was.get(d, NORMAL_RANK)) for d in destinations}
            dests = ranked_json(ranks)
            conn.execute(INSERT_JOBS, {"file_id": new_id, "destinations": dests, "now": at})
            keep = json.dumps([d for d in still_failed if d not in ranks])
            conn.execute(KEEP_FAILED_JOBS, {"id": file_id, "new_id": new_id, "keep": keep})
            updated = conn.execute(
                """UPDATE files SET retried_as = :new_id
                   WHERE id = :id AND retried_as IS NULL""",
                {"id": file_id, "new_id": new_id},
            ).rowcount
            if updated != 1:  # pragma: no cover - the INSERT above checked the same condition
                raise QueueError(f"queue database {self._path}: file {file_id} changed meanwhile")
        logger.info("requeued failed file %d as %d (%s)", file_id, new_id, new_path)
        return new_id

    def rename_requeued(self, file_id: int, new_path: str, rel_path: str) -> bool:
        """``forwarder retry`` found another file at the name it queued ``file_id`` under (put
        there after the name was chosen, before the move; never replaced): the row moves to
        ``new_path``, to which the file is moved next. Only while the row still is the failed
        file, untouched by a daemon (QUEUED, its size and mtime those of the file it was
        retried from, no job claimed). Else the daemon took the other file for this row's
        (a replacement, sent in its place): the row stays that file's, and the file retried
        from is listed by :meth:`failed_files` again (it stays in failed/). Returns whether the
        row moved. Raises :class:`PathQueuedError` when an unfinished file holds ``new_path``."""
        params = {"id": file_id, "new_path": new_path, "rel_path": rel_path}
        with self._write(f"requeuing file {file_id} as {new_path} instead") as conn:
            try:
                moved = conn.execute(
                    """UPDATE files SET path = :new_path, rel_path = :rel_path
                       WHERE id = :id AND +state = 'QUEUED'
                         AND EXISTS (SELECT 1 FROM files AS old
                                     WHERE old.retried_as = :id AND old.size = files.size
                                       AND old.mtime_ns IS files.mtime_ns)
                         AND NOT EXISTS (SELECT 1 FROM jobs
                                         WHERE file_id = :id AND status = 'CLAIMED')""",
                    params,
                ).rowcount
            except sqlite3.IntegrityError as exc:
                raise PathQueuedError(
                    f"queue database {self._path}: cannot requeue file {file_id} as "
                    f"{new_path}: a file with that path is already queued"
                ) from exc
            if not moved:
                conn.execute("UPDATE files SET retried_as = NULL WHERE retried_as = :id", params)
        return bool(moved)
