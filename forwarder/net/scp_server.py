"""The Storage SCP's listening socket: one thread per connection, bounded, stoppable.

An accept thread takes connections (``TCP_NODELAY`` on, as our answers are small writes that
the peer waits for), drops those whose source address the caller's filter refuses without a
word, and starts one thread per connection: the TLS handshake (bounded, on that thread, so a
silent client never blocks the accept loop), then :class:`~forwarder.net.scp_association.\
ScpAssociation`. At most ``max_associations`` connections hold a slot; one more is still read
(its A-ASSOCIATE-RQ, under the short first-PDU timeout) and answered A-ASSOCIATE-RJ transient,
local limit exceeded, on a thread of its own (a few at a time; beyond that it is closed). An
association the caller's checks reject gives its slot back as soon as it is answered.
:meth:`ScpServer.stop` stops accepting, aborts every association and joins every thread.

Not here: what an association does (:mod:`forwarder.net.scp_association`), who may associate
(the ``admit`` and ``allow_host`` callables of :mod:`forwarder.net.receiver`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from forwarder.net.commitment_scp import CommitmentResponder
from forwarder.net.scp_association import ScpAssociation
from forwarder.net.scp_codec import REJECT_LIMIT, AssociateRequest
from forwarder.net.scp_commitment import ReportSink
from forwarder.net.scp_object import ObjectSink, Origin
from forwarder.net.scp_policy import HANDSHAKE_TIMEOUT, Admit, ContextPolicy, EngineSettings
from forwarder.net.scp_wire import Wire
from forwarder.net.tls import describe_tls_error

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT = 10.0
_STOP_GRACE = 2.0  # seconds an association has to send its A-ABORT and end
#: accept() errors that mean the listening socket itself is unusable, for good.
_DEAD_LISTENER = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
_MAX_REJECTING = 8  # connections over the limit being answered A-ASSOCIATE-RJ at once


class _ConnectionThread(threading.Thread):
    """A connection's thread; ``sock`` is its socket (TLS-wrapped once the handshake began)."""

    def __init__(
        self, sock: socket.socket, target: Callable[[], None], name: str, over: bool
    ) -> None:
        super().__init__(target=target, name=name, daemon=True)
        self.sock = sock
        self.holds_slot = not over  # else one of the few "being rejected" places


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (an IP address) and listening; raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


