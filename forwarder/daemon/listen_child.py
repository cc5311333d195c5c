"""The daemon's receiving process: the Storage SCP engine of ``listen:`` on its own core.

Started by :class:`forwarder.daemon.listen_process.ListenProcess` as
``python -m forwarder.daemon.listen_child PEER_FD LISTEN_FD CARRIER_FD DAEMON_PID``: the
listening socket is the daemon's (so the port stays open while this process is restarted), the
peer socket carries the calls of :mod:`forwarder.daemon.listen_wire` that are not an
association's, and the carrier passes the daemon one channel per association (its calls go
straight from the association's thread to a daemon thread and back).

Here, on each association's thread: the engine receives, checks and fsyncs an object, then
:class:`~forwarder.daemon.listen_sink.Placement` renames it under ``incoming/.listen`` (steps 1
and 2 of :mod:`forwarder.daemon.listen_sink`). Steps 3 and 4, route and queue, are done here for
most objects (:mod:`forwarder.daemon.listen_queue`: the daemon is told, not asked), and by the
daemon's answer to a call for the rest; then Success is answered. A storage commitment request
is answered from the daemon's queue, and a PACS's commitment report goes to the daemon's
keeper, both by a call.

The process dies with the daemon (``PR_SET_PDEATHSIG``), so it never answers Success for an
object the daemon cannot queue. SIGTERM and SIGINT are ignored: the daemon (to which systemd
and a terminal send them too) drains this process itself (the ``stop`` call).
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forwarder.config import ListenConfig
from forwarder.crashpoints import crash_point
from forwarder.daemon.child_process import HEALTH_EVERY
from forwarder.daemon.listen_queue import DirectQueue, Routing
from forwarder.daemon.listen_sink import Placement, SpaceWatch, log_received
from forwarder.daemon.listen_wire import Peer, PeerGone, die_with, pass_channel
from forwarder.daemon.routes_in_use import RoutesInUse
from forwarder.errors import ForwarderError
from forwarder.net.commitment import Reference
from forwarder.net.commitment_scp import REASON_PROCESSING_FAILURE
from forwarder.net.scp_object import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Answer,
    Origin,
    ReceivedObject,
)

logger = logging.getLogger("forwarder.daemon.listen")

_QUEUE_TIMEOUT = 120.0  # seconds the daemon may take to queue one object (its queue is locked)
_INIT_TIMEOUT = 60.0  # seconds to wait for the daemon's first message


class RemoteSink:
    """The engine's sink here: place the object, then queue it here or have the daemon do it."""

    def __init__(self, child: Child) -> None:
        self._child = child
        self._local = threading.local()  # per association: the generation its object read

    @property
    def spool(self) -> Path:
        return self._child.placement.root

    @property
    def wanted(self) -> tuple[dict[int, str], dict[int, str]]:
        # Read by the engine on the association's thread as an object's check starts; its
        # accept (same thread) says which generation its values were collected for.
        routing = self._child.routing
        self._local.generation = routing.generation
        return routing.wanted

    def accept(self, path: str, obj: ReceivedObject, origin: Origin) -> Answer:
        generation = getattr(self._local, "generation", -1)
        final = self._child.placement.place(path, obj, origin)
        if isinstance(final, Answer):
            return final
        direct = self._child.direct
        if direct is not None:
            in_use = self._child.in_use.begin()  # before the routes are read (RoutesInUse)
            try:
                queued = direct.queue(final, obj, origin, self._child.routing, generation)
            except Exception:  # a bug of ours: the daemon's proven path takes the object
                logger.exception("listen: %s: queueing it here failed; asking the daemon", final)
                queued = None
            finally:
                self._child.in_use.end(in_use)
            if queued is not None:
                # Logged before the answer: every object a modality was told is stored has
                # its line, and before the daemon's line that it was sent on.
                log_received(queued.entry, origin, queued.destinations)
                crash_point("listen-before-answer")
                return Answer(STATUS_SUCCESS, then=self._child.teller.note)
        try:
            status, comment = self._child.ask(
                "queue", str(final), obj, origin, generation, timeout=_QUEUE_TIMEOUT
            )
        except PeerGone as exc:
            # Durable, perhaps not queued: the daemon's next start (or restart of this process)
            # queues it. The modality is not told Success.
            logger.error("listen: %s: cannot have it queued: %s", final, exc)
            return Answer(STATUS_OUT_OF_RESOURCES, "the gateway is restarting")
        return Answer(status, comment)


