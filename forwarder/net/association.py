"""A lean, synchronous DICOM association for the C-STORE hot path.

pynetdicom's own SCU costs about 3 ms per C-STORE (a reactor thread, queues, 1 ms polling sleeps,
command sets encoded through pydicom) and decodes/re-encodes every file; importing it also costs
~0.7 s (it pulls in pydicom and numpy), more than storescu needs to send 2,000 files. So the
three association PDUs are encoded by hand (:mod:`forwarder.net.pdu`; the tests decode them with
pynetdicom's PDU classes and negotiate with DCMTK, Orthanc and pynetdicom peers), and the
per-file work is done on a blocking socket:

* the C-STORE-RQ command set is packed with ``struct`` (implicit VR little endian);
* the data set is streamed from the file in PDU-sized fragments, several PDUs per ``sendall``,
  through one reused buffer, so memory stays flat whatever the file size;
* ``TCP_NODELAY`` is always on, ``TCP_QUICKACK`` re-armed after every read (a peer with Nagle's
  algorithm on never stalls on our delayed ACKs), and plain TCP runs on kernel timeouts, without a
  ``poll()`` a call (:mod:`forwarder.net.transport`);
* every PDU and response is checked against PS3.7/PS3.8 by :mod:`forwarder.net.pdu`'s strict
  decoders (a few comparisons a response, no pydicom): Message ID Being Responded To, Affected
  SOP Class/Instance UID, a 2-byte non-Pending Status... A violation aborts the association and
  raises :class:`~forwarder.errors.ProtocolError` (the file is retried); a stalled peer hits the
  socket timeout and is aborted. A missing or wrong Command Group Length, elements out of order
  or repeated with the same value change nothing and are tolerated, as by pynetdicom and DCMTK
  (a warning once per association); an empty Affected SOP Class/Instance UID counts as absent;
* the peer's maximum PDU is clamped (``pdu.send_pdu_limit``), fragments are even and an odd data
  set is padded with one 0x00;
* release collisions are answered (PS3.8 Sta9/Sta11, :mod:`forwarder.net.acse`), and an idle
  association is checked before reuse (:meth:`Association.peer_gone`).

There is no reactor thread, hence no race over who reads the C-STORE-RSP. This module holds the
:class:`Association` and its DIMSE messages (C-STORE, C-ECHO and their responses); the socket is
:mod:`forwarder.net.transport`'s, negotiation and release are :mod:`forwarder.net.acse`'s.

A little past 400 lines: the DIMSE streaming code and the settings records importers expect
here; the socket is :mod:`forwarder.net.transport`, negotiation :mod:`forwarder.net.acse`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.crashpoints import crash_point
from forwarder.dicom.part10 import FileMeta, read_error
from forwarder.errors import (
    AssociationError,
    ConnectInterrupted,
    InvalidFileError,
    ProtocolError,
    UnreadableFileError,
)
from forwarder.net import acse
from forwarder.net.acse import AcceptedContext, Negotiated
from forwarder.net.interrupt import STOPPING, StopEvent
from forwarder.net.pacing import Pacer
from forwarder.net.pdu import (
    C_ECHO_RSP,
    C_STORE_RSP,
    MAX_CONTEXTS,
    PDATA_HEADER,
    PDU_ABORT,
    PDU_P_DATA,
    PDU_RELEASE_RQ,
    PRIORITY,
    RELEASE_RP,
    VERIFICATION_SOP_CLASS,
    ProposedContext,
    check_response,
    collect_command,
    command_text,
    decode_command,
    encode_echo_rq,
    encode_store_rq,
    offending_text,
)
from forwarder.net.transport import Transport, connect, pdu_name

if TYPE_CHECKING:
    import socket
    import ssl

    from forwarder.dicom.edit import EditedObject

logger = logging.getLogger(__name__)

_VERIFICATION = VERIFICATION_SOP_CLASS.encode("ascii")
_NOTHING_YET = Negotiated({}, {}, frozenset(), 0)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to connect, and the called AE title."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AssociationSettings:
    """Everything about how we associate, from the config or the ``send`` command line."""

    calling_ae_title: str = "FORWARDER"
    bind_host: str | None = None
    connect_timeout: float = 10.0  # TCP connect, and the A-ASSOCIATE-AC unless accept_timeout
    accept_timeout: float | None = None
    response_timeout: float = 60.0  # DIMSE response
    release_timeout: float = 10.0
    max_pdu_receive: int = 262144  # what we tell the peer we accept (0 = unlimited)
    max_pdu_send: int | None = None  # our own cap on PDUs we send (dcmsnd -sndpdulen)
    tcp_nodelay: bool = True
    so_sndbuf: int | None = None
    so_rcvbuf: int | None = None
    priority: int = PRIORITY["medium"]
    tls: ssl.SSLContext | None = None  # ssl is imported only when TLS is used
    tls_server_name: str | None = None  # defaults to the peer's host
    batch_bytes: int = 1024 * 1024  # data set bytes per sendall (dcmsnd -bufsize)
    # The destination's rate cap, shared by all its associations (None: unlimited).
    pacer: Pacer | None = None
    # The sending threads' stop: once set, an association being set up (TCP connect, TLS
    # handshake, A-ASSOCIATE-AC wait) is interrupted; one established is not touched.
    stop: StopEvent | None = None


@dataclass(frozen=True, slots=True)
class DimseResponse:
    """A C-STORE-RSP or C-ECHO-RSP."""

    status: int
    error_comment: str | None
    message_id: int
    offending: str | None = None


class Association:
    """One association to a peer, used by one thread at a time.

    Raises :class:`AssociationError` (``retryable`` says whether trying later may help) when the
    association cannot be made or breaks; after such an error the object is closed.
    """

    def __init__(self, peer: Peer, settings: AssociationSettings, sock: socket.socket) -> None:
        self.peer = peer
        self.settings = settings
        self._transport = Transport(sock, peer, settings)
        self._message_id = 0
        self._negotiated = _NOTHING_YET
        self.max_pdu_send = 0  # the largest P-DATA-TF we send (pdu.send_pdu_limit)
        self._frag = 0  # data bytes per PDV: max_pdu_send - 6, even
        self._context_ids: frozenset[int] = frozenset()  # accepted presentation context IDs
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self._layout_noted = False  # a tolerated command set layout fault was logged

    # -- establishment ------------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        peer: Peer,
        settings: AssociationSettings,
        contexts: Sequence[ProposedContext],
    ) -> Association:
        """Connect and negotiate ``contexts`` (at most 128)."""
        if not contexts:
            raise ValueError("at least one presentation context is needed")
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts; at most {MAX_CONTEXTS}")
        sock = connect(peer, settings)
        assoc = cls(peer, settings, sock)
        try:
            if settings.stop is None:
                assoc._negotiate(contexts)
            else:
                # A peer that takes the connection and never answers: the stop ends the wait.
                with settings.stop.watching(sock):
                    assoc._negotiate(contexts)
        except ConnectInterrupted:
            assoc._transport.close()
            raise ConnectInterrupted(
                f"association with {peer} not established: {STOPPING}"
            ) from None
        except BaseException:
            assoc._transport.close()
            raise
        return assoc

    def _negotiate(self, contexts: Sequence[ProposedContext]) -> None:
        neg = acse.negotiate(self._transport, contexts)
        self._negotiated = neg
        self.max_pdu_send = neg.max_pdu_send
        self._frag = neg.max_pdu_send - 6
        self._context_ids = neg.context_ids
        if self.settings.tls is None:
            self._transport.use_kernel_timeouts(self.settings.response_timeout)
        else:
            self._transport.sock.settimeout(self.settings.response_timeout)

    @property
    def closed(self) -> bool:
        """True once the association is released, aborted or broken."""
        return self._transport.closed

    @property
    def last_progress(self) -> float:
        """When a byte was last sent or received (monotonic; watchdog health)."""
        return self._transport.last_progress

    # -- negotiated contexts ------------------------------------------------------------------

    def context_for(self, sop_class: str, transfer_syntax: str) -> AcceptedContext | None:
        """The accepted context for exactly this SOP class and transfer syntax, if any."""
        return self._negotiated.accepted.get((sop_class, transfer_syntax))

    def accepted_for(self, sop_class: str) -> list[AcceptedContext]:
        """Every accepted context for ``sop_class``, whatever its transfer syntax (in proposal
        order)."""
        return self._negotiated.by_abstract.get(sop_class, [])

    @property
    def accepted_contexts(self) -> list[AcceptedContext]:
        return [c for cs in self._negotiated.by_abstract.values() for c in cs]

    # -- DIMSE --------------------------------------------------------------------------------

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def echo(self) -> DimseResponse:
        ctx = self.accepted_for(VERIFICATION_SOP_CLASS)
        if not ctx:
            raise AssociationError(f"{self.peer} did not accept Verification", retryable=False)
        msg_id = self._next_message_id()
        self._send_fragments(ctx[0].context_id, True, encode_echo_rq(msg_id))
        return self._read_response(msg_id, C_ECHO_RSP, _VERIFICATION, None)

    def store_file(
        self,
        path: str,
        meta: FileMeta,
        context: AcceptedContext,
        *,
        priority: int | None = None,
    ) -> DimseResponse:
        """Send the data set of ``path`` (as it is on disk) and return the peer's response.

        A data set of odd length (a deflated one: PS3.5 A.5 pads the deflated bytes, not every
        writer does) goes out with one trailing 0x00, as DCMTK sends it: PS3.5 7.1 wants even
        lengths, and DCMTK's SCP aborts on an odd fragment.
        """
        # os.open + one fstat + preadv: the builtin open() adds an fstat and a seek per file.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise read_error(path, exc, "cannot open") from None
        try:
            if os.fstat(fd).st_size != meta.size:
                raise InvalidFileError(path, "the file changed since its header was read")
            msg_id = self._next_message_id()
            prio = self.settings.priority if priority is None else priority
            command = encode_store_rq(msg_id, meta.sop_class_uid, meta.sop_instance_uid, prio)
            base = meta.dataset_offset

            def read_at(view: memoryview, pos: int) -> int:
                return os.preadv(fd, [view], base + pos)

            urgent = prio == PRIORITY["high"]
            self._stream(context.context_id, command, read_at, meta.dataset_length, path, urgent)
        finally:
            os.close(fd)
        return self._read_response(
            msg_id, C_STORE_RSP, meta.sop_class_uid.encode(), meta.sop_instance_uid.encode()
        )

    def store_edited(
        self, obj: EditedObject, context: AcceptedContext, *, priority: int | None = None
    ) -> DimseResponse:
        """Send a changed object (:mod:`forwarder.dicom.edit`): its re-encoded attributes and
        its Pixel Data streamed from the file, as :meth:`store_file` streams a whole file."""
        msg_id = self._next_message_id()
        prio = self.settings.priority if priority is None else priority
        command = encode_store_rq(msg_id, obj.sop_class_uid, obj.sop_instance_uid, prio)
        urgent = prio == PRIORITY["high"]
        with obj.open() as reader:
            self._stream(context.context_id, command, reader.read_at, obj.length, obj.path, urgent)
        return self._read_response(
            msg_id, C_STORE_RSP, obj.sop_class_uid.encode(), obj.sop_instance_uid.encode()
        )

    def store_bytes(
        self,
        sop_class: str,
        sop_instance: str,
        dataset: bytes,
        context: AcceptedContext,
        *,
        priority: int | None = None,
    ) -> DimseResponse:
        """Send an already encoded data set (used after transcoding); padded to even length.
        ``priority`` overrides the settings' C-STORE Priority for this request."""
        msg_id = self._next_message_id()
        prio = self.settings.priority if priority is None else priority
        command = encode_store_rq(msg_id, sop_class, sop_instance, prio)
        urgent = prio == PRIORITY["high"]
        self._send_fragments(context.context_id, True, command, urgent)
        if len(dataset) % 2:
            dataset += b"\x00"
        self._send_fragments(context.context_id, False, dataset, urgent)
        return self._read_response(msg_id, C_STORE_RSP, sop_class.encode(), sop_instance.encode())

    def _send_fragments(
        self, context_id: int, command: bool, data: bytes, urgent: bool = False
    ) -> None:
        frag = self._frag
        total = len(data)
        parts = []
        pos = 0
        while True:
            chunk = data[pos : pos + frag]
            pos += len(chunk)
            last = pos >= total
            control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
            parts.append(
                PDATA_HEADER.pack(PDU_P_DATA, len(chunk) + 6, len(chunk) + 2, context_id, control)
            )
            parts.append(chunk)
            if last:
                break
        self._transport.send(b"".join(parts), what="P-DATA", urgent=urgent)

    def _stream(
        self,
        context_id: int,
        command: bytes,
        read_at: Callable[[memoryview, int], int],
        length: int,
        path: str,
        urgent: bool = False,
    ) -> None:
        """Command PDU(s) and the data set's PDUs, batched into ~1 MB ``sendall`` calls; an odd
        ``length`` is sent with one 0x00 pad byte (fragments are even: pdu.send_pdu_limit).
        ``read_at(view, pos)`` fills ``view`` from data set position ``pos``; ``urgent``: an
        urgent file's bytes (a rate cap may treat them apart, :class:`~forwarder.net.pacing.
        Pacer`)."""
        transport = self._transport
        frag = self._frag
        if len(command) > frag:
            self._send_fragments(context_id, True, command, urgent)
            prefix = b""
        else:
            prefix = (
                PDATA_HEADER.pack(PDU_P_DATA, len(command) + 6, len(command) + 2, context_id, 0x03)
                + command
            )
        padded = length + (length & 1)
        fragments = max(1, -(-padded // frag))
        per_batch = min(fragments, max(1, self.settings.batch_bytes // (frag + 12)))
        batch_len = len(prefix) + per_batch * (frag + 12)
        buf = bytearray(batch_len)
        view = memoryview(buf)
        offset = 0
        remaining = padded
        in_file = length
        pos = len(prefix)
        view[:pos] = prefix
        while True:
            n = min(frag, remaining)
            if pos + 12 + n > batch_len:
                transport.send(view[:pos], what="P-DATA", urgent=urgent)
                crash_point("mid-store")
                pos = 0
            remaining -= n
            control = 0x02 if remaining == 0 else 0x00
            PDATA_HEADER.pack_into(buf, pos, PDU_P_DATA, n + 6, n + 2, context_id, control)
            want = min(n, in_file)
            got = 0
            while got < want:
                try:
                    r = read_at(view[pos + 12 + got : pos + 12 + want], offset)
                except OSError as exc:
                    # EIO and the like: part of the message may be out, so the association
                    # cannot carry on; nothing is known against the file: tried again later.
                    self.abort()
                    raise UnreadableFileError(
                        path, f"read error while sending: {exc.strerror or exc}"
                    ) from None
                offset += r
                if not r:
                    # The file shrank under us: the message cannot be completed on this association.
                    self.abort()
                    raise InvalidFileError(path, "the file was truncated while being sent")
                got += r
            in_file -= want
            if want < n:
                buf[pos + 12 + want] = 0  # the pad byte (the buffer is reused: set it)
            pos += 12 + n
            if remaining == 0:
                break
        transport.send(view[:pos], what="P-DATA", urgent=urgent)

    def _read_response(
        self, message_id: int, command_field: int, sop_class: bytes, sop_instance: bytes | None
    ) -> DimseResponse:
        """Wait for the response to our one outstanding request and check it (pdu.py's
        :func:`collect_command`, :func:`decode_command`, :func:`check_response`): a few
        comparisons, no pydicom. Anything but that response aborts the association."""
        transport = self._transport
        timeout = self.settings.response_timeout
        command = bytearray()
        while True:
            pdu_type, body = transport.read_pdu(timeout, waiting_for="a DIMSE response")
            if pdu_type == PDU_P_DATA:
                try:
                    if not collect_command(body, self._context_ids, command):
                        continue
                    notes: list[str] = []
                    values = decode_command(bytes(command), notes)
                    status = check_response(
                        values, command_field, message_id, sop_class, sop_instance
                    )
                except ProtocolError as exc:
                    self.abort()
                    raise ProtocolError(f"{self.peer} sent a bad DIMSE response: {exc}") from None
                self.last_used = time.monotonic()
                if notes:
                    self._note_layout(notes)
                return DimseResponse(
                    status=status,
                    error_comment=command_text(values.get(0x0902)),
                    message_id=message_id,
                    offending=offending_text(values.get(0x0901)),
                )
            if pdu_type == PDU_ABORT:
                transport.close()
                raise AssociationError(f"{self.peer} aborted the association", retryable=True)
            if pdu_type == PDU_RELEASE_RQ:
                # PS3.8 Sta6 + A-RELEASE-RQ: answer it; the request is lost with the association.
                transport.send(RELEASE_RP, what="A-RELEASE-RP")
                transport.close()
                raise AssociationError(
                    f"{self.peer} released the association before answering", retryable=True
                )
            self.abort()
            raise ProtocolError(
                f"{self.peer} sent {pdu_name(pdu_type)} while we waited for a DIMSE response"
            )

    def _note_layout(self, notes: list[str]) -> None:
        """A response decoded in spite of layout faults that change nothing (pdu.decode_command):
        a warning the first time on this association, a debug line after that."""
        level = logging.DEBUG if self._layout_noted else logging.WARNING
        self._layout_noted = True
        logger.log(
            level,
            "%s: DIMSE response accepted in spite of %s (PS3.7 E.1; tolerated as pynetdicom and "
            "DCMTK do)%s",
            self.peer,
            "; ".join(notes),
            "" if level == logging.DEBUG else "; further ones on this association at debug level",
        )

    # -- release / abort ----------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE (:func:`forwarder.net.acse.release`); aborts if the peer does not answer
        within ``release_timeout``."""
        acse.release(self._transport)

    def peer_gone(self) -> bool:
        """True when this association, idle between requests, can no longer be used: the peer
        closed the connection, the socket failed, or the peer sent something while we had no
        request outstanding. A non-blocking look (one ``recv`` with MSG_PEEK|MSG_DONTWAIT on
        plain TCP); call it only between requests.

        What arrived is answered as PS3.8 says (:func:`forwarder.net.acse.answer_idle`). Either
        way the association is closed when this returns True, so the caller opens a new one for
        the next file instead of losing an attempt to a dead one.
        """
        transport = self._transport
        if transport.closed:
            return True
        waiting = transport.poll_idle()
        if waiting is None:
            return False
        if not waiting:
            logger.debug("%s: the peer closed the idle association", self.peer)
            transport.close()
            return True
        acse.answer_idle(transport)
        return True

    def abort(self) -> None:
        self._transport.abort()
