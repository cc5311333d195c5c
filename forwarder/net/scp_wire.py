"""One accepted connection's socket: large reads into one reused buffer, bounded waits.

The Storage SCP reads with ``recv_into`` into a fixed buffer (no per-PDU allocation) and hands
out either small copies (PDU headers, command sets, the A-ASSOCIATE-RQ) or views of what is
buffered, so a data set fragment goes from this buffer to its file without being assembled.
Waits are bounded by kernel socket timeouts (``SO_RCVTIMEO``/``SO_SNDTIMEO``: no ``poll`` per
read, as in :mod:`forwarder.net.association`), or Python's socket timeout for TLS sockets. A
timeout raises :class:`WireTimeout`, a closed or broken connection :class:`WireClosed`.

Not here: what the bytes mean (:mod:`forwarder.net.scp_association`).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class WireClosed(Exception):
    """The peer closed the connection, or it broke."""


class WireTimeout(Exception):
    """Nothing arrived (or nothing could be sent) within the timeout."""


def _timeval(seconds: float) -> bytes:
    usec = max(1000, round(min(seconds, 2**31 - 1) * 1_000_000))
    return struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)


class Wire:
    """Buffered, timed reads and whole writes on one connected socket."""

    def __init__(self, sock: socket.socket, buffer_size: int = 512 * 1024) -> None:
        self.sock = sock
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._kernel = not isinstance(sock, ssl.SSLSocket)
        self._timeout = -1.0  # the wait for each read or write
        self._applied = -1.0  # what the socket is set to now
        #: A monotonic time by which everything still to be read must have arrived (None: only
        #: the per-read timeout). For the first PDU, so that a peer dripping a byte now and
        #: then cannot hold a connection (and its slot) before any check ran.
        self.deadline: float | None = None

    def set_timeout(self, seconds: float) -> None:
        self._timeout = seconds
        self._apply(seconds)

    def _apply(self, seconds: float) -> None:
        if seconds == self._applied:
            return
        self._applied = seconds
        if self._kernel:
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
        else:
            self.sock.settimeout(seconds)

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def _recv(self) -> None:
        """Read what the socket has (at least one byte) after the buffered bytes."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._compact()
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise WireTimeout
            self._apply(min(self._timeout, left))
        elif self._applied != self._timeout:
            self._apply(self._timeout)
        try:
            got = self.sock.recv_into(self._view[self._end :])
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            raise WireTimeout from None
        except (OSError, ValueError) as exc:
            raise WireClosed(str(exc)) from None
        if not got:
            raise WireClosed("the peer closed the connection")
        self._end += got
        if _TCP_QUICKACK is not None and self._kernel:
            # Linux turns quick ACKs off again after a while: re-arm them, so that a peer with
            # Nagle's algorithm on never waits for our delayed ACK to send its next segment.
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass

    def _compact(self) -> None:
        n = self._end - self._start
        self._buf[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes, as a copy."""
        if n <= len(self._buf):
            if self._start + n > len(self._buf):
                self._compact()
            while self._end - self._start < n:
                self._recv()
            out = bytes(self._view[self._start : self._start + n])
            self._start += n
            return out
        parts = bytearray()
        self.stream(n, parts.extend)
        return bytes(parts)

    def stream(self, n: int, consume: Callable[[memoryview], object]) -> None:
        """Hand the next ``n`` bytes to ``consume`` in views of what is buffered (valid only
        during the call), reading more as needed."""
        while n > 0:
            if self._start == self._end:
                self._recv()
            take = min(n, self._end - self._start)
            consume(self._view[self._start : self._start + take])
            self._start += take
            n -= take

    def skip(self, n: int) -> None:
        self.stream(n, lambda _view: None)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):
            raise WireTimeout from None
        except (OSError, ValueError) as exc:
            raise WireClosed(str(exc)) from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
