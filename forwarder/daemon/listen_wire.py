"""Calls between the daemon and its receiving process, over Unix socket pairs.

Each message is a length-prefixed pickle of a tuple ``(kind, call_id, *args)``. Both ends are
this package, started together (the socket pair is never reachable by anyone else), so pickle
carries the engine's dataclasses and a report's data set as they are. ``call_id`` 0 is a
notification (no answer); any other is answered by ``("reply", call_id, value)``.

:class:`Peer` is one end: :meth:`Peer.call` from any thread waits for its answer while
:meth:`Peer.serve`, on one thread, reads the other end's messages, answers requests with
``handle`` and hands answers to the threads waiting for them. :meth:`Peer.ask` is the call of
a thread that has a socket pair of its own (each association's, passed to the daemon with
:func:`pass_channel`): no reader thread between it and its answer.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forwarder

_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
_MAX_MESSAGE = 64 * 2**20  # a report's data set with many references is far below this


class PeerGone(Exception):
    """The other end closed the socket (it exited or was killed), or sent garbage."""


class PeerStuck(PeerGone):
    """The other end did not read: a message could not be sent within its deadline. The
    socket cannot be used again when part of it was sent."""


class _Waiter:
    __slots__ = ("done", "gone", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.gone = False


class Peer:
    """One end of the socket pair. ``handle(kind, args)`` answers the other end's requests,
    on the thread running :meth:`serve`."""

    def __init__(
        self,
        sock: socket.socket,
        handle: Callable[[str, tuple[Any, ...]], Any] = lambda _kind, _args: None,
    ) -> None:
        self.sock = sock
        self.handle = handle
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._gone = False
        self._broken = False  # a message was cut short by its deadline

    def send(self, kind: str, *args: Any, call_id: int = 0, timeout: float | None = None) -> None:
        """Send a message (a notification unless ``call_id``); raises :class:`PeerGone`, or
        :class:`PeerStuck` when it could not be sent within ``timeout`` seconds (the other
        end does not read)."""
        data = pickle.dumps((kind, call_id, *args), protocol=pickle.HIGHEST_PROTOCOL)
        message = _HEADER.pack(len(data)) + data
        if timeout is None:
            try:
                with self._send_lock:
                    if self._broken:
                        raise PeerGone(f"cannot send {kind}: a message was cut short")
                    self.sock.sendall(message)
            except OSError as exc:
                raise PeerGone(f"cannot send {kind}: {exc}") from None
            return
        deadline = time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=timeout):
            raise PeerStuck(f"cannot send {kind}: another message waited {timeout:.0f} s")
        try:
            self._send_by(kind, memoryview(message), deadline)
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed meanwhile
            raise PeerGone(f"cannot send {kind}: {exc}") from None
        finally:
            self._send_lock.release()

    def _send_by(self, kind: str, message: memoryview, deadline: float) -> None:
        """Send all of ``message`` by ``deadline`` (the send lock held)."""
        if self._broken:
            raise PeerGone(f"cannot send {kind}: a message was cut short")
        sent = 0
        poller: select.poll | None = None
        while sent < len(message):
            try:
                sent += self.sock.send(message[sent:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if poller is None:
                poller = select.poll()
                poller.register(self.sock, select.POLLOUT)
            if left <= 0 or not poller.poll(left * 1000):
                self._broken = sent > 0
                raise PeerStuck(f"cannot send {kind}: the other end has not read for a while")

    def call(self, kind: str, *args: Any, timeout: float | None = None) -> Any:
        """Ask the other end and wait for its answer; raises :class:`PeerGone` when it goes
        away (or ``timeout`` passes: to send the request, then to answer it) first."""
        waiter = _Waiter()
        with self._lock:
            if self._gone:
                raise PeerGone(f"cannot send {kind}: the other process is gone")
            call_id = next(self._ids)
            self._waiting[call_id] = waiter
        try:
            self.send(kind, *args, call_id=call_id, timeout=timeout)
            if not waiter.done.wait(timeout):
                raise PeerGone(f"no answer to {kind} within {timeout} s")
        finally:
            with self._lock:
                self._waiting.pop(call_id, None)
        if waiter.gone:
            raise PeerGone(f"the other process went away before answering {kind}")
        return waiter.value

    def ask(self, kind: str, *args: Any, timeout: float) -> Any:
        """A call on a socket this thread alone uses (an association's channel): the answer is
        read here, without a thread in between. Raises :class:`PeerGone`."""
        self.send(kind, *args, call_id=1)
        message = self._receive(timeout)
        if message is None:
            raise PeerGone(f"no answer to {kind} within {timeout} s")
        if message[0] != "reply" or len(message) != 3:
            raise PeerGone(f"{message[0]!r} in answer to {kind}")
        return message[2]

    def serve(
        self, *, idle: float | None = None, on_idle: Callable[[], None] | None = None
    ) -> None:
        """Read and dispatch messages until the other end closes; ``on_idle`` runs after each
        ``idle`` seconds without one. Returns once every waiting call has been woken."""
        try:
            while True:
                message = self._receive(idle)
                if message is None:
                    if on_idle is not None:
                        on_idle()
                    continue
                kind, call_id, *args = message
                if kind == "reply":
                    with self._lock:
                        waiter = self._waiting.get(call_id)
                    if waiter is not None:
                        waiter.value = args[0]
                        waiter.done.set()
                    continue
                result = self.handle(kind, tuple(args))
                if call_id:
                    self.send("reply", result, call_id=call_id)
        except PeerGone:
            pass
        finally:
            with self._lock:
                self._gone = True
                waiters = list(self._waiting.values())
            for waiter in waiters:
                waiter.gone = True
                waiter.done.set()

    def receive(self, timeout: float) -> tuple[Any, ...]:
        """The next message, before :meth:`serve` runs (the first one: what to do); raises
        :class:`PeerGone` when none comes within ``timeout`` seconds."""
        message = self._receive(timeout)
        if message is None:
            raise PeerGone(f"nothing within {timeout} s")
        return message

    def _receive(self, timeout: float | None) -> tuple[Any, ...] | None:
        """The next message; None when ``timeout`` passed first. Raises :class:`PeerGone`."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > _MAX_MESSAGE:
                    raise PeerGone(f"a message of {size} bytes")
                end = _HEADER.size + size
                if len(self._buffer) >= end:
                    data = bytes(self._buffer[_HEADER.size : end])
                    del self._buffer[:end]
                    try:
                        message = pickle.loads(data)
                    except Exception as exc:
                        raise PeerGone(f"an unreadable message: {exc}") from None
                    if not isinstance(message, tuple) or len(message) < 2:
                        raise PeerGone("a message that is not a call")
                    return message
            if timeout is not None:
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
                if not poller.poll(timeout * 1000):
                    return None
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as exc:
                raise PeerGone(str(exc)) from None
            if not chunk:
                raise PeerGone("closed")
            self._buffer += chunk


def pass_channel(carrier: socket.socket, lock: threading.Lock) -> Peer:
    """A new socket pair whose other end goes to the daemon through ``carrier`` (SCM_RIGHTS);
    the daemon serves it on a thread of its own (:func:`take_channels`)."""
    ours, theirs = socket.socketpair()
    try:
        with lock:
            socket.send_fds(carrier, [b"c"], [theirs.fileno()])
    except OSError as exc:
        ours.close()
        raise PeerGone(f"cannot pass a channel: {exc}") from None
    finally:
        theirs.close()
    return Peer(ours)


def take_channels(carrier: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """Receive the channels passed through ``carrier`` and ``serve`` each, until it closes."""
    while True:
        try:
            data, fds, _flags, _address = socket.recv_fds(carrier, 16, 8)
        except OSError:
            return
        for fd in fds:
            os.set_inheritable(fd, False)  # no MSG_CMSG_CLOEXEC in recv_fds
            serve(socket.socket(fileno=fd))
        if not data:
            return


def child_env() -> dict[str, str]:
    """The environment of a process the daemon starts with ``python -m forwarder...``: the
    package as this process imported it (whatever the working folder), and the daemon's PID for
    :func:`~forwarder.crashpoints.crash_point` (which then kills the daemon too)."""
    env = dict(os.environ)
    root = str(Path(forwarder.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if env.get("FORWARDER_CRASH_AT"):
        env["FORWARDER_CRASH_PARENT"] = str(os.getpid())
    return env


def die_with(parent: int) -> None:
    """SIGKILL this process when the daemon (``parent``) dies; exit now if it is already gone.
    Elsewhere than on Linux (no ``prctl``) it ends when its peer socket closes, which the
    daemon's death does too, a moment later."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)
