"""Association control for the SCU (PS3.8 ACSE): negotiate, release, and answer an idle peer.

Each function works on a :class:`~forwarder.net.transport.Transport` (which holds the peer and
the settings) and follows PS3.8's state machine for the requestor:

* :func:`negotiate` sends the A-ASSOCIATE-RQ (:func:`forwarder.net.pdu.encode_associate_rq`) and
  turns the A-ASSOCIATE-AC into the accepted contexts and the clamped maximum PDU we may send
  (``pdu.send_pdu_limit``); an A-ASSOCIATE-RJ or A-ABORT is an
  :class:`~forwarder.errors.AssociationError`, anything malformed a
  :class:`~forwarder.errors.ProtocolError` after an A-ABORT;
* :func:`release` is A-RELEASE, with release collisions answered (Sta9/Sta11);
* :func:`answer_idle` answers what a peer sent while no request was outstanding (Sta6).

The PDUs are encoded and decoded in :mod:`forwarder.net.pdu`; the DIMSE messages sent over an
established association are :mod:`forwarder.net.association`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from forwarder.errors import AssociationError, ProtocolError
from forwarder.net.pdu import (
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_P_DATA,
    PDU_RELEASE_RP,
    PDU_RELEASE_RQ,
    REJECT_RESULT,
    RELEASE_RP,
    RELEASE_RQ,
    ProposedContext,
    decode_associate_ac,
    decode_associate_rj,
    encode_associate_rq,
    reject_reason,
    send_pdu_limit,
)
from forwarder.net.tls import TLS_CLOSED
from forwarder.net.transport import Transport, pdu_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the peer accepted: contexts by (SOP class, transfer syntax) and by SOP class (in
    proposal order), their IDs, and the largest P-DATA-TF we may send."""

    accepted: dict[tuple[str, str], AcceptedContext]
    by_abstract: dict[str, list[AcceptedContext]]
    context_ids: frozenset[int]
    max_pdu_send: int


def negotiate(transport: Transport, contexts: Sequence[ProposedContext]) -> Negotiated:
    """A-ASSOCIATE for ``contexts`` (IDs 1, 3, 5... in order). On any failure the transport is
    closed (aborted where PS3.8 says so) before the error is raised."""
    peer, s = transport.peer, transport.settings
    proposed = {2 * i + 1: ctx for i, ctx in enumerate(contexts)}
    rq = encode_associate_rq(peer.ae_title, s.calling_ae_title, proposed, s.max_pdu_receive)
    timeout = s.accept_timeout if s.accept_timeout is not None else s.connect_timeout
    transport.sock.settimeout(timeout)
    try:
        transport.send(rq, what="A-ASSOCIATE-RQ")
        pdu_type, body = transport.read_pdu(timeout, waiting_for="A-ASSOCIATE-AC")
    except AssociationError as exc:
        if s.tls is None or not transport.peer_closed or "certificate" in str(exc):
            raise
        # A TLS 1.3 server checks our certificate after our side of the handshake ended and
        # sends its refusal as an alert; when our request reaches it after it closed, the
        # reset discards that alert unread, and only "closed" or "reset" is left to say.
        raise AssociationError(f"{exc} ({TLS_CLOSED})", retryable=exc.retryable) from None
    if pdu_type == PDU_ASSOCIATE_RJ:
        try:
            result, source, reason = decode_associate_rj(body)
        except ProtocolError as exc:
            transport.abort()
            raise ProtocolError(f"{peer} sent a malformed A-ASSOCIATE-RJ: {exc}") from None
        transport.close()
        verdict = REJECT_RESULT[result]
        raise AssociationError(
            f"{peer} rejected the association ({verdict}: {reject_reason(source, reason)})",
            retryable=result != 1,
        )
    if pdu_type == PDU_ABORT:
        transport.close()
        raise AssociationError(f"{peer} aborted during negotiation", retryable=True)
    if pdu_type != PDU_ASSOCIATE_AC:
        transport.abort()
        raise ProtocolError(f"{peer} answered the A-ASSOCIATE-RQ with {pdu_name(pdu_type)}")
    try:
        results, peer_max = decode_associate_ac(body, proposed)
    except ProtocolError as exc:
        transport.abort()
        raise ProtocolError(f"{peer} sent a malformed A-ASSOCIATE-AC: {exc}") from None
    try:
        max_pdu_send = send_pdu_limit(peer_max, s.max_pdu_send)
    except ProtocolError as exc:
        transport.abort()
        raise ProtocolError(f"{peer}: {exc}") from None
    accepted: dict[tuple[str, str], AcceptedContext] = {}
    by_abstract: dict[str, list[AcceptedContext]] = {}
    accepted_ids = set()
    for cid, (result, ts) in results.items():
        proposal = proposed.get(cid)
        if proposal is None or result != 0 or not ts:
            continue
        acc = AcceptedContext(cid, proposal.abstract_syntax, ts)
        accepted_ids.add(cid)
        accepted.setdefault((proposal.abstract_syntax, ts), acc)
        by_abstract.setdefault(proposal.abstract_syntax, []).append(acc)
    logger.debug(
        "associated with %s: %d of %d contexts accepted, peer max PDU %d",
        peer,
        len(accepted_ids),
        len(proposed),
        peer_max,
    )
    return Negotiated(accepted, by_abstract, frozenset(accepted_ids), max_pdu_send)


