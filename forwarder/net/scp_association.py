"""One association accepted by the Storage SCP, from its A-ASSOCIATE-RQ to its end.

A blocking loop on the connection's own thread (no reactor, no queues, no polling), as the
sender's :mod:`forwarder.net.association`: read a PDU header, then act on it. The A-ASSOCIATE-RQ
is decoded strictly (:mod:`forwarder.net.scp_codec`), admitted or rejected (the caller's
``admit``), and each presentation context answered (:mod:`forwarder.net.scp_policy`). Then each
P-DATA-TF goes to the DIMSE layer this class is built on (:mod:`forwarder.net.scp_dimse`:
commands, data sets streamed to the object's file, C-STORE-RSP / C-ECHO-RSP, storage commitment);
a requestor that proposed an asynchronous operations window may send its next requests meanwhile
(they wait in the socket; answers go in order).

Strict (PS3.8 9.3, PS3.7 9.3): a PDU of an unknown or unexpected type, longer than the maximum we
announced, or a malformed DIMSE message (:class:`~forwarder.net.scp_dimse.Abort`): the
association is aborted (A-ABORT, source service provider) and the object in progress deleted,
never answered Success. A short timeout for the first PDU (a silent connection holds no slot for
long), the idle one after.
Not here: sockets, TLS and slots (:mod:`forwarder.net.scp_server`).
"""

from __future__ import annotations

import logging
import threading
import time

from forwarder.errors import ProtocolError
from forwarder.net.commitment_scp import CommitmentResponder
from forwarder.net.pdu import (
    APPLICATION_CONTEXT,
    PDU_ABORT,
    PDU_ASSOCIATE_RQ,
    PDU_HEADER,
    PDU_NAMES,
    PDU_P_DATA,
    PDU_RELEASE_RQ,
    RELEASE_RP,
    send_pdu_limit,
)
from forwarder.net.scp_codec import (
    ABORT_SOURCE_PROVIDER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    REJECT_APPLICATION_CONTEXT,
    REJECT_PROTOCOL_VERSION,
    AssociateRequest,
    decode_associate_rq,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
)
from forwarder.net.scp_commitment import ReportSink
from forwarder.net.scp_dimse import Abort, DimseReceiver
from forwarder.net.scp_object import ObjectSink, Origin
from forwarder.net.scp_policy import Admit, ContextPolicy, EngineSettings, log_refused
from forwarder.net.scp_wire import Wire, WireClosed, WireTimeout

logger = logging.getLogger(__name__)
_TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record

_MAX_ASSOCIATE_RQ = 1024 * 1024  # 128 contexts of 8 syntaxes take ~40 kB
_ABORT_LINGER = 2.0  # after our A-ABORT / A-ASSOCIATE-RJ, how long the peer has to close


