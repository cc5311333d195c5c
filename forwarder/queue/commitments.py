"""Proof of delivery in the queue: stored instances awaiting commitment, and the transactions.

A destination that requires proof (storage commitment, or a verifying C-FIND) acks a stored
job ``DONE`` with ``commitment = 1``: stored, not yet proven; its file does not finish. The
daemon groups such jobs into a *transaction* (:meth:`Commitments.begin_commitment`: the row in
``commitments`` with its deadline, the jobs ``commitment = 2`` naming it), committed *before*
the request goes out, so a crash at any point leaves every transaction either awaited (its
report is still accepted after a restart) or expired at its deadline. The outcome is recorded
in one transaction (:meth:`Commitments.resolve_commitment`): committed jobs ``commitment = 3``
(the file may finish), the others sent again (``READY``, ``resends + 1``) while ``resends`` is
below the limit, else ``FAILED`` with "stored but not committed" and the peer's reason. Nothing
is marked committed but what a trusted report (or query) named committed; a second outcome for
the same transaction changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from forwarder.errors import QueueError
from forwarder.queue.sql import TERMINAL_FILES
from forwarder.queue.store import Store, clock, ids_json

AWAITING = 1
REQUESTED = 2
COMMITTED = 3
_DROP_BATCH = 500  # instances drop_proof() releases a transaction: ~5 ms of the write lock


@dataclass(frozen=True, slots=True)
class CommitItem:
    """One stored instance awaiting proof, or part of a transaction."""

    job_id: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    stored_at: float
    path: str = ""  # the file (in incoming while it awaits proof)
    rel_path: str = ""
    calling_ae: str = ""  # received through ``listen`` from this AE title ("": watch folder)
    # The (Study, Series, SOP Instance) UIDs it was sent with, as recorded when it was acked
    # (its own, or those its changes gave it); None: not recorded (stored before schema 10),
    # the proof works them out from the routes in force.
    sent_uids: tuple[str, str, str] | None = None


def _item(row: Sequence[Any]) -> CommitItem:
    """A :class:`CommitItem` from a row of :data:`_ITEM_COLUMNS`."""
    job_id, sop_class, sop, study, series, stored_at, path, rel_path, calling_ae, recorded = row
    sent: tuple[str, str, str] | None = None
    if recorded == "":  # sent with its own
        sent = (study, series, sop)
    elif recorded is not None:
        try:
            uids = json.loads(recorded)
        except (ValueError, TypeError):
            uids = None
        # Only what this code writes, a JSON array of three strings; anything else (a string,
        # numbers, null, more or fewer items) is not recorded: never asked by 'None' or '1'.
        if isinstance(uids, list) and len(uids) == 3 and all(isinstance(u, str) for u in uids):
            sent = (uids[0], uids[1], uids[2])
    return CommitItem(
        job_id, sop_class, sop, study, series, stored_at, path, rel_path, calling_ae, sent
    )


@dataclass(frozen=True, slots=True)
class OpenCommitment:
    """A transaction requested and not yet resolved."""

    uid: str
    destination: str
    kind: str  # "stgcmt" or "query"
    created_at: float
    deadline: float
    items: tuple[CommitItem, ...]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What :meth:`Commitments.resolve_commitment` did."""

    committed: int
    resent: int
    failed: int
    finished_files: tuple[int, ...]  # files this made terminal, for the finisher


@dataclass(frozen=True, slots=True)
class CommitmentCounts:
    """Per destination: instances awaiting proof, and the cumulative counters."""

    awaiting: int
    committed: int
    uncommitted: int  # instances reported not committed (each time, resent or failed)


_ITEM_COLUMNS = """j.id, f.sop_class_uid, f.sop_instance_uid, COALESCE(f.study_instance_uid, ''),
       COALESCE(f.series_instance_uid, ''), COALESCE(j.finished_at, j.created_at), f.path,
       f.rel_path, COALESCE(f.calling_ae, ''), j.sent_uids"""


