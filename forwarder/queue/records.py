"""The records the queue hands out and takes in: statuses and frozen, slotted dataclasses.

Kept apart from the queue's parts (:mod:`forwarder.queue.jobs` and its siblings), which all
use them; :mod:`forwarder.queue` re-exports every name here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

#: A route's ``priority`` as the queue stores it per job (claimed lowest rank first).
PRIORITY_RANK = {"urgent": 0, "normal": 1, "low": 2}
NORMAL_RANK = PRIORITY_RANK["normal"]


class JobStatus(enum.StrEnum):
    READY = "READY"
    CLAIMED = "CLAIMED"
    DONE = "DONE"
    FAILED = "FAILED"


class FileState(enum.StrEnum):
    QUEUED = "QUEUED"
    FINISHING = "FINISHING"
    FINISHED = "FINISHED"


class Finish(enum.StrEnum):
    """How a file finishes once every job is terminal: moved to done/ or to failed/."""

    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """What ingest enqueues: a complete file in incoming and the header values the sender needs."""

    path: str
    rel_path: str
    size: int
    mtime_ns: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    # What ``forwarder find`` looks files up by ("": the file has none).
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    accession_number: str = ""
    # Where it came from, for a file received through ``listen`` ("": the watch folder).
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""  # host:port
    association: str = ""
    # Where the data set starts (the meta header's end), as checked; 0: not recorded (the
    # sender reads the meta header again).
    dataset_offset: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed delivery: send the file at ``path`` to ``destination``, then ack ``id``."""

    id: int
    file_id: int
    destination: str
    path: str
    rel_path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    attempts: int  # completed attempts before this one
    created_at: float
    mtime_ns: int = 0  # as queued: a file whose size or mtime differs was replaced since
    calling_ae: str = ""  # received through ``listen`` from this AE title ("": watch folder)
    priority: int = 1  # PRIORITY_RANK: 0 urgent, 1 normal, 2 low (claimed in that order)
    dataset_offset: int = 0  # as queued (FileEntry.dataset_offset); 0: not recorded


@dataclass(frozen=True, slots=True)
class JobResult:
    """One destination's outcome for a file, for ``NAME.error.json``."""

    destination: str
    status: JobStatus
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class FileToFinish:
    """A file whose jobs are all terminal (``QUEUED``), or one caught mid-finish (``FINISHING``)."""

    file_id: int
    path: str
    rel_path: str
    state: FileState
    outcome: Finish  # "done" if every job is DONE, else "failed"
    final_path: str | None  # set once begin_finish ran
    results: tuple[JobResult, ...]
    calling_ae: str = ""  # received through ``listen`` from this AE title ("": watch folder)
    # The version queued, as ingest saw it (mtime_ns 0: not recorded): what is at ``path`` now
    # may be another file dropped again under that name, which must not be moved in its place.
    size: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True, slots=True)
class DestinationStats:
    pending: int  # READY jobs, including those waiting out a retry delay
    in_flight: int  # CLAIMED jobs
    done: int  # cumulative, survives prune()
    failed: int  # cumulative, survives prune()
    oldest_pending_seconds: float | None  # age of the oldest READY or CLAIMED job
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Replaced:
    """What :meth:`Queue.replace_file` changed: the destinations the new version goes to
    (again), and those it is no longer routed to (their undelivered jobs dropped)."""

    file_id: int
    destinations: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Retired:
    """What :meth:`Queue.retire_file` ended: the version that was queued at a path, which went
    to done/ or failed/ unqueued, and where each destination stood with it then (``CLAIMED``:
    its send was under way, and ends on the version the sender had open)."""

    file_id: int
    sop_instance_uid: str
    results: tuple[JobResult, ...]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    requeued: int  # CLAIMED jobs returned to READY
    finishing: tuple[FileToFinish, ...]


@dataclass(frozen=True, slots=True)
class FailedFile:
    """A file that ended in failed/ and has not been retried yet (for ``forwarder retry``)."""

    file_id: int
    final_path: str
    rel_path: str
    destinations: tuple[str, ...]  # every destination whose job FAILED, sorted
    finished_at: float


class PendingSyntax(NamedTuple):
    sop_class_uid: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class DestinationState:
    """A destination's last recorded state (:meth:`Queue.set_destination_state`)."""

    state: str  # "up" or "down"
    error: str | None  # why it is down
    since: float  # Unix time


class KeyKind(enum.StrEnum):
    """Which recorded value a ``forwarder find`` key matched (the DICOM keyword)."""

    STUDY = "StudyInstanceUID"
    SERIES = "SeriesInstanceUID"
    SOP_INSTANCE = "SOPInstanceUID"
    ACCESSION = "AccessionNumber"


@dataclass(frozen=True, slots=True)
class FoundJob:
    """One destination's state for a found file."""

    destination: str
    status: JobStatus
    attempts: int  # completed attempts
    next_attempt_at: float | None  # READY only: when it is due
    last_status: int | None  # the last DICOM status (or HTTP status) answered
    last_error: str | None
    finished_at: float | None  # DONE or FAILED: when


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A file :meth:`Queue.find` found: where it is now and its state per destination."""

    file_id: int
    rel_path: str
    path: str  # where it is now: in incoming, or its final path in done/ or failed/
    state: FileState
    outcome: Finish | None  # once it is FINISHING or FINISHED
    matched: tuple[tuple[str, KeyKind], ...]  # (the key given, what it matched), in key order
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    created_at: float
    finished_at: float | None
    retried_as: int | None  # a failed file put back by ``forwarder retry``: its new file id
    jobs: tuple[FoundJob, ...]  # by destination name
    # Received through ``listen``: calling AE, called AE, peer host:port, association (else None)
    origin: tuple[str, str, str, str] | None = None
    # FINISHING: the final path it is being moved to; until the queue records the move the file
    # is at ``path`` or already there
    moving_to: str | None = None
    # Its size in bytes as queued (0: not known), so that a copy cut short since can be told
    size: int = 0