class ScpServer:
    """Listens on ``(host, port)`` and serves each connection on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        settings: EngineSettings,
        policy: ContextPolicy,
        sink: ObjectSink,
        admit: Admit,
        allow_host: Callable[[str], bool],
        max_associations: int,
        tls: ssl.SSLContext | None = None,
        commitment: CommitmentResponder | None = None,
        reports: ReportSink | None = None,
    ) -> None:
        self._address = (host, port)
        self._commitment = commitment
        self._reports = reports
        self._settings, self._policy, self._sink = settings, policy, sink
        self._admit, self._allow_host = admit, allow_host
        self._max = max_associations
        self._tls = tls
        self._lock = threading.Lock()
        self._serving: set[_ConnectionThread] = set()
        self._associations: set[ScpAssociation] = set()
        self._slots = 0
        self._rejecting = 0
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        return int(self._listener.getsockname()[1])

    def start(self, listener: socket.socket | None = None) -> None:
        """Bind and listen (raises ``OSError``), then accept on a thread of its own.

        ``listener``: a socket already listening (made by a parent process, which keeps the
        port while this process is restarted) instead of binding one."""
        self._listener = listener or listening_socket(*self._address)
        self._thread = threading.Thread(target=self._accept_loop, name="receiver-accept")
        self._thread.daemon = True
        self._thread.start()

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._serving)

    def stop_accepting(self) -> None:
        """Close the listening socket (a new connection is refused) and join the accept
        thread; open associations go on. Idempotent."""
        listener, thread = self._listener, self._thread
        if listener is None or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        listener.close()

    def stop(self, drain: float = 0.0) -> None:
        """Stop accepting, give open associations ``drain`` seconds to end by themselves (the
        peer releases), abort those still open and join every thread we started."""
        if self._listener is None:
            return
        self.stop_accepting()
        if drain > 0:
            deadline = time.monotonic() + drain
            with self._lock:
                draining = set(self._serving)
            for worker in draining:
                worker.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            serving = set(self._serving)
            for assoc in self._associations:
                assoc.stopping.set()
        for worker in serving:
            # A plain connection: its reading side only, so that the association still sends
            # its A-ABORT. A TLS one cannot write once its reads were cut (OpenSSL's state is
            # broken then), so it is closed both ways: the peer sees the connection end. The
            # plain socket method: ``SSLSocket.shutdown`` would drop the TLS layer first.
            how = socket.SHUT_RDWR if isinstance(worker.sock, ssl.SSLSocket) else socket.SHUT_RD
            with contextlib.suppress(OSError):
                socket.socket.shutdown(worker.sock, how)
        deadline = time.monotonic() + _STOP_GRACE
        for worker in serving:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in serving:
            if worker.is_alive():
                # Blocked writing to a peer that stopped reading (SHUT_RD does not wake a
                # send): cut the connection both ways.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(worker.sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for worker in serving:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                logger.warning("association thread %s did not stop", worker.name)
        self._listener = None
        self._thread = None

    @property
    def healthy(self) -> bool:
        """Whether the accept thread runs (False before start and after stop)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _DEAD_LISTENER:
                    # The listening socket itself is gone: nothing will ever be accepted
                    # again. The thread ends, so that `healthy` says so (the daemon then stops
                    # feeding systemd's watchdog) instead of logging this ten times a second.
                    logger.error("the listening socket failed (%s): no longer accepting", exc)
                    return
                # Out of descriptors or memory: wait instead of spinning, then try again.
                logger.warning("cannot accept a connection: %s", exc.strerror or exc)
                self._stopping.wait(0.1)
                continue
            try:
                self._admit_connection(sock, address)
            except Exception:
                # A bug of ours, or no thread to be had (RuntimeError: can't start new thread):
                # this connection is dropped, the port stays open for the next.
                logger.exception("cannot serve a connection from %s; carrying on", address)
                with contextlib.suppress(OSError):
                    sock.close()
                self._stopping.wait(0.1)

    def _admit_connection(self, sock: socket.socket, address: Any) -> None:
        """Serve an accepted connection on a thread of its own (or close it)."""
        host, port = str(address[0]), int(address[1])
        if not self._allow_host(host):
            sock.close()
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            over = self._slots >= self._max
            if over and self._rejecting >= _MAX_REJECTING:
                sock.close()
                return
            if over:
                self._rejecting += 1
            else:
                self._slots += 1
            n = next(self._ids)
            worker = _ConnectionThread(
                sock,
                functools.partial(self._serve, sock, host, port, n, over),
                f"receiver-association-{n}",
                over,
            )
            self._serving.add(worker)
        try:
            worker.start()
        except BaseException:
            with self._lock:  # never started: its slot is given back
                self._serving.discard(worker)
                if over:
                    self._rejecting -= 1
                else:
                    self._slots -= 1
            raise

    def _serve(self, sock: socket.socket, host: str, port: int, n: int, over: bool) -> None:
        me = threading.current_thread()
        assert isinstance(me, _ConnectionThread)
        assoc: ScpAssociation | None = None
        try:
            if self._tls is not None:
                wrapped = self._handshake(sock, host)
                if wrapped is None:
                    return
                sock = wrapped
            origin = Origin("", "", host, port, f"{self._prefix}-{n}")
            admit = self._admit_or_free_slot if not over else self._refuse_over_limit
            assoc = ScpAssociation(
                Wire(sock),
                origin,
                self._settings,
                self._policy,
                self._sink,
                admit,
                self._commitment,
                self._reports,
            )
            with self._lock:
                if self._stopping.is_set():
                    return
                self._associations.add(assoc)
            assoc.run()
        except Exception:
            logger.exception("serving the connection from %s failed", host)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._serving.discard(me)
                if assoc is not None:
                    self._associations.discard(assoc)
                if me.holds_slot:
                    self._slots -= 1
                else:
                    self._rejecting -= 1

    def _admit_or_free_slot(
        self, request: AssociateRequest, origin: Origin
    ) -> tuple[tuple[int, int, int], str] | None:
        """The caller's verdict; a rejected association gives its slot back at once, as it
        lingers (up to the abort linger) for the requestor to close: a peer that keeps the
        connection open after an A-ASSOCIATE-RJ must not hold one of ``max_associations``."""
        verdict = self._admit(request, origin)
        if verdict is not None:
            me = threading.current_thread()
            assert isinstance(me, _ConnectionThread)
            with self._lock:
                if me.holds_slot:
                    me.holds_slot = False
                    self._slots -= 1
                    self._rejecting += 1
        return verdict

    def _refuse_over_limit(self, *_args: object) -> tuple[tuple[int, int, int], str]:
        return REJECT_LIMIT, f"too many associations (max {self._max})"

    def _handshake(self, sock: socket.socket, host: str) -> socket.socket | None:
        assert self._tls is not None
        wrapped: ssl.SSLSocket | None = None
        try:
            wrapped = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            me = threading.current_thread()
            assert isinstance(me, _ConnectionThread)
            with self._lock:
                me.sock = wrapped
            wrapped.settimeout(HANDSHAKE_TIMEOUT)
            wrapped.do_handshake()
        except (OSError, ValueError) as exc:
            if self._stopping.is_set():
                logger.debug("TLS handshake with %s cut short: stopping", host)
            else:
                logger.warning("TLS handshake with %s failed: %s", host, describe_tls_error(exc))
            with contextlib.suppress(OSError):
                sock.close()
            if wrapped is not None:  # wrap_socket detached sock: the wrapper holds the fd
                with contextlib.suppress(OSError):
                    wrapped.close()
            return None
        return wrapped
