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
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.cancel import (
    Cancelled,
    abort_now,
    abort_on_cancel,
    associate,
    why_not_established,
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
from forwarder.net.endings import (
    accepted_ending,
    lost,
    release,
    requestor,
    watch_acceptor,
    watched,
)
from forwarder.net.status import code_to_category

if TYPE_CHECKING:
    from pynetdicom.events import EventHandlerType

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"
_POLL = 0.2  # how often the same-association wait looks whether the association still stands
_ANSWER_GRACE = 2.0  # seconds a report's answer has to go out, and its sender to release, on stop
_ANSWER_POLL = 0.05


class _ReportTaker:
    """The EVT_N_EVENT_REPORT handler that hands each report to ``book``, and the EVT_PDU_SENT
    one that sees its answer go out.

    The book wakes whoever waits for the report before pynetdicom sends the answer (the
    handler's return value), and that waiter goes on to end the association: a release on the
    same association, the acceptor's stop on a new one. Ended at once, the peer gets an
    A-RELEASE-RQ or an A-ABORT instead of its N-EVENT-REPORT-RSP, and a PACS may take the
    report for undelivered. So the ender first waits for the answer (:meth:`answered`), and the
    acceptor for the peer to end what it opened (:meth:`took_from`)."""

    def __init__(self, book: CommitmentBook, sender: str | None) -> None:
        self.book = book
        self.sender = sender
        self._lock = threading.Lock()
        self._owed: dict[Any, threading.Event] = {}  # association -> set once answered
        self._took: weakref.WeakSet[Any] = weakref.WeakSet()

    def handlers(self) -> list[EventHandlerType]:
        from pynetdicom import evt

        return [(evt.EVT_N_EVENT_REPORT, self._take), (evt.EVT_PDU_SENT, self._sent)]

    def _take(self, event: Any) -> tuple[int, None]:
        assoc = event.assoc
        with self._lock:
            self._owed[assoc] = threading.Event()  # before the book wakes anybody
            self._took.add(assoc)
        who = self.sender or str(assoc.requestor.ae_title).strip()
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            logger.warning("N-EVENT-REPORT from %s for another SOP class: ignored", who)
            return STATUS_PROCESSING_FAILURE, None
        try:
            info = event.event_information
        except Exception as exc:  # a data set pydicom cannot read: not trusted
            logger.warning("N-EVENT-REPORT from %s with an unreadable data set: %s", who, exc)
            return STATUS_PROCESSING_FAILURE, None
        return self.book.deliver(int(event.request.EventTypeID or 0), info, who), None

    def _sent(self, event: Any) -> None:
        from pynetdicom.pdu import P_DATA_TF

        # Nothing else goes out on these associations while a report waits for its answer:
        # the first P-DATA-TF after it is the N-EVENT-REPORT-RSP (a command set, one PDU).
        if isinstance(event.pdu, P_DATA_TF):
            with self._lock:
                sent = self._owed.pop(event.assoc, None)
            if sent is not None:
                sent.set()

    def answered(self, assoc: Any, timeout: float = _ANSWER_GRACE) -> None:
        """Return once the answer to the report ``assoc`` carried went out, the association
        ended, or ``timeout`` seconds passed."""
        with self._lock:
            sent = self._owed.get(assoc)
        deadline = time.monotonic() + timeout
        while sent is not None and not sent.wait(_ANSWER_POLL):
            if not assoc.is_established or time.monotonic() > deadline:
                return

    def took_from(self, assoc: Any) -> bool:
        """Whether ``assoc`` carried a report (answered or not)."""
        with self._lock:
            return assoc in self._took


class ReportAcceptor:
    """A small Storage Commitment SCU that accepts the associations peers open to deliver
    their reports (N-EVENT-REPORT), on ``bind:port`` as ``ae_title``. Also answers C-ECHO.
    A peer that resets or closes one without releasing it is said in one line of ours, not
    pynetdicom's (:mod:`forwarder.net.endings`)."""

    def __init__(
        self, book: CommitmentBook, *, ae_title: str, port: int, bind: str = "0.0.0.0"
    ) -> None:
        self.book = book
        self.ae_title = ae_title
        self.bind = bind
        self._port = port
        self._server: Any = None
        self._taker = _ReportTaker(book, None)

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
        watch_acceptor(ae)  # a peer's reset said by _ended, not by pynetdicom's traceback
        try:
            self._server = ae.start_server(
                (self.bind, self._port),
                block=False,
                evt_handlers=[*self._taker.handlers(), (evt.EVT_FSM_TRANSITION, self._ended)],
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

    def _ended(self, event: Any) -> None:
        """The peer ended one of our associations without releasing it (a reset, a close,
        an A-ABORT): said in one line; a warning when no report came on it."""
        ending = accepted_ending(event)
        if ending is None:
            return
        assoc = event.assoc
        took = self._taker.took_from(assoc)
        why = ending.words(
            requestor(assoc), "the A-RELEASE-RQ" if took else "the N-EVENT-REPORT", 0.0
        )
        if took:
            logger.info("storage commitment reports: %s (after its report)", why)
        else:
            logger.warning("storage commitment reports: %s; no report taken on it", why)

    def stop(self) -> None:
        """Stop promptly: a peer that delivered a report has a moment (``_ANSWER_GRACE``) to
        get its answer and release; then the listening ends, and every association accepted
        is ended: an established one aborted (a peer may keep one open for minutes), a
        connection that never became one (no A-ASSOCIATE-RQ: a port scan, a peer that hung)
        closed. Their threads end within a moment, not after the ACSE timeout."""
        if self._server is None:
            return
        server, self._server = self._server, None
        deadline = time.monotonic() + _ANSWER_GRACE
        for assoc in list(server.active_associations):
            if self._taker.took_from(assoc):
                assoc.join(max(0.0, deadline - time.monotonic()))
        server.shutdown()  # first: no connection is accepted behind the ending below
        ended: set[Any] = set()  # the associations themselves: an id may be used again
        until = time.monotonic() + _ANSWER_GRACE
        while time.monotonic() < until:
            left = [a for a in server.active_associations if a not in ended]
            if not left:
                break
            for assoc in left:
                ended.add(assoc)
                if assoc.is_established:
                    abort_now(assoc)
                else:
                    _close_unestablished(assoc)
            time.sleep(_ANSWER_POLL)  # one accepted just before the shutdown has its thread

    def __enter__(self) -> ReportAcceptor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _close_unestablished(assoc: Any) -> None:
    """End an accepted connection that is no association (yet): there is nothing to abort
    (an A-ABORT is no event of the state machine before the A-ASSOCIATE-RQ), so close the
    connection (its DUL goes idle, and ends), then wake the association thread, which waits
    for the A-ASSOCIATE-RQ for the ACSE timeout: woken with nothing, it ends as at that
    timeout."""
    try:
        assoc.dul.socket._shutdown_socket()
        until = time.monotonic() + _ANSWER_GRACE
        while assoc.dul.is_alive() and time.monotonic() < until:
            if assoc.dul.stop_dul():
                break
            time.sleep(0.01)
        assoc.dul.to_user_queue.put(None)
    except Exception as exc:  # gone meanwhile: nothing left to end
        logger.debug("closing a connection on stop: %s", exc)


def open_association(
    peer: Peer,
    settings: AssociationSettings,
    book: CommitmentBook,
    contexts: Sequence[str],
    cancel: threading.Event | None = None,
    taker: _ReportTaker | None = None,
) -> Any:
    """A pynetdicom association to ``peer`` proposing ``contexts`` (one each, little endian),
    whose N-EVENT-REPORTs go to ``book`` (through ``taker``, when given). Raises
    :class:`CommitmentError` when none, or when ``cancel`` is set before it is established."""
    from pynetdicom import AE

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
        "evt_handlers": (taker or _ReportTaker(book, peer.ae_title)).handlers(),
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
        why = why_not_established(assoc)
        raise CommitmentError(f"no association with {peer} for storage commitment: {why}")
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
        taker = _ReportTaker(book, peer.ae_title)
        assoc = open_association(peer, settings, book, [STORAGE_COMMITMENT_PUSH], cancel, taker)
        with watched(assoc) as ending:
            try:
                with abort_on_cancel(assoc, cancel):
                    report = _ask(
                        assoc, peer, references, book, uid, deadline, release_at_once, cancel
                    )
                stopping = cancel is not None and cancel.is_set()
                if report is None and not (release_at_once or stopping or assoc.is_established):
                    # Ended under the wait for the report (pynetdicom's lines of it not let
                    # through): said here, still watched (the connection thread may note the
                    # ending only after we saw it gone); the report may still come on another
                    # association.
                    why = ending.words(peer, "the N-EVENT-REPORT")
                    if why is not None:
                        logger.warning("storage commitment (transaction %s): %s", uid, why)
                if report is not None:
                    taker.answered(assoc)  # the peer gets its answer before our A-RELEASE-RQ
            finally:
                release(assoc, ending, peer, cancel)
        if report is not None or (cancel is not None and cancel.is_set()):
            return uid, report
        return uid, _wait(book, uid, deadline, cancel)
    finally:
        if manage_book:
            book.forget(uid)


def _wait(
    book: CommitmentBook, uid: str, deadline: float, cancel: threading.Event | None
) -> CommitmentReport | None:
    """The report for ``uid`` by ``deadline`` once the association has ended (the peer may
    still send it on another one), or None; returns at once when ``cancel`` is set: a peer that
    ended the association must not hold a stop for the rest of ``wait_on_association``."""
    if cancel is None:
        return book.wait(uid, deadline)
    while time.monotonic() < deadline and book.awaits(uid) and not cancel.is_set():
        report = book.wait(uid, min(deadline, time.monotonic() + _POLL))
        if report is not None:
            return report
    return book.wait(uid, 0.0)  # one that came meanwhile (0.0: a deadline long past)


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
        ended = lost(assoc, peer, "the N-ACTION-RSP")
        raise CommitmentError(ended or f"{peer} did not answer the N-ACTION")
    # A Warning (0x0001, 0x0107, 0x0116, 0xBxxx; PS3.7 C.3) is accepted as Success is: the
    # PACS took the request, and its report is awaited (refused, it would be asked again).
    category = code_to_category(code)
    if category not in ("Success", "Warning"):
        raise CommitmentError(f"{peer} answered the N-ACTION with status 0x{code:04X}", status=code)
    logger.log(
        logging.INFO if category == "Success" else logging.WARNING,
        "storage commitment of %d instance(s) requested from %s (transaction %s)%s",
        len(references),
        peer,
        uid,
        "" if category == "Success" else f": accepted with warning status 0x{code:04X}",
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
