"""Looking files up by what identifies them (``forwarder find`` and the status page's search).

:meth:`Lookup.find` takes keys (a Study, Series or SOP Instance UID, or an Accession Number; the
kind is not said, every kind is tried) and returns every file row that matches, unfinished or
finished (until :mod:`~forwarder.queue.housekeeping` prunes it), with where the file is now and
its state per destination. Each key is one indexed lookup per column (schema version 4): no
scan, whatever the size of the queue.

Rendering the answer (text, JSON, HTML) is not here: it is the command's and the status page's.
"""

from __future__ import annotations

from collections.abc import Sequence

from forwarder.queue.records import FileState, Finish, FoundFile, FoundJob, JobStatus, KeyKind
from forwarder.queue.sql import FIND_KEY, FOUND_FILES, FOUND_JOBS
from forwarder.queue.store import Store, ids_json

MAX_KEY_LENGTH = 256  # longer than any UID (64) or Accession Number (16): cannot match


class Lookup(Store):
    """``forwarder find``'s part of :class:`forwarder.queue.Queue`."""

    def find(self, keys: Sequence[str]) -> list[FoundFile]:
        """Every file any of ``keys`` matches (surrounding spaces ignored), by file id (the
        order they were queued), each with the keys it matched and its jobs by destination."""
        wanted = list(dict.fromkeys(k.strip() for k in keys))
        wanted = [k for k in wanted if k and len(k) <= MAX_KEY_LENGTH]
        if not wanted:
            return []
        with self._scan("finding files") as conn:
            matched: dict[int, list[tuple[str, KeyKind]]] = {}
            for key in wanted:
                for file_id, kind in conn.execute(FIND_KEY, {"key": key}).fetchall():
                    matched.setdefault(int(file_id), []).append((key, KeyKind(kind)))
            if not matched:
                return []
            ids = {"ids": ids_json(sorted(matched))}
            files = conn.execute(FOUND_FILES, ids).fetchall()
            jobs: dict[int, list[FoundJob]] = {}
            for r in conn.execute(FOUND_JOBS, ids).fetchall():
                jobs.setdefault(r[0], []).append(FoundJob(r[1], JobStatus(r[2]), *r[3:]))
        found: list[FoundFile] = []
        for (
            file_id,
            rel_path,
            path,
            final_path,
            state,
            outcome,
            sop_instance_uid,
            study_instance_uid,
            series_instance_uid,
            created_at,
            finished_at,
            retried_as,
            calling_ae,
            called_ae,
            peer,
            association,
            size,
        ) in files:
            file_state = FileState(state)
            found.append(
                FoundFile(
                    file_id=file_id,
                    rel_path=rel_path,
                    # Until the move is recorded (FINISHED) the queue says incoming; while
                    # FINISHING it may already be at moving_to.
                    path=final_path if file_state is FileState.FINISHED and final_path else path,
                    moving_to=final_path if file_state is FileState.FINISHING else None,
                    state=file_state,
                    outcome=None if outcome is None else Finish(outcome),
                    matched=tuple(matched[file_id]),
                    sop_instance_uid=sop_instance_uid,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    created_at=created_at,
                    finished_at=finished_at,
                    retried_as=retried_as,
                    jobs=tuple(jobs.get(file_id, ())),
                    origin=None
                    if calling_ae is None
                    else (calling_ae, called_ae or "", peer or "", association or ""),
                    size=size or 0,
                )
            )
        return found
