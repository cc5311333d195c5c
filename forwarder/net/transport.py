"""The SCU's socket: connect, send bytes, read whole PDUs, time out, close or abort.

:func:`connect` opens the TCP (optionally TLS) connection to a peer with the socket options of
:class:`~forwarder.net.association.AssociationSettings` (a connect under way ends at once when
their ``stop`` is set, :mod:`forwarder.net.interrupt`); a :class:`Transport` then carries PDUs
over it for one :class:`~forwarder.net.association.Association`:

* ``TCP_NODELAY`` is on unless configured off, and ``TCP_QUICKACK`` is re-armed after every read,
  so a peer with Nagle's algorithm on (Debian's DCMTK and Orthanc) never stalls on our delayed
  ACKs;
* on plain TCP after negotiation the socket is blocking with kernel timeouts (``SO_RCVTIMEO`` /
  ``SO_SNDTIMEO``): a Python-level timeout makes every send and recv a ``poll()`` first, two more
  system calls a file, each giving up the GIL;
* :meth:`Transport.read_pdu` returns one PDU of a known type and bounded length (fixed-size
  release and abort PDUs checked by :func:`forwarder.net.pdu.check_fixed_pdu`);
* every socket failure becomes an :class:`~forwarder.errors.AssociationError` that says what was
  being sent or awaited (retryable), and leaves the transport closed (a stalled peer is aborted).

What the PDUs mean (negotiation, release, DIMSE) is not decided here: see
:mod:`forwarder.net.acse` and :mod:`forwarder.net.association`.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

from forwarder.errors import AssociationError, ConnectInterrupted, ProtocolError
from forwarder.net.interrupt import STOPPING, open_connection
from forwarder.net.pdu import (
    ABORT,
    PDU_HEADER,
    PDU_NAMES,
    PDU_P_DATA,
    PDU_RELEASE_RQ,
    check_fixed_pdu,
)

if TYPE_CHECKING:  # association.py imports this module; the types only are needed here
    from forwarder.net.association import AssociationSettings, Peer

_MAX_INCOMING_PDU = 16 * 1024 * 1024  # refuse absurd PDU lengths from a broken peer
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def connect(peer: Peer, settings: AssociationSettings) -> socket.socket:
    """A connected socket to ``peer`` (TLS-wrapped when ``settings.tls`` is set).

    Raises :class:`~forwarder.errors.ConnectInterrupted` at once when ``settings.stop`` is set
    while the TCP connect or the TLS handshake waits (:mod:`forwarder.net.interrupt`): a peer
    that drops SYNs does not hold a stopping daemon for ``connect_timeout``."""
    source = (settings.bind_host, 0) if settings.bind_host else None
    try:
        sock = open_connection(
            (peer.host, peer.port), settings.connect_timeout, source=source, stop=settings.stop
        )
    except ConnectInterrupted:
        raise ConnectInterrupted(f"cannot connect to {peer}: {STOPPING}") from None
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
            sock = settings.tls.wrap_socket(
                sock, server_hostname=name, do_handshake_on_connect=False
            )
            if settings.stop is None:
                sock.do_handshake()
            else:
                with settings.stop.watching(sock):
                    sock.do_handshake()
    except ConnectInterrupted:
        sock.close()
        raise ConnectInterrupted(f"TLS handshake with {peer}: {STOPPING}") from None
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


class Transport:
    """PDUs over one connected socket to ``peer``, used by one thread at a time.

    Every method that fails closes the transport (``closed``) before it raises.
    """

    def __init__(self, sock: socket.socket, peer: Peer, settings: AssociationSettings) -> None:
        self.sock = sock
        self.peer = peer
        self.settings = settings
        self.closed = False
        # The peer ended the connection (closed, reset, or a TLS EOF), as opposed to a timeout.
        self.peer_closed = False
        self.last_progress = time.monotonic()  # any byte sent or received (watchdog health)
        self._rbuf = bytearray()
        self._kernel_timeouts = False
        self._rcvtimeo: float | None = None

    # -- timeouts -----------------------------------------------------------------------------

    def use_kernel_timeouts(self, timeout: float) -> None:
        """Blocking socket, ``timeout`` enforced by the kernel (plain TCP only)."""
        sock = self.sock
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        self._kernel_timeouts = True
        self._rcvtimeo = timeout

    def _set_recv_timeout(self, timeout: float) -> None:
        if not self._kernel_timeouts:
            self.sock.settimeout(timeout)
        elif timeout != self._rcvtimeo:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            self._rcvtimeo = timeout

    # -- sending and receiving ----------------------------------------------------------------

    def send(
        self, data: bytes | bytearray | memoryview, *, what: str, urgent: bool = False
    ) -> None:
        """Write all of ``data``, paced by the destination's rate cap if it has one (``urgent``:
        an urgent file's bytes, which may bypass a closed window's tighter rate)."""
        self.last_progress = time.monotonic()
        pacer = self.settings.pacer
        try:
            if pacer is None or not pacer.limited(urgent=urgent):
                self.sock.sendall(data)
            else:
                # The destination's rate cap: slice by slice, each waiting for its tokens.
                view = memoryview(data).cast("B")
                step = pacer.slice_size(urgent=urgent)
                for start in range(0, len(view), step):
                    piece = view[start : start + step]
                    pacer.take(len(piece), urgent=urgent)
                    self.sock.sendall(piece)
                    self.last_progress = time.monotonic()
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            self.abort()
            raise AssociationError(
                f"{self.peer} stopped reading while we sent {what} "
                f"(no progress in {self.settings.response_timeout:g}s)",
                retryable=True,
            ) from None
        except (OSError, ValueError) as exc:
            self.close()
            self.peer_closed = True
            raise AssociationError(
                f"connection to {self.peer} lost while sending {what}: {_oserror(exc)}",
                retryable=True,
            ) from None

    def _fill(self, n: int, timeout: float, waiting_for: str) -> None:
        sock = self.sock
        self._set_recv_timeout(timeout)
        while len(self._rbuf) < n:
            try:
                chunk = sock.recv(max(65536, n - len(self._rbuf)))
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                self.abort()
                raise AssociationError(
                    no_answer(self.peer, waiting_for, timeout), retryable=True
                ) from None
            except (OSError, ValueError) as exc:
                self.close()
                self.peer_closed = True
                raise AssociationError(
                    connection_lost(self.peer, waiting_for, exc), retryable=True
                ) from None
            if not chunk:
                self.close()
                self.peer_closed = True
                raise AssociationError(connection_closed(self.peer, waiting_for), retryable=True)
            self._rbuf += chunk
            self.last_progress = time.monotonic()
            if _TCP_QUICKACK is not None:
                # Linux turns quick ACKs off again after a while; re-arm after every read so the
                # peer's Nagle-delayed second segment is released at once.
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                except OSError:
                    pass

    def read_pdu(self, timeout: float, waiting_for: str) -> tuple[int, bytes]:
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

    def poll_idle(self) -> bool | None:
        """None: nothing to read; True: bytes are waiting (now or already buffered); False: EOF
        or a socket error. Does not block."""
        if self._rbuf:
            return True
        sock = self.sock
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

    # -- ending -------------------------------------------------------------------------------

    def abort(self) -> None:
        """Send an A-ABORT (best effort, 1 s at most) and close."""
        if self.closed:
            return
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(ABORT)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def pdu_name(pdu_type: int) -> str:
    """The PDU's name for messages ("A-ASSOCIATE-AC", or its type number when unknown)."""
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}")


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO (0 would mean "never time out"; a
    configured ``.inf`` or 1e300 becomes 68 years rather than an overflow)."""
    usec = max(1000, round(min(seconds, 2**31 - 1) * 1_000_000))
    return struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)


def connection_lost(peer: object, waiting_for: str, exc: BaseException) -> str:
    """How a connection that failed under us (a reset) is said, here and for the pynetdicom
    SCUs (:mod:`forwarder.net.endings`): "connection to PACS@host:104 lost waiting for
    A-ASSOCIATE-AC: connection reset by peer"."""
    return f"connection to {peer} lost waiting for {waiting_for}: {_oserror(exc)}"


def no_answer(peer: object, waiting_for: str, timeout: float) -> str:
    """How a peer that kept the connection but did not answer in time is said (see
    :func:`connection_lost`): "PACS@host:104 did not send the C-STORE-RSP within 60s"."""
    return f"{peer} did not send {waiting_for} within {timeout:g}s"


def connection_closed(peer: object, waiting_for: str) -> str:
    """How a connection the peer closed under us is said (see :func:`connection_lost`)."""
    return f"{peer} closed the connection (waiting for {waiting_for})"


def _oserror(exc: BaseException) -> str:
    ssl = sys.modules.get("ssl")  # loaded when TLS is in use
    if ssl is not None and isinstance(exc, ssl.SSLError):
        from forwarder.net.tls import describe_tls_alert

        return describe_tls_alert(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
