"""TCP connects that a stop interrupts: a SIGTERM never waits on a peer whose firewall drops SYNs.

A connect to a host that drops SYNs blocks until ``connect_timeout`` (10 s by default, 30-60 s
when so configured). Closing the socket from another thread does not wake the connecting thread
reliably; shutting it down does, on Linux: ``shutdown()`` of a socket in SYN_SENT disconnects it
(``inet_shutdown``), and the blocked ``connect()`` (blocking or with a timeout) returns
ECONNRESET at once. ``tests/test_connect_stop.py`` checks this on the machine it runs on.

* :class:`StopEvent` is the :class:`threading.Event` a sending thread stops by; it also holds
  the sockets being set up under it (:meth:`~StopEvent.watching`: the TCP connect, and for the
  C-STORE sender the TLS handshake and the wait for the A-ASSOCIATE-AC), and its
  :meth:`~StopEvent.set` shuts them down (shutdown() also wakes a thread blocked reading).
* :func:`open_connection` is :func:`socket.create_connection` (every address of the host in
  turn, ``timeout`` for each, optional source address) whose connects are registered with a
  :class:`StopEvent`: once it is set, it raises
  :class:`~forwarder.errors.ConnectInterrupted` instead of waiting.

The name lookup before the connect cannot be interrupted (``getaddrinfo`` blocks in the C
library, up to the resolver's timeouts: 5 s an attempt and a server by default). Under a stop
event it runs on a thread of its own (``forwarder-resolve``) that the caller waits for with the
stop: once set, the caller goes (:class:`~forwarder.errors.ConnectInterrupted`) and the lookup
thread ends when the resolver gives up (a daemon thread: it never holds the process). A host
given as an IP address is not looked up. The C-STORE
sender (:mod:`forwarder.net.transport`) and the STOW-RS client (:mod:`forwarder.dicomweb.http`)
connect through :func:`open_connection`; the pynetdicom associations of the storage commitment
and query SCUs are stopped by :mod:`forwarder.net.cancel`, which shuts their socket down the
same way.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from forwarder.errors import ConnectInterrupted

STOPPING = "interrupted: forwarder is stopping"


class StopEvent(threading.Event):
    """A stop event whose :meth:`set` also interrupts the connects made under it."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._connecting: set[socket.socket] = set()
        self._waiting: set[threading.Event] = set()

    def set(self) -> None:
        # Under the guard: a socket leaves the set (and may then be closed) only after its
        # shutdown, so the descriptor shut down is never one closed and reused meanwhile.
        with self._guard:
            super().set()
            for sock in self._connecting:
                shut_down(sock)
            for event in self._waiting:
                event.set()

    def wait_for(self, done: threading.Event) -> None:
        """Wait until ``done`` is set or this stop is; :class:`ConnectInterrupted` for the
        stop (before or during the wait)."""
        with self._guard:
            if self.is_set():
                raise ConnectInterrupted(STOPPING)
            self._waiting.add(done)
        try:
            done.wait()
        finally:
            with self._guard:
                self._waiting.discard(done)
        if self.is_set():
            raise ConnectInterrupted(STOPPING)

    @contextmanager
    def watching(self, sock: socket.socket) -> Iterator[None]:
        """While the block runs, :meth:`set` shuts ``sock`` down: a connect, a TLS handshake or
        a wait for the peer's first answer on it ends at once. :class:`ConnectInterrupted` when
        the event is set before the block, during it (instead of whatever the block raised for
        the broken socket), or as it ends (the stop wins). The caller closes ``sock`` on any
        exception. Only for setting a connection up: a transfer under way is never cut."""
        with self._guard:
            if self.is_set():
                raise ConnectInterrupted(STOPPING)
            self._connecting.add(sock)
        try:
            yield
        except Exception:
            if self.is_set():
                raise ConnectInterrupted(STOPPING) from None
            raise
        finally:
            with self._guard:
                self._connecting.discard(sock)
        if self.is_set():  # done as the stop came: it may have been shut down already
            raise ConnectInterrupted(STOPPING)


def shut_down(sock: socket.socket) -> None:
    """Wake a thread blocked in ``sock.connect()`` (best effort: a socket already closed or
    not connecting yet is left as it is)."""
    try:
        # socket.socket's own shutdown, also for a TLS socket: ssl.SSLSocket.shutdown would
        # drop the TLS state under the thread still handshaking on it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def open_connection(
    address: tuple[str, int],
    timeout: float | None,
    *,
    source: tuple[str, int] | None = None,
    stop: StopEvent | None = None,
    options: Sequence[tuple[int, int, int | bytes]] = (),
) -> socket.socket:
    """A socket connected to ``address`` (host, port), trying each address the host resolves
    to, ``timeout`` seconds each, like :func:`socket.create_connection`; ``options`` are set
    before the connect. Raises TimeoutError or OSError as that does (the last address's
    error), and :class:`ConnectInterrupted` once ``stop`` is set."""
    host, port = address
    last: OSError | None = None
    infos = resolve(host, port, stop)
    for family, kind, proto, _name, sockaddr in infos:
        if stop is not None and stop.is_set():
            raise ConnectInterrupted(STOPPING)
        sock = socket.socket(family, kind, proto)
        try:
            for level, name, value in options:
                sock.setsockopt(level, name, value)
            sock.settimeout(timeout)
            if source is not None:
                sock.bind(source)
            if stop is None:
                sock.connect(sockaddr)
            else:
                with stop.watching(sock):
                    sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if last is not None:
        raise last
    raise OSError(f"{host} resolves to no address")


#: One of getaddrinfo's answers: (family, type, proto, canonname, sockaddr).
AddressInfo = tuple[Any, ...]


def resolve(host: str, port: int, stop: StopEvent | None) -> list[AddressInfo]:
    """``socket.getaddrinfo(host, port, 0, SOCK_STREAM)``, given up (not the lookup itself: it
    cannot be) once ``stop`` is set: the lookup runs on a thread of its own, which ends when
    the resolver answers or times out."""
    if stop is None or _is_address(host):
        return list(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
    done = threading.Event()
    outcome: list[list[AddressInfo] | BaseException] = []

    def look_up() -> None:
        try:
            outcome.append(list(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)))
        except BaseException as exc:  # handed to the caller, if it still waits
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name="forwarder-resolve", daemon=True).start()
    stop.wait_for(done)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) aside
    except ValueError:
        return False
    return True
