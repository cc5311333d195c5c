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
* ``TCP_NODELAY`` is always on, and ``TCP_QUICKACK`` is re-armed after every read, so a peer with
  Nagle's algorithm on (Debian's DCMTK and Orthanc) never stalls on our delayed ACKs;
* every PDU and response is checked against PS3.7/PS3.8 by :mod:`forwarder.net.pdu`'s strict
  decoders (a few comparisons a response, no pydicom): Message ID Being Responded To, Affected
  SOP Class/Instance UID, a 2-byte non-Pending Status... A violation aborts the association and
  raises :class:`~forwarder.errors.ProtocolError` (the file is retried); a stalled peer hits the
  socket timeout and is aborted. A missing or wrong Command Group Length, elements out of order
  or repeated with the same value change nothing and are tolerated, as by pynetdicom and DCMTK
  (a warning once per association); an empty Affected SOP Class/Instance UID counts as absent;
* the peer's maximum PDU is clamped (``pdu.send_pdu_limit``), fragments are even and an odd data
  set is padded with one 0x00;
* release collisions are answered (PS3.8 Sta9/Sta11), and an idle association is checked before
  reuse (:meth:`Association.peer_gone`).

There is no reactor thread, hence no race over who reads the C-STORE-RSP.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forwarder.crashpoints import crash_point
from forwarder.dicom.part10 import FileMeta, read_error
from forwarder.errors import (
    AssociationError,
    InvalidFileError,
    ProtocolError,
    UnreadableFileError,
)
from forwarder.net.pdu import (
    ABORT,
    C_ECHO_RSP,
    C_STORE_RSP,
    MAX_CONTEXTS,
    PDATA_HEADER,
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_HEADER,
    PDU_NAMES,
    PDU_P_DATA,
    PDU_RELEASE_RP,
    PDU_RELEASE_RQ,
    PRIORITY,
    REJECT_RESULT,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION_SOP_CLASS,
    ProposedContext,
    check_fixed_pdu,
    check_response,
    collect_command,
    command_text,
    decode_associate_ac,
    decode_associate_rj,
    decode_command,
    encode_associate_rq,
    encode_echo_rq,
    encode_store_rq,
    offending_text,
    reject_reason,
    send_pdu_limit,
)

if TYPE_CHECKING:
    import ssl

logger = logging.getLogger(__name__)