def release(transport: Transport) -> None:
    """A-RELEASE (PS3.8 7.2); aborts if the peer does not answer within ``release_timeout``.

    While we wait for the A-RELEASE-RP (PS3.8 state Sta7), a P-DATA-TF is dropped (AR-6: no
    request is outstanding); an A-RELEASE-RQ from the peer is a release collision (AR-8): as
    the association requestor we answer it with an A-RELEASE-RP at once (AR-9, Sta11), then
    wait for theirs (AR-3), as pynetdicom's state machine and DCMTK do. An A-ABORT ends it;
    anything else gets an A-ABORT (AA-8).
    """
    if transport.closed:
        return
    peer = transport.peer
    try:
        transport.send(RELEASE_RQ, what="A-RELEASE-RQ")
        deadline = time.monotonic() + transport.settings.release_timeout
        collided = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssociationError("no A-RELEASE-RP", retryable=True)
            pdu_type, _ = transport.read_pdu(remaining, waiting_for="A-RELEASE-RP")
            if pdu_type in (PDU_RELEASE_RP, PDU_ABORT):
                break
            if pdu_type == PDU_RELEASE_RQ and not collided:
                logger.debug("%s: release collision, answering the peer's A-RELEASE-RQ", peer)
                collided = True
                transport.send(RELEASE_RP, what="A-RELEASE-RP")
                continue
            if pdu_type == PDU_P_DATA and not collided:
                continue
            raise ProtocolError(
                f"{peer} sent {pdu_name(pdu_type)} while we waited for A-RELEASE-RP"
            )
    except AssociationError as exc:
        logger.debug("%s: release failed (%s); aborting", peer, exc)
        if not transport.closed:
            transport.abort()
        return
    transport.close()


def answer_idle(transport: Transport) -> None:
    """Read the PDU a peer started while no request was outstanding and answer it as PS3.8
    says: an A-RELEASE-RQ (Sta6, AR-2) gets its A-RELEASE-RP, an A-ABORT closes, anything else
    (an unsolicited P-DATA-TF, garbage) gets an A-ABORT. The transport is closed afterwards."""
    peer = transport.peer
    try:
        pdu_type, _ = transport.read_pdu(1.0, waiting_for="the PDU it started while idle")
    except AssociationError as exc:
        logger.debug("%s: idle association broke: %s", peer, exc)
        return  # closed or aborted by read_pdu
    if pdu_type == PDU_RELEASE_RQ:
        logger.debug("%s: the peer released the idle association", peer)
        try:
            transport.send(RELEASE_RP, what="A-RELEASE-RP")
        except AssociationError:
            pass
        transport.close()
    elif pdu_type == PDU_ABORT:
        logger.debug("%s: the peer aborted the idle association", peer)
        transport.close()
    else:
        logger.warning("%s sent %s on an idle association; aborting it", peer, pdu_name(pdu_type))
        transport.abort()
