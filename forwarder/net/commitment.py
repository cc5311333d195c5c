"""Storage Commitment Push Model (PS3.4 Annex J): the request, the report, and who awaits it.

A C-STORE Success says the peer received an object; a storage commitment report says it keeps it.
This module holds what both sides of that exchange mean, without any network:

- :func:`action_dataset` builds the N-ACTION-RQ's Action Information (Transaction UID, Referenced
  SOP Sequence) for Action Type ID 1 (PS3.4 J.3.2.1).
- :func:`parse_report` reads an N-EVENT-REPORT's Event Information (Event Type ID 1, all
  committed; 2, some failed, with a Failure Reason each; PS3.4 J.3.3.1) strictly, against what
  was asked: a report naming an instance we did not ask about, or naming one twice, or with the
  wrong SOP Class, raises :class:`ReportRejected` and is not trusted at all.
- :class:`CommitmentBook` holds the transactions awaiting their report. Whoever receives an
  N-EVENT-REPORT (the requesting association itself, the report acceptor of
  :mod:`forwarder.net.commitment_scu`, or later the daemon's own listener) hands it to
  :meth:`CommitmentBook.deliver`: a report for a transaction the book does not know is logged
  and ignored. That method is the one seam every path of a report goes through.

Not here: associations (:mod:`forwarder.net.commitment_scu`), answering N-ACTION as an SCP
(:mod:`forwarder.net.commitment_scp`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.errors import ForwarderError
from forwarder.net.pdu import IMPLEMENTATION_CLASS_UID

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: The Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.1).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: The transfer syntaxes commitment goes in, both ways (our order of preference).
COMMITMENT_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)
ACTION_REQUEST_COMMITMENT = 1  # Action Type ID of "Request Storage Commitment"
EVENT_ALL_COMMITTED = 1  # Event Type ID: storage commitment request successful
EVENT_SOME_FAILED = 2  # Event Type ID: storage commitment request complete, failures exist

#: Failure Reason (0008,1197) values PS3.3 C.14.1.1 / PS3.4 J.3.2.1.1 names.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP Class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

#: Statuses we answer an N-EVENT-REPORT with (PS3.7 10.1.1.1.8, C.x).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT = 0x0115


def failure_text(reason: int | None) -> str:
    """``0x0112 (no such object instance)``; ``not reported`` when the peer said nothing."""
    if reason is None:
        return "not reported"
    name = FAILURE_REASONS.get(reason, "unknown reason")
    return f"0x{reason:04X} ({name})"


class CommitmentError(ForwarderError):
    """Commitment could not be requested: no association, the context refused, or the
    N-ACTION answered with a failure status (``status``)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ReportRejected(ForwarderError):
    """An N-EVENT-REPORT that does not answer what was asked; it is not trusted."""

    def __init__(self, message: str, *, status: int = STATUS_INVALID_ARGUMENT) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Reference:
    """One instance in a commitment request or report."""

    sop_class: str
    sop_instance: str


@dataclass(frozen=True, slots=True)
class Failure:
    """One instance the peer reported it does not commit, and why (Failure Reason)."""

    reference: Reference
    reason: int | None


@dataclass(frozen=True, slots=True)
class CommitmentReport:
    """A report as we trust it: what the peer committed and what it failed, from the
    instances asked for in ``transaction_uid`` only."""

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]
    calling_ae: str  # who sent it (the peer's AE title, or ours on the same association)
    retrieve_ae: str | None = None

    def not_reported(self, asked: Iterable[Reference]) -> list[Reference]:
        """Of ``asked``, those the report names neither committed nor failed."""
        named = set(self.committed) | {f.reference for f in self.failed}
        return [r for r in asked if r not in named]


