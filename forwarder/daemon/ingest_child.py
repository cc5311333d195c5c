"""The daemon's watch-and-ingest process: the watch folder taken on a core of its own.

Started by :class:`forwarder.daemon.ingest_process.IngestProcess` as
``python -m forwarder.daemon.ingest_child PEER_FD DAEMON_PID``. It runs what the daemon ran on
its own threads before: the :class:`~forwarder.daemon.watcher.Watcher` of ``incoming`` and an
:class:`~forwarder.daemon.ingest.Ingest` (the same check, fsync before the commit, routing and
rejections), on a connection of its own to the queue (never created or migrated from here, as
:mod:`forwarder.daemon.listen_queue`). Why a process: on a backlog of small files the daemon was
bound by one core, its interpreter lock shared by the senders and the ingest.

Over the peer socket (:mod:`forwarder.daemon.listen_wire`), all notifications:

- from the daemon: ``init`` (folders, queue, watch settings, router), ``routing`` (a reload's
  router and its generation, said back in ``routed`` once no file routed with the earlier
  router is still being queued: a batch under way keeps the routes it was read for),
  ``finish`` (file ids whose jobs are all terminal, one message per sender's batch),
  ``forget`` (paths moved out of incoming by someone else: queued again when a file of that
  name comes back), ``rescan``, ``stop`` (stop watching, at SIGTERM), then ``exit`` (the
  daemon's senders have drained: finish what was handed over, and exit);
- to the daemon: ``ready`` once watching (or ``failed`` with the reason, then exit),
  ``ingested`` (counts for the daemon's metrics, and whether something was queued: the
  daemon wakes its senders; one message per queued chunk and per batch handed on),
  ``health`` when the watcher's health changes, ``finished`` (the paths under
  ``incoming/.listen`` the finisher moved out: the daemon's own Ingest, the listener's, knows
  those).

The :class:`~forwarder.daemon.finisher.Finisher` runs here, on this process's queue
connection: the moves out of incoming, their fsyncs and their two queue transactions a batch
no longer take the daemon's interpreter from its senders, and the forget of a moved path is a
call, not a message. Nothing handed over is lost when this process dies: a file's jobs are
terminal in the queue before its id is sent, and each start sweeps the whole queue
(:meth:`~forwarder.daemon.finisher.Finisher.sweep_all`) before the periodic sweep goes on
every few seconds; a move half done is a FINISHING row, which every sweep takes.

The process dies with the daemon (``PR_SET_PDEATHSIG``); what it had checked but not committed
is found again by the next start's scan. SIGTERM, SIGINT and SIGHUP are ignored: the daemon
(to which systemd and a terminal send them too) stops this process itself. SIGUSR1 writes every
thread's stack to the log, as in the daemon.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forwarder.daemon.child_process import HEALTH_EVERY
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.listen_wire import Peer, PeerGone, die_with
from forwarder.daemon.spool import LISTEN_FOLDER, Spool
from forwarder.daemon.watch_settle import ReadyFile
from forwarder.daemon.watcher import Watcher
from forwarder.errors import ForwarderError
from forwarder.queue import Queue

logger = logging.getLogger("forwarder.daemon.ingest_child")

_INIT_TIMEOUT = 60.0  # seconds to wait for the daemon's first message
_STUCK = 90.0  # seconds the watcher's settle loop may take for one turn (under WatchdogSec)
_FINISH_RETRY_EVERY = 5.0  # the finisher's periodic sweep (moves that failed, lost ids)
# Of the 10 s the daemon gives this process to exit once told (ingest_process._STOP_GRACE),
# what the sweep of the whole queue at exit may take (a start's sweep a stop cut short).
_EXIT_SWEEP_LIMIT = 6.0


class Counts:
    """Ingest's metrics here: counted, then sent to the daemon in one message (see
    :meth:`flush`). Used on the watcher's settle thread (Ingest's one caller here)."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._lock = threading.Lock()
        self._counts: dict[tuple[bool, str], int] = {}
        self._queued = False

    def ingested(self, accepted: bool, reason: str = "") -> None:
        key = (accepted, reason)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def enqueued(self) -> None:
        """Ingest queued a chunk: the daemon's senders are woken now."""
        with self._lock:
            self._queued = True
        self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            queued, self._queued = self._queued, False
        if counts or queued:
            try:
                self._peer.send("ingested", counts, queued)
            except PeerGone:
                pass  # the daemon is going away, and this process with it


