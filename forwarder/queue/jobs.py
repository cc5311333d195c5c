"""The job state machine: enqueue, claim, ack, retry, release, give up, and recover at start.

A file row is enqueued with one ``READY`` job per destination. A worker claims due jobs for its
destination (``READY`` -> ``CLAIMED``, one ``UPDATE ... RETURNING`` inside ``BEGIN IMMEDIATE``),
sends them and acks each one: ``DONE``, ``FAILED``, or back to ``READY`` with a later
``next_attempt_at``. Every transition is one transaction that checks what it changed, and bumps
the destination's cumulative counters in the same commit. The worker's own reads (what is due
when, which transfer syntaxes to propose) are here too.

Delivery is **at least once**: a job is never handed out by deleting its row, so a crash leaves
it ``CLAIMED`` and :meth:`Jobs.recover` returns it to ``READY``. Moving files out of incoming
once their jobs are terminal is :mod:`~forwarder.queue.finishing`; a file replaced while queued
is :mod:`~forwarder.queue.replacing`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from forwarder.errors import QueueError
from forwarder.queue.finishing import select_to_finish
from forwarder.queue.records import (
    PRIORITY_RANK,
    FileEntry,
    Job,
    JobStatus,
    PendingSyntax,
    RecoveryReport,
)
from forwarder.queue.sql import (
    ACK_RETRY,
    ACK_TERMINAL,
    BUMP_STATS,
    CLAIM,
    CLAIM_OLDEST,
    CLAIMED_JOBS,
    DROP_CLAIMED,
    FAIL_PENDING,
    INSERT_FILE,
    INSERT_FILES,
    INSERT_JOBS,
    INSERT_JOBS_MANY,
    RECORD_SENT_UIDS,
    RELEASE,
    TERMINAL_FILES,
)
from forwarder.queue.store import (
    Routed,
    Store,
    clock,
    file_values,
    ids_json,
    ranked,
)

LOWEST_RANK = max(PRIORITY_RANK.values())
_FAIL_BATCH = 500  # jobs fail_pending() fails a transaction: ~5 ms of the write lock

logger = logging.getLogger(__name__)


def _unique_ids(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))


def _describe_jobs(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"job {shown}" if len(ids) == 1 else f"jobs {shown}{more}"


# A claim that ends stored on a version retired while it was being sent (its file rewritten
# into one not queued, and moved to failed/ or done/: Replacing.retire_file): recorded DONE, as
# it is, so that `find` and `status` say that destination has that version (it was deleted,
# and the row said "being sent" for good). Nothing awaits a commitment for it: its file is
# finished. A claim on it that ends otherwise is dropped (DROP_CLAIMED): nothing more of that
# version is sent.
_STORED_RETIRED = """
    UPDATE jobs SET status = 'DONE', attempts = attempts + 1, finished_at = :now,
                    last_status = :last_status, last_error = :error, commitment = 0,
                    commit_txn = NULL, sent_uids = :own, claimed_at = NULL, stale = 0
    WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'CLAIMED' AND stale = 2
      AND EXISTS (SELECT 1 FROM files AS f WHERE f.id = jobs.file_id AND +f.state = 'FINISHED')
    RETURNING id, file_id, destination"""


def _say_stored_retired(conn: sqlite3.Connection, rows: Sequence[Any]) -> None:
    """One line for each version stored after its file was rewritten and moved out: the
    send's own line names the file, which is something else now."""
    for _, file_id, destination in rows:
        row = conn.execute(
            "SELECT rel_path, sop_instance_uid, final_path FROM files WHERE id = :id",
            {"id": file_id},
        ).fetchone()
        if row is not None:
            logger.info(
                "%s: the version queued before (SOP Instance UID %s) was stored by %s; the "
                "file had been rewritten since, and is at %s",
                row[0],
                row[1],
                destination,
                row[2],
            )


