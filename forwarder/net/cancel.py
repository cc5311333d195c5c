"""Stopping a pynetdicom association from another thread, so a SIGTERM never waits on a peer.

pynetdicom blocks its caller while it waits: ``AE.associate`` for up to the connect and ACSE
timeouts, ``send_n_action``/``send_c_find`` for the DIMSE timeout (a destination's
``response_timeout``, a minute by default), and ``Association.abort`` from another thread does
not wake a caller waiting for a DIMSE response (it waits on a queue that only DIMSE messages
fill). So, with a ``cancel`` event set (the daemon's stop):

- :func:`associate` runs ``AE.associate`` on a helper thread and returns as soon as ``cancel``
  is set (:class:`Cancelled`), aborting the association under negotiation, and shutting down
  the socket of one whose TCP connect still waits (a peer dropping SYNs);
- :func:`abort_on_cancel` watches ``cancel`` while its block runs: once set, it sends A-ABORT,
  wakes the thread waiting for a DIMSE response (it sees "no response" at once) and closes the
  connection. The caller's ``send_*`` then returns like a peer that did not answer;
- :func:`end_association` releases, or aborts once ``cancel`` is set.

Closing matters beyond the caller: pynetdicom's connection (DUL) thread is not a daemon thread,
so one left running holds the process's exit however promptly the daemon's own threads stop.

Only the storage commitment and query SCUs use pynetdicom as requestor (not a hot path); the
sender has its own association engine with its own stop.

pynetdicom logs a connection that fails as two ERROR lines and, for TLS, a traceback, on its
connection thread, every time (a storage commitment round every minute against a PACS whose
certificate changed); so too a peer's TLS alert refusing our certificate (TLS 1.3: after our
side of the handshake, at the first read), then "Association Aborted" on the requesting thread.
:func:`why_not_established` says it in one line for the caller's own message instead, and those
lines are not let through (:class:`_ConnectFailures`).
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from forwarder.errors import ForwarderError
from forwarder.net.interrupt import shut_down
from forwarder.net.pdu import REJECT_RESULT, reject_reason
from forwarder.net.tls import TLS_CLOSED, describe_tls_alert, describe_tls_error

logger = logging.getLogger(__name__)

_POLL = 0.1  # how often a wait looks at the cancel event
_WAKE_EVERY = 0.02  # how often the waiter is offered its "no response" again
_WAKE_FOR = 5.0  # and for how long at most
_CONNECT_FAILED = "Association request failed: unable to connect to remote"
_CONNECT_ERROR = "TCP Initialisation Error: "
_READ_FAILED = "Connection closed before the entire PDU was received"  # pynetdicom's DUL
_ABORTED = "Association Aborted"  # pynetdicom's ACSE, at ERROR: the request was aborted
_KEEP_FAILURES = 64  # connection threads whose failure no caller asked for, at most
_FAILURE_FRESH = 30.0  # seconds a kept failure may be told; older, it was nobody's


class _ConnectFailures(logging.Filter):
    """On pynetdicom's transport, DUL and ACSE loggers: what made an association we request
    fail before it was established (which pynetdicom logs on the association's connection
    thread) is kept by that thread's id, for :func:`why_not_established`, and its lines are not
    let through; nor is ACSE's "Association Aborted" that follows (every association we
    request is told by its caller, with :func:`why_not_established`)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._by_thread: OrderedDict[int | None, tuple[float, OSError | str, bool]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.acse":
            return not (record.levelno >= logging.ERROR and record.msg == _ABORTED)
        if record.name == "pynetdicom.dul":
            return self._dul(record)
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError):
            self._keep(record.thread, error, False)  # the TLS traceback: its exception is why
            return False
        message = record.getMessage()
        if message.startswith(_CONNECT_ERROR):
            # "[Errno 111] Connection refused": the words only
            words = re.sub(r"^\[Errno \d+\] ", "", message[len(_CONNECT_ERROR) :])
            self._keep(record.thread, words, False)
            return False
        return message != _CONNECT_FAILED

    def _dul(self, record: logging.LogRecord) -> bool:
        """The connection thread of an association we request, not yet established, could not
        read the peer's answer (a TLS alert refusing our certificate, a reset): kept, and its
        lines not let through. Any other association's lines pass."""
        assoc = getattr(threading.current_thread(), "assoc", None)  # pynetdicom's DUL thread
        if assoc is None or not assoc.is_requestor:
            return True
        if assoc.is_established or assoc.is_released or assoc.is_aborted or assoc.is_rejected:
            return True  # not negotiating
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError):
            self._keep(record.thread, error, True)
            return False
        return record.msg != _READ_FAILED

    def _keep(self, thread: int | None, failure: OSError | str, reading: bool) -> None:
        with self._lock:
            self._by_thread[thread] = (time.monotonic(), failure, reading)
            while len(self._by_thread) > _KEEP_FAILURES:
                self._by_thread.popitem(last=False)

    def take(self, thread: int | None) -> tuple[OSError | str, bool] | None:
        """What failed on ``thread``'s association, and whether it was reading the peer's
        answer (False: connecting, the TLS handshake included)."""
        with self._lock:
            kept = self._by_thread.pop(thread, None)
        # A failure no caller took (an association given up at a stop) is not another's,
        # when the thread id comes round again: the caller asks as soon as associate returns.
        if kept is None or time.monotonic() - kept[0] > _FAILURE_FRESH:
            return None
        return kept[1], kept[2]