class Child:
    """The watcher, Ingest and the finisher, answering the daemon's messages."""

    def __init__(self, peer: Peer, init: dict[str, Any]) -> None:
        self.peer = peer
        peer.handle = self._handle
        self.counts = Counts(peer)
        self.queue = Queue(init["queue"], create=False, migrate=False)
        incoming = Path(init["incoming"])
        spool = Spool(incoming, Path(init["done"]), Path(init["failed"]))
        self.ingest = Ingest(
            spool,
            self.queue,
            init["router"],
            on_enqueued=self.counts.enqueued,
            metrics=self.counts,
            log_phi=init["log_phi"],
        )
        watch = init["watch"]
        self.watcher = Watcher(
            incoming,
            self._on_ready,
            settle=watch["settle"],
            polling=watch["polling"],
            rescan_interval=watch["rescan_interval"],
            is_known=self.ingest.is_known,
        )
        self.finisher = Finisher(self.queue, spool, self._finished)
        self._listen = str(incoming / LISTEN_FOLDER) + os.sep
        self._stop = threading.Event()  # stop watching
        self._exit = threading.Event()  # finish what was handed over, then exit
        self._known = -1  # Ingest's known paths when last said (in the DEBUG log)
        self._next_look = 0.0
        self._stuck = False  # the settle loop has not come round for _STUCK seconds
        self._ready = False  # "ready" was sent
        self._swept = False  # the start's sweep went over the whole queue (not cut by ``exit``)

    def run(self) -> int:
        """Watch until the daemon says stop (or goes away); the exit status."""
        # The daemon's messages are read from now on: a stop sent while the watcher starts is
        # seen before its first scan has gone far.
        reader = threading.Thread(target=self._serve, name="ingest-peer", daemon=True)
        reader.start()
        try:
            self.watcher.start()
        except ForwarderError as exc:
            self.peer.send("failed", str(exc))
            return 1
        self.finisher.start()
        if not self._stop.is_set():
            self.peer.send("ready")
            self._ready = True
        # What a previous process was handed and did not finish; on a thread of its own, so
        # that a stop stops the watcher at once even in a long queue.
        sweep = threading.Thread(
            target=self._retry, kwargs={"everything": True}, name="finish-sweep", daemon=True
        )
        sweep.start()
        while not self._stop.wait(_FINISH_RETRY_EVERY):
            self._retry()
        self.watcher.stop()
        self.counts.flush()
        logger.info(
            "watch: stopped; %d file(s) it queued are not finished yet", self.ingest.known_count
        )
        # Still finishing: the daemon's senders drain, and hand their last files over.
        while not self._exit.wait(_FINISH_RETRY_EVERY):
            self._retry()
        sweep.join()  # the start's sweep stops between two slices at ``exit``
        healthy = self.finisher.healthy
        # What was handed over before ``exit`` is finished; a finisher still busy (a stuck
        # move) makes the exit status say so: the daemon then sweeps the queue itself.
        if not self.finisher.stop():
            logger.error("finish: the finisher did not end in time; files are left to the daemon")
            return 1
        # A move, or its record, that failed since the last sweep (a full disk, freed since)
        # is tried once more: a clean stop leaves no row FINISHING that can be finished now.
        # The start's sweep cut short by ``exit`` (a stop soon after a restart) is finished
        # here: what a killed process was handed is known from no one else, and the daemon,
        # seeing this exit status 0, does not sweep. Within part of the stop's grace: a long
        # queue's sweep is left to the daemon (exit status 1) rather than cut by a kill. An
        # unhealthy finisher leaves everything to the daemon.
        try:
            if healthy and self._swept:
                self.finisher.retry_pending()
            elif healthy and not self._sweep_at_exit():
                logger.warning(
                    "finish: the sweep of the queue did not end within %.0f s of the stop; "
                    "the daemon finishes it",
                    _EXIT_SWEEP_LIMIT,
                )
                healthy = False
        except ForwarderError as exc:  # the next start's sweep finishes them
            logger.error("finishing files: %s", exc)
        self.queue.close()
        return 0 if healthy else 1

    def _sweep_at_exit(self) -> bool:
        """The whole queue's sweep, stopped between two slices after
        :data:`_EXIT_SWEEP_LIMIT` seconds; True when it went over the whole queue."""
        cut = threading.Event()
        timer = threading.Timer(_EXIT_SWEEP_LIMIT, cut.set)
        timer.start()
        try:
            self.finisher.sweep_all(until=cut)
        finally:
            timer.cancel()
        return not cut.is_set()

    def _retry(self, *, everything: bool = False) -> None:
        """The finisher's sweep (:meth:`Finisher.retry_pending`; ``everything``: the whole
        queue, as at start). A dead finisher thread ends this process: the daemon starts
        another, whose start finishes what this one was handed."""
        if not self.finisher.healthy:
            logger.error("finish: the finisher thread died; ending the watch-and-ingest process")
            self._stop.set()
            self._exit.set()
            return
        try:
            if everything:
                found = self.finisher.sweep_all(until=self._exit)
                self._swept = not self._exit.is_set()
                if found:
                    logger.info(
                        "finish: %d file(s) left unfinished before this start finished", found
                    )
            else:
                self.finisher.retry_pending()
        except ForwarderError as exc:
            logger.error("finishing files: %s", exc)

    def _finished(self, paths: Sequence[str]) -> None:
        """The finisher moved ``paths`` out of incoming: forgotten here, and those under
        incoming/.listen (the listener's, known by the daemon's Ingest) forgotten there."""
        self._forget(paths)
        listen = [p for p in paths if p.startswith(self._listen)]
        if listen:
            try:
                self.peer.send("finished", listen)
            except PeerGone:
                pass  # the daemon is going away, and this process with it

    def _on_ready(self, files: list[ReadyFile]) -> None:
        try:
            self.ingest(files)
        finally:
            self.counts.flush()  # the rejections of a batch with nothing queued

    def _serve(self) -> None:
        try:
            self.peer.serve(idle=HEALTH_EVERY, on_idle=self._look)
        finally:
            self._stop.set()  # the daemon is gone (PR_SET_PDEATHSIG kills us soon anyway)
            self._exit.set()

    def _look(self) -> None:
        """The watcher's health, each second: the daemon's sign that this process is alive
        (silent, it is taken for stopped or hung; so also while it only finishes, after
        ``stop``). Taking files making no progress for :data:`_STUCK` seconds (a hung mount, a
        stuck fsync) is unhealthy too."""
        self._next_look = time.monotonic() + HEALTH_EVERY
        if not self._ready:  # the watcher may not run yet: its health means nothing
            return
        if self._stop.is_set():  # not watching, still finishing: alive all the same
            self.peer.send("health", False)
            return
        stuck = self.watcher.stuck_for
        healthy = self.watcher.healthy and stuck < _STUCK
        if (stuck >= _STUCK) != self._stuck:
            self._stuck = stuck >= _STUCK
            if self._stuck:
                logger.error("watch: taking files from incoming is stuck (%.0f s)", stuck)
            else:
                logger.warning("watch: taking files from incoming again")
        self.peer.send("health", healthy)
        known = self.ingest.known_count
        if known != self._known:
            self._known = known
            logger.debug("watch: %d file(s) queued from incoming, not finished yet", known)

    def _handle(self, kind: str, args: tuple[Any, ...]) -> None:
        try:
            self._act(kind, args)
        except Exception:  # a bug of ours, or the queue: the process goes on reading
            logger.exception("watch: handling the daemon's %s failed", kind)
        if time.monotonic() >= self._next_look:  # busy: no idle second to look in
            self._look()

    def _act(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "finish":
            self.finisher.submit(args[0])
        elif kind == "forget":
            self._forget(args[0])
        elif kind == "routing":
            # With its generation (a daemon of an older release sends none), said back once
            # no file routed with the earlier routes is still being queued.
            generation = args[1] if len(args) > 1 else None
            self.ingest.set_router(
                args[0], None if generation is None else lambda: self._routed(generation)
            )
        elif kind == "rescan":
            self.watcher.rescan()
        elif kind == "stop":
            self._stop.set()
        elif kind == "exit":
            self._stop.set()
            self._exit.set()

    def _routed(self, generation: int) -> None:
        try:
            self.peer.send("routed", generation)
        except PeerGone:
            pass  # the daemon is going away, and this process with it

    def _forget(self, paths: Sequence[str]) -> None:
        """``paths`` were moved out of incoming. A file of the same name already back
        may have been seen while its name was still known (and taken for a replacement of
        the queued one): a rescan offers it again."""
        self.ingest.forget(paths)
        if any(os.path.lexists(p) for p in paths):
            self.watcher.rescan()


def main(argv: list[str]) -> int:
    peer_fd, parent = (int(a) for a in argv)
    die_with(parent)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    faulthandler.enable(all_threads=True)
    # Every thread's stack on stderr, as the daemon's (which passes its SIGUSR1 on).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    peer = Peer(socket.socket(fileno=peer_fd))
    kind, _call, init = peer.receive(_INIT_TIMEOUT)
    if kind != "init":
        return 1
    from forwarder.logsetup import configure_daemon_logging

    configure_daemon_logging(init["log_level"])
    try:
        child = Child(peer, init)
    except ForwarderError as exc:  # the queue cannot be opened: the daemon says why
        peer.send("failed", str(exc))
        return 1
    except Exception as exc:  # a bug
        peer.send("failed", f"{type(exc).__name__}: {exc}")
        return 1
    return child.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