class ScpAssociation(DimseReceiver):
    """Serves one connection; :meth:`run` returns when it has ended (and is closed)."""

    def __init__(
        self,
        wire: Wire,
        origin: Origin,
        settings: EngineSettings,
        policy: ContextPolicy,
        sink: ObjectSink,
        admit: Admit,
        commitment: CommitmentResponder | None = None,
        reports: ReportSink | None = None,
    ) -> None:
        super().__init__(wire, origin, settings, sink, commitment, reports)
        self.policy = policy
        self.admit = admit
        self.stopping = threading.Event()

    # -- the life of the association --------------------------------------------------------------

    def run(self) -> None:
        established = False
        try:
            established = self._associate()
            if established:
                self.wire.set_timeout(self.settings.idle_timeout)
                while self._next_pdu():
                    pass
        except Abort as exc:
            who = self.origin.calling_ae or self.origin.host
            if exc.dimse:
                logger.warning(
                    "invalid DIMSE message from %s (%s); aborting the association", who, exc
                )
            else:
                logger.warning("malformed PDU from %s (%s); aborting the association", who, exc)
            self._send_abort(exc.reason)
        except WireTimeout:
            s = self.settings
            waited, what = (
                (s.idle_timeout, "a PDU")
                if established
                else (s.associate_timeout, "an A-ASSOCIATE-RQ")
            )
            who = self.origin.calling_ae or "connection"
            if self.wire.deadline is not None and established:
                logger.warning(
                    "%s at %s sent a PDU slower than %g bytes/s; aborting",
                    who,
                    self.origin.host,
                    s.min_pdu_rate,
                )
            else:
                logger.warning(
                    "%s at %s sent no %s within %gs; aborting", who, self.origin.host, what, waited
                )
            self._send_abort(0)
        except WireClosed as exc:
            if self.stopping.is_set():
                self._send_abort(0)
            elif established or self._message is not None:
                logger.info(
                    "association from %s at %s lost: %s",
                    self.origin.calling_ae,
                    self.origin.host,
                    exc,
                )
            else:
                logger.debug("connection from %s closed before associating", self.origin.host)
        finally:
            self._drop_message()
            self.wire.close()
            if self._commit is not None:
                self._commit.after(self.origin.calling_ae, self.stopping)

    def _send_abort(self, reason: int) -> None:
        """A-ABORT, then wait (bounded, ARTIM-like) for the peer to close the connection, as
        PS3.8 Sta13 has it: closing at once makes some requestors miss the A-ABORT."""
        self._drop_message()
        try:
            self.wire.set_timeout(self.settings.release_timeout)
            self.wire.send(encode_abort(ABORT_SOURCE_PROVIDER, reason))
        except (WireClosed, WireTimeout):
            return
        self._linger()

    def _linger(self) -> None:
        """Read and drop until the peer closes the connection, for a bounded time."""
        try:
            self.wire.set_timeout(_ABORT_LINGER)
            deadline = time.monotonic() + _ABORT_LINGER
            while time.monotonic() < deadline:
                self.wire.skip(self.wire.buffered or 1)
        except (WireClosed, WireTimeout):
            pass

    def _header(self) -> tuple[int, int]:
        pdu_type, length = PDU_HEADER.unpack(self.wire.take(6))
        if pdu_type not in PDU_NAMES:
            # 0x16 is a TLS handshake record: a peer configured for TLS, this port is not
            hint = ": a TLS handshake on a port without TLS?" if pdu_type == _TLS_HANDSHAKE else ""
            raise Abort(f"PDU of unknown type 0x{pdu_type:02X}{hint}", ABORT_UNRECOGNISED_PDU)
        return pdu_type, length

    # -- association establishment ---------------------------------------------------------------

    def _associate(self) -> bool:
        self.wire.set_timeout(self.settings.associate_timeout)
        # The whole A-ASSOCIATE-RQ within that time, not each byte of it (ARTIM, PS3.8 9.1.5).
        self.wire.deadline = time.monotonic() + self.settings.associate_timeout
        pdu_type, length = self._header()
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise Abort(f"{PDU_NAMES[pdu_type]} before A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
        if length > _MAX_ASSOCIATE_RQ:
            raise Abort(f"A-ASSOCIATE-RQ of {length} bytes")
        body = self.wire.take(length)
        self.wire.deadline = None
        try:
            request = decode_associate_rq(body)
        except ProtocolError as exc:
            if "protocol version" in str(exc):
                self._reject(REJECT_PROTOCOL_VERSION, str(exc), None)
                return False
            raise Abort(str(exc)) from None
        self.origin = Origin(
            request.calling_ae,
            request.called_ae,
            self.origin.host,
            self.origin.port,
            self.origin.association,
        )
        if request.application_context != APPLICATION_CONTEXT:
            why = f"application context {request.application_context} not supported"
            self._reject(REJECT_APPLICATION_CONTEXT, why, request)
            return False
        verdict = self.admit(request, self.origin)
        if verdict is not None:
            self._reject(verdict[0], verdict[1], request)
            return False
        try:
            self._send_limit = send_pdu_limit(request.max_pdu)
        except ProtocolError as exc:
            raise Abort(str(exc)) from None
        answer = self.policy.negotiate(request, self.settings.async_window)
        self._contexts = answer.accepted
        ac = encode_associate_ac(
            body, answer.results, self.settings.max_pdu, answer.window, answer.roles
        )
        self.wire.send(ac)
        logger.info(
            "association from %s at %s:%d accepted",
            request.calling_ae,
            self.origin.host,
            self.origin.port,
        )
        if answer.refused:
            log_refused(request.calling_ae, answer.refused)
        return True

    def _reject(
        self, verdict: tuple[int, int, int], why: str, request: AssociateRequest | None
    ) -> None:
        logger.warning(
            "rejected association from %s (calling AE %r, called AE %r): %s",
            self.origin.host,
            request.calling_ae if request else "",
            request.called_ae if request else "",
            why,
        )
        self.wire.send(encode_associate_rj(*verdict))
        self._linger()  # the requestor closes the connection (PS3.8 Sta13)

    # -- established -----------------------------------------------------------------------------

    def _next_pdu(self) -> bool:
        """Handle one PDU; False once the association has ended."""
        if self.stopping.is_set():
            raise WireClosed("the receiver is stopping")
        pdu_type, length = self._header()
        if pdu_type == PDU_P_DATA:
            s = self.settings
            if 0 < s.max_pdu < length:
                raise Abort(f"P-DATA-TF of {length} bytes; we accept at most {s.max_pdu}")
            self.wire.deadline = time.monotonic() + s.idle_timeout + length / s.min_pdu_rate
            self._pdata(length)
            self.wire.deadline = None
            return True
        if pdu_type in (PDU_RELEASE_RQ, PDU_ABORT):
            if length != 4:
                raise Abort(f"{PDU_NAMES[pdu_type]} of {length} bytes (exactly 4)")
            self.wire.skip(4)
            if pdu_type == PDU_ABORT:
                logger.info(
                    "association from %s at %s aborted",
                    self.origin.calling_ae or "?",
                    self.origin.host,
                )
                self._drop_message()
                return False
            if self._message is not None:
                raise Abort("A-RELEASE-RQ in the middle of a DIMSE message", ABORT_UNEXPECTED_PDU)
            self.wire.set_timeout(self.settings.release_timeout)
            self.wire.send(RELEASE_RP)
            logger.debug("association from %s released", self.origin.calling_ae)
            return False
        raise Abort(f"unexpected {PDU_NAMES[pdu_type]}", ABORT_UNEXPECTED_PDU)