class Teller:
    """Tells the daemon how many objects this process queued itself (its senders wake, its
    metrics count them), in one message for those queued within ``apart`` seconds of the
    last message: a modality's push is an object every millisecond or so, and a message each
    cost this process as much as the queue's commit. The first object after a pause is told
    at once. What is not yet told when this process dies is only counted short; its objects
    reach the senders at their next look at the queue, within a second."""

    def __init__(self, send: Callable[[int], None], apart: float = 0.002) -> None:
        self._send = send
        self._apart = apart
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        # The thread waits for a first object on a held lock that note() releases: a plain
        # lock's release is a fraction of a Condition's notify, and note() is per object.
        self._waiting = False
        self._signal = threading.Lock()
        self._signal.acquire()
        self._thread = threading.Thread(target=self._run, name="listen-teller", daemon=True)
        self._thread.start()

    def note(self) -> None:
        """One more object queued here."""
        with self._lock:
            self._pending += 1
            wake, self._waiting = self._waiting, False
        if wake:
            self._signal.release()

    def close(self) -> None:
        """Tell what is pending, then end the thread."""
        with self._lock:
            self._closed = True
            wake, self._waiting = self._waiting, False
        if wake:
            self._signal.release()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            logger.warning("listen: the daemon did not take the last count of queued objects")

    def _run(self) -> None:
        while True:
            with self._lock:
                wait = self._waiting = not self._pending and not self._closed
            if wait:
                self._signal.acquire()  # released by note() or close()
            with self._lock:
                count, self._pending = self._pending, 0
                closed = self._closed
            if count:
                try:
                    self._send(count)
                except Exception as exc:  # the daemon is going away (this process with it)
                    logger.warning("listen: cannot tell the daemon of %d objects: %s", count, exc)
            if closed:
                return
            time.sleep(self._apart)