_MAX_INCOMING_PDU = 16 * 1024 * 1024  # refuse absurd PDU lengths from a broken peer
_VERIFICATION = VERIFICATION_SOP_CLASS.encode("ascii")
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
        self.max_pdu_send = 0  # the largest P-DATA-TF we send (pdu.send_pdu_limit)
        self._frag = 0  # data bytes per PDV: max_pdu_send - 6, even
        self._context_ids: frozenset[int] = frozenset()  # accepted presentation context IDs
        self.closed = False
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self.last_progress = self.opened_at  # any byte sent or received (watchdog health)
        # Plain TCP after negotiation: a blocking socket with kernel timeouts (SO_RCVTIMEO /
        # SO_SNDTIMEO), because a Python-level timeout makes every send and recv a poll()
        # first: two more system calls a file, each giving up the GIL.
        self._kernel_timeouts = False
        self._rcvtimeo: float | None = None
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
            try:
                result, source, reason = decode_associate_rj(body)
            except ProtocolError as exc:
                self.abort()
                raise ProtocolError(f"{self.peer} sent a malformed A-ASSOCIATE-RJ: {exc}") from None
            self._close_socket()
            verdict = REJECT_RESULT[result]
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
            raise ProtocolError(
                f"{self.peer} answered the A-ASSOCIATE-RQ with {_pdu_name(pdu_type)}"
            )
        try:
            results, peer_max = decode_associate_ac(body, proposed)
        except ProtocolError as exc:
            self.abort()
            raise ProtocolError(f"{self.peer} sent a malformed A-ASSOCIATE-AC: {exc}") from None
        try:
            self.max_pdu_send = send_pdu_limit(peer_max, s.max_pdu_send)
        except ProtocolError as exc:
            self.abort()
            raise ProtocolError(f"{self.peer}: {exc}") from None
        self._frag = self.max_pdu_send - 6
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
        self._negotiated = neg
        self._context_ids = frozenset(accepted_ids)
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
        return self._read_response(msg_id, C_ECHO_RSP, _VERIFICATION, None)

    def store_file(self, path: str, meta: FileMeta, context: AcceptedContext) -> DimseResponse:
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
            command = encode_store_rq(
                msg_id, meta.sop_class_uid, meta.sop_instance_uid, self.settings.priority
            )
            self._stream(
                context.context_id, command, fd, meta.dataset_offset, meta.dataset_length, path
            )
        finally:
            os.close(fd)
        return self._read_response(
            msg_id, C_STORE_RSP, meta.sop_class_uid.encode(), meta.sop_instance_uid.encode()
        )

    def store_bytes(
        self, sop_class: str, sop_instance: str, dataset: bytes, context: AcceptedContext
    ) -> DimseResponse:
        """Send an already encoded data set (used after transcoding); padded to even length."""
        msg_id = self._next_message_id()
        command = encode_store_rq(msg_id, sop_class, sop_instance, self.settings.priority)
        self._send_fragments(context.context_id, True, command)
        if len(dataset) % 2:
            dataset += b"\x00"
        self._send_fragments(context.context_id, False, dataset)
        return self._read_response(msg_id, C_STORE_RSP, sop_class.encode(), sop_instance.encode())

    def _send_fragments(self, context_id: int, command: bool, data: bytes) -> None:
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
        self._send(b"".join(parts), what="P-DATA")

    def _stream(
        self, context_id: int, command: bytes, fd: int, offset: int, length: int, path: str
    ) -> None:
        """Command PDU(s) and the data set's PDUs, batched into ~1 MB ``sendall`` calls; an odd
        ``length`` is sent with one 0x00 pad byte (fragments are even: pdu.send_pdu_limit)."""
        frag = self._frag
        if len(command) > frag:
            self._send_fragments(context_id, True, command)
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
        preadv = os.preadv
        remaining = padded
        in_file = length
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
            want = min(n, in_file)
            got = 0
            while got < want:
                try:
                    r = preadv(fd, [view[pos + 12 + got : pos + 12 + want]], offset)
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
        self._send(view[:pos], what="P-DATA")

    def _read_response(
        self, message_id: int, command_field: int, sop_class: bytes, sop_instance: bytes | None
    ) -> DimseResponse:
        """Wait for the response to our one outstanding request and check it (pdu.py's
        :func:`collect_command`, :func:`decode_command`, :func:`check_response`): a few
        comparisons, no pydicom. Anything but that response aborts the association."""
        timeout = self.settings.response_timeout
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu(timeout, waiting_for="a DIMSE response")
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
                self._close_socket()
                raise AssociationError(f"{self.peer} aborted the association", retryable=True)
            if pdu_type == PDU_RELEASE_RQ:
                # PS3.8 Sta6 + A-RELEASE-RQ: answer it; the request is lost with the association.
                self._send(RELEASE_RP, what="A-RELEASE-RP")
                self._close_socket()
                raise AssociationError(
                    f"{self.peer} released the association before answering", retryable=True
                )
            self.abort()
            raise ProtocolError(
                f"{self.peer} sent {_pdu_name(pdu_type)} while we waited for a DIMSE response"
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
        """A-RELEASE (PS3.8 7.2); aborts if the peer does not answer within ``release_timeout``.

        While we wait for the A-RELEASE-RP (PS3.8 state Sta7), a P-DATA-TF is dropped (AR-6: no
        request is outstanding); an A-RELEASE-RQ from the peer is a release collision (AR-8): as
        the association requestor we answer it with an A-RELEASE-RP at once (AR-9, Sta11), then
        wait for theirs (AR-3), as pynetdicom's state machine and DCMTK do. An A-ABORT ends it;
        anything else gets an A-ABORT (AA-8).
        """
        if self.closed:
            return
        try:
            self._send(RELEASE_RQ, what="A-RELEASE-RQ")
            deadline = time.monotonic() + self.settings.release_timeout
            collided = False
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssociationError("no A-RELEASE-RP", retryable=True)
                pdu_type, _ = self._read_pdu(remaining, waiting_for="A-RELEASE-RP")
                if pdu_type in (PDU_RELEASE_RP, PDU_ABORT):
                    break
                if pdu_type == PDU_RELEASE_RQ and not collided:
                    logger.debug(
                        "%s: release collision, answering the peer's A-RELEASE-RQ", self.peer
                    )
                    collided = True
                    self._send(RELEASE_RP, what="A-RELEASE-RP")
                    continue
                if pdu_type == PDU_P_DATA and not collided:
                    continue
                raise ProtocolError(
                    f"{self.peer} sent {_pdu_name(pdu_type)} while we waited for A-RELEASE-RP"
                )
        except AssociationError as exc:
            logger.debug("%s: release failed (%s); aborting", self.peer, exc)
            if not self.closed:
                self.abort()
            return
        self._close_socket()

    def peer_gone(self) -> bool:
        """True when this association, idle between requests, can no longer be used: the peer
        closed the connection, the socket failed, or the peer sent something while we had no
        request outstanding. A non-blocking look (one ``recv`` with MSG_PEEK|MSG_DONTWAIT on
        plain TCP); call it only between requests.

        What arrived is answered as PS3.8 says: an A-RELEASE-RQ (Sta6, AR-2) gets its
        A-RELEASE-RP, since nothing is outstanding; an A-ABORT closes; anything else (an
        unsolicited P-DATA-TF, garbage) gets an A-ABORT. Either way the association is closed
        when this returns True, so the caller opens a new one for the next file instead of
        losing an attempt to a dead one.
        """
        if self.closed:
            return True
        if not self._rbuf:
            waiting = self._poll_idle()
            if waiting is None:
                return False
            if not waiting:
                logger.debug("%s: the peer closed the idle association", self.peer)
                self._close_socket()
                return True
        try:
            pdu_type, _ = self._read_pdu(1.0, waiting_for="the PDU it started while idle")
        except AssociationError as exc:
            logger.debug("%s: idle association broke: %s", self.peer, exc)
            return True  # closed or aborted by _read_pdu
        if pdu_type == PDU_RELEASE_RQ:
            logger.debug("%s: the peer released the idle association", self.peer)
            try:
                self._send(RELEASE_RP, what="A-RELEASE-RP")
            except AssociationError:
                pass
            self._close_socket()
        elif pdu_type == PDU_ABORT:
            logger.debug("%s: the peer aborted the idle association", self.peer)
            self._close_socket()
        else:
            logger.warning(
                "%s sent %s on an idle association; aborting it", self.peer, _pdu_name(pdu_type)
            )
            self.abort()
        return True

    def _poll_idle(self) -> bool | None:
        """None: nothing to read; True: bytes are waiting (now or in ``_rbuf``); False: EOF or a
        socket error."""
        sock = self._sock
        if self.settings.tls is None:
            try:
                return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                return None
            except OSError:
                return False
        import ssl  # already loaded: TLS is in use

        try:
            buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            if not buffered and not select.select([sock], [], [], 0)[0]:
                return None
            sock.settimeout(0)
            try:
                chunk = sock.recv(65536)
            finally:
                sock.settimeout(self.settings.response_timeout)
        except ssl.SSLWantReadError:
            return None  # a TLS record with no application data (a session ticket)
        except (OSError, ValueError):
            return False
        if not chunk:
            return False
        self._rbuf += chunk
        return True

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
        """One PDU: a known type (PS3.8 9.3.1), a bounded length (a P-DATA-TF no longer than
        the maximum we announced), A-RELEASE and A-ABORT PDUs of exactly 4 bytes."""
        self._fill(6, timeout, waiting_for)
        pdu_type, length = PDU_HEADER.unpack_from(self._rbuf, 0)
        if length > _MAX_INCOMING_PDU or pdu_type not in PDU_NAMES:
            self.abort()
            raise ProtocolError(
                f"{self.peer} sent a malformed PDU (type 0x{pdu_type:02X}, length {length})"
            )
        limit = self.settings.max_pdu_receive
        if pdu_type == PDU_P_DATA and 0 < limit < length:
            self.abort()
            raise ProtocolError(
                f"{self.peer} sent a P-DATA-TF of {length} bytes; we accept at most {limit}"
            )
        self._fill(6 + length, timeout, waiting_for)
        body = bytes(self._rbuf[6 : 6 + length])
        del self._rbuf[: 6 + length]
        if pdu_type >= PDU_RELEASE_RQ:
            try:
                check_fixed_pdu(pdu_type, body)
            except ProtocolError as exc:
                self.abort()
                raise ProtocolError(f"{self.peer} sent a malformed PDU: {exc}") from None
        return pdu_type, body


def _pdu_name(pdu_type: int) -> str:
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}")


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
            from forwarder.net.tls import describe_tls_error

            raise AssociationError(
                f"TLS handshake with {peer} failed: {describe_tls_error(exc)}", retryable=True
            ) from None
        raise AssociationError(
            f"cannot connect to {peer}: {_oserror(exc)}", retryable=True
        ) from None
    return sock