_failures = _ConnectFailures()
for _name in ("pynetdicom.transport", "pynetdicom.dul", "pynetdicom.acse"):
    logging.getLogger(_name).addFilter(_failures)


def why_not_established(assoc: Any) -> str:
    """Why pynetdicom's association ``assoc`` was not established, in a few words: the TLS
    check that failed (worded as for C-STORE), the connection's error (``Connection
    refused``), the peer's rejection with its reason (as ``forwarder send`` words it),
    ``aborted`` or ``no answer``."""
    dul = getattr(assoc, "dul", None)
    kept = _failures.take(dul.ident if dul is not None else None)
    failure, reading = kept if kept is not None else (None, False)
    rejection = _rejection(assoc)
    if rejection is not None:
        result, source, reason = rejection
        verdict = REJECT_RESULT.get(result, f"result {result}")
        return f"rejected ({verdict}: {reject_reason(source, reason)})"
    if isinstance(failure, ssl.SSLError):
        # An alert read once the handshake is over is worded as the sender words it there.
        return describe_tls_alert(failure) if reading else describe_tls_error(failure)
    if isinstance(failure, OSError):
        words = failure.strerror or str(failure)
        return _tls_hint(words, dul) if reading else words
    if failure:
        return failure
    return _tls_hint("aborted", dul) if assoc.is_aborted else "no answer"


def _tls_hint(words: str, dul: Any) -> str:
    """``words`` for a connection that closed while we waited for the peer's answer, with
    why a TLS peer may have closed it (its alert refusing our certificate lost to the reset),
    as ``forwarder send`` says it."""
    if getattr(getattr(dul, "socket", None), "tls_args", None) is None:
        return words
    return f"{words} ({TLS_CLOSED})"


