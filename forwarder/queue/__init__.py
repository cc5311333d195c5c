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

:class:`Queue` is the one class the rest of forwarder uses. It is made of parts, one concern
each, that share one connection and one lock (:class:`~forwarder.queue.store.Store`):

- :mod:`~forwarder.queue.store`: the connection, pragmas, schema and transactions;
- :mod:`~forwarder.queue.jobs`: the state machine (enqueue, claim, ack, retry, release, recover);
- :mod:`~forwarder.queue.replacing`: a file replaced in incoming while queued;
- :mod:`~forwarder.queue.finishing`: files whose jobs are all terminal, moved in two steps;
- :mod:`~forwarder.queue.stats`: statistics and problems, for ``forwarder status`` and metrics;
- :mod:`~forwarder.queue.requeue`: failed files put back in the queue (``forwarder retry``);
- :mod:`~forwarder.queue.lookup`: files found by UID or Accession Number (``forwarder find``);
- :mod:`~forwarder.queue.housekeeping`: pruning old finished files;
- :mod:`~forwarder.queue.commitments`: proof of delivery (stored instances awaiting storage
  commitment or a verifying query, and the transactions);
- :mod:`~forwarder.queue.control`: destinations an operator paused (``forwarder pause``);
- :mod:`~forwarder.queue.records` (the records handed out and taken in) and
  :mod:`~forwarder.queue.sql` (the schema and statements).
"""

from __future__ import annotations

from forwarder.queue.commitments import (
    CommitItem,
    CommitmentCounts,
    Commitments,
    OpenCommitment,
    Resolution,
)
from forwarder.queue.control import Control
from forwarder.queue.finishing import Finishing
from forwarder.queue.housekeeping import Housekeeping
from forwarder.queue.jobs import Jobs
from forwarder.queue.lookup import Lookup
from forwarder.queue.records import (
    NORMAL_RANK,
    PRIORITY_RANK,
    DestinationState,
    DestinationStats,
    FailedFile,
    FileEntry,
    FileState,
    FileToFinish,
    Finish,
    FoundFile,
    FoundJob,
    Job,
    JobResult,
    JobStatus,
    KeyKind,
    PendingSyntax,
    RecoveryReport,
    Replaced,
    Retired,
)
from forwarder.queue.replacing import Replacing
from forwarder.queue.requeue import Requeue
from forwarder.queue.stats import Statistics
from forwarder.queue.store import SCHEMA_VERSION
from forwarder.queue.uidmap import UidMap

__all__ = [
    "NORMAL_RANK",
    "PRIORITY_RANK",
    "SCHEMA_VERSION",
    "CommitItem",
    "CommitmentCounts",
    "DestinationState",
    "DestinationStats",
    "FailedFile",
    "FileEntry",
    "FileState",
    "FileToFinish",
    "Finish",
    "FoundFile",
    "FoundJob",
    "Job",
    "JobResult",
    "JobStatus",
    "KeyKind",
    "OpenCommitment",
    "PendingSyntax",
    "Queue",
    "RecoveryReport",
    "Replaced",
    "Resolution",
    "Retired",
]


class Queue(
    Jobs,
    Replacing,
    Finishing,
    Statistics,
    Requeue,
    Lookup,
    Housekeeping,
    UidMap,
    Control,
    Commitments,
):
    """The persistent queue in one SQLite file. Thread-safe; close it (or use ``with``).

    ``create=False`` refuses to create a missing database (for ``forwarder status``).
    """
