"""Finishing files: which files have every job terminal, and their two-step move out of incoming.

When every job of a file is ``DONE`` or ``FAILED`` the caller (the daemon's finisher) moves the
file in two steps: :meth:`Finishing.begin_finish` records where it goes (``QUEUED`` ->
``FINISHING``, with :class:`~forwarder.queue.records.Finish` ``done`` or ``failed``), the caller
renames it, then :meth:`Finishing.complete_finish` marks it ``FINISHED``. A crash in between
leaves the file ``FINISHING`` with its target path, and recovery hands it back.

The moving itself (renames, fsyncs, ``NAME.error.json``) is not here: it is
:mod:`forwarder.daemon.finisher`'s; this module only records the states.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from forwarder.errors import QueueError
from forwarder.queue.records import FileState, FileToFinish, Finish, JobResult, JobStatus
from forwarder.queue.sql import (
    BEGIN_FINISH,
    COMPLETE_FINISH,
    RESULTS,
    SWEEP_UPTO,
    TO_FINISH_ALL,
    TO_FINISH_FINISHING,
    TO_FINISH_IDS,
    TO_FINISH_SLICE,
)
from forwarder.queue.store import Store, clock, ids_json

SWEEP_SPAN = 20_000  # files looked at per sweep_to_finish() call: ~10 ms


def select_to_finish(
    conn: sqlite3.Connection, file_ids: Sequence[int] | None, limit: int
) -> list[FileToFinish]:
    """Inside a transaction on ``conn``: :meth:`Finishing.to_finish`'s answer (``limit=-1``:
    all), also what :meth:`forwarder.queue.jobs.Jobs.recover` returns."""
    if file_ids is None:
        files = conn.execute(TO_FINISH_ALL, {"limit": limit}).fetchall()
    else:
        params = {"ids": ids_json(file_ids), "limit": limit}
        files = conn.execute(TO_FINISH_IDS, params).fetchall()
    return _with_results(conn, files)


def _with_results(conn: sqlite3.Connection, files: list[Any]) -> list[FileToFinish]:
    """Rows of (id, path, rel_path, state, final_path, calling_ae, size, mtime_ns) with every
    destination's result."""
    if not files:
        return []
    results: dict[int, list[JobResult]] = {}
    for r in conn.execute(RESULTS, {"ids": ids_json(f[0] for f in files)}).fetchall():
        results.setdefault(r[0], []).append(JobResult(r[1], JobStatus(r[2]), *r[3:]))
    finished: list[FileToFinish] = []
    for file_id, path, rel_path, state, final_path, calling_ae, size, mtime_ns in files:
        jobs = tuple(results.get(file_id, ()))
        done = all(j.status is JobStatus.DONE for j in jobs)
        finished.append(
            FileToFinish(
                file_id=file_id,
                path=path,
                rel_path=rel_path,
                state=FileState(state),
                outcome=Finish.DONE if done else Finish.FAILED,
                final_path=final_path,
                results=jobs,
                calling_ae=calling_ae,
                size=size,
                mtime_ns=mtime_ns,
            )
        )
    return finished