def _rejection(assoc: Any) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ that answered ``assoc``, if one did.

    pynetdicom (3.0.4) can report a rejected association as aborted: when the RJ arrives, and
    its connection thread closes the socket (AE-4), before the calling thread has looked at
    the connection, ``ACSE._negotiate_as_requestor`` finds it closed and aborts, the rejection
    left unread in the DUL's queue (one association in twenty on two busy cores). It is read
    from there."""
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    primitive: Any = assoc.acceptor.primitive if assoc.is_rejected else None
    if primitive is None:
        queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
        for item in list(getattr(queue, "queue", ())):
            if isinstance(item, A_ASSOCIATE) and item.result in (1, 2):
                primitive = item
                break
    if primitive is None:
        return None
    return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)


_ABORT_GRACE = 1.0  # after an A-ABORT, how long the peer has to close before we do
_RELEASE_BOUND = 5.0  # a release not ended by then is aborted (see end_association)


class Cancelled(ForwarderError):
    """Stopped on request (the daemon stops) before the peer answered."""


def abort_now(assoc: Any, waiter_done: threading.Event | None = None) -> None:
    """A-ABORT ``assoc`` and wake whoever waits in it for a DIMSE response; returns once that
    waiter is awake (``waiter_done`` set; at once without one). A helper thread then waits for
    the connection to close: at most the ACSE timeout."""
    try:
        # Non-blocking: marks the abort as sent, so the woken caller's own "no response" abort
        # returns at once instead of waiting for the connection to close too.
        assoc.abort(block=False)
    except Exception as exc:  # an association already gone: nothing left to stop
        logger.debug("aborting an association on stop: %s", exc)
        return
    # "No response" for the waiter. The abort restarted the association's reactor, which may
    # take this off the queue before the waiter does: offer it again until the waiter is out.
    until = time.monotonic() + _WAKE_FOR
    while True:
        assoc.dimse.msg_queue.put((None, None))
        if waiter_done is None or waiter_done.wait(_WAKE_EVERY) or time.monotonic() > until:
            break
    threading.Thread(target=_close, args=(assoc,), name="assoc-abort", daemon=True).start()


def _close(assoc: Any) -> None:
    """Give the A-ABORT a moment to go out and the peer to close, then close our end (so the
    state machine is idle at once, not after the ACSE timeout) and end the threads."""
    try:
        until = time.monotonic() + _ABORT_GRACE
        while assoc.dul.state_machine.current_state != "Sta1" and time.monotonic() < until:
            time.sleep(0.01)
        assoc.dul.socket._shutdown_socket()
        assoc.kill()
    except Exception as exc:
        logger.debug("closing an aborted association: %s", exc)


@contextmanager
def abort_on_cancel(assoc: Any, cancel: threading.Event | None) -> Iterator[None]:
    """While the block runs, ``cancel`` being set aborts ``assoc`` (see :func:`abort_now`)."""
    if cancel is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_POLL):
            if cancel.is_set():
                abort_now(assoc, done)
                return

    threading.Thread(target=watch, name="assoc-cancel", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def end_association(assoc: Any, cancel: threading.Event | None) -> None:
    """Release ``assoc``; abort it instead when ``cancel`` is set, also while the release waits
    for the peer's answer (a stop never waits on the release handshake), or when the release
    has not ended within :data:`_RELEASE_BOUND` seconds.

    The bound is for pynetdicom: now and then (3 in 25 runs of a storage commitment test under
    load) ``Association.release`` spun for good in its wait for the association's reactor to
    pause, the reactor parked at its checkpoint (py-spy: association.py:612 and :724), and the
    proving thread with it. Aborting wakes the spin (the abort restarts and kills the reactor)."""
    if cancel is not None and cancel.is_set():
        abort_now(assoc)  # stopping: no release handshake with a peer that may not answer
        return
    if not assoc.is_established:
        return
    done = threading.Event()

    def watch() -> None:
        until = time.monotonic() + _RELEASE_BOUND
        while not done.wait(_POLL):
            stopping = cancel is not None and cancel.is_set()
            if stopping or time.monotonic() > until:
                if not stopping:
                    logger.warning(
                        "the release of an association did not end within %gs; aborting it",
                        _RELEASE_BOUND,
                    )
                abort_now(assoc, done)
                return

    threading.Thread(target=watch, name="assoc-release", daemon=True).start()
    try:
        assoc.release()
    finally:
        done.set()


def associate(
    ae: Any, host: str, port: int, kwargs: dict[str, Any], cancel: threading.Event | None
) -> Any:
    """``ae.associate(host, port, **kwargs)``, unless ``cancel`` is set first: then the
    association being negotiated is aborted (pynetdicom's connection thread is not a daemon
    thread: left alone, it would hold the process's exit until the ACSE timeout) and
    :class:`Cancelled` raised at once; one established meanwhile is aborted too. (A TCP connect
    that waits is interrupted too: see :func:`_interrupt_connect`.)"""
    if cancel is None:
        return ae.associate(host, port, **kwargs)
    from pynetdicom import evt

    result: list[Any] = []
    failure: list[BaseException] = []
    connected: list[Any] = []  # the association, once its connection is open
    sockets: list[Any] = []  # pynetdicom's AssociationSocket, once made (before its connect)
    finished = threading.Event()
    lock = threading.Lock()
    abandoned = False
    make_socket = ae._create_socket

    def note_socket(*args: Any) -> Any:
        # AE._create_socket (pynetdicom 3.0) makes the socket the association connects on:
        # noted, so that a connect still waiting when ``cancel`` is set can be interrupted.
        sock = make_socket(*args)
        with lock:
            sockets.append(sock)
        return sock

    ae._create_socket = note_socket

    def on_open(event: Any) -> None:
        with lock:
            connected.append(event.assoc)
            late = abandoned
        if late:
            abort_now(event.assoc)

    handlers = [*kwargs.get("evt_handlers", []), (evt.EVT_CONN_OPEN, on_open)]

    def run() -> None:
        try:
            assoc = ae.associate(host, port, **{**kwargs, "evt_handlers": handlers})
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
            finished.set()
            return
        with lock:
            result.append(assoc)
            late = abandoned
        finished.set()
        if late and assoc.is_established:
            abort_now(assoc)

    threading.Thread(target=run, name="assoc-open", daemon=True).start()
    while not finished.wait(_POLL):
        if cancel.is_set():
            with lock:
                abandoned = not result
                opened = list(connected)
            if abandoned:
                for assoc in opened:
                    abort_now(assoc)
                threading.Thread(
                    target=_interrupt_connect,
                    args=(sockets, opened, finished, lock, ae.connection_timeout),
                    name="assoc-unconnect",
                    daemon=True,
                ).start()
                raise Cancelled("stopping: the association was not established")
            break
    if failure:
        raise failure[0]
    return result[0]


def _interrupt_connect(
    sockets: list[Any],
    opened: list[Any],
    finished: threading.Event,
    lock: threading.Lock,
    bound: float | None,
) -> None:
    """Shut down the socket of every association of an abandoned :func:`associate` whose
    connection is not open, until ``ae.associate`` has returned (``finished``): a TCP connect
    waiting on a peer that drops SYNs then fails at once (:mod:`forwarder.net.interrupt`), and
    pynetdicom's connection thread, which holds the process's exit, ends. Again every
    :data:`_WAKE_EVERY` seconds, since the connect may not have begun yet; for ``bound`` (the
    AE's connection timeout) plus a second at most."""
    until = time.monotonic() + (bound or 0.0) + 1.0
    interrupted: set[Any] = set()
    while True:
        with lock:
            pending = [s for s in sockets if s.assoc not in opened]
        for assoc_socket in pending:
            raw = assoc_socket.socket  # a TLS socket once wrapped: read it each time
            if raw is not None:
                shut_down(raw)
                interrupted.add(raw)
        if finished.wait(_WAKE_EVERY):
            # pynetdicom is done with them; its own close is skipped when the shutdown before
            # it fails (ENOTCONN: our shutdown came first), so the socket would wait for the GC.
            for raw in interrupted:
                raw.close()
            return
        if time.monotonic() > until:
            return
