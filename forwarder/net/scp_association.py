"""One association accepted by the Storage SCP, from its A-ASSOCIATE-RQ to its end.

A blocking loop on the connection's own thread (no reactor, no queues, no polling), as the
sender's :mod:`forwarder.net.association`: read a PDU header, then act on it. The A-ASSOCIATE-RQ
is decoded strictly (:mod:`forwarder.net.scp_codec`), admitted or rejected (the caller's
``admit``), and each presentation context answered (:mod:`forwarder.net.scp_policy`). Then
P-DATA-TF PDUs are walked PDV by PDV straight from the socket buffer: command fragments are
gathered and decoded by hand, data set fragments go to the object's file as they arrive
(:mod:`forwarder.net.scp_object`). The C-STORE-RSP / C-ECHO-RSP goes out once the object is
checked and the sink has answered; a requestor that proposed an asynchronous operations window
may send its next requests meanwhile (they wait in the socket; answers go in order). An
N-ACTION-RQ on the Storage Commitment context (when the receiver answers commitment) has its
small data set gathered in memory and is answered by :mod:`forwarder.net.scp_commitment`; so is
an N-EVENT-REPORT-RQ there (a PACS reporting as SCP, when the receiver takes reports).

Strict (PS3.8 9.3, PS3.7 9.3): a PDU of an unknown or unexpected type, longer than the maximum we
announced, items or PDVs that do not exactly fill what holds them, a PDV on a context not
accepted, a data set fragment before its command, a command fragment inside a data set, a
command set that is not a valid C-STORE-RQ / C-ECHO-RQ / N-ACTION-RQ (or the response to a
report we sent): the association is aborted (A-ABORT, source service provider) and the object
in progress deleted, never answered Success. A short
timeout for the first PDU (a silent connection holds no slot for long), the idle one after.
Not here: sockets, TLS and slots (:mod:`forwarder.net.scp_server`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time

from forwarder.errors import ProtocolError
from forwarder.net.commitment import STORAGE_COMMITMENT_PUSH
from forwarder.net.commitment_scp import MAX_ACTION_SIZE, CommitmentResponder
from forwarder.net.pdu import (
    APPLICATION_CONTEXT,
    MAX_COMMAND_SET,
    PDU_ABORT,
    PDU_ASSOCIATE_RQ,
    PDU_HEADER,
    PDU_NAMES,
    PDU_P_DATA,
    PDU_RELEASE_RQ,
    RELEASE_RP,
    VERIFICATION_SOP_CLASS,
    send_pdu_limit,
)
from forwarder.net.scp_codec import (
    ABORT_INVALID_PARAMETER,
    ABORT_SOURCE_PROVIDER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    N_ACTION_RQ,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    REJECT_APPLICATION_CONTEXT,
    REJECT_PROTOCOL_VERSION,
    AssociateRequest,
    DimseRequest,
    decode_associate_rq,
    decode_request,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_pdata,
    encode_response,
)
from forwarder.net.scp_commitment import CommitmentExchange, ReportSink, take_report
from forwarder.net.scp_object import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    Answer,
    IncomingObject,
    ObjectSink,
    Origin,
    shown,
)
from forwarder.net.scp_policy import NON_STORAGE, Admit, ContextPolicy, EngineSettings, log_refused
from forwarder.net.scp_wire import Wire, WireClosed, WireTimeout

logger = logging.getLogger(__name__)

_MAX_ASSOCIATE_RQ = 1024 * 1024  # 128 contexts of 8 syntaxes take ~40 kB
_PDV_HEADER = struct.Struct(">IBB")
_ABORT_LINGER = 2.0  # after our A-ABORT / A-ASSOCIATE-RJ, how long the peer has to close


class _Abort(Exception):
    """End the association with an A-ABORT (reason for the provider source)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER, dimse: bool = False):
        super().__init__(message)
        self.reason = reason
        self.dimse = dimse


class _Message:
    """A DIMSE message being received on one presentation context."""

    __slots__ = ("answer", "buffer", "command", "context_id", "object", "request")

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.command = bytearray()
        self.request: DimseRequest | None = None
        self.object: IncomingObject | None = None
        self.answer: Answer | None = None  # decided before the data set (0x0122): read, drop
        self.buffer: bytearray | None = None  # an N-ACTION's data set, kept in memory


