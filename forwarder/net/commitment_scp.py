"""Answering storage commitment requests (the SCP of PS3.4 Annex J) for what a folder holds.

``forwarder receive`` accepts the Storage Commitment Push Model SOP Class beside storage: an
N-ACTION-RQ (Action Type 1) names instances by SOP Class and Instance UID; the
:class:`CommitmentResponder` answers the N-ACTION-RSP at once and builds the N-EVENT-REPORT:
every instance found is committed, the others failed with a Failure Reason. Where to look is
the :class:`FolderHoldings`: ``output/*/<SOPInstanceUID>.dcm`` (the layout
:mod:`forwarder.net.placement` writes: one folder per study, ``no-study-uid`` for the rest; the
request carries no Study UID, so every study folder is looked in), and the file's own meta
header must name the same SOP Instance and Class.

The association loop (:mod:`forwarder.net.scp_association`) sends the report on the same
association right after the N-ACTION-RSP, or, when ``report_to`` is set (``receive
--stgcmt-peer HOST:PORT``), on a new association to that address once the requestor's
association has ended (:func:`send_report`, pynetdicom: not a hot path), called AE the
requestor's calling AE, with SCP/SCU role selection naming us the SCP (PS3.4 J.3.3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.errors import ForwarderError, InvalidFileError
from forwarder.net.cancel import (
    Cancelled,
    abort_on_cancel,
    associate,
    why_not_established,
)
from forwarder.net.commitment import (
    ACTION_REQUEST_COMMITMENT,
    COMMITMENT_SYNTAXES,
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    IMPLICIT_LE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    Reference,
    ReportRejected,
    parse_action,
)
from forwarder.net.endings import lost, release, watched
from forwarder.net.placement import safe_uid_name

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

MAX_ACTION_SIZE = 16 * 1024 * 1024  # an N-ACTION data set larger than this is refused

#: N-ACTION-RSP statuses (PS3.7 10.1.4.1.10, PS3.4 J.3.2.1.2).
STATUS_SUCCESS = 0x0000
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_NO_SUCH_INSTANCE = 0x0112  # the Requested SOP Instance is not the well-known one
STATUS_PROCESSING_FAILURE = 0x0110

#: Failure Reasons in our reports (PS3.3 C.14.1.1).
REASON_NO_SUCH_INSTANCE = 0x0112
REASON_CLASS_CONFLICT = 0x0119
REASON_PROCESSING_FAILURE = 0x0110


class FolderHoldings:
    """What a receiver's output folder holds, looked up by SOP Instance UID."""

    def __init__(self, output: Path) -> None:
        self.output = output

    def failure(self, ref: Reference) -> int | None:
        """None when ``output`` holds ``ref`` (that instance, that class), else the Failure
        Reason: 0x0112 not held, 0x0119 held under another SOP Class, 0x0110 unreadable."""
        from forwarder.dicom.part10 import read_meta

        name = f"{safe_uid_name(ref.sop_instance)}.dcm"
        for path in sorted(self.output.glob(f"*/{name}")):
            try:
                meta = read_meta(str(path))
            except InvalidFileError as exc:
                logger.warning("storage commitment: %s unreadable: %s", path, exc.reason)
                return REASON_PROCESSING_FAILURE
            if meta.sop_instance_uid != ref.sop_instance:
                continue
            if meta.sop_class_uid != ref.sop_class:
                return REASON_CLASS_CONFLICT
            return None
        return REASON_NO_SUCH_INSTANCE


@dataclass(frozen=True, slots=True)
class ActionAnswer:
    """The N-ACTION-RSP status, and the report to send (None when the request was refused)."""

    status: int
    transaction_uid: str = ""
    event_type: int = 0
    report: Dataset | None = None


