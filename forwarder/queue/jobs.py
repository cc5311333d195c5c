"""The persistent delivery queue: one SQLite file, one state machine row per (file, destination).

Ingest enqueues a *file* row and one ``READY`` *job* per destination it is routed to. A worker
claims due jobs for its destination (``READY`` -> ``CLAIMED``), sends them and acks each one
(``DONE``, ``FAILED``, or back to ``READY`` with a later ``next_attempt_at``). When every job of
a file is terminal the caller moves the file in two steps: :meth:`Queue.begin_finish` records
where it goes (``QUEUED`` -> ``FINISHING``), the caller renames it, then
:meth:`Queue.complete_finish` marks it ``FINISHED``.

Delivery is **at least once**. Every transition is committed (WAL, ``synchronous=FULL``) before
the caller acts on it, and a job is never handed out by deleting its row: a crash at any moment
leaves it ``CLAIMED``, and :meth:`Queue.recover` (run at start, before the incoming folder is
rescanned) returns it to ``READY`` so it is sent again. A crash in the middle of a finish leaves
the file ``FINISHING`` with its target path, and :meth:`Queue.recover` hands it back.

The queue takes plain values (a database path, numbers), never the config object. One
:class:`Queue` may be shared by many threads; other processes (``forwarder status``,
``forwarder retry``) open their own :class:`Queue` on the same file at the same time.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

from forwarder.errors import QueueError
from forwarder.queue.records import (
    DestinationState,
    DestinationStats,
    FailedFile,
    FileEntry,
    FileState,
    FileToFinish,
    Job,
    JobResult,
    JobStatus,
    Outcome,
    PendingSyntax,
    RecoveryReport,
    Replaced,
)
from forwarder.queue.sql import (
    ACK_RETRY,
    ACK_TERMINAL,
    BEGIN_FINISH,
    BUMP_STATS,
    CLAIM,
    CLAIMED_JOBS,
    DDL,
    DROP_CLAIMED,
    FAILED_FILES,
    INSERT_FILE,
    INSERT_JOBS,
    PRUNE,
    RELEASE,
    REQUEUE_FILE,
    RESULTS,
    TERMINAL_FILES,
    TO_FINISH_ALL,
    TO_FINISH_IDS,
    UNFINISHED_JOB,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "DestinationState",
    "DestinationStats",
    "FailedFile",
    "FileEntry",
    "FileState",
    "FileToFinish",
    "Job",
    "JobResult",
    "JobStatus",
    "Outcome",
    "PendingSyntax",
    "Queue",
    "RecoveryReport",
]

SCHEMA_VERSION = 3  # 2: the problems table; 3: jobs.stale
_PRUNE_BATCH = 2000  # rows deleted per transaction, so workers can ack in between
_STATE_PREFIX = "state:"  # problems-table keys of destination states
_CHECKPOINT_BUSY_MS = 2000  # how long prune's checkpoint waits for readers before giving up


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _ids_json(ids: Iterable[int]) -> str:
    return json.dumps([int(i) for i in ids])


def _unique_ids(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))


def _destinations(destinations: Sequence[str]) -> list[str]:
    """The destinations in order, without duplicates; a file must go somewhere."""
    unique = list(dict.fromkeys(destinations))
    if not unique:
        raise ValueError("a file must be enqueued for at least one destination")
    return unique


def _describe_jobs(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"job {shown}" if len(ids) == 1 else f"jobs {shown}{more}"


class Queue:
    """The persistent queue in one SQLite file. Thread-safe; close it (or use ``with``).

    ``create=False`` refuses to create a missing database (for ``forwarder status``).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0, create: bool = True
    ) -> None:
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if not create and not os.path.exists(self._path):
            raise QueueError(
                f"queue database {self._path} does not exist: check the 'queue' key of the "
                "config, or start the daemon once to create it"
            )
        self._busy_pragma = f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}"
        try:
            # timeout= is SQLite's busy timeout: wait for another writer instead of failing.
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False:
            # worker threads share this connection, serialized by self._lock.
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "opening it") from exc
        try:
            self._configure(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "opening it") from exc
            raise
        self._conn = conn

    @property
    def path(self) -> str:
        return self._path

    def _error(self, exc: sqlite3.Error, what: str) -> QueueError:
        hint = ""
        if "unable to open" in str(exc):
            directory = os.path.dirname(os.path.abspath(self._path))
            hint = f" (does {directory} exist, and may this user write to it?)"
        elif "not a database" in str(exc):
            hint = " (is the 'queue' key pointing at some other file?)"
        return QueueError(f"queue database {self._path}: {exc} while {what}{hint}")

    def _configure(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Must be chosen before the first table exists (and before WAL): lets prune() hand
            # freed pages back to the filesystem without a VACUUM that locks out the daemon.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # WAL: readers (forwarder status) and the daemon's writer do not block each other, and a
        # commit is one append to the log. The mode is stored in the file.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueError(
                f"queue database {self._path}: cannot use write-ahead logging (journal mode "
                f"stays {mode!r}); put the queue on a local filesystem"
            )
        # FULL: fsync the log on every commit. With NORMAL a power loss can drop the last commits:
        # a lost ack would make a job look READY for a file already moved to done/.
        conn.execute("PRAGMA synchronous = FULL")
        # prune() relies on ON DELETE CASCADE from files to jobs; SQLite leaves it off by default.
        conn.execute("PRAGMA foreign_keys = ON")
        # After a checkpoint, shrink the -wal file back to 64 MiB so a burst does not pin the disk.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"queue database {self._path} has schema version {version}, newer than this "
                f"forwarder understands ({SCHEMA_VERSION}); upgrade forwarder"
            )
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in DDL:
                    conn.execute(statement)
                columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                if "stale" not in columns:  # a version 1 or 2 database
                    conn.execute("ALTER TABLE jobs ADD COLUMN stale INTEGER NOT NULL DEFAULT 0")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    # -- connection plumbing ---------------------------------------------------------------

    def _connection(self, what: str) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"queue database {self._path}: closed, while {what}")
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; any sqlite3 error becomes a QueueError."""
        with self._lock:
            conn = self._connection(what)
            try:
                # IMMEDIATE takes the write lock now, so reads inside see what they will update.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A short read transaction (one snapshot across statements) under the lock."""
        with self._lock:
            conn = self._connection(what)
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback failed; SQLite rolls back when the connection closes")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise self._error(exc, "closing it") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transitions ----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Run once at start, before rescanning incoming: CLAIMED jobs of a crashed run go back
        to READY (no attempt counted; they are sent again: at least once), and every file that is
        FINISHING, or QUEUED with all jobs terminal, is returned for the caller to finish."""
        with self._write("recovering jobs claimed before a restart") as conn:
            # Claimed for a destination the replaced file is no longer routed to: dropped.
            conn.execute("DELETE FROM jobs WHERE status = 'CLAIMED' AND stale = 2")
            # The rest are sent again, in the file's current version: no longer stale.
            requeued = conn.execute(
                "UPDATE jobs SET status = 'READY', claimed_at = NULL, stale = 0 "
                "WHERE status = 'CLAIMED'"
            ).rowcount
            finishing = self._select_to_finish(conn, None, -1)
        if requeued:
            logger.warning(
                "%d jobs were being sent when forwarder stopped; they will be sent again",
                requeued,
            )
        if finishing:
            logger.info("%d files are delivered or failed but not yet moved", len(finishing))
        return RecoveryReport(requeued=requeued, finishing=tuple(finishing))

    def enqueue(
        self, entry: FileEntry, destinations: Sequence[str], *, now: float | None = None
    ) -> int | None:
        """Add a file and one READY job per destination in one transaction. Returns the file id,
        or None when an unfinished row for that path exists (then nothing changes)."""
        return self._enqueue([(entry, destinations)], now, f"enqueuing {entry.path}")[0]

    def enqueue_many(
        self,
        items: Sequence[tuple[FileEntry, Sequence[str]]],
        *,
        now: float | None = None,
    ) -> list[int | None]:
        """:meth:`enqueue` for many files in ONE transaction; results in the order given."""
        return self._enqueue(items, now, f"enqueuing {len(items)} files")

    def _enqueue(
        self,
        items: Sequence[tuple[FileEntry, Sequence[str]]],
        now: float | None,
        what: str,
    ) -> list[int | None]:
        if not items:
            return []
        prepared = [(entry, json.dumps(_destinations(dests))) for entry, dests in items]
        at = _now(now)
        ids: list[int | None] = []
        with self._write(what) as conn:
            for entry, destinations in prepared:
                row = conn.execute(
                    INSERT_FILE,
                    {
                        "path": entry.path,
                        "rel_path": entry.rel_path,
                        "size": entry.size,
                        "mtime_ns": entry.mtime_ns,
                        "sop_class_uid": entry.sop_class_uid,
                        "sop_instance_uid": entry.sop_instance_uid,
                        "transfer_syntax": entry.transfer_syntax,
                        "now": at,
                    },
                ).fetchall()
                if not row:
                    ids.append(None)
                    continue
                file_id = int(row[0][0])
                conn.execute(
                    INSERT_JOBS, {"file_id": file_id, "destinations": destinations, "now": at}
                )
                ids.append(file_id)
        return ids

    def claim(self, destination: str, limit: int, *, now: float | None = None) -> list[Job]:
        """Up to ``limit`` due READY jobs for ``destination``, earliest due first (FIFO among
        new jobs), now CLAIMED. One UPDATE ... RETURNING: no job is handed out twice."""
        if limit <= 0:
            return []
        params = {"destination": destination, "limit": limit, "now": _now(now)}
        with self._write(f"claiming jobs for {destination}") as conn:
            claimed = [r[0] for r in conn.execute(CLAIM, params).fetchall()]
            if not claimed:
                return []
            rows = conn.execute(CLAIMED_JOBS, {"ids": _ids_json(claimed)}).fetchall()
        return [Job(*r) for r in rows]

    def ack_done(
        self, job_ids: Sequence[int], *, status: int | None = None, now: float | None = None
    ) -> list[int]:
        """CLAIMED -> DONE (one attempt counted). Returns the ids of files this made terminal."""
        return self._ack_terminal(job_ids, JobStatus.DONE, status, None, now)

    def ack_failed(
        self, job_id: int, *, error: str, status: int | None = None, now: float | None = None
    ) -> list[int]:
        """CLAIMED -> FAILED for good (one attempt counted). Returns files this made terminal."""
        return self._ack_terminal([job_id], JobStatus.FAILED, status, error, now)

    def _ack_terminal(
        self,
        job_ids: Sequence[int],
        to: JobStatus,
        status: int | None,
        error: str | None,
        now: float | None,
    ) -> list[int]:
        ids = _unique_ids(job_ids)
        if not ids:
            return []
        at = _now(now)
        verb = "delivered" if to is JobStatus.DONE else "failed"
        params = {"status": to.value, "last_status": status, "error": error, "now": at}
        with self._write(f"acking {_describe_jobs(ids)} as {verb}") as conn:
            dropped = conn.execute(DROP_CLAIMED, {"ids": _ids_json(ids)}).fetchall()
            rows = conn.execute(ACK_TERMINAL, {**params, "ids": _ids_json(ids)}).fetchall()
            self._expect_claimed(conn, ids, rows + dropped)
            per_destination: dict[str, int] = {}
            for _, _, destination in rows:
                per_destination[destination] = per_destination.get(destination, 0) + 1
            for destination, n in per_destination.items():
                done, failed = (n, 0) if to is JobStatus.DONE else (0, n)
                self._bump(conn, destination, done=done, failed=failed, error=error, now=at)
            file_ids = sorted({r[1] for r in rows + dropped})
            terminal = conn.execute(TERMINAL_FILES, {"ids": _ids_json(file_ids)}).fetchall()
        return [r[0] for r in terminal]

    def ack_retry(
        self,
        job_id: int,
        *,
        next_attempt_at: float,
        error: str,
        status: int | None = None,
        now: float | None = None,
    ) -> None:
        """CLAIMED -> READY again, one attempt counted, due at ``next_attempt_at``."""
        params = {
            "id": job_id,
            "next_attempt_at": next_attempt_at,
            "last_status": status,
            "error": error,
        }
        with self._write(f"acking job {job_id} for a retry") as conn:
            if conn.execute(DROP_CLAIMED, {"ids": _ids_json([job_id])}).fetchall():
                return  # no longer routed there; retry_pending() finishes the file if due
            rows = conn.execute(ACK_RETRY, params).fetchall()
            self._expect_claimed(conn, [job_id], rows)
            self._bump(conn, rows[0][2], done=0, failed=0, error=error, now=_now(now))

    def release(self, job_ids: Sequence[int]) -> None:
        """CLAIMED -> READY without counting an attempt: jobs claimed but not tried (shutdown,
        the batch's association failed on an earlier file) or held (the destination rejected
        the association permanently: no file is at fault)."""
        ids = _unique_ids(job_ids)
        if not ids:
            return
        with self._write(f"releasing {_describe_jobs(ids)}") as conn:
            dropped = conn.execute(DROP_CLAIMED, {"ids": _ids_json(ids)}).fetchall()
            rows = conn.execute(RELEASE, {"ids": _ids_json(ids)}).fetchall()
            self._expect_claimed(conn, ids, rows + dropped)

    def fail_pending(self, destination: str, *, error: str, now: float | None = None) -> list[int]:
        """READY -> FAILED for every job of ``destination`` (e.g. it is no longer configured).
        No attempt counted. Returns the ids of files this made terminal."""
        at = _now(now)
        with self._write(f"failing the pending jobs of {destination}") as conn:
            rows = conn.execute(
                """UPDATE jobs SET status = 'FAILED', last_error = :error, finished_at = :now
                   WHERE destination = :destination AND status = 'READY'
                   RETURNING file_id""",
                {"destination": destination, "error": error, "now": at},
            ).fetchall()
            if not rows:
                return []
            self._bump(conn, destination, done=0, failed=len(rows), error=error, now=at)
            file_ids = sorted({r[0] for r in rows})
            terminal = conn.execute(TERMINAL_FILES, {"ids": _ids_json(file_ids)}).fetchall()
        logger.warning("gave up %d jobs for %s: %s", len(rows), destination, error)
        return [r[0] for r in terminal]

    @staticmethod
    def _bump(
        conn: sqlite3.Connection,
        destination: str,
        *,
        done: int,
        failed: int,
        error: str | None,
        now: float,
    ) -> None:
        conn.execute(
            BUMP_STATS,
            {
                "destination": destination,
                "done": done,
                "failed": failed,
                "error": error,
                "now": now,
            },
        )

    def _expect_claimed(
        self, conn: sqlite3.Connection, ids: Sequence[int], rows: Sequence[Any]
    ) -> None:
        """Raise (rolling the transaction back) unless every id was CLAIMED."""
        if len(rows) == len(ids):
            return
        changed = {r[0] for r in rows}
        missing = [i for i in ids if i not in changed]
        found = dict(
            conn.execute(
                "SELECT id, status FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))",
                {"ids": _ids_json(missing)},
            ).fetchall()
        )
        problems = ", ".join(
            f"job {i} is {found[i]}" if i in found else f"job {i} does not exist"
            for i in missing[:5]
        )
        raise QueueError(
            f"queue database {self._path}: {problems}; only CLAIMED jobs can be acked or "
            "released (was recover() run by another process on the same queue?)"
        )

    # -- finishing files -------------------------------------------------------------------

    def to_finish(
        self, file_ids: Sequence[int] | None = None, limit: int = 1000
    ) -> list[FileToFinish]:
        """Files (all, or among ``file_ids``) whose jobs are all terminal and that are QUEUED or
        FINISHING, oldest first, with every destination's result."""
        with self._read("listing files to finish") as conn:
            return self._select_to_finish(conn, file_ids, limit)

    @staticmethod
    def _select_to_finish(
        conn: sqlite3.Connection, file_ids: Sequence[int] | None, limit: int
    ) -> list[FileToFinish]:
        if file_ids is None:
            files = conn.execute(TO_FINISH_ALL, {"limit": limit}).fetchall()
        else:
            params = {"ids": _ids_json(file_ids), "limit": limit}
            files = conn.execute(TO_FINISH_IDS, params).fetchall()
        if not files:
            return []
        results: dict[int, list[JobResult]] = {}
        for r in conn.execute(RESULTS, {"ids": _ids_json(f[0] for f in files)}).fetchall():
            results.setdefault(r[0], []).append(JobResult(r[1], JobStatus(r[2]), *r[3:]))
        finished: list[FileToFinish] = []
        for file_id, path, rel_path, state, final_path in files:
            jobs = tuple(results.get(file_id, ()))
            done = all(j.status is JobStatus.DONE for j in jobs)
            finished.append(
                FileToFinish(
                    file_id=file_id,
                    path=path,
                    rel_path=rel_path,
                    state=FileState(state),
                    outcome=Outcome.DONE if done else Outcome.FAILED,
                    final_path=final_path,
                    results=jobs,
                )
            )
        return finished

    def begin_finish(self, file_id: int, final_path: str) -> None:
        """QUEUED -> FINISHING, recording where the file goes. Commit this, then move the file,
        then :meth:`complete_finish`; after a crash :meth:`recover` returns it with final_path."""
        self.begin_finish_many([(file_id, final_path)])

    def begin_finish_many(self, items: Sequence[tuple[int, str]]) -> None:
        """:meth:`begin_finish` for many files in ONE transaction (one fsync for a batch);
        all or nothing."""
        if not items:
            return
        with self._write(f"starting to finish {len(items)} files") as conn:
            for file_id, final_path in items:
                params = {"id": file_id, "final_path": final_path}
                if conn.execute(BEGIN_FINISH, params).rowcount != 1:
                    raise self._not_in_state(conn, file_id, FileState.QUEUED, "begin_finish")

    def complete_finish(self, file_id: int, *, now: float | None = None) -> None:
        """FINISHING -> FINISHED, once the file is at its final path."""
        self.complete_finish_many([file_id], now=now)

    def complete_finish_many(self, file_ids: Sequence[int], *, now: float | None = None) -> None:
        """:meth:`complete_finish` for many files in ONE transaction; all or nothing."""
        if not file_ids:
            return
        with self._write(f"completing the finish of {len(file_ids)} files") as conn:
            for file_id in file_ids:
                updated = conn.execute(
                    """UPDATE files SET state = 'FINISHED', finished_at = :now
                       WHERE id = :id AND state = 'FINISHING'""",
                    {"id": file_id, "now": _now(now)},
                ).rowcount
                if updated != 1:
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

    # -- reading ---------------------------------------------------------------------------

    def active_files(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) as queued, for every unfinished file (ingest notices a
        file replaced in incoming by comparing)."""
        with self._read("listing queued files") as conn:
            rows = conn.execute(
                "SELECT path, size, mtime_ns FROM files WHERE state != 'FINISHED'"
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def replace_file(
        self,
        entry: FileEntry,
        destinations: Sequence[str],
        *,
        now: float | None = None,
    ) -> Replaced | None:
        """The file at ``entry.path`` was replaced in incoming while QUEUED: record its new
        header values and routing (``destinations``, routed afresh from the new version).

        For each destination routed now, the new version is sent (again): DONE and FAILED jobs
        go back to READY, CLAIMED ones are marked stale (their ack puts them back to READY), a
        destination routed for the first time gets a job. Destinations no longer routed keep
        what they already stored (DONE stays); their READY and FAILED jobs are deleted and a
        CLAIMED one is deleted when its claim ends. Returns None when no QUEUED row has that
        path (finishing or finished: nothing to do)."""
        params = {
            "path": entry.path,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
            "sop_class_uid": entry.sop_class_uid,
            "sop_instance_uid": entry.sop_instance_uid,
            "transfer_syntax": entry.transfer_syntax,
            "now": _now(now),
        }
        routed_now = _destinations(destinations)
        with self._write(f"recording that {entry.path} was replaced") as conn:
            row = conn.execute(
                """UPDATE files SET size = :size, mtime_ns = :mtime_ns,
                          sop_class_uid = :sop_class_uid, sop_instance_uid = :sop_instance_uid,
                          transfer_syntax = :transfer_syntax
                   WHERE path = :path AND state = 'QUEUED' RETURNING id""",
                params,
            ).fetchone()
            if row is None:
                return None
            ids = {"id": row[0], "now": params["now"], "dests": json.dumps(routed_now)}
            routed = "destination IN (SELECT value FROM json_each(:dests))"
            conn.execute(
                f"""UPDATE jobs SET status = 'READY', attempts = 0, next_attempt_at = :now,
                          finished_at = NULL, last_status = NULL
                   WHERE file_id = :id AND status IN ('DONE', 'FAILED') AND {routed}""",
                ids,
            )
            conn.execute(
                f"UPDATE jobs SET stale = 1 WHERE file_id = :id AND status = 'CLAIMED' "
                f"AND {routed}",
                ids,
            )
            dropped = conn.execute(
                f"""DELETE FROM jobs WHERE file_id = :id AND status IN ('READY', 'FAILED')
                   AND NOT {routed} RETURNING destination""",
                ids,
            ).fetchall()
            dropped += conn.execute(
                f"""UPDATE jobs SET stale = 2 WHERE file_id = :id AND status = 'CLAIMED'
                   AND NOT {routed} RETURNING destination""",
                ids,
            ).fetchall()
            conn.execute(
                """INSERT INTO jobs (file_id, destination, status, next_attempt_at, created_at)
                   SELECT :id, value, 'READY', :now, :now FROM json_each(:dests)
                   WHERE value NOT IN (SELECT destination FROM jobs WHERE file_id = :id)""",
                ids,
            )
        return Replaced(
            file_id=int(row[0]),
            destinations=tuple(routed_now),
            dropped=tuple(sorted(r[0] for r in dropped)),
        )

    def pending_syntaxes(self, destination: str, limit: int = 256) -> list[PendingSyntax]:
        """Distinct (SOP Class UID, transfer syntax) of READY and CLAIMED jobs for
        ``destination``, most common first: what the sender should propose."""
        with self._read(f"listing pending transfer syntaxes for {destination}") as conn:
            rows = conn.execute(
                """SELECT f.sop_class_uid, f.transfer_syntax, COUNT(*) AS n
                   FROM jobs AS j JOIN files AS f ON f.id = j.file_id
                   WHERE j.destination = :destination AND j.status IN ('READY', 'CLAIMED')
                   GROUP BY f.sop_class_uid, f.transfer_syntax
                   ORDER BY n DESC, f.sop_class_uid, f.transfer_syntax LIMIT :limit""",
                {"destination": destination, "limit": limit},
            ).fetchall()
        return [PendingSyntax(r[0], r[1]) for r in rows]

    def next_due(self, destination: str) -> float | None:
        """The earliest next_attempt_at of READY jobs for ``destination`` (None: nothing queued)."""
        with self._read(f"reading when {destination} is due") as conn:
            row = conn.execute(
                """SELECT MIN(next_attempt_at) FROM jobs
                   WHERE destination = :destination AND status = 'READY'""",
                {"destination": destination},
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def stats(
        self, *, now: float | None = None, destinations: Sequence[str] = ()
    ) -> dict[str, DestinationStats]:
        """Per destination (every one with rows, plus those named), sorted by name."""
        at = _now(now)
        with self._read("reading destination statistics") as conn:
            live = conn.execute(
                """SELECT destination, status, COUNT(*), MIN(created_at) FROM jobs
                   WHERE status IN ('READY', 'CLAIMED') GROUP BY destination, status"""
            ).fetchall()
            totals = conn.execute(
                "SELECT destination, done_total, failed_total, last_error FROM destination_stats"
            ).fetchall()
        pending: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        oldest: dict[str, float] = {}
        for destination, status, n, first in live:
            (pending if status == JobStatus.READY else in_flight)[destination] = n
            oldest[destination] = min(first, oldest.get(destination, first))
        by_total = {r[0]: r for r in totals}
        names = set(destinations) | set(pending) | set(in_flight) | set(by_total)
        result: dict[str, DestinationStats] = {}
        for name in sorted(names):
            total = by_total.get(name)
            result[name] = DestinationStats(
                pending=pending.get(name, 0),
                in_flight=in_flight.get(name, 0),
                done=total[1] if total else 0,
                failed=total[2] if total else 0,
                oldest_pending_seconds=max(0.0, at - oldest[name]) if name in oldest else None,
                last_error=total[3] if total else None,
            )
        return result

    def counts(self) -> dict[str, int]:
        """Rows per job status (every JobStatus value present) — pruned rows not included."""
        with self._read("counting jobs") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = {s.value: 0 for s in JobStatus}
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def set_problem(self, key: str, text: str, *, now: float | None = None) -> None:
        """Record a condition for ``forwarder status`` (replaces the previous one of ``key``)."""
        with self._write(f"recording problem {key}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO problems (key, text, at) VALUES (:key, :text, :at)",
                {"key": key, "text": text, "at": _now(now)},
            )

    def clear_problem(self, key: str) -> None:
        with self._write(f"clearing problem {key}") as conn:
            conn.execute("DELETE FROM problems WHERE key = :key", {"key": key})

    def problems(self) -> dict[str, tuple[str, float]]:
        """key -> (text, time) of every recorded problem."""
        with self._read("reading problems") as conn:
            rows = conn.execute("SELECT key, text, at FROM problems").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def set_destination_state(
        self, destination: str, state: str, error: str | None, *, since: float | None = None
    ) -> None:
        """Record that ``destination`` is ``state`` ("up" or "down", with why) since ``since``,
        for ``forwarder status`` in another process (kept in the problems table)."""
        text = json.dumps({"state": state, "error": error})
        self.set_problem(f"{_STATE_PREFIX}{destination}", text, now=since)

    def destination_states(self) -> dict[str, DestinationState]:
        """destination -> its last recorded state (destinations never recorded are absent)."""
        states: dict[str, DestinationState] = {}
        for key, (text, at) in self.problems().items():
            if not key.startswith(_STATE_PREFIX):
                continue
            try:
                value = json.loads(text)
                state = DestinationState(str(value["state"]), value.get("error"), float(at))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # written by a different version: not worth failing status for
            states[key[len(_STATE_PREFIX) :]] = state
        return states

    def waiting_to_move(self) -> int:
        """Files whose jobs are all terminal but which are not yet out of incoming."""
        with self._read("counting files waiting to be moved") as conn:
            row = conn.execute(
                f"""SELECT COUNT(*) FROM files AS f WHERE f.state = 'FINISHING'
                    OR (f.state = 'QUEUED' AND NOT EXISTS ({UNFINISHED_JOB}))"""
            ).fetchone()
        return int(row[0])

    # -- forwarder retry -------------------------------------------------------------------

    def failed_files(self, destination: str | None = None) -> list[FailedFile]:
        """FINISHED files that went to failed/ and were not retried yet; with ``destination``,
        only those whose job for it FAILED. Each lists every destination that failed."""
        with self._read("listing failed files") as conn:
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

    def requeue_failed(
        self,
        file_id: int,
        new_path: str,
        rel_path: str,
        destinations: Sequence[str],
        *,
        now: float | None = None,
    ) -> int:
        """Queue a failed file again: a NEW QUEUED row at ``new_path`` (header values copied)
        with fresh READY jobs for ``destinations``, and the old row marked retried so
        :meth:`failed_files` no longer lists it. Returns the new file id. Do this before moving
        the file to ``new_path`` so the watcher sees it as already queued."""
        dests = json.dumps(_destinations(destinations))
        at = _now(now)
        params = {"id": file_id, "new_path": new_path, "rel_path": rel_path, "now": at}
        with self._write(f"requeuing failed file {file_id} as {new_path}") as conn:
            try:
                row = conn.execute(REQUEUE_FILE, params).fetchall()
            except sqlite3.IntegrityError as exc:
                raise QueueError(
                    f"queue database {self._path}: cannot requeue file {file_id} as {new_path}: "
                    "a file with that path is already queued"
                ) from exc
            if not row:
                raise QueueError(
                    f"queue database {self._path}: cannot requeue file {file_id}: it is not a "
                    "finished, failed file (or it was retried already)"
                )
            new_id = int(row[0][0])
            conn.execute(INSERT_JOBS, {"file_id": new_id, "destinations": dests, "now": at})
            updated = conn.execute(
                """UPDATE files SET retried_as = :new_id
                   WHERE id = :id AND retried_as IS NULL""",
                {"id": file_id, "new_id": new_id},
            ).rowcount
            if updated != 1:  # pragma: no cover - the INSERT above checked the same condition
                raise QueueError(f"queue database {self._path}: file {file_id} changed meanwhile")
        logger.info("requeued failed file %d as %d (%s)", file_id, new_id, new_path)
        return new_id

    # -- housekeeping ----------------------------------------------------------------------

    def prune(self, older_than: float, *, now: float | None = None) -> int:
        """Delete FINISHED files (and their jobs) finished more than ``older_than`` seconds ago,
        in small transactions, then return freed pages to the filesystem and truncate the WAL.
        Returns how many files were deleted. Counters in stats() are kept."""
        params = {"cutoff": _now(now) - older_than, "batch": _PRUNE_BATCH}
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
                # executescript steps the pragma to the end; execute() would free one page only
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
