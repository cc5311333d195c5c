"""A file replaced in incoming while it is queued: what ingest compares, and routing it afresh.

Ingest notices a replaced file by comparing size and mtime with :meth:`Replacing.active_files`,
then hands the new version's header values and routing to :meth:`Replacing.replace_file`: each
destination routed now receives the new version (again), destinations no longer routed keep
what they already stored. A job claimed meanwhile is marked stale and its ack (in
:mod:`~forwarder.queue.jobs`) sends it again or drops it. A file replaced by one that is not
queued at all (not DICOM any more, no route, a discard route) ends its row with
:meth:`Replacing.retire_file` before ingest moves it to failed/ or done/.

Reading headers and routing are not here: they are the daemon's ingest and router.
"""

from __future__ import annotations

import json

from forwarder.errors import QueueError
from forwarder.queue.records import FileEntry, Finish, JobResult, JobStatus, Replaced, Retired
from forwarder.queue.sql import FREEZE_OWN_SENT_UIDS, RESULTS
from forwarder.queue.store import (
    Routed,
    Store,
    clock,
    file_values,
    ids_json,
    ranked_json,
    routed_to,
)


class Replacing(Store):
    """Replaced files (a part of :class:`forwarder.queue.Queue`)."""

    def active_files(self, under: str | None = None) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) as queued, for every unfinished file (ingest notices a
        file replaced in incoming by comparing); ``under``: only those in that folder and
        below (a range on the unfinished-path index, not a read of every queued file)."""
        sql = "SELECT path, size, mtime_ns FROM files WHERE state != 'FINISHED'"
        bounds: dict[str, str] = {}
        if under is not None:
            # Every path below FOLDER starts with "FOLDER/"; "0" is the character after "/".
            sql += " AND path >= :low AND path < :high"
            folder = under.rstrip("/")
            bounds = {"low": folder + "/", "high": folder + "0"}
        with self._scan("listing queued files") as conn:
            rows = conn.execute(sql, bounds).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def replace_file(
        self,
        entry: FileEntry,
        destinations: Routed,
        *,
        now: float | None = None,
        changed_only: bool = False,
    ) -> Replaced | None:
        """The file at ``entry.path`` was replaced in incoming while QUEUED: record its new
        header values and routing (``destinations``, routed afresh from the new version).

        For each destination routed now, the new version is sent (again): DONE and FAILED jobs
        go back to READY, CLAIMED ones are marked stale (their ack puts them back to READY), a
        destination routed for the first time gets a job. Destinations no longer routed keep
        what they already stored (DONE stays); their READY and FAILED jobs are deleted and a
        CLAIMED one is deleted when its claim ends. Returns None when no QUEUED row has that
        path (finishing or finished: nothing to do); with ``changed_only``, also when the row
        already has the entry's size and mtime (queued as it is, by another process)."""
        params = {**file_values(entry), "now": clock(now)}
        changed = " AND (size != :size OR mtime_ns != :mtime_ns)" if changed_only else ""
        routed_now = routed_to(destinations)
        with self._write(f"recording that {entry.path} was replaced") as conn:
            conn.execute(FREEZE_OWN_SENT_UIDS, {"path": entry.path})
            # By the unfinished-path index ("state != 'FINISHED'" lets SQLite use it, "+state"
            # keeps it off files_state, which walks every QUEUED file under the write lock).
            row = conn.execute(
                """UPDATE files SET size = :size, mtime_ns = :mtime_ns,
                          sop_class_uid = :sop_class_uid, sop_instance_uid = :sop_instance_uid,
                          transfer_syntax = :transfer_syntax, dataset_offset = :dataset_offset,
                          study_instance_uid = :study_instance_uid,
                          series_instance_uid = :series_instance_uid,
                          accession_number = :accession_number,
                          calling_ae = :calling_ae, called_ae = :called_ae, peer = :peer,
                          association = :association
                   WHERE path = :path AND state != 'FINISHED' AND +state = 'QUEUED'"""
                + changed
                + " RETURNING id",
                params,
            ).fetchone()
            if row is None:
                return None
            ids = {
                "id": row[0],
                "now": params["now"],
                "dests": json.dumps(routed_now),
                "ranks": ranked_json(destinations),
            }
            routed = "destination IN (SELECT value FROM json_each(:dests))"
            conn.execute(
                f"""UPDATE jobs SET status = 'READY', attempts = 0, next_attempt_at = :now,
                          finished_at = NULL, last_status = NULL, commitment = 0,
                          commit_txn = NULL
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
                """INSERT INTO jobs (file_id, destination, status, next_attempt_at, created_at,
                                     priority)
                   SELECT :id, key, 'READY', :now, :now, value FROM json_each(:ranks)
                   WHERE key NOT IN (SELECT destination FROM jobs WHERE file_id = :id)""",
                ids,
            )
            # The new version's routes decide its priority everywhere it still goes.
            conn.execute(
                """UPDATE jobs SET priority = (SELECT value FROM json_each(:ranks)
                                               WHERE key = jobs.destination)
                   WHERE file_id = :id AND destination IN (SELECT key FROM json_each(:ranks))""",
                ids,
            )
        return Replaced(
            file_id=int(row[0]),
            destinations=tuple(routed_now),
            dropped=tuple(sorted(r[0] for r in dropped)),
        )

    def retire_file(
        self, path: str, final_path: str, outcome: Finish, *, now: float | None = None
    ) -> Retired | None:
        """The file at ``path`` was replaced in incoming while QUEUED by one that is not queued
        (not DICOM any more, no route: ``outcome`` failed; a discard route: done), which the
        caller moves to ``final_path`` next: in one transaction the row ends there (FINISHED),
        so that nothing looks for the file in incoming again. Nothing more of the version
        queued is sent: it is gone. DONE jobs stay (their destination stored it; one awaiting
        a commitment is not sent again), READY and FAILED jobs are deleted, and a CLAIMED one
        ends with its claim (the sender had that version open: what it stores is that version,
        whole, or the send fails): DONE when it was stored, else deleted. Returns the version
        queued and every destination's state then, or None when no QUEUED row has that path
        (finished, or being moved out: :meth:`moving_out`).

        A crash after this commit, before the move, leaves the file in incoming unqueued: the
        rescan at start takes it as a new file (to failed/ or done/ again)."""
        params = {
            "path": path,
            "final_path": final_path,
            "outcome": outcome.value,
            "now": clock(now),
        }
        with self._write(f"retiring the version of {path} queued before") as conn:
            # By the unfinished-path index, as in replace_file.
            row = conn.execute(
                """UPDATE files SET state = 'FINISHED', outcome = :outcome,
                          final_path = :final_path, finished_at = :now
                   WHERE path = :path AND state != 'FINISHED' AND +state = 'QUEUED'
                   RETURNING id, sop_instance_uid""",
                params,
            ).fetchone()
            if row is None:
                return None
            ids = {"id": row[0], "ids": ids_json([row[0]])}
            results = tuple(
                JobResult(r[1], JobStatus(r[2]), *r[3:])
                for r in conn.execute(RESULTS, ids).fetchall()
            )
            conn.execute(
                "DELETE FROM jobs WHERE file_id = :id AND status IN ('READY', 'FAILED')", ids
            )
            conn.execute(
                "UPDATE jobs SET stale = 2 WHERE file_id = :id AND status = 'CLAIMED'", ids
            )
            conn.execute(
                """UPDATE jobs SET commitment = 0, commit_txn = NULL
                   WHERE file_id = :id AND status = 'DONE' AND commitment IN (1, 2)""",
                ids,
            )
        return Retired(file_id=int(row[0]), sop_instance_uid=str(row[1]), results=results)

    def retarget_retired(self, file_id: int, final_path: str) -> None:
        """A row :meth:`retire_file` ended goes to ``final_path`` instead of the path recorded:
        another file was put there before the move (which never replaces one)."""
        params = {"id": file_id, "final_path": final_path}
        with self._write(f"recording that file {file_id} went to {final_path}") as conn:
            changed = conn.execute(
                "UPDATE files SET final_path = :final_path WHERE id = :id AND state = 'FINISHED'",
                params,
            ).rowcount
            if changed != 1:
                raise QueueError(
                    f"queue database {self._path}: cannot record that file {file_id} went to "
                    f"{final_path}: it is not a finished file"
                )

    def unfinished(self, path: str) -> bool:
        """Whether a row that is not FINISHED has ``path`` (QUEUED or FINISHING): a file
        queued by another connection (the listener's receiving process, ``forwarder retry``)
        that the caller's own bookkeeping does not know of."""
        return self._exists(
            f"reading whether {path} is queued",
            "SELECT 1 FROM files WHERE path = :path AND state != 'FINISHED'",
            {"path": path},
        )

    def moving_out(self, path: str) -> bool:
        """Whether the finisher is moving the file at ``path`` out (its row FINISHING): what is
        there now is left alone until it is done (its check leaves a file replaced meanwhile
        where it is, and the watcher offers it again then)."""
        return self._exists(
            f"reading the state of {path}",
            "SELECT 1 FROM files WHERE path = :path AND state != 'FINISHED' "
            "AND +state = 'FINISHING'",
            {"path": path},
        )

    def is_dropped(self, job_id: int) -> bool:
        """Whether a CLAIMED job was dropped while claimed (its file replaced by a version not
        routed to its destination, or by a file not queued at all): the end of its claim
        deletes it. A worker finding its file gone asks, not to report a failure."""
        return self._exists(
            f"reading whether job {job_id} is still wanted",
            "SELECT 1 FROM jobs WHERE id = :id AND status = 'CLAIMED' AND stale = 2",
            {"id": job_id},
        )

    def _exists(self, what: str, query: str, params: dict[str, object]) -> bool:
        """Whether ``query`` (a SELECT 1 by key) finds a row."""
        with self._read(what) as conn:
            return conn.execute(query, params).fetchone() is not None