class CommitmentResponder:
    """Answers N-ACTION storage commitment requests from ``holdings``; ``report_to``: send the
    reports on a new association to this (host, port) instead of the same association."""

    def __init__(
        self,
        holdings: Callable[[Reference], int | None],
        *,
        ae_title: str,
        report_to: tuple[str, int] | None = None,
    ) -> None:
        self.holdings = holdings
        self.ae_title = ae_title
        self.report_to = report_to

    def answer(
        self, sop_instance: str, action_type: int, data: bytes, syntax: str, calling_ae: str
    ) -> ActionAnswer:
        if action_type != ACTION_REQUEST_COMMITMENT:
            logger.warning("N-ACTION from %s with Action Type ID %d", calling_ae, action_type)
            return ActionAnswer(STATUS_NO_SUCH_ACTION)
        if sop_instance != STORAGE_COMMITMENT_INSTANCE:
            logger.warning("N-ACTION from %s for SOP Instance %s", calling_ae, sop_instance)
            return ActionAnswer(STATUS_NO_SUCH_INSTANCE)
        try:
            uid, refs = parse_action(decode_dataset(data, syntax))
        except ReportRejected as exc:
            logger.warning("storage commitment request from %s refused: %s", calling_ae, exc)
            return ActionAnswer(STATUS_INVALID_ARGUMENT)
        except Exception as exc:  # a data set pydicom cannot read
            logger.warning("storage commitment request from %s unreadable: %s", calling_ae, exc)
            return ActionAnswer(STATUS_PROCESSING_FAILURE)
        from pydicom.dataset import Dataset

        committed, failed = [], []
        for ref in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class
            item.ReferencedSOPInstanceUID = ref.sop_instance
            reason = self.holdings(ref)
            if reason is None:
                committed.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        report = Dataset()
        report.TransactionUID = uid
        report.RetrieveAETitle = self.ae_title
        if committed:
            report.ReferencedSOPSequence = committed
        if failed:
            report.FailedSOPSequence = failed
        logger.info(
            "storage commitment request from %s (transaction %s): %d committed, %d failed",
            calling_ae,
            uid,
            len(committed),
            len(failed),
        )
        event = EVENT_SOME_FAILED if failed else EVENT_ALL_COMMITTED
        return ActionAnswer(STATUS_SUCCESS, uid, event, report)


def decode_dataset(data: bytes, syntax: str) -> Dataset:
    from pynetdicom.dsutils import decode

    return decode(BytesIO(data), syntax == IMPLICIT_LE, True)


def encode_dataset(ds: Dataset, syntax: str) -> bytes:
    from pynetdicom.dsutils import encode

    out = encode(ds, syntax == IMPLICIT_LE, True)
    if out is None:
        raise ForwarderError("the storage commitment report could not be encoded")
    return out


def send_report(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    event_type: int,
    report: Dataset,
    cancel: threading.Event | None = None,
) -> bool:
    """The report on a new association to ``host:port`` (we take the SCP role of the Storage
    Commitment Push Model, PS3.4 J.3.3); True when the requestor answered Success. ``cancel``
    (the receiver stopping) ends the attempt at once, whatever the peer does: a peer that
    accepts the connection and never answers would otherwise hold SIGTERM for the ACSE and
    DIMSE timeouts."""
    from pynetdicom import AE, build_role

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
    ae.connection_timeout = 10
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    try:
        assoc = associate(ae, host, port, {"ae_title": called_ae, "ext_neg": [role]}, cancel)
    except Cancelled:
        logger.warning(
            "storage commitment report (transaction %s) not delivered to %s at %s:%d: stopping",
            report.TransactionUID,
            called_ae,
            host,
            port,
        )
        return False
    if not assoc.is_established:
        logger.warning(
            "storage commitment report (transaction %s) not delivered: no association with "
            "%s at %s:%d: %s",
            report.TransactionUID,
            called_ae,
            host,
            port,
            why_not_established(assoc),
        )
        return False
    status: Dataset | None = None
    ended: str | None = None
    peer = f"{called_ae}@{host}:{port}"
    with watched(assoc) as ending:
        try:
            with abort_on_cancel(assoc, cancel):
                status, _ = assoc.send_n_event_report(
                    report, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
                )
                if status is None or "Status" not in status:
                    ended = lost(assoc, peer, "the N-EVENT-REPORT-RSP")
        finally:
            release(assoc, ending, peer, cancel)  # a release never ended is aborted (cancel.py)
    code = int(status.Status) if status is not None and "Status" in status else None
    if ended is not None:
        logger.warning(
            "storage commitment report (transaction %s) not delivered: %s",
            report.TransactionUID,
            ended,
        )
        return False
    if code != 0:
        logger.warning(
            "storage commitment report (transaction %s) to %s answered %s",
            report.TransactionUID,
            called_ae,
            "nothing" if code is None else f"0x{code:04X}",
        )
        return False
    logger.info(
        "storage commitment report (transaction %s) delivered to %s at %s:%d",
        report.TransactionUID,
        called_ae,
        host,
        port,
    )
    return True