class Finishing(Store):
    """Finishing files (a part of :class:`forwarder.queue.Queue`)."""

    def to_finish(
        self, file_ids: Sequence[int] | None = None, limit: int = 1000
    ) -> list[FileToFinish]:
        """Files (all, or among ``file_ids``) whose jobs are all terminal and that are QUEUED or
        FINISHING, oldest first, with every destination's result."""
        if file_ids is None:  # a sweep over every queued file: off the writers' lock
            with self._scan("listing files to finish") as conn:
                return select_to_finish(conn, None, limit)
        with self._read("listing files to finish") as conn:
            return select_to_finish(conn, file_ids, limit)

    def sweep_to_finish(
        self, after: int, span: int = SWEEP_SPAN, limit: int = 1000, *, finishing: bool = True
    ) -> tuple[list[FileToFinish], int]:
        """The periodic sweep for files :meth:`to_finish` would return, a slice at a time so
        that its cost does not grow with the queue: every FINISHING file (unless not
        ``finishing``), and the QUEUED files with every job terminal among the ``span`` files
        after id ``after``. Returns them and where the next slice starts (0: the beginning
        again); a whole cycle covers every file."""
        params: dict[str, int] = {"after": after, "offset": span - 1, "limit": limit}
        with self._scan("sweeping for files to finish") as conn:
            row = conn.execute(SWEEP_UPTO, params).fetchone()
            last = row is None
            if last:  # fewer than ``span`` files after ``after``: to the end of the table
                row = conn.execute("SELECT MAX(id) FROM files").fetchone()
            params["upto"] = int(row[0] or 0)
            stuck = conn.execute(TO_FINISH_FINISHING, params).fetchall() if finishing else []
            queued = conn.execute(TO_FINISH_SLICE, params).fetchall()
            files = sorted({r[0]: r for r in stuck + queued}.values())
            found = _with_results(conn, files)
        if len(queued) == limit:  # more in this slice: go on after the last one next time
            return found, int(queued[-1][0])
        return found, 0 if last else params["upto"]

    def begin_finish(self, file_id: int, final_path: str) -> None:
        """QUEUED -> FINISHING, recording where the file goes. Commit this, then move the file,
        then :meth:`complete_finish`; after a crash :meth:`recover` returns it with final_path."""
        self.begin_finish_many([(file_id, final_path)])

    def begin_finish_many(self, items: Sequence[tuple[int, str]]) -> None:
        """:meth:`begin_finish` for many files in ONE transaction (one fsync for a batch);
        all or nothing."""
        if not items:
            return
        # One statement for the batch, not one a file: each lets go of the GIL, which the
        # daemon's threads take turns on.
        _unique(self, [i for i, _ in items], "begin_finish")
        payload = json.dumps([[int(i), str(p)] for i, p in items], ensure_ascii=False)
        with self._write(f"starting to finish {len(items)} files") as conn:
            begun = {r[0] for r in conn.execute(BEGIN_FINISH, {"items": payload})}
            for file_id, _ in items:
                if file_id not in begun:
                    raise self._not_in_state(conn, file_id, FileState.QUEUED, "begin_finish")

    def retarget_finish(self, file_id: int, final_path: str) -> None:
        """A FINISHING file goes to ``final_path`` instead of the path recorded: another file
        was put there before the move (which never replaces one). Record this, then move."""
        params = {"id": file_id, "final_path": final_path}
        with self._write(f"recording that file {file_id} goes to {final_path}") as conn:
            changed = conn.execute(
                "UPDATE files SET final_path = :final_path WHERE id = :id AND +state = 'FINISHING'",
                params,
            ).rowcount
            if changed != 1:
                raise self._not_in_state(conn, file_id, FileState.FINISHING, "retarget_finish")

    def complete_finish(self, file_id: int, *, now: float | None = None) -> None:
        """FINISHING -> FINISHED, once the file is at its final path."""
        self.complete_finish_many([file_id], now=now)

    def complete_finish_many(self, file_ids: Sequence[int], *, now: float | None = None) -> None:
        """:meth:`complete_finish` for many files in ONE transaction; all or nothing."""
        if not file_ids:
            return
        _unique(self, file_ids, "complete_finish")
        params = {"ids": ids_json(file_ids), "now": clock(now)}
        with self._write(f"completing the finish of {len(file_ids)} files") as conn:
            completed = {r[0] for r in conn.execute(COMPLETE_FINISH, params)}
            for file_id in file_ids:
                if file_id not in completed:
                    raise self._not_in_state(conn, file_id, FileState.FINISHING, "complete_finish")

    def _not_in_state(
        self, conn: sqlite3.Connection, file_id: int, expected: FileState, action: str
    ) -> QueueError:
        row = conn.execute("SELECT state FROM files WHERE id = :id", {"id": file_id}).fetchone()
        if row is None:
            found = "does not exist"
        elif row[0] == expected:
            found = "still has jobs that are READY or CLAIMED"
        else:
            found = f"is {row[0]}"
        return QueueError(
            f"queue database {self._path}: cannot {action} file {file_id}: it {found} "
            f"(it must be {expected.value} with every job DONE or FAILED)"
        )


def _unique(store: Store, file_ids: Sequence[int], action: str) -> None:
    """A batch names each file once (one statement updates a file once, whatever its copies)."""
    if len(set(file_ids)) != len(file_ids):
        raise QueueError(f"queue database {store.path}: cannot {action} a file twice in a batch")