class Commitments(Store):
    """Storage commitment and verifying queries (a part of :class:`forwarder.queue.Queue`)."""

    def awaiting_commitment(self, destination: str, limit: int = 10000) -> list[CommitItem]:
        """Jobs of ``destination`` stored and not yet in a transaction, oldest first. Read on
        the statistics connection: up to ``limit`` sorted rows, once a second per destination
        (0.1-0.2 s at 200,000 awaiting) must not hold claims, acks and enqueues.
        :meth:`begin_commitment` checks again what it takes."""
        with self._scan(f"listing instances awaiting commitment at {destination}") as conn:
            rows = conn.execute(
                f"""SELECT {_ITEM_COLUMNS} FROM jobs AS j JOIN files AS f ON f.id = j.file_id
                    WHERE j.destination = :d AND j.status = 'DONE' AND j.commitment = 1
                      AND j.commitment IN (1, 2)
                    ORDER BY j.finished_at, j.id LIMIT :limit""",
                {"d": destination, "limit": limit},
            ).fetchall()
        return [_item(r) for r in rows]

    def begin_commitment(
        self,
        uid: str,
        destination: str,
        kind: str,
        job_ids: Sequence[int],
        *,
        deadline: float,
        now: float | None = None,
    ) -> None:
        """Record transaction ``uid`` for ``job_ids`` (each DONE, awaiting); all or nothing."""
        at = clock(now)
        with self._write(f"recording commitment transaction {uid} for {destination}") as conn:
            conn.execute(
                """INSERT INTO commitments (uid, destination, kind, state, created_at, deadline)
                   VALUES (:uid, :d, :kind, 'REQUESTED', :now, :deadline)""",
                {"uid": uid, "d": destination, "kind": kind, "now": at, "deadline": deadline},
            )
            changed = conn.execute(
                """UPDATE jobs SET commitment = 2, commit_txn = :uid
                   WHERE id IN (SELECT value FROM json_each(:ids)) AND destination = :d
                     AND status = 'DONE' AND commitment = 1""",
                {"uid": uid, "d": destination, "ids": ids_json(job_ids)},
            ).rowcount
            if changed != len(set(job_ids)):
                raise QueueError(
                    f"queue database {self._path}: {len(set(job_ids)) - changed} of the jobs "
                    f"of commitment transaction {uid} no longer await commitment"
                )

    def cancel_commitment(self, uid: str) -> None:
        """The request could not be made (the peer is down): its jobs await a new one."""
        with self._write(f"cancelling commitment transaction {uid}") as conn:
            conn.execute(
                """UPDATE commitments SET state = 'CANCELLED'
                   WHERE uid = :uid AND state = 'REQUESTED'""",
                {"uid": uid},
            )
            conn.execute(
                """UPDATE jobs SET commitment = 1, commit_txn = NULL
                   WHERE commit_txn = :uid AND status = 'DONE' AND commitment = 2""",
                {"uid": uid},
            )

    def open_commitments(
        self, destination: str | None = None, *, due_by: float | None = None
    ) -> list[OpenCommitment]:
        """Every transaction still REQUESTED (of ``destination``; with ``due_by``, only those
        whose deadline is not after it), with its instances."""
        with self._read("listing open commitment transactions") as conn:
            txns = conn.execute(
                """SELECT uid, destination, kind, created_at, deadline FROM commitments
                   WHERE state = 'REQUESTED' AND (:d IS NULL OR destination = :d)
                     AND (:due IS NULL OR deadline <= :due)
                   ORDER BY deadline""",
                {"d": destination, "due": due_by},
            ).fetchall()
            out = []
            for uid, dest, kind, created, deadline in txns:
                rows = conn.execute(
                    f"""SELECT {_ITEM_COLUMNS} FROM jobs AS j JOIN files AS f ON f.id = j.file_id
                        WHERE j.commit_txn = :uid AND j.status = 'DONE' AND j.commitment = 2
                        ORDER BY j.id""",
                    {"uid": uid},
                ).fetchall()
                items = tuple(_item(r) for r in rows)
                out.append(OpenCommitment(uid, dest, kind, created, deadline, items))
        return out

    def drop_proof(self, destination: str) -> tuple[int, list[int]]:
        """``destination`` no longer requires proof (its key was removed, or it was): what it
        stored and had not yet proven counts as delivered, as without proof; its open
        transactions are cancelled. Returns (instances released, files this made terminal).
        Nothing is counted as committed.

        A slice of instances a transaction (all at once held the write lock for seconds, a
        reload's, with the listener's answers waiting); the open transactions are cancelled
        with the last slice, so an instance still requested is never in a cancelled one. One
        stopped half way leaves the rest awaiting, released by the next call (at start)."""
        params = {"d": destination, "batch": _DROP_BATCH}
        released, terminal = 0, list[int]()

        def step(conn: sqlite3.Connection) -> bool:
            nonlocal released
            rows = conn.execute(
                """UPDATE jobs SET commitment = 0, commit_txn = NULL
                   WHERE id IN (SELECT id FROM jobs
                                WHERE destination = :d AND commitment IN (1, 2)
                                  AND status = 'DONE' LIMIT :batch)
                   RETURNING file_id""",
                params,
            ).fetchall()
            if rows:
                files = sorted({r[0] for r in rows})
                found = conn.execute(TERMINAL_FILES, {"ids": ids_json(files)})
                terminal.extend(r[0] for r in found)
            released += len(rows)
            last = len(rows) < _DROP_BATCH
            if last:
                conn.execute(
                    """UPDATE commitments SET state = 'CANCELLED'
                       WHERE destination = :d AND state = 'REQUESTED'""",
                    params,
                )
            return last

        self._in_slices(f"dropping the proof of delivery of {destination}", step)
        return released, terminal

    def commitment_destination(self, uid: str) -> str | None:
        """The destination of transaction ``uid`` (None: unknown)."""
        with self._read(f"reading commitment transaction {uid}") as conn:
            row = conn.execute(
                "SELECT destination FROM commitments WHERE uid = :uid", {"uid": uid}
            ).fetchone()
        return None if row is None else str(row[0])

    def resolve_commitment(
        self,
        uid: str,
        committed: Sequence[int],
        not_committed: Sequence[tuple[int, str]],
        *,
        max_resends: int,
        outcome: str,
        now: float | None = None,
    ) -> Resolution | None:
        """Record the outcome of transaction ``uid``: ``committed`` job ids proven, each of
        ``not_committed`` (job id, reason) sent again or, past ``max_resends``, failed. Jobs
        of the transaction in neither list are not committed ("not reported"). None when the
        transaction is not open (resolved before, cancelled, unknown): nothing changes."""
        at = clock(now)
        with self._write(f"recording the outcome of commitment transaction {uid}") as conn:
            row = conn.execute(
                """UPDATE commitments SET state = 'RESOLVED', resolved_at = :now,
                          outcome = :outcome
                   WHERE uid = :uid AND state = 'REQUESTED' RETURNING destination""",
                {"uid": uid, "now": at, "outcome": outcome},
            ).fetchone()
            if row is None:
                return None
            destination = row[0]
            members = dict(
                conn.execute(
                    """SELECT id, resends FROM jobs WHERE commit_txn = :uid
                       AND status = 'DONE' AND commitment = 2""",
                    {"uid": uid},
                ).fetchall()
            )
            good = [j for j in dict.fromkeys(committed) if j in members]
            reasons = {j: why for j, why in not_committed if j in members and j not in good}
            for j in members:
                if j not in good and j not in reasons:
                    reasons[j] = "not reported"
            conn.execute(
                """UPDATE jobs SET commitment = 3, commit_txn = NULL
                   WHERE id IN (SELECT value FROM json_each(:ids))""",
                {"ids": ids_json(good)},
            )
            resent = failed = 0
            for job_id, why in reasons.items():
                if members[job_id] < max_resends:
                    conn.execute(
                        """UPDATE jobs SET status = 'READY', commitment = 0, commit_txn = NULL,
                                  resends = resends + 1, next_attempt_at = :now,
                                  finished_at = NULL, last_error = :error
                           WHERE id = :id""",
                        {"id": job_id, "now": at, "error": f"not committed, sent again: {why}"},
                    )
                    resent += 1
                else:
                    error = f"stored but not committed: {why}"
                    conn.execute(
                        """UPDATE jobs SET status = 'FAILED', commitment = 0, commit_txn = NULL,
                                  finished_at = :now, last_error = :error
                           WHERE id = :id""",
                        {"id": job_id, "now": at, "error": error},
                    )
                    failed += 1
            conn.execute(
                """INSERT INTO destination_stats (destination) VALUES (:d)
                   ON CONFLICT (destination) DO NOTHING""",
                {"d": destination},
            )
            conn.execute(
                """UPDATE destination_stats SET committed_total = committed_total + :c,
                          uncommitted_total = uncommitted_total + :u,
                          failed_total = failed_total + :f,
                          last_error = CASE WHEN :f > 0 THEN :error ELSE last_error END,
                          last_error_at = CASE WHEN :f > 0 THEN :now ELSE last_error_at END
                   WHERE destination = :d""",
                {
                    "d": destination,
                    "c": len(good),
                    "u": len(reasons),
                    "f": failed,
                    "error": next(iter(reasons.values()), None),
                    "now": at,
                },
            )
            files = conn.execute(
                "SELECT DISTINCT file_id FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))",
                {"ids": json.dumps(list(members))},
            ).fetchall()
            terminal = conn.execute(
                TERMINAL_FILES, {"ids": ids_json(r[0] for r in files)}
            ).fetchall()
        return Resolution(len(good), resent, failed, tuple(r[0] for r in terminal))

    def commitment_counts(self) -> dict[str, CommitmentCounts]:
        """Per destination with any commitment activity."""
        with self._scan("counting instances awaiting commitment") as conn:
            awaiting = dict(
                conn.execute(
                    """SELECT destination, COUNT(*) FROM jobs
                       WHERE status = 'DONE' AND commitment IN (1, 2) GROUP BY destination"""
                ).fetchall()
            )
            totals = {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    "SELECT destination, committed_total, uncommitted_total FROM destination_stats"
                ).fetchall()
            }
        names = set(awaiting) | {n for n, t in totals.items() if any(t)}
        return {
            n: CommitmentCounts(awaiting.get(n, 0), *totals.get(n, (0, 0))) for n in sorted(names)
        }
