"""What the gateway holds, for a modality's storage commitment request on the listener.

A modality that pushed to the daemon's ``listen:`` port may ask it to commit what it sent
(PS3.4 Annex J, the gateway as Storage Commitment SCP). The gateway holds an instance when the
queue knows a file of that SOP Instance UID (received through ``listen`` or taken from the
watched folder) and that file is still on disk where the queue says it is, whole (the size
the queue recorded when it took the file: a copy cut short since is not held): in
``incoming`` while it is forwarded, in ``done/`` once delivered, or in ``failed/`` (kept there
for an operator; delivery failed, the object did not). Its meta header must name that SOP
Instance and Class. A file put back by ``forwarder retry`` is looked up at its new place.

The N-ACTION and the report are the engine's (:class:`~forwarder.net.commitment_scp.
CommitmentResponder`); this module only answers "held, or why not".
"""

from __future__ import annotations

import logging
import os

from forwarder.dicom.part10 import FileMeta, read_meta
from forwarder.errors import ForwarderError
from forwarder.net.commitment import Reference
from forwarder.net.commitment_scp import (
    REASON_CLASS_CONFLICT,
    REASON_NO_SUCH_INSTANCE,
    REASON_PROCESSING_FAILURE,
)
from forwarder.queue import KeyKind, Queue

logger = logging.getLogger(__name__)

_LOOKUPS = 3  # look-ups of one instance while its copies move out of incoming


class QueueHoldings:
    """Answers :meth:`failure` from the queue and the files it points to."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def failure(self, ref: Reference) -> int | None:
        """None when the gateway holds ``ref`` (that instance, that class), else the Failure
        Reason: 0x0112 not held, 0x0119 held under another SOP Class, 0x0110 the queue cannot
        be read."""
        # The finisher may move a copy out of incoming between the look-up and the read: a copy
        # not found where the queue said is looked up again (the queue then says FINISHING,
        # with the path it is moving to, or FINISHED, with that path).
        for _ in range(_LOOKUPS):
            try:
                found = self.queue.find([ref.sop_instance])
            except ForwarderError as exc:
                logger.warning("storage commitment: cannot look %s up: %s", ref.sop_instance, exc)
                return REASON_PROCESSING_FAILURE
            candidates = [
                f
                for f in found
                if f.retried_as is None
                and any(kind is KeyKind.SOP_INSTANCE for _, kind in f.matched)
            ]
            conflict = missing = False
            for f in reversed(candidates):  # the newest copy first
                read = _read_either(f.path, f.moving_to)
                if read is None:
                    missing = True  # moved meanwhile, or removed by someone
                    continue
                meta, size = read
                if meta.sop_instance_uid != ref.sop_instance:
                    continue
                if meta.sop_class_uid != ref.sop_class:
                    conflict = True
                    continue
                if f.size and size != f.size:
                    # Cut short (or grown) since it was queued: its meta header still names the
                    # instance, but it is not the object received, and a modality told it is
                    # committed may delete its own copy.
                    logger.warning(
                        "storage commitment: %s is %d bytes, %d as received: not committed",
                        f.path,
                        size,
                        f.size,
                    )
                    continue
                return None
            if not missing:
                break
        return REASON_CLASS_CONFLICT if conflict else REASON_NO_SUCH_INSTANCE


def _read_either(path: str, moving_to: str | None) -> tuple[FileMeta, int] | None:
    """The meta header and size of the file at ``path``, or at ``moving_to`` (None: at
    neither)."""
    for where in (path, moving_to):
        if where is None:
            continue
        try:
            size = os.stat(where).st_size
            return read_meta(where), size
        except (ForwarderError, OSError):
            continue
    return None