class Jobs(Store):
    """The transitions of jobs (a part of :class:`forwarder.queue.Queue`)."""

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
            finishing = select_to_finish(conn, None, -1)
        if requeued:
            logger.warning(
                "%d jobs were being sent when forwarder stopped; they will be sent again",
                requeued,
            )
        if finishing:
            logger.info("%d files are delivered or failed but not yet moved", len(finishing))
        return RecoveryReport(requeued=requeued, finishing=tuple(finishing))

    def enqueue(
        self, entry: FileEntry, destinations: Routed, *, now: float | None = None
    ) -> int | None:
        """Add a file and one READY job per destination in one transaction (``destinations``:
        names, or name -> priority rank). Returns the file id, or None when an unfinished row
        for that path exists (then nothing changes)."""
        return self._enqueue([(entry, destinations)], now, f"enqueuing {entry.path}")[0]

    def enqueue_many(
        self,
        items: Sequence[tuple[FileEntry, Routed]],
        *,
        now: float | None = None,
    ) -> list[int | None]:
        """:meth:`enqueue` for many files in ONE transaction; results in the order given."""
        return self._enqueue(items, now, f"enqueuing {len(items)} files")

    def _enqueue(
        self,
        items: Sequence[tuple[FileEntry, Routed]],
        now: float | None,
        what: str,
    ) -> list[int | None]:
        if not items:
            return []
        if len(items) == 1:
            return [self._enqueue_one(*items[0], now, what)]
        # Two statements for the whole batch, not two a file: each statement lets go of the
        # GIL, and the daemon's threads take turns on it.
        ranks = [ranked(dests) for _, dests in items]
        rows = [file_values(entry) for entry, _ in items]
        # ensure_ascii=False: a value Python cannot encode as UTF-8 (a file name's lone
        # surrogate) fails here as it fails binding, never stored mangled.
        payload = json.dumps(rows, ensure_ascii=False)
        at = clock(now)
        with self._write(what) as conn:
            inserted = {
                path: int(file_id)
                for file_id, path in conn.execute(INSERT_FILES, {"rows": payload, "now": at})
            }
            ids: list[int | None] = []
            jobs: list[tuple[int, str, int]] = []
            for (entry, _), dests in zip(items, ranks, strict=True):
                file_id = inserted.pop(entry.path, None)  # a path twice: the first copy only
                ids.append(file_id)
                if file_id is not None:
                    jobs.extend((file_id, name, rank) for name, rank in dests.items())
            if jobs:
                conn.execute(INSERT_JOBS_MANY, {"jobs": json.dumps(jobs), "now": at})
        return ids

    def _enqueue_one(
        self, entry: FileEntry, destinations: Routed, now: float | None, what: str
    ) -> int | None:
        """One file: its values bound directly (JSON is for batches; the listener queues each
        object alone while the modality waits)."""
        params = file_values(entry)
        params["now"] = at = clock(now)
        dests = json.dumps(ranked(destinations), ensure_ascii=False)
        with self._write(what) as conn:
            row = conn.execute(INSERT_FILE, params).fetchone()
            if row is None:
                return None  # an unfinished row for this path exists
            file_id = int(row[0])
            conn.execute(INSERT_JOBS, {"file_id": file_id, "destinations": dests, "now": at})
        return file_id

    def claim(
        self,
        destination: str,
        limit: int,
        *,
        now: float | None = None,
        oldest: bool = False,
        max_rank: int = LOWEST_RANK,
    ) -> list[Job]:
        """Up to ``limit`` due READY jobs for ``destination``, now CLAIMED: urgent first, then
        normal, then low, and within one priority earliest due first (FIFO among new jobs).
        ``oldest`` ignores priorities (the share the caller reserves so low jobs are never
        starved); ``max_rank`` 0 claims urgent jobs only. One UPDATE ... RETURNING: no job is
        handed out twice."""
        if limit <= 0:
            return []
        params = {
            "destination": destination,
            "limit": limit,
            "now": clock(now),
            "max_rank": max_rank,
        }
        with self._write(f"claiming jobs for {destination}") as conn:
            statement = CLAIM_OLDEST if oldest else CLAIM
            claimed = [r[0] for r in conn.execute(statement, params).fetchall()]
            if not claimed:
                return []
            rows = conn.execute(CLAIMED_JOBS, {"ids": ids_json(claimed)}).fetchall()
        return [Job(*r) for r in rows]

    def ack_done(
        self,
        job_ids: Sequence[int],
        *,
        status: int | None = None,
        now: float | None = None,
        commitment: bool = False,
        sent_uids: Mapping[int, tuple[str, str, str]] | None = None,
    ) -> list[int]:
        """CLAIMED -> DONE (one attempt counted). Returns the ids of files this made terminal.
        ``commitment``: the destination must also commit them (storage commitment or a
        verifying query): the jobs await that and their files do not finish yet.
        ``sent_uids``: job id -> the (Study, Series, SOP Instance) UIDs it was sent with, for
        those whose changes made them differ from the file's own; the others were sent with
        their own. Recorded in the same transaction, for the proof to ask by (None: not said;
        the proof works them out from the routes then in force)."""
        return self._ack_terminal(job_ids, JobStatus.DONE, status, None, now, commitment, sent_uids)

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
        commitment: bool = False,
        sent_uids: Mapping[int, tuple[str, str, str]] | None = None,
    ) -> list[int]:
        ids = _unique_ids(job_ids)
        if not ids:
            return []
        at = clock(now)
        verb = "delivered" if to is JobStatus.DONE else "failed"
        params = {
            "status": to.value,
            "last_status": status,
            "error": error,
            "now": at,
            "commit": 1 if commitment else 0,
            "own": None if sent_uids is None else "",
        }
        with self._write(f"acking {_describe_jobs(ids)} as {verb}") as conn:
            stored_retired: list[Any] = []
            if to is JobStatus.DONE:
                stored_retired = conn.execute(
                    _STORED_RETIRED, {**params, "ids": ids_json(ids)}
                ).fetchall()
            dropped = conn.execute(DROP_CLAIMED, {"ids": ids_json(ids)}).fetchall()
            rows = conn.execute(ACK_TERMINAL, {**params, "ids": ids_json(ids)}).fetchall()
            if stored_retired:
                _say_stored_retired(conn, stored_retired)
                rows += stored_retired
            self._expect_claimed(conn, ids, rows + dropped)
            if sent_uids:  # an edited send (deidentify): none for a file sent as it is
                acked = set(ids)
                sent = [[i, list(u)] for i, u in sent_uids.items() if i in acked]
                conn.execute(RECORD_SENT_UIDS, {"sent": json.dumps(sent)})
            per_destination: dict[str, int] = {}
            for _, _, destination in rows:
                per_destination[destination] = per_destination.get(destination, 0) + 1
            for destination, n in per_destination.items():
                done, failed = (n, 0) if to is JobStatus.DONE else (0, n)
                self._bump(conn, destination, done=done, failed=failed, error=error, now=at)
            file_ids = sorted({r[1] for r in rows + dropped})
            terminal = conn.execute(TERMINAL_FILES, {"ids": ids_json(file_ids)}).fetchall()
        return [r[0] for r in terminal]

    def ack_retry(
        self,
        job_id: int,
        *,
        next_attempt_at: float,
        error: str,
        status: int | None = None,
        now: float | None = None,
        charge: bool = True,
    ) -> None:
        """CLAIMED -> READY again, one attempt counted (none without ``charge``: the file was
        not tried), due at ``next_attempt_at``."""
        params = {
            "id": job_id,
            "charge": 1 if charge else 0,
            "next_attempt_at": next_attempt_at,
            "last_status": status,
            "error": error,
        }
        with self._write(f"acking job {job_id} for a retry") as conn:
            if conn.execute(DROP_CLAIMED, {"ids": ids_json([job_id])}).fetchall():
                return  # no longer routed there; retry_pending() finishes the file if due
            rows = conn.execute(ACK_RETRY, params).fetchall()
            self._expect_claimed(conn, [job_id], rows)
            self._bump(conn, rows[0][2], done=0, failed=0, error=error, now=clock(now))

    def release(self, job_ids: Sequence[int]) -> None:
        """CLAIMED -> READY without counting an attempt: jobs claimed but not tried (shutdown,
        the batch's association failed on an earlier file) or held (the destination rejected
        the association permanently: no file is at fault)."""
        ids = _unique_ids(job_ids)
        if not ids:
            return
        with self._write(f"releasing {_describe_jobs(ids)}") as conn:
            dropped = conn.execute(DROP_CLAIMED, {"ids": ids_json(ids)}).fetchall()
            rows = conn.execute(RELEASE, {"ids": ids_json(ids)}).fetchall()
            self._expect_claimed(conn, ids, rows + dropped)

    def fail_pending(self, destination: str, *, error: str, now: float | None = None) -> list[int]:
        """READY -> FAILED for every job of ``destination`` (e.g. it is no longer configured).
        No attempt counted. Returns the ids of files this made terminal. A slice of jobs a
        transaction, each with its counters and files (all of a large backlog in one held the
        write lock for seconds, the listener's answers waiting): one stopped half way leaves
        the rest READY, failed by the next call."""
        at = clock(now)
        params = {"destination": destination, "error": error, "now": at, "batch": _FAIL_BATCH}
        failed, terminal = 0, list[int]()

        def step(conn: sqlite3.Connection) -> bool:
            nonlocal failed
            rows = conn.execute(FAIL_PENDING, params).fetchall()
            if rows:
                self._bump(conn, destination, done=0, failed=len(rows), error=error, now=at)
                file_ids = sorted({r[0] for r in rows})
                found = conn.execute(TERMINAL_FILES, {"ids": ids_json(file_ids)})
                terminal.extend(r[0] for r in found)
            failed += len(rows)
            return len(rows) < _FAIL_BATCH

        self._in_slices(f"failing the pending jobs of {destination}", step)
        if failed:
            logger.warning("gave up %d jobs for %s: %s", failed, destination, error)
        return terminal

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
                {"ids": ids_json(missing)},
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

    # -- the worker's reads ---------------------------------------------------------------

    def pending_syntaxes(
        self, destination: str, limit: int = 256, window: int = 5000
    ) -> list[PendingSyntax]:
        """Distinct (SOP Class UID, transfer syntax) among the next ``window`` READY and
        CLAIMED jobs for ``destination`` (those in flight, then the earliest due), most common
        first: what the sender should propose. A hint, so its cost stays flat however deep the
        queue: a job outside the window still goes, on contexts negotiated when it comes."""
        with self._scan(f"listing pending transfer syntaxes for {destination}") as conn:
            rows = conn.execute(
                """SELECT f.sop_class_uid, f.transfer_syntax, COUNT(*) AS n
                   FROM (SELECT file_id FROM jobs
                         WHERE destination = :destination AND status IN ('CLAIMED', 'READY')
                         ORDER BY status, next_attempt_at LIMIT :window) AS j
                   JOIN files AS f ON f.id = j.file_id
                   GROUP BY f.sop_class_uid, f.transfer_syntax
                   ORDER BY n DESC, f.sop_class_uid, f.transfer_syntax LIMIT :limit""",
                {"destination": destination, "limit": limit, "window": window},
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
