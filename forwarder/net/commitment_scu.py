"""Requesting storage commitment (the SCU of PS3.4 Annex J) over pynetdicom.

Commitment is not a hot path: one N-ACTION per batch of stored instances, on an association of
its own opened after the C-STOREs (PS3.4 J.3.3 lets the request go on any association), so
pynetdicom carries it. The report comes back either

- on the same association, while we keep it open (:func:`request_commitment` with
  ``release_at_once=False``): pynetdicom's requestor serves the peer's N-EVENT-REPORT and hands
  it to the :class:`~forwarder.net.commitment.CommitmentBook`; or
- on an association the peer opens to our AE title: a :class:`ReportAcceptor` listening on a
  port takes it (Orthanc and most PACSs do this, to the address they have configured for our
  AE title), and hands it to the same book.

Either way the book checks it against the transaction (:func:`~forwarder.net.commitment.
parse_report`). Not here: what the reports mean, the send command, the daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.cancel import (
    Cancelled,
    abort_now,
    abort_on_cancel,
    associate,
    end_association,
)
from forwarder.net.commitment import (
    ACTION_REQUEST_COMMITMENT,
    COMMITMENT_SYNTAXES,
    STATUS_PROCESSING_FAILURE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentBook,
    CommitmentError,
    CommitmentReport,
    Reference,
    action_dataset,
    new_transaction_uid,
)

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"
_POLL = 0.2  # how often the same-association wait looks whether the association still stands


def _report_handler(book: CommitmentBook, sender: str | None) -> Any:
    """An EVT_N_EVENT_REPORT handler that hands the report to ``book``."""

    def handle(event: Any) -> tuple[int, None]:
        who = sender or str(event.assoc.requestor.ae_title).strip()
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            logger.warning("N-EVENT-REPORT from %s for another SOP class: ignored", who)
            return STATUS_PROCESSING_FAILURE, None
        try:
            info = event.event_information
        except Exception as exc:  # a data set pydicom cannot read: not trusted
            logger.warning("N-EVENT-REPORT from %s with an unreadable data set: %s", who, exc)
            return STATUS_PROCESSING_FAILURE, None
        return book.deliver(int(event.request.EventTypeID or 0), info, who), None

    return handle


class ReportAcceptor:
    """A small Storage Commitment SCU that accepts the associations peers open to deliver
    their reports (N-EVENT-REPORT), on ``bind:port`` as ``ae_title``. Also answers C-ECHO."""

    def __init__(
        self, book: CommitmentBook, *, ae_title: str, port: int, bind: str = "0.0.0.0"
    ) -> None:
        self.book = book
        self.ae_title = ae_title
        self.bind = bind
        self._port = port
        self._server: Any = None

    @property
    def port(self) -> int:
        return int(self._server.socket.getsockname()[1]) if self._server else self._port

    def start(self) -> ReportAcceptor:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        # The peer may propose the SCP role for itself (role selection), or leave roles default.
        ae.add_supported_context(
            STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES), scu_role=True, scp_role=True
        )
        ae.add_supported_context(_VERIFICATION, list(COMMITMENT_SYNTAXES))
        ae.require_called_aet = False
        try:
            self._server = ae.start_server(
                (self.bind, self._port),
                block=False,
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, _report_handler(self.book, None))],
            )
        except OSError as exc:
            raise CommitmentError(
                f"cannot listen for storage commitment reports on {self.bind}:{self._port}: {exc}"
            ) from None
        logger.info(
            "accepting storage commitment reports as %s on %s:%d",
            self.ae_title,
            self.bind,
            self.port,
        )
        return self

    def stop(self) -> None:
        """Stop at once: open associations are aborted first (pynetdicom's server waits for
        every association thread to end, and a peer may keep one open for minutes)."""
        if self._server is not None:
            for assoc in list(self._server.active_associations):
                abort_now(assoc)
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> ReportAcceptor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_association(
    peer: Peer,
    settings: AssociationSettings,
    book: CommitmentBook,
    contexts: Sequence[str],
    cancel: threading.Event | None = None,
) -> Any:
    """A pynetdicom association to ``peer`` proposing ``contexts`` (one each, little endian),
    whose N-EVENT-REPORTs go to ``book``. Raises :class:`CommitmentError` when none, or when
    ``cancel`` is set before it is established."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=settings.calling_ae_title)
    for uid in contexts:
        ae.add_requested_context(uid, list(COMMITMENT_SYNTAXES))
    ae.connection_timeout = settings.connect_timeout
    ae.acse_timeout = settings.accept_timeout or settings.connect_timeout
    ae.dimse_timeout = settings.response_timeout
    ae.network_timeout = max(settings.response_timeout, 60.0)
    kwargs: dict[str, Any] = {
        "ae_title": peer.ae_title,
        "max_pdu": settings.max_pdu_receive,
        "evt_handlers": [(evt.EVT_N_EVENT_REPORT, _report_handler(book, peer.ae_title))],
    }
    if settings.bind_host:
        kwargs["bind_address"] = (settings.bind_host, 0)
    if settings.tls is not None:
        kwargs["tls_args"] = (settings.tls, settings.tls_server_name or peer.host)
    try:
        assoc = associate(ae, peer.host, peer.port, kwargs, cancel)
    except Cancelled as exc:
        raise CommitmentError(f"no association with {peer} for storage commitment: {exc}") from None
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise CommitmentError(f"no association with {peer} for storage commitment ({why})")
    return assoc


