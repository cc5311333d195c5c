"""The daemon's side of its receiving process (:mod:`forwarder.daemon.listen_child`).

Why a process: a modality pushing small objects one at a time waits for each answer, so the
gateway's pace is the receive path's latency, and in one interpreter the receiving threads and
the sending threads take turns on one lock. In a process of its own the engine (PDUs, the end to
end check, the file, its fsync and rename) runs on another core, and so do the routing and the
queue commit of most objects (:mod:`forwarder.daemon.listen_queue`, with a copy of the daemon's
router sent down at start and after each reload); the daemon is told how many (``queued N``,
after the answers, in one message for those close together), and is called for the rest
(objects routed nowhere, discarded, conflicting or sent again while queued).

:class:`ListenProcess` makes the listening socket itself and hands it down, starts the process,
answers its calls (``listen-association`` threads, one per association: queue an object, what
the gateway holds, a commitment report; ``listen-calls``: the objects it queued, a refusal to
count, its health), and restarts it when it dies: the port stays bound
meanwhile (connections wait in its backlog), the objects it made durable but did not have queued
are queued first (``recover``), and the modality whose association was cut sends again what was
not answered. The process dies with the daemon (``PR_SET_PDEATHSIG``), so a kill -9 of the
daemon leaves nothing holding the port.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forwarder.config import ListenConfig
from forwarder.daemon.child_process import ChildProcess, exit_text
from forwarder.daemon.listen_queue import Routing
from forwarder.daemon.listen_sink import ListenSink
from forwarder.daemon.listen_wire import Peer, PeerGone, take_channels
from forwarder.dicom.check import check_file_values
from forwarder.errors import ForwarderError, InvalidFileError, UnreadableFileError
from forwarder.net.commitment import STATUS_PROCESSING_FAILURE, Reference
from forwarder.net.receiver import bind
from forwarder.net.scp_commitment import ReportSink
from forwarder.net.scp_object import STATUS_OUT_OF_RESOURCES, Origin, ReceivedObject

logger = logging.getLogger(__name__)

_CALL_TIMEOUT = 10.0  # seconds for it to take and answer stop_accepting (it does at once)
_STOP_GRACE = 10.0  # seconds past the drain before it is killed


class ListenProcess(ChildProcess):
    """The engine in a process of its own; :meth:`start`, then :meth:`stop_accepting` and
    :meth:`stop`. ``recover`` runs before each restart (not before the first start)."""

    module = "forwarder.daemon.listen_child"
    area = "listen"
    what = "the receiving process"
    restart_delays = (0.0, 1.0, 2.0, 5.0, 10.0)

    def __init__(
        self,
        listen: ListenConfig,
        *,
        ae_title: str,
        incoming: Path,
        sink: ListenSink,
        holdings: Callable[[Reference], int | None],
        reports: ReportSink | None,
        recover: Callable[[], object],
        on_space: Callable[[], object],
        on_object: Callable[[str], None],
        log_level: str,
    ) -> None:
        super().__init__()
        self._listen = listen
        self._ae_title = ae_title
        self._incoming = incoming
        self._sink = sink
        self._holdings = holdings
        self._reports = reports
        self._recover = recover
        self._on_space = on_space
        self._on_object = on_object
        self._log_level = log_level
        self._socket: socket.socket | None = None
        self._carrier: socket.socket | None = None  # this spawn's, until its thread takes it
        self._sent: Routing | None = None
        self._generation = 0
        self._told = 0  # the generation the running process was given
        # The generation it said it routes with, nothing older in progress (``routed``):
        # :meth:`routes_taken`; ``on_routes_taken`` is called when it says so (or starts).
        self._taken = 0
        self._routes_lock = threading.Lock()  # not _lock: held while a message is sent
        self.on_routes_taken: Callable[[], None] | None = None
        self._threads: list[threading.Thread] = []  # those serving the process's channels

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the listener is not started")
        return int(self._socket.getsockname()[1])

    def start(self, cancelled: Callable[[], bool] | None = None) -> bool:
        """Bind the port and start the process; raises :class:`ForwarderError` when either
        fails (the process's own reason: TLS material, the folder). False when ``cancelled()``
        turned true first."""
        self._socket = bind(self._listen.bind, self._listen.port)
        try:
            started = super().start(cancelled)
        except ForwarderError as exc:  # "cannot start ...", "the receiving process failed: ..."
            self._socket.close()
            raise ForwarderError(f"listen: {exc}") from None
        if not started:
            self._socket.close()
        return started

    def stop_accepting(self) -> int:
        """Refuse new connections from now on (a process dying from now on is not restarted);
        returns how many associations are open. A process that does not answer (stopped,
        hung) is killed: nothing it holds was answered Success and not queued."""
        with self._life:
            self._stopping.set()
            peer = self._peer
        if peer is None:
            return 0
        try:
            return int(peer.call("stop_accepting", timeout=_CALL_TIMEOUT))
        except PeerGone as exc:
            self._kill(peer, f"did not answer at the stop ({exc})")
            return 0

    def stop(self, drain: float) -> None:
        """Open associations get ``drain`` seconds to end, then the process aborts them and
        exits (killed if it does not within :data:`_STOP_GRACE` more)."""
        self._stop_process(("stop", drain), drain + _STOP_GRACE)
        deadline = time.monotonic() + _STOP_GRACE
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:  # their channels closed with the process
            thread.join(max(deadline - time.monotonic(), 0.0))
        if self._socket is not None:
            self._socket.close()
        if self._carrier is not None:  # a last spawn that failed
            self._carrier.close()
            self._carrier = None

    # -- the process -------------------------------------------------------------------------

    def _descriptors(self) -> tuple[list[int], list[socket.socket]]:
        assert self._socket is not None
        if self._carrier is not None:  # the last spawn's: it failed
            self._carrier.close()
        carrier, theirs = socket.socketpair()
        self._carrier = carrier
        # The listening socket stays open here: the port is bound while the child restarts.
        return [self._socket.fileno(), theirs.fileno()], [theirs]

    def _spawned(self) -> None:
        carrier, self._carrier = self._carrier, None
        assert carrier is not None
        channels = threading.Thread(
            target=self._take_channels, args=(carrier,), name="listen-channels", daemon=True
        )
        channels.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(channels)

    def _init(self, peer: Peer) -> None:
        # Under the lock from the routes read to the peer set: a reload in between would
        # otherwise send its routes to no one (or before init), and this process would route
        # with the old ones until the next reload.
        routing = self._current_routing()
        init = {
            "listen": self._listen,
            "ae_title": self._ae_title,
            "incoming": str(self._incoming),
            "folder": str(self._sink.spool),
            "routing": routing,
            "queue": self._sink.queue_path,
            "spool": self._sink.spool_folders,
            "reports": self._reports is not None,
            "log_level": self._log_level,
        }
        self._send(peer, "init", init)
        self._told = routing.generation
        with self._routes_lock:
            self._taken = routing.generation  # a new process: it never routed with another

    def _before_restart(self) -> None:
        """Queue what the dead process made durable, then start another."""
        try:
            self._recover()
        except Exception:  # the restart matters more: the next start recovers again
            logger.exception("listen: recovering the received files failed")

    def _death(self, code: int | None, delay: float) -> None:
        later = f" in {delay:.0f} s" if delay else ""
        if self._failed:  # it said why before exiting: it never served
            logger.error(
                "listen: the receiving process (PID %s) could not start (%s: %s); the port "
                "stays open; starting it again%s",
                self.pid or "?",
                exit_text(code),
                self._failed,
                later,
            )
        else:
            logger.error(
                "listen: the receiving process (PID %s) died (%s); its open associations "
                "are cut, the port stays open; restarting it%s",
                self.pid or "?",
                exit_text(code),
                later,
            )

    def _on_ready(self, again: bool) -> None:
        self._routes_news()
        if again:
            logger.warning("listen: receiving again, in process %s", self.pid)

    def _on_health(self, healthy: bool) -> None:
        if not healthy and not self._stopping.is_set():  # draining on a stop: no fault
            logger.error("listen: the receiving process no longer accepts connections")

    # -- its calls ---------------------------------------------------------------------------

    def _take_channels(self, carrier: socket.socket) -> None:
        """Serve each association's channel on a thread of its own until the process exits."""
        try:
            take_channels(carrier, self._serve_channel)
        finally:
            carrier.close()

    def _serve_channel(self, sock: socket.socket) -> None:
        def serve() -> None:
            try:
                Peer(sock, self._handle).serve()
            finally:
                sock.close()

        thread = threading.Thread(target=serve, name="listen-association", daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> Any:
        try:
            return self._answer(kind, args)
        except Exception:  # a bug of ours: the object is refused, the listener goes on
            logger.exception("listen: answering the receiving process's %s failed", kind)
            if kind == "queue":
                return STATUS_OUT_OF_RESOURCES, "cannot queue the object"
            if kind in ("holdings", "report"):
                return STATUS_PROCESSING_FAILURE
            return None

    def _answer(self, kind: str, args: tuple[Any, ...]) -> Any:
        if kind == "queued":  # it queued objects itself (listen_queue)
            self._sink.queued_elsewhere(int(args[0]) if args else 1)
            return None
        if kind == "queue":
            return self._queue(*args)
        if kind == "routed":  # it routes with that generation, nothing older in progress
            with self._routes_lock:
                if int(args[0]) == self._told:
                    self._taken = self._told
            self._routes_news()
            return None
        if kind == "holdings":
            return self._holdings(args[0])
        if kind == "report":
            if self._reports is None:
                return STATUS_OUT_OF_RESOURCES
            return self._reports(*args)
        if kind == "object":
            self._on_object(args[0])
        elif kind == "space":
            self._on_space()
        return None

    def routes_changed(self) -> None:
        """A reload replaced the router: the process routes with the new one from now on (it
        says when: :meth:`routes_taken`)."""
        self._routing()

    def routes_taken(self, router: object) -> bool:
        """The process routes with ``router`` and nothing it routed with an earlier one is
        still being queued (True too while none runs: the next one starts with it)."""
        sent = self._sent
        with self._routes_lock:
            return sent is not None and sent.router is router and self._taken == sent.generation

    def _routes_news(self) -> None:
        if self.on_routes_taken is not None:
            self.on_routes_taken()

    def _routing(self) -> Routing:
        """The routes in force, with their generation: a new one after each reload that
        replaced them, sent to the process (which routes most objects itself)."""
        with self._lock:
            sent = self._current_routing()
            if sent.generation != self._told:
                self._told = sent.generation  # before: its ``routed`` may come back at once
                peer = self._peer
                if peer is not None:
                    self._send(peer, "routing", sent)
            return sent

    def _current_routing(self) -> Routing:
        """The routes in force as a :class:`Routing` (a new generation when a reload replaced
        them); the caller holds ``_lock``."""
        router, wanted = self._sink.routing()
        sent = self._sent
        if sent is None or wanted is not sent.wanted or router is not sent.router:
            self._generation += 1
            self._sent = sent = Routing(self._generation, wanted, router)
        return sent

    def _queue(
        self, path: str, obj: ReceivedObject, origin: Origin, generation: int
    ) -> tuple[int, str | None]:
        current, wanted, _router = self._routing()
        if generation != current:  # collected for routes since reloaded: read them again
            try:
                _meta, values = check_file_values(Path(path), *wanted)
            except (InvalidFileError, UnreadableFileError) as exc:
                logger.error("listen: %s: cannot read it back: %s", path, exc)
                return STATUS_OUT_OF_RESOURCES, "cannot read the object back"
            obj = dataclasses.replace(obj, values=values)
        answer = self._sink.queue(Path(path), obj, origin)
        return answer.status, answer.comment