class ScpAssociation:
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
        self.commitment = commitment
        self.reports = reports
        self._commit = CommitmentExchange(commitment) if commitment is not None else None
        self.wire = wire
        self.origin = origin
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.admit = admit
        self.stopping = threading.Event()
        self._contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        self._send_limit = 0
        self._message: _Message | None = None

    # -- the life of the association --------------------------------------------------------------

    def run(self) -> None:
        established = False
        try:
            established = self._associate()
            if established:
                self.wire.set_timeout(self.settings.idle_timeout)
                while self._next_pdu():
                    pass
        except _Abort as exc:
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
                self._commit.after(self.origin.calling_ae)

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

    def _drop_message(self) -> None:
        message, self._message = self._message, None
        if message is not None and message.object is not None:
            message.object.discard()

    def _header(self) -> tuple[int, int]:
        pdu_type, length = PDU_HEADER.unpack(self.wire.take(6))
        if pdu_type not in PDU_NAMES:
            raise _Abort(f"PDU of unknown type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
        return pdu_type, length

    # -- association establishment ---------------------------------------------------------------

    def _associate(self) -> bool:
        self.wire.set_timeout(self.settings.associate_timeout)
        # The whole A-ASSOCIATE-RQ within that time, not each byte of it (ARTIM, PS3.8 9.1.5).
        self.wire.deadline = time.monotonic() + self.settings.associate_timeout
        pdu_type, length = self._header()
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise _Abort(f"{PDU_NAMES[pdu_type]} before A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
        if length > _MAX_ASSOCIATE_RQ:
            raise _Abort(f"A-ASSOCIATE-RQ of {length} bytes")
        body = self.wire.take(length)
        self.wire.deadline = None
        try:
            request = decode_associate_rq(body)
        except ProtocolError as exc:
            if "protocol version" in str(exc):
                self._reject(REJECT_PROTOCOL_VERSION, str(exc), None)
                return False
            raise _Abort(str(exc)) from None
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
            raise _Abort(str(exc)) from None
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
                raise _Abort(f"P-DATA-TF of {length} bytes; we accept at most {s.max_pdu}")
            self.wire.deadline = time.monotonic() + s.idle_timeout + length / s.min_pdu_rate
            self._pdata(length)
            self.wire.deadline = None
            return True
        if pdu_type in (PDU_RELEASE_RQ, PDU_ABORT):
            if length != 4:
                raise _Abort(f"{PDU_NAMES[pdu_type]} of {length} bytes (exactly 4)")
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
                raise _Abort("A-RELEASE-RQ in the middle of a DIMSE message", ABORT_UNEXPECTED_PDU)
            self.wire.set_timeout(self.settings.release_timeout)
            self.wire.send(RELEASE_RP)
            logger.debug("association from %s released", self.origin.calling_ae)
            return False
        raise _Abort(f"unexpected {PDU_NAMES[pdu_type]}", ABORT_UNEXPECTED_PDU)

    def _pdata(self, length: int) -> None:
        wire = self.wire
        if length < 6:
            raise _Abort(f"P-DATA-TF of {length} bytes holds no PDV item")
        while length > 0:
            if length < 6:
                raise _Abort("P-DATA-TF ends inside a PDV item header")
            item_len, context_id, control = _PDV_HEADER.unpack(wire.take(6))
            if item_len < 2 or item_len - 2 > length - 6:
                raise _Abort(f"PDV item of length {item_len} in {length} bytes left of its PDU")
            length -= 4 + item_len
            self._pdv(context_id, control, item_len - 2)

    def _pdv(self, context_id: int, control: int, size: int) -> None:
        if context_id not in self._contexts:
            raise _Abort(f"PDV on presentation context {context_id}, not accepted", dimse=True)
        message = self._message
        if message is None:
            message = self._message = _Message(context_id)
        elif message.context_id != context_id:
            raise _Abort(
                f"PDV on context {context_id} inside a message on context {message.context_id}",
                dimse=True,
            )
        last = bool(control & 0x02)
        if control & 0x01:
            if message.request is not None:
                raise _Abort("command fragment after the command set was complete", dimse=True)
            if len(message.command) + size > MAX_COMMAND_SET:
                raise _Abort(f"command set over {MAX_COMMAND_SET} bytes", dimse=True)
            message.command += self.wire.take(size)
            if last:
                self._command(message)
            return
        if message.request is None:
            raise _Abort("data set fragment before its command set", dimse=True)
        if message.object is not None:
            self.wire.stream(size, message.object.write)
        elif message.buffer is not None:
            if len(message.buffer) + size > MAX_ACTION_SIZE:
                raise _Abort(
                    f"N-ACTION/N-EVENT-REPORT data set over {MAX_ACTION_SIZE} bytes", dimse=True
                )
            message.buffer += self.wire.take(size)
        else:
            self.wire.skip(size)
        if last:
            self._message = None
            if message.buffer is not None:
                if message.request.command_field == N_EVENT_REPORT_RQ:
                    self._event_report(message.request, context_id, bytes(message.buffer))
                else:
                    self._n_action(message.request, context_id, bytes(message.buffer))
                return
            if message.request.command_field == N_EVENT_REPORT_RSP:
                return  # a response: nothing to answer
            answer = message.answer
            if message.object is not None:
                answer = message.object.finish()
            assert answer is not None
            self._respond(message.request, context_id, answer)

    def _command(self, message: _Message) -> None:
        try:
            request = decode_request(bytes(message.command))
        except ProtocolError as exc:
            raise _Abort(str(exc), dimse=True) from None
        message.request = request
        abstract, syntax = self._contexts[message.context_id]
        if request.command_field == C_CANCEL_RQ:
            self._message = None  # nothing to cancel: every C-STORE is answered in order
            return
        if request.command_field == N_EVENT_REPORT_RSP:
            self._report_answered(request, message)
            return
        if request.command_field == N_ACTION_RQ:
            if (
                self.commitment is None
                or abstract != STORAGE_COMMITMENT_PUSH
                or request.sop_class != STORAGE_COMMITMENT_PUSH
                or not request.has_data_set
            ):
                raise _Abort(
                    f"N-ACTION for {request.sop_class} on a context for {abstract}", dimse=True
                )
            message.buffer = bytearray()
            return
        if request.command_field == N_EVENT_REPORT_RQ:
            if (
                self.reports is None
                or abstract != STORAGE_COMMITMENT_PUSH
                or request.sop_class != STORAGE_COMMITMENT_PUSH
                or not request.has_data_set
            ):
                raise _Abort(
                    f"N-EVENT-REPORT for {request.sop_class} on a context for {abstract}",
                    dimse=True,
                )
            message.buffer = bytearray()
            return
        if request.command_field == C_ECHO_RQ:
            self._message = None
            if abstract == VERIFICATION_SOP_CLASS == request.sop_class:
                logger.debug("C-ECHO from %s", self.origin.calling_ae)
                self._respond(request, message.context_id, Answer(STATUS_SUCCESS))
            else:
                self._respond(request, message.context_id, self._wrong_class(request, message))
            return
        if request.sop_class != abstract:
            message.answer = self._wrong_class(request, message)
        elif not self._storage(abstract):
            # A C-STORE on the Verification context (or any non-storage one): nothing to keep.
            message.answer = self._wrong_class(request, message)
        elif request.has_data_set:
            message.object = IncomingObject(
                self.sink,
                self.origin,
                request.sop_class,
                request.sop_instance,
                syntax,
                self.settings.max_object_size,
            )
        if not request.has_data_set:
            self._message = None
            answer = message.answer
            if answer is None:
                comment = "the C-STORE request carries no data set"
                logger.warning(
                    "refused SOP Instance %s from %s: %s; answering 0x%04X",
                    shown(request.sop_instance),
                    self.origin.calling_ae,
                    comment,
                    STATUS_CANNOT_UNDERSTAND,
                )
                answer = Answer(STATUS_CANNOT_UNDERSTAND, comment)
            self._respond(request, message.context_id, answer)

    @staticmethod
    def _storage(abstract: str) -> bool:
        """Whether a context accepted for ``abstract`` may carry a C-STORE: every context the
        policy accepts is a storage one but Verification's and Storage Commitment's."""
        return abstract not in NON_STORAGE

    # -- storage commitment (PS3.4 J): forwarder.net.scp_commitment -----------------------------

    def _n_action(self, request: DimseRequest, context_id: int, data: bytes) -> None:
        assert self._commit is not None
        syntax = self._contexts[context_id][1]
        self.wire.send(
            self._commit.action(
                request, context_id, syntax, data, self._send_limit, self.origin.calling_ae
            )
        )

    def _event_report(self, request: DimseRequest, context_id: int, data: bytes) -> None:
        assert self.reports is not None
        syntax = self._contexts[context_id][1]
        self.wire.send(
            take_report(
                self.reports,
                request,
                context_id,
                syntax,
                data,
                self._send_limit,
                self.origin.calling_ae,
            )
        )

    def _report_answered(self, request: DimseRequest, message: _Message) -> None:
        if self._commit is None or not self._commit.answered(request, self.origin.calling_ae):
            raise _Abort(f"N-EVENT-REPORT-RSP for message {request.message_id}", dimse=True)
        if not request.has_data_set:  # else its Event Reply is read and dropped (_pdv)
            self._message = None

    def _wrong_class(self, request: DimseRequest, message: _Message) -> Answer:
        # A presentation context carries one abstract syntax (PS3.8 7.1.1.13): a request on it is
        # for that SOP Class. Nothing is kept; the association goes on (0x0122, as PS3.7 C.5
        # defines it: "SOP Class not supported").
        abstract = self._contexts[message.context_id][0]
        logger.warning(
            "refused SOP Instance %s from %s: the request names SOP Class %s on presentation "
            "context %d, negotiated for %s; answering 0x%04X",
            shown(request.sop_instance),
            self.origin.calling_ae,
            shown(request.sop_class),
            message.context_id,
            shown(abstract),
            STATUS_SOP_CLASS_NOT_SUPPORTED,
        )
        return Answer(
            STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP Class not negotiated on this presentation context"
        )

    def _respond(self, request: DimseRequest, context_id: int, answer: Answer) -> None:
        command = encode_response(request, answer.status, answer.comment)
        self.wire.send(encode_pdata(context_id, command, self._send_limit))