def request_commitment(
    peer: Peer,
    settings: AssociationSettings,
    references: Sequence[Reference],
    book: CommitmentBook,
    *,
    timeout: float,
    release_at_once: bool,
    transaction_uid: str | None = None,
    manage_book: bool = True,
    cancel: threading.Event | None = None,
) -> tuple[str, CommitmentReport | None]:
    """Ask ``peer`` to commit ``references``; wait up to ``timeout`` seconds for the report.

    ``release_at_once``: release the association after the N-ACTION-RSP and wait for the report
    on ``book`` (a :class:`ReportAcceptor` or another listener feeds it); otherwise keep the
    association open until the report comes on it, the peer ends it, or the time is up.
    Returns (Transaction UID, report or None). Raises :class:`CommitmentError` when the request
    could not be made or was refused (the instances are then simply not committed).
    ``manage_book=False``: the caller has told ``book`` to expect the transaction and keeps
    expecting it after this returns (the daemon, whose reports may come hours later)."""
    uid = transaction_uid or new_transaction_uid()
    deadline = time.monotonic() + timeout
    if manage_book:
        book.expect(uid, references)
    try:
        assoc = open_association(peer, settings, book, [STORAGE_COMMITMENT_PUSH], cancel)
        try:
            with abort_on_cancel(assoc, cancel):
                report = _ask(assoc, peer, references, book, uid, deadline, release_at_once, cancel)
        finally:
            end_association(assoc, cancel)
        if report is not None or (cancel is not None and cancel.is_set()):
            return uid, report
        return uid, book.wait(uid, deadline)
    finally:
        if manage_book:
            book.forget(uid)


def _ask(
    assoc: Any,
    peer: Peer,
    references: Sequence[Reference],
    book: CommitmentBook,
    uid: str,
    deadline: float,
    release_at_once: bool,
    cancel: threading.Event | None,
) -> CommitmentReport | None:
    """The N-ACTION on ``assoc``, then (unless ``release_at_once``) the wait for the report on
    it; the report, or None."""
    if not any(cx.abstract_syntax == STORAGE_COMMITMENT_PUSH for cx in assoc.accepted_contexts):
        raise CommitmentError(f"{peer} does not accept Storage Commitment Push Model")
    status, _ = assoc.send_n_action(
        action_dataset(uid, references),
        ACTION_REQUEST_COMMITMENT,
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_INSTANCE,
    )
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        if cancel is not None and cancel.is_set():
            raise CommitmentError(f"stopping: no answer from {peer} to the N-ACTION yet")
        raise CommitmentError(f"{peer} did not answer the N-ACTION")
    if code != 0x0000:
        raise CommitmentError(f"{peer} answered the N-ACTION with status 0x{code:04X}", status=code)
    logger.info(
        "storage commitment of %d instance(s) requested from %s (transaction %s)",
        len(references),
        peer,
        uid,
    )
    if release_at_once:
        return None
    while (
        time.monotonic() < deadline
        and assoc.is_established
        and book.awaits(uid)
        and not (cancel is not None and cancel.is_set())
    ):
        report = book.wait(uid, min(deadline, time.monotonic() + _POLL))
        if report is not None:
            return report
    return None