def new_transaction_uid() -> str:
    """A fresh Transaction UID under forwarder's implementation root."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=IMPLEMENTATION_CLASS_UID + "."))


def action_dataset(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION-RQ Action Information (PS3.4 Table J.3-1)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class
        item.ReferencedSOPInstanceUID = ref.sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_action(ds: Dataset) -> tuple[str, list[Reference]]:
    """An N-ACTION-RQ's Action Information -> (Transaction UID, references), strictly:
    raises :class:`ReportRejected` (status 0x0115 invalid argument) when a UID is missing."""
    uid = str(ds.get("TransactionUID", "") or "").strip()
    if not uid:
        raise ReportRejected("N-ACTION without Transaction UID (0008,1195)")
    refs = _references(ds, "ReferencedSOPSequence", "N-ACTION")
    if not refs:
        raise ReportRejected("N-ACTION with an empty Referenced SOP Sequence (0008,1199)")
    return uid, refs


def _references(ds: Dataset, keyword: str, what: str) -> list[Reference]:
    out = []
    for i, item in enumerate(ds.get(keyword) or []):
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_instance:
            raise ReportRejected(f"{what}: item {i + 1} of {keyword} lacks a SOP Class/Instance")
        out.append(Reference(sop_class, sop_instance))
    return out


def parse_report(
    event_type: int, ds: Dataset, asked: Sequence[Reference], calling_ae: str
) -> CommitmentReport:
    """An N-EVENT-REPORT's Event Information, checked against the instances ``asked``.

    Raises :class:`ReportRejected` when the event type is not 1 or 2, when a type 1 report
    holds a Failed SOP Sequence or a type 2 one none, or when an instance is named that was not
    asked for, named twice, or with another SOP Class than asked: such a report is not trusted
    (nothing in it counts as committed)."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ReportRejected(f"Event Type ID {event_type}", status=STATUS_NO_SUCH_EVENT_TYPE)
    uid = str(ds.get("TransactionUID", "") or "").strip()
    committed = _references(ds, "ReferencedSOPSequence", "report")
    failed_items = list(ds.get("FailedSOPSequence") or [])
    failed_refs = _references(ds, "FailedSOPSequence", "report")
    if event_type == EVENT_ALL_COMMITTED and failed_refs:
        raise ReportRejected("Event Type 1 (all committed) with a Failed SOP Sequence")
    if event_type == EVENT_SOME_FAILED and not failed_refs:
        raise ReportRejected("Event Type 2 (failures) without a Failed SOP Sequence")
    by_instance = {r.sop_instance: r for r in asked}
    seen: set[str] = set()
    for ref in (*committed, *failed_refs):
        mine = by_instance.get(ref.sop_instance)
        if mine is None:
            raise ReportRejected(f"the report names SOP Instance {ref.sop_instance}, not asked")
        if mine.sop_class != ref.sop_class:
            raise ReportRejected(
                f"the report names SOP Instance {ref.sop_instance} with SOP Class "
                f"{ref.sop_class}; asked with {mine.sop_class}"
            )
        if ref.sop_instance in seen:
            raise ReportRejected(f"the report names SOP Instance {ref.sop_instance} twice")
        seen.add(ref.sop_instance)
    failures = []
    for item, ref in zip(failed_items, failed_refs, strict=True):
        reason = item.get("FailureReason")
        failures.append(Failure(ref, int(reason) if reason is not None else None))
    retrieve = str(ds.get("RetrieveAETitle", "") or "").strip() or None
    return CommitmentReport(uid, tuple(committed), tuple(failures), calling_ae, retrieve)


class _Awaited:
    __slots__ = ("asked", "event", "report")

    def __init__(self, asked: Sequence[Reference]) -> None:
        self.asked = list(asked)
        self.event = threading.Event()
        self.report: CommitmentReport | None = None


class CommitmentBook:
    """The transactions awaiting a report, and the one door reports come in by.

    Thread-safe: reports arrive on pynetdicom's association threads, the waiters are the
    senders'. ``on_report`` (optional) is called with each trusted report, after the book has
    recorded it (the daemon persists it there); when it raises, the report is not kept and the
    peer is answered 0x0110, so that the report it may send again is taken."""

    def __init__(self, on_report: Callable[[CommitmentReport], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._awaited: dict[str, _Awaited] = {}
        self._on_report = on_report

    def expect(self, transaction_uid: str, asked: Sequence[Reference]) -> None:
        with self._lock:
            self._awaited[transaction_uid] = _Awaited(asked)

    def forget(self, transaction_uid: str) -> None:
        with self._lock:
            self._awaited.pop(transaction_uid, None)

    def awaits(self, transaction_uid: str) -> bool:
        """Whether ``transaction_uid`` is expected and its report has not come."""
        with self._lock:
            awaited = self._awaited.get(transaction_uid)
            return awaited is not None and awaited.report is None

    def pending(self) -> list[str]:
        with self._lock:
            return [uid for uid, a in self._awaited.items() if a.report is None]

    def deliver(self, event_type: int, ds: Dataset, calling_ae: str) -> int:
        """Take one N-EVENT-REPORT (Event Type ID, Event Information, who sent it); returns
        the status to answer it with. Unknown transactions and untrustworthy reports are logged
        and ignored (a warning, and a failure status to the sender)."""
        uid = str(ds.get("TransactionUID", "") or "").strip() if ds is not None else ""
        with self._lock:
            awaited = self._awaited.get(uid)
        if awaited is None:
            logger.warning(
                "storage commitment report from %s for unknown transaction %r: ignored",
                calling_ae,
                uid,
            )
            return STATUS_PROCESSING_FAILURE
        try:
            report = parse_report(event_type, ds, awaited.asked, calling_ae)
        except ReportRejected as exc:
            logger.warning(
                "storage commitment report from %s for transaction %s ignored: %s",
                calling_ae,
                uid,
                exc,
            )
            return exc.status
        with self._lock:
            if awaited.report is not None:
                logger.warning(
                    "second storage commitment report from %s for transaction %s: ignored",
                    calling_ae,
                    uid,
                )
                return STATUS_SUCCESS
            awaited.report = report
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception as exc:  # not recorded (the queue's disk full, a bug)
                with self._lock:
                    awaited.report = None
                logger.error(
                    "storage commitment report from %s for transaction %s not recorded: %s; "
                    "answered 0x%04X, so that it is taken if sent again",
                    calling_ae,
                    uid,
                    exc,
                    STATUS_PROCESSING_FAILURE,
                )
                return STATUS_PROCESSING_FAILURE
        awaited.event.set()
        logger.info(
            "storage commitment report from %s for transaction %s: %d committed, %d failed",
            calling_ae,
            uid,
            len(report.committed),
            len(report.failed),
        )
        return STATUS_SUCCESS

    def wait(self, transaction_uid: str, deadline: float) -> CommitmentReport | None:
        """The report for ``transaction_uid``, or None when none came by ``deadline``
        (``time.monotonic()``)."""
        with self._lock:
            awaited = self._awaited.get(transaction_uid)
        if awaited is None:
            return None
        awaited.event.wait(max(0.0, deadline - time.monotonic()))
        return awaited.report
