"""A lean, synchronous DICOM association for the C-STORE hot path.

pynetdicom's own SCU costs about 3 ms per C-STORE (a reactor thread, queues, 1 ms polling sleeps,
command sets encoded through pydicom) and decodes/re-encodes every file; importing it also costs
~0.7 s (it pulls in pydicom and numpy), more than storescu needs to send 2,000 files. So the
three association PDUs are encoded by hand (:mod:`forwarder.pdu`; the tests decode them with
pynetdicom's PDU classes and negotiate with DCMTK, Orthanc and pynetdicom peers), and the
per-file work is done on a blocking socket:

* the C-STORE-RQ command set is packed with ``struct`` (implicit VR little endian);
* the data set is streamed from the file in PDU-sized fragments, several PDUs per ``sendall``,
  through one reused buffer, so memory stays flat whatever the file size;
* ``TCP_NODELAY`` is always on, and ``TCP_QUICKACK`` is re-armed after every read, so a peer with
  Nagle's algorithm on (Debian's DCMTK and Orthanc) never stalls on our delayed ACKs;
* responses are read and matched by Message ID; a stalled peer hits the socket timeout and is
  aborted.

There is no reactor thread, hence no race over who reads the C-STORE-RSP.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forwarder.crashpoints import crash_point
from forwarder.dicomfile import FileMeta
from forwarder.errors import AssociationError, InvalidFileError
from forwarder.pdu import (
    ABORT,
    MAX_CONTEXTS,
    PDATA_HEADER,
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_HEADER,
    PDU_P_DATA,
    PDU_RELEASE_RP,
    PDU_RELEASE_RQ,
    PRIORITY,
    REJECT_RESULT,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION_SOP_CLASS,
    ProposedContext,
    command_text,
    decode_associate_ac,
    decode_command,
    encode_associate_rq,
    encode_echo_rq,
    encode_store_rq,
    reject_reason,
)

if TYPE_CHECKING:
    import ssl

logger = logging.getLogger(__name__)

_MAX_INCOMING_PDU = 16 * 1024 * 1024  # refuse absurd PDU lengths from a broken peer
_UNLIMITED_FRAGMENT = 1024 * 1024 - 6  # what we send when the peer says "no limit"
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


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


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class DimseResponse:
    """A C-STORE-RSP or C-ECHO-RSP."""

    status: int
    error_comment: str | None
    message_id: int
    offending: str | None = None


@dataclass(slots=True)
class _Negotiated:
    accepted: dict[tuple[str, str], AcceptedContext] = field(default_factory=dict)
    by_abstract: dict[str, list[AcceptedContext]] = field(default_factory=dict)
    rejected: list[ProposedContext] = field(default_factory=list)


class Association:
    """One association to a peer, used by one thread at a time.

    Raises :class:`AssociationError` (``retryable`` says whether trying later may help) when the
    association cannot be made or breaks; after such an error the object is closed.
    """

    def __init__(self, peer: Peer, settings: AssociationSettings, sock: socket.socket) -> None:
        self.peer = peer
        self.settings = settings
        self._sock = sock
        self._rbuf = bytearray()
        self._message_id = 0
        self._negotiated = _Negotiated()
        self.max_pdu_send = 0
        self.closed = False
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self.last_progress = self.opened_at  # any byte sent or received (watchdog health)
        # Plain TCP after negotiation: a blocking socket with kernel timeouts (SO_RCVTIMEO /
        # SO_SNDTIMEO), because a Python-level timeout makes every send and recv a poll()
        # first: two more system calls a file, each giving up the GIL.
        self._kernel_timeouts = False
        self._rcvtimeo: float | None = None

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
        sock = _connect(peer, settings)
        assoc = cls(peer, settings, sock)
        try:
            assoc._negotiate(contexts)
        except BaseException:
            assoc._close_socket()
            raise
        return assoc

    def _negotiate(self, contexts: Sequence[ProposedContext]) -> None:
        s = self.settings
        proposed = {2 * i + 1: ctx for i, ctx in enumerate(contexts)}
        rq = encode_associate_rq(
            self.peer.ae_title, s.calling_ae_title, proposed, s.max_pdu_receive
        )
        timeout = s.accept_timeout if s.accept_timeout is not None else s.connect_timeout
        self._sock.settimeout(timeout)
        self._send(rq, what="A-ASSOCIATE-RQ")
        pdu_type, body = self._read_pdu(timeout, waiting_for="A-ASSOCIATE-AC")
        if pdu_type == PDU_ASSOCIATE_RJ:
            result, source, reason = body[1], body[2], body[3]
            self._close_socket()
            verdict = REJECT_RESULT.get(result, f"result {result}")
            raise AssociationError(
                f"{self.peer} rejected the association "
                f"({verdict}: {reject_reason(source, reason)})",
                retryable=result != 1,
            )
        if pdu_type == PDU_ABORT:
            self._close_socket()
            raise AssociationError(f"{self.peer} aborted during negotiation", retryable=True)
        if pdu_type != PDU_ASSOCIATE_AC:
            self.abort()
            raise AssociationError(
                f"{self.peer} answered the A-ASSOCIATE-RQ with PDU type 0x{pdu_type:02X}",
                retryable=True,
            )
        try:
            results, peer_max = decode_associate_ac(body)
        except ValueError as exc:
            self.abort()
            raise AssociationError(
                f"{self.peer} sent a malformed A-ASSOCIATE-AC: {exc}", retryable=True
            ) from None
        self.max_pdu_send = peer_max
        if s.max_pdu_send:
            self.max_pdu_send = min(peer_max or s.max_pdu_send, s.max_pdu_send)
        neg = _Negotiated()
        accepted_ids = set()
        for cid, (result, ts) in results.items():
            proposal = proposed.get(cid)
            if proposal is None or result != 0 or not ts:
                continue
            acc = AcceptedContext(cid, proposal.abstract_syntax, ts)
            accepted_ids.add(cid)
            neg.accepted.setdefault((proposal.abstract_syntax, ts), acc)
            neg.by_abstract.setdefault(proposal.abstract_syntax, []).append(acc)
        neg.rejected = [c for cid, c in proposed.items() if cid not in accepted_ids]
        self._negotiated = neg
        if s.tls is None:
            self._use_kernel_timeouts(s.response_timeout)
        else:
            self._sock.settimeout(s.response_timeout)
        logger.debug(
            "associated with %s: %d of %d contexts accepted, peer max PDU %d",
            self.peer,
            len(accepted_ids),
            len(proposed),
            peer_max,
        )

    # -- negotiated contexts ------------------------------------------------------------------

    def context_for(self, sop_class: str, transfer_syntax: str) -> AcceptedContext | None:
        """The accepted context for exactly this SOP class and transfer syntax, if any."""
        return self._negotiated.accepted.get((sop_class, transfer_syntax))

    def contexts_for(self, sop_class: str) -> list[AcceptedContext]:
        """Every accepted context for ``sop_class`` (in proposal order)."""
        return self._negotiated.by_abstract.get(sop_class, [])

    @property
    def accepted_contexts(self) -> list[AcceptedContext]:
        return [c for cs in self._negotiated.by_abstract.values() for c in cs]

    @property
    def rejected_contexts(self) -> list[ProposedContext]:
        return list(self._negotiated.rejected)

    # -- DIMSE --------------------------------------------------------------------------------

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def echo(self) -> DimseResponse:
        ctx = self.contexts_for(VERIFICATION_SOP_CLASS)
        if not ctx:
            raise AssociationError(f"{self.peer} did not accept Verification", retryable=False)
        msg_id = self._next_message_id()
        self._send_fragments(ctx[0].context_id, True, encode_echo_rq(msg_id))
        return self._read_response(msg_id, 0x8030)

    def store_file(self, path: str, meta: FileMeta, context: AcceptedContext) -> DimseResponse:
        """Send the data set of ``path`` (as it is on disk) and return the peer's response."""
        # os.open + one fstat + preadv: the builtin open() adds an fstat and a seek per file.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidFileError(path, f"cannot open: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size != meta.size:
                raise InvalidFileError(path, "the file changed since its header was read")
            msg_id = self._next_message_id()
            command = encode_store_rq(
                msg_id, meta.sop_class_uid, meta.sop_instance_uid, self.settings.priority
            )
            self._stream(
                context.context_id, command, fd, meta.dataset_offset, meta.dataset_length, path
            )
        finally:
            os.close(fd)
        return self._read_response(msg_id, 0x8001)

    def store_bytes(
        self, sop_class: str, sop_instance: str, dataset: bytes, context: AcceptedContext
    ) -> DimseResponse:
        """Send an already encoded data set (used after transcoding)."""
        msg_id = self._next_message_id()
        command = encode_store_rq(msg_id, sop_class, sop_instance, self.settings.priority)
        self._send_fragments(context.context_id, True, command)
        self._send_fragments(context.context_id, False, dataset)
        return self._read_response(msg_id, 0x8001)

    def _fragment_size(self) -> int:
        return (self.max_pdu_send - 6) if self.max_pdu_send else _UNLIMITED_FRAGMENT

    def _send_fragments(self, context_id: int, command: bool, data: bytes) -> None:
        frag = self._fragment_size()
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
        self._send(b"".join(parts), what="P-DATA")

    def _stream(
        self, context_id: int, command: bytes, fd: int, offset: int, length: int, path: str
    ) -> None:
        """Command PDU(s) and the data set's PDUs, batched into ~1 MB ``sendall`` calls."""
        frag = self._fragment_size()
        if len(command) > frag:
            self._send_fragments(context_id, True, command)
            prefix = b""
        else:
            prefix = (
                PDATA_HEADER.pack(PDU_P_DATA, len(command) + 6, len(command) + 2, context_id, 0x03)
                + command
            )
        fragments = max(1, -(-length // frag))
        per_batch = min(fragments, max(1, self.settings.batch_bytes // (frag + 12)))
        batch_len = len(prefix) + per_batch * (frag + 12)
        buf = bytearray(batch_len)
        view = memoryview(buf)
        preadv = os.preadv
        remaining = length
        pos = len(prefix)
        view[:pos] = prefix
        while True:
            n = min(frag, remaining)
            if pos + 12 + n > batch_len:
                self._send(view[:pos], what="P-DATA")
                crash_point("mid-store")
                pos = 0
            remaining -= n
            control = 0x02 if remaining == 0 else 0x00
            PDATA_HEADER.pack_into(buf, pos, PDU_P_DATA, n + 6, n + 2, context_id, control)
            got = 0
            while got < n:
                r = preadv(fd, [view[pos + 12 + got : pos + 12 + n]], offset)
                offset += r
                if not r:
                    # The file shrank under us: the message cannot be completed on this association.
                    self.abort()
                    raise InvalidFileError(path, "the file was truncated while being sent")
                got += r
            pos += 12 + n
            if remaining == 0:
                break
        self._send(view[:pos], what="P-DATA")

    def _read_response(self, message_id: int, command_field: int) -> DimseResponse:
        timeout = self.settings.response_timeout
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu(timeout, waiting_for="a DIMSE response")
            if pdu_type == PDU_P_DATA:
                pos, end = 0, len(body)
                done = False
                while pos + 6 <= end:
                    (item_len,) = struct.unpack_from(">I", body, pos)
                    control = body[pos + 5]
                    data = body[pos + 6 : pos + 4 + item_len]
                    pos += 4 + item_len
                    if control & 0x01:
                        command += data
                        if control & 0x02:
                            done = True
                if not done:
                    continue
                values = decode_command(bytes(command))
                command = bytearray()
                field_ = struct.unpack("<H", values.get(0x0100, b"\0\0")[:2])[0]
                responded = struct.unpack("<H", values.get(0x0120, b"\0\0")[:2])[0]
                if field_ != command_field or responded != message_id:
                    logger.warning(
                        "%s sent an unexpected DIMSE message (command 0x%04X for message %d)",
                        self.peer,
                        field_,
                        responded,
                    )
                    continue
                status = struct.unpack("<H", values.get(0x0900, b"\0\0")[:2])[0]
                self.last_used = time.monotonic()
                return DimseResponse(
                    status=status,
                    error_comment=command_text(values.get(0x0902)),
                    message_id=responded,
                    offending=values[0x0901].hex() if 0x0901 in values else None,
                )
            if pdu_type == PDU_ABORT:
                self._close_socket()
                raise AssociationError(f"{self.peer} aborted the association", retryable=True)
            if pdu_type == PDU_RELEASE_RQ:
                self._send(RELEASE_RP, what="A-RELEASE-RP")
                self._close_socket()
                raise AssociationError(
                    f"{self.peer} released the association before answering", retryable=True
                )
            self.abort()
            raise AssociationError(
                f"{self.peer} sent an unexpected PDU type 0x{pdu_type:02X}", retryable=True
            )

    # -- release / abort ----------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE; aborts if the peer does not answer within ``release_timeout``."""
        if self.closed:
            return
        try:
            self._send(RELEASE_RQ, what="A-RELEASE-RQ")
            deadline = time.monotonic() + self.settings.release_timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssociationError("no A-RELEASE-RP", retryable=True)
                pdu_type, _ = self._read_pdu(remaining, waiting_for="A-RELEASE-RP")
                if pdu_type in (PDU_RELEASE_RP, PDU_ABORT):
                    break
        except AssociationError:
            if not self.closed:
                self.abort()
            return
        self._close_socket()

    def abort(self) -> None:
        if self.closed:
            return
        try:
            self._sock.settimeout(1.0)
            self._sock.sendall(ABORT)
        except OSError:
            pass
        self._close_socket()

    def _close_socket(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    # -- socket I/O ---------------------------------------------------------------------------

    def _use_kernel_timeouts(self, timeout: float) -> None:
        sock = self._sock
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        self._kernel_timeouts = True
        self._rcvtimeo = timeout

    def _set_recv_timeout(self, timeout: float) -> None:
        if not self._kernel_timeouts:
            self._sock.settimeout(timeout)
        elif timeout != self._rcvtimeo:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            self._rcvtimeo = timeout

    def _send(self, data: bytes | bytearray | memoryview, *, what: str) -> None:
        self.last_progress = time.monotonic()
        try:
            self._sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            self.abort()
            raise AssociationError(
                f"{self.peer} stopped reading while we sent {what} "
                f"(no progress in {self.settings.response_timeout:g}s)",
                retryable=True,
            ) from None
        except (OSError, ValueError) as exc:
            self._close_socket()
            raise AssociationError(
                f"connection to {self.peer} lost while sending {what}: {_oserror(exc)}",
                retryable=True,
            ) from None

    def _fill(self, n: int, timeout: float, waiting_for: str) -> None:
        sock = self._sock
        self._set_recv_timeout(timeout)
        while len(self._rbuf) < n:
            try:
                chunk = sock.recv(max(65536, n - len(self._rbuf)))
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                self.abort()
                raise AssociationError(
                    f"{self.peer} did not send {waiting_for} within {timeout:g}s", retryable=True
                ) from None
            except (OSError, ValueError) as exc:
                self._close_socket()
                raise AssociationError(
                    f"connection to {self.peer} lost waiting for {waiting_for}: {_oserror(exc)}",
                    retryable=True,
                ) from None
            if not chunk:
                self._close_socket()
                raise AssociationError(
                    f"{self.peer} closed the connection (waiting for {waiting_for})",
                    retryable=True,
                )
            self._rbuf += chunk
            self.last_progress = time.monotonic()
            if _TCP_QUICKACK is not None:
                # Linux turns quick ACKs off again after a while; re-arm after every read so the
                # peer's Nagle-delayed second segment is released at once.
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                except OSError:
                    pass

    def _read_pdu(self, timeout: float, waiting_for: str) -> tuple[int, bytes]:
        self._fill(6, timeout, waiting_for)
        pdu_type, length = PDU_HEADER.unpack_from(self._rbuf, 0)
        if length > _MAX_INCOMING_PDU or pdu_type not in range(1, 8):
            self.abort()
            raise AssociationError(
                f"{self.peer} sent a malformed PDU (type 0x{pdu_type:02X}, length {length})",
                retryable=True,
            )
        self._fill(6 + length, timeout, waiting_for)
        body = bytes(self._rbuf[6 : 6 + length])
        del self._rbuf[: 6 + length]
        return pdu_type, body


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO (0 would mean "never time out"; a
    configured ``.inf`` or 1e300 becomes 68 years rather than an overflow)."""
    usec = max(1000, round(min(seconds, 2**31 - 1) * 1_000_000))
    return struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)


def _oserror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _connect(peer: Peer, settings: AssociationSettings) -> socket.socket:
    source = (settings.bind_host, 0) if settings.bind_host else None
    try:
        sock = socket.create_connection(
            (peer.host, peer.port), timeout=settings.connect_timeout, source_address=source
        )
    except TimeoutError:
        raise AssociationError(
            f"cannot connect to {peer}: no answer within {settings.connect_timeout:g}s",
            retryable=True,
        ) from None
    except OSError as exc:
        raise AssociationError(
            f"cannot connect to {peer}: {_oserror(exc)}", retryable=True
        ) from None
    handshaking = False
    try:
        if settings.tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings.so_sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.so_sndbuf)
        if settings.so_rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.so_rcvbuf)
        if settings.tls is not None:
            name = settings.tls_server_name or peer.host
            handshaking = True
            sock = settings.tls.wrap_socket(sock, server_hostname=name)
    except OSError as exc:  # ssl.SSLError is an OSError
        sock.close()
        if handshaking:
            from forwarder.tls import describe_tls_error

            raise AssociationError(
                f"TLS handshake with {peer} failed: {describe_tls_error(exc)}", retryable=True
            ) from None
        raise AssociationError(
            f"cannot connect to {peer}: {_oserror(exc)}", retryable=True
        ) from None
    return sock
