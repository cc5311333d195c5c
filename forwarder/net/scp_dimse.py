"""The DIMSE layer of an association accepted by the Storage SCP: P-DATA-TF PDUs walked PDV by
PDV, messages gathered and answered.

:class:`~forwarder.net.scp_association.ScpAssociation` (establishment, release, abort) hands each
P-DATA-TF here, straight from the socket buffer: command fragments are gathered and decoded by
hand, data set fragments go to the object's file as they arrive
(:mod:`forwarder.net.scp_object`). The C-STORE-RSP / C-ECHO-RSP goes out once the object is
checked and the sink has answered. An N-ACTION-RQ on the Storage Commitment context (when the
receiver answers commitment) has its small data set gathered in memory and is answered by
:mod:`forwarder.net.scp_commitment`; so is an N-EVENT-REPORT-RQ there (a PACS reporting as SCP,
when the receiver takes reports).

Strict (PS3.8 9.3, PS3.7 9.3): items or PDVs that do not exactly fill what holds them, a PDV on a
context not accepted, a data set fragment before its command, a command fragment inside a data
set, a command set that is not a valid C-STORE-RQ / C-ECHO-RQ / N-ACTION-RQ (or the response to a
report we sent) raise :class:`Abort`: the association is aborted and the object in progress
deleted, never answered Success.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from forwarder.errors import ProtocolError
from forwarder.net.command_set import MAX_COMMAND_SET
from forwarder.net.commitment import STORAGE_COMMITMENT_PUSH
from forwarder.net.commitment_scp import MAX_ACTION_SIZE, CommitmentResponder
from forwarder.net.pdu import VERIFICATION_SOP_CLASS
from forwarder.net.scp_codec import ABORT_INVALID_PARAMETER, encode_pdata
from forwarder.net.scp_command_set import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    N_ACTION_RQ,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    DimseRequest,
    decode_request,
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
from forwarder.net.scp_policy import NON_STORAGE, EngineSettings
from forwarder.net.scp_wire import Wire

logger = logging.getLogger(__name__)

_PDV_HEADER = struct.Struct(">IBB")


class Abort(Exception):
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


class DimseReceiver:
    """The messages of one association, once established; subclassed by
    :class:`~forwarder.net.scp_association.ScpAssociation`, which negotiates the contexts
    (``_contexts``) and the largest PDU the peer takes (``_send_limit``)."""

    def __init__(
        self,
        wire: Wire,
        origin: Origin,
        settings: EngineSettings,
        sink: ObjectSink,
        commitment: CommitmentResponder | None,
        reports: ReportSink | None,
    ) -> None:
        self.commitment = commitment
        self.reports = reports
        self._commit = CommitmentExchange(commitment) if commitment is not None else None
        self.wire = wire
        self.origin = origin
        self.settings = settings
        self.sink = sink
        self._contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        self._send_limit = 0
        self._message: _Message | None = None

    def _drop_message(self) -> None:
        message, self._message = self._message, None
        if message is not None and message.object is not None:
            message.object.discard()

    def _pdata(self, length: int) -> None:
        wire = self.wire
        if length < 6:
            raise Abort(f"P-DATA-TF of {length} bytes holds no PDV item")
        while length > 0:
            if length < 6:
                raise Abort("P-DATA-TF ends inside a PDV item header")
            item_len, context_id, control = _PDV_HEADER.unpack(wire.take(6))
            if item_len < 2 or item_len - 2 > length - 6:
                raise Abort(f"PDV item of length {item_len} in {length} bytes left of its PDU")
            length -= 4 + item_len
            self._pdv(context_id, control, item_len - 2)

    def _pdv(self, context_id: int, control: int, size: int) -> None:
        if context_id not in self._contexts:
            raise Abort(f"PDV on presentation context {context_id}, not accepted", dimse=True)
        message = self._message
        if message is None:
            message = self._message = _Message(context_id)
        elif message.context_id != context_id:
            raise Abort(
                f"PDV on context {context_id} inside a message on context {message.context_id}",
                dimse=True,
            )
        last = bool(control & 0x02)
        if control & 0x01:
            if message.request is not None:
                raise Abort("command fragment after the command set was complete", dimse=True)
            if len(message.command) + size > MAX_COMMAND_SET:
                raise Abort(f"command set over {MAX_COMMAND_SET} bytes", dimse=True)
            message.command += self.wire.take(size)
            if last:
                self._command(message)
            return
        if message.request is None:
            raise Abort("data set fragment before its command set", dimse=True)
        if message.object is not None:
            self.wire.stream(size, message.object.write)
        elif message.buffer is not None:
            if len(message.buffer) + size > MAX_ACTION_SIZE:
                raise Abort(
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
            try:
                self._respond(message.request, context_id, answer)
            finally:
                if answer.then is not None:
                    self._then(answer.then)

    def _command(self, message: _Message) -> None:
        try:
            request = decode_request(bytes(message.command))
        except ProtocolError as exc:
            raise Abort(str(exc), dimse=True) from None
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
                raise Abort(
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
                raise Abort(
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
            raise Abort(f"N-EVENT-REPORT-RSP for message {request.message_id}", dimse=True)
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

    def _then(self, work: Callable[[], None]) -> None:
        """The sink's follow-up to an answer (:attr:`Answer.then`): its failure is logged, and
        the association goes on."""
        try:
            work()
        except Exception:
            logger.exception("after answering %s: the follow-up failed", self.origin.calling_ae)

    def _respond(self, request: DimseRequest, context_id: int, answer: Answer) -> None:
        command = encode_response(request, answer.status, answer.comment)
        self.wire.send(encode_pdata(context_id, command, self._send_limit))