class Child:
    """The engine and its sink, answering the daemon's calls."""

    def __init__(self, peer: Peer, carrier: socket.socket, init: dict[str, Any]) -> None:
        listen: ListenConfig = init["listen"]
        folder = Path(init["folder"])
        self.peer = peer
        peer.handle = self._handle
        self._carrier = carrier  # passes each association's channel to the daemon
        self._carrier_lock = threading.Lock()
        self._local = threading.local()
        self.routing: Routing = init["routing"]
        self.in_use = RoutesInUse()  # the objects being queued here, by routes generation
        self.direct: DirectQueue | None = None
        try:
            self.direct = DirectQueue(init["queue"], init["spool"])
        except ForwarderError as exc:
            logger.warning("listen: %s; the daemon queues every object", exc)
        self._space_ok = True
        space = SpaceWatch(
            Path(init["incoming"]), listen.min_free_space, self._space_changed, announce=False
        )
        self.placement = Placement(folder, space, self._refused)
        self.teller = Teller(lambda count: self.peer.send("queued", count))
        self._stop = threading.Event()
        self._drain = 0.0
        self._next_look = 0.0

        from forwarder.daemon.listener import receiver_settings
        from forwarder.net.receiver import Receiver

        settings = receiver_settings(listen, folder, init["ae_title"])
        if listen.tls is not None:
            import dataclasses

            from forwarder.net.tls import server_context

            tls = server_context(listen.tls.cert, listen.tls.key, listen.tls.ca)
            settings = dataclasses.replace(settings, tls=tls)
        self.receiver = Receiver(
            settings,
            sink=RemoteSink(self),
            reports=self._report if init["reports"] else None,
            holdings=self._holdings,
        )

    def run(self, listener: socket.socket) -> int:
        """Serve until the daemon says stop (or goes away); the exit status."""
        try:
            self.receiver.start(listener)
        except ForwarderError as exc:
            self.peer.send("failed", str(exc))
            return 1
        reader = threading.Thread(target=self._serve, name="listen-peer", daemon=True)
        reader.start()
        self.peer.send("ready")
        self._stop.wait()
        self.receiver.stop(self._drain)
        self.teller.close()
        if self.direct is not None:
            self.direct.close()
        return 0

    def _serve(self) -> None:
        self.peer.serve(idle=HEALTH_EVERY, on_idle=self._look)
        self._stop.set()  # the daemon is gone (PR_SET_PDEATHSIG kills us soon anyway)

    def _look(self) -> None:
        """The accept thread's health, each second: the daemon's sign that this process is
        alive (silent, it is taken for stopped or hung)."""
        self._next_look = time.monotonic() + HEALTH_EVERY
        self.peer.send("health", self.receiver.healthy)

    def _handle(self, kind: str, args: tuple[Any, ...]) -> Any:
        if time.monotonic() >= self._next_look:  # busy: no idle second to look in
            self._look()
        if kind == "routing":
            routing: Routing = args[0]
            self.routing = routing
            # Said back once no object routed with the earlier routes is still being queued
            # here (the daemon routes every job again before sending it until then).
            self.in_use.advance(lambda: self._routed(routing.generation))
        elif kind == "stop_accepting":
            return self.receiver.stop_accepting()
        elif kind == "stop":
            self._drain = float(args[0])
            self._stop.set()
        return None

    def _routed(self, generation: int) -> None:
        try:
            self.peer.send("routed", generation)
        except PeerGone:
            pass  # the daemon is going away, and this process with it

    def _refused(self, outcome: str) -> None:
        try:
            self.peer.send("object", outcome)
        except PeerGone:
            pass

    def _space_changed(self, ok: bool, _free: int) -> None:
        if ok != self._space_ok:  # the daemon measures again, and says so once
            self._space_ok = ok
            try:
                self.peer.send("space")
            except PeerGone:
                pass

    def ask(self, kind: str, *args: Any, timeout: float) -> Any:
        """A call to the daemon on this thread's own channel (made at its first use: each
        association has its thread, and the daemon a thread serving its channel). A channel
        that failed is dropped, so the next call makes another."""
        channel = self._channel()
        try:
            return channel.ask(kind, *args, timeout=timeout)
        except PeerGone:
            self._drop(channel)
            raise

    def _channel(self) -> Peer:
        channel: Peer | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = pass_channel(self._carrier, self._carrier_lock)
            self._local.channel = channel
        return channel

    def _drop(self, channel: Peer) -> None:
        self._local.channel = None
        channel.sock.close()

    def _holdings(self, reference: Reference) -> int | None:
        try:
            result = self.ask("holdings", reference, timeout=_QUEUE_TIMEOUT)
        except PeerGone as exc:  # as the daemon's own answer on a queue error: not committed
            logger.error("listen: cannot ask the daemon what it holds: %s", exc)
            return REASON_PROCESSING_FAILURE
        return None if result is None else int(result)

    def _report(self, message_id: int, dataset: Any, peer: str) -> int:
        return int(self.ask("report", message_id, dataset, peer, timeout=_QUEUE_TIMEOUT))


def main(argv: list[str]) -> int:
    peer_fd, listen_fd, carrier_fd, parent = (int(a) for a in argv)
    die_with(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    faulthandler.enable(all_threads=True)
    # `systemctl kill -s USR1 forwarder` reaches this process too: its stacks, not its end.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    peer = Peer(socket.socket(fileno=peer_fd))
    listener = socket.socket(fileno=listen_fd)
    kind, _call, init = peer.receive(_INIT_TIMEOUT)
    if kind != "init":
        return 1
    from forwarder.logsetup import configure_daemon_logging

    configure_daemon_logging(init["log_level"])
    try:
        child = Child(peer, socket.socket(fileno=carrier_fd), init)
    except Exception as exc:  # the TLS material, a bug: the daemon says why and exits
        peer.send("failed", f"{type(exc).__name__}: {exc}")
        return 1
    return child.run(listener)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
