"""What a channel is asked to store, and what came of each file: :class:`StoreRequest` and
:class:`SendOutcome`, the records both channels share (C-STORE,
:class:`forwarder.net.channel.Channel`; STOW-RS, :class:`forwarder.dicomweb.channel.StowChannel`)
and the daemon's workers, ``forwarder send`` and ``--report`` read.

Each outcome carries the :class:`~forwarder.net.status.Outcome` its response status maps to
(:mod:`forwarder.net.status` holds that classification).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.dicom.part10 import FileMeta
from forwarder.net.status import Outcome

if TYPE_CHECKING:  # pydicom is imported only when an object is changed
    from forwarder.dicom.edit import Editor


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """A file to store. ``key`` is the caller's handle (a job id, an index)."""

    path: str
    key: int = 0
    meta: FileMeta | None = None  # read from the file when not given
    # The data set's own (SOP Class UID, SOP Instance UID) when a whole-file check found them
    # (the daemon's ingest): they win over the meta header's that read_meta may fall back to.
    dataset_uids: tuple[str, str] | None = None
    # Changes to make to what is sent (modify, deidentify: :mod:`forwarder.dicom.edit`); the
    # file itself is never changed. Empty: the file is streamed byte for byte.
    edits: tuple[Editor, ...] = ()
    # The C-STORE Priority (PS3.7: 0 medium, 1 high, 2 low); None: the settings' priority.
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """The result of one C-STORE attempt, for logs, the queue and ``--report``."""

    request: StoreRequest
    outcome: Outcome
    status: int | None  # the DIMSE status, when the peer answered
    error: str | None  # why it is not plainly stored
    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax: str | None  # the file's
    sent_transfer_syntax: str | None
    association: int | None  # association number, 1-based per process
    nbytes: int
    seconds: float
    # False when no attempt is to be charged to the file: it was not tried (the association
    # for an earlier file of the batch failed), or the association was rejected permanently
    # (our AE title unknown there...: the configuration or the peer is at fault, no file is).
    attempted: bool = True
    # True when this outcome is the failure to open an association in this batch (the file
    # that was tried, and the rest of the batch answered with the same reason). What a caller
    # must use to tell "the peer is down" from a file's own fault: Channel.down is the last
    # association attempt's error and stays set through batches that never try one.
    association_failed: bool = False
    # True when the association broke while this file was on it (aborted, reset, timed out):
    # a connection-level failure like association_failed, though the file was tried.
    association_broke: bool = False
    # The Study, Series and SOP Instance UID the object was sent with when its changes
    # (deidentify, modify) made any differ from the file's own; None: its own. What the
    # destination holds it by, which the daemon records for its proof of delivery.
    sent_uids: tuple[str, str, str] | None = None

    @classmethod
    def without_data(
        cls,
        request: StoreRequest,
        meta: FileMeta | None,
        outcome: Outcome,
        status: int | None,
        error: str,
        started: float,
        association: int | None,
        *,
        attempted: bool = True,
        association_failed: bool = False,
        association_broke: bool = False,
    ) -> SendOutcome:
        """An outcome for which no data set byte counts as sent (refused before or while
        sending, or not tried): the file's UIDs from ``meta`` when it was read; ``started``
        (monotonic, 0 for none) times it. Both channels (C-STORE and STOW-RS) build these."""
        return cls(
            request=request,
            outcome=outcome,
            status=status,
            error=error,
            sop_class_uid=meta.sop_class_uid if meta else None,
            sop_instance_uid=meta.sop_instance_uid if meta else None,
            transfer_syntax=meta.transfer_syntax if meta else None,
            sent_transfer_syntax=None,
            association=association,
            nbytes=0,
            seconds=time.monotonic() - started if started else 0.0,
            attempted=attempted,
            association_failed=association_failed,
            association_broke=association_broke,
        )
