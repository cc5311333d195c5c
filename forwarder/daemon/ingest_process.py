"""The daemon's side of its watch-and-ingest process (:mod:`forwarder.daemon.ingest_child`).

:class:`IngestProcess` stands where the :class:`~forwarder.daemon.watcher.Watcher` stood in the
service (``start``, ``healthy``, ``rescan``, ``stop``) and adds what the process needs from the
daemon: the routes after a reload (:meth:`IngestProcess.routes_changed`) and the paths the
finisher moved out of incoming (:meth:`IngestProcess.forget`, one message per finished batch:
a file of that name dropped again is then ingested again, and the process's set of queued
paths does not grow). The process's counts go to the daemon's metrics as before
(``forwarder_ingest_accepted_total``, ``forwarder_ingest_rejected_total{reason}``), and each
chunk it queued wakes the senders.

:meth:`IngestProcess.start` returns once the process watches (the daemon reports ready only
then) and raises :class:`~forwarder.errors.ForwarderError` with its reason when it cannot (no
incoming folder, no queue). When it dies alone, the death is logged at ERROR, ``healthy`` is
False meanwhile (the service stops feeding systemd's watchdog) and it is started again after a
backoff; its first scan takes the files that arrived meanwhile, and those it had checked but
not committed. Nothing is queued twice: it learns the queued paths from the queue at each
start, and the queue takes a path once. It dies with the daemon (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from forwarder.config import WatchConfig
from forwarder.daemon.listen_wire import Peer, PeerGone, child_env
from forwarder.daemon.router import Router
from forwarder.errors import ForwarderError

logger = logging.getLogger(__name__)

_START_TIMEOUT = 60.0  # seconds for the process to import, open the queue and say ready
_STOP_GRACE = 10.0  # seconds for it to stop watching and exit before it is killed
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after its 1st, 2nd... death in a row
_STEADY = 60.0  # seconds up after which a death counts as the first again


class IngestCounts(Protocol):
    """Where the process's counts go (:class:`~forwarder.daemon.metrics.Metrics`)."""

    def ingested(self, accepted: bool, reason: str = "", count: int = 1) -> None: ...

    def ingest_restart(self) -> None: ...


class IngestProcess:
    """The watch folder's Watcher and Ingest in a process of their own; :meth:`start`, then
    :meth:`request_stop` (optional, to stop taking files at once) and :meth:`stop`."""

    def __init__(
        self,
        *,
        incoming: Path,
        done: Path,
        failed: Path,
        queue: Path,
        watch: WatchConfig,
        router: Router,
        wake: Callable[[], None],
        metrics: IngestCounts | None,
        log_level: str,
        log_phi: bool,
    ) -> None:
        self._folders = (str(incoming), str(done), str(failed))
        self._queue = str(queue)
        self._watch = watch
        self._router = router
        self._wake = wake
        self.metrics = metrics
        self._log_level = log_level
        self._log_phi = log_phi
        self._process: subprocess.Popen[bytes] | None = None
        self._peer: Peer | None = None
        self._ready = threading.Event()  # the first process is up, or failed to start
        self._ever_up = False
        self._failed: str | None = None  # why the last process failed to start
        self._healthy = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the router and the peer it was sent to
        self._life = threading.Lock()  # a spawn and stop()'s look at what runs, one at a time
        # The finisher runs in the process too (:mod:`forwarder.daemon.finish_relay`): the
        # paths under incoming/.listen it moved out, and each restart, are told there.
        self.on_finished: Callable[[list[str]], None] | None = None
        self.on_restarted: Callable[[], None] | None = None

    @property
    def pid(self) -> int | None:
        """The process's PID (None before the first start)."""
        process = self._process
        return None if process is None else process.pid

    @property
    def healthy(self) -> bool:
        """The process runs and its watcher is healthy."""
        process = self._process
        return self._healthy and process is not None and process.poll() is None

    def start(self) -> None:
        """Start the process; returns once it watches, raises :class:`ForwarderError` (with
        its reason) when it cannot."""
        try:
            peer = self._spawn()
        except (OSError, subprocess.SubprocessError) as exc:
            raise ForwarderError(f"cannot start the watch-and-ingest process: {exc}") from None
        self._thread = threading.Thread(
            target=self._supervise, args=(peer,), name="ingest-calls", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or not self._ever_up:
            reason = self._failed or f"it did not start within {_START_TIMEOUT:.0f} s"
            self.stop(0.0)
            raise ForwarderError(reason)

    def request_stop(self) -> None:
        """Stop taking files from incoming now (the process exits); :meth:`stop` waits."""
        with self._life:  # a restart spawning now has finished: its child is the one told
            self._stopping.set()
            peer = self._peer
        if peer is not None:
            with contextlib.suppress(PeerGone):
                peer.send("stop")

    def stop(self, timeout: float = _STOP_GRACE) -> None:
        """Stop the process (killed if it has not exited within ``timeout`` seconds) and wait
        for its last counts. After :meth:`request_stop` it still finishes files: ``exit`` (the
        second message) has it finish what it was handed, then exit."""
        self.request_stop()
        self._tell("exit")
        process = self._process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("watch: the watch-and-ingest process did not stop; killing it")
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(_STOP_GRACE)

    def dump_threads(self) -> None:
        """Have the process write every thread's stack to the log (SIGUSR1, as the daemon's)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGUSR1)

    @property
    def finishing(self) -> bool:
        """The process runs (it finishes files even while its watcher is unhealthy)."""
        process = self._process
        return self._ever_up and process is not None and process.poll() is None

    def finish(self, file_ids: Sequence[int]) -> None:
        """Have the process's finisher move ``file_ids`` out of incoming (one message). Lost
        when the process is not running: each start's sweep finds such files in the queue."""
        if file_ids:
            self._tell("finish", list(file_ids))

    def rescan(self) -> None:
        """Ask for a full scan of incoming as soon as possible."""
        self._tell("rescan")

    def forget(self, paths: Sequence[str]) -> None:
        """The finisher moved ``paths`` out of incoming. Lost when the process is not running:
        the next one learns the queued paths from the queue."""
        if paths:
            self._tell("forget", list(paths))

    def routes_changed(self, router: Router) -> None:
        """A reload replaced the router: files are routed with ``router`` from now on."""
        with self._lock:
            self._router = router
            peer = self._peer
            if peer is not None:
                with contextlib.suppress(PeerGone):
                    peer.send("routing", router)

    def _tell(self, kind: str, *args: Any) -> None:
        peer = self._peer
        if peer is not None:
            with contextlib.suppress(PeerGone):
                peer.send(kind, *args)

    # -- the process -------------------------------------------------------------------------

    def _spawn(self) -> Peer:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "forwarder.daemon.ingest_child",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        peer = Peer(ours, self._handle)
        self._failed = None
        # Under the lock from the router read to the peer set: a reload in between would
        # otherwise send its router to no one, and this process would route with the old one.
        with self._lock:
            incoming, done, failed = self._folders
            init = {
                "incoming": incoming,
                "done": done,
                "failed": failed,
                "queue": self._queue,
                "watch": {
                    "settle": self._watch.settle,
                    "polling": self._watch.polling,
                    "rescan_interval": self._watch.rescan_interval,
                },
                "router": self._router,
                "log_level": self._log_level,
                "log_phi": self._log_phi,
            }
            with contextlib.suppress(PeerGone):
                peer.send("init", init)
            self._peer = peer
        return peer

    def _supervise(self, peer: Peer) -> None:
        """Read the process's messages; when it dies, start it again (unless stopping)."""
        deaths = 0
        while True:
            started = time.monotonic()
            try:
                code = self._serve_until_exit(peer)
            except Exception:  # a bug of ours: the watch folder must come back all the same
                logger.exception("watch: serving the watch-and-ingest process failed")
                code = self._end_process()
            if not self._ever_up:  # the first one never started: start() says why
                self._failed = self._failed or f"it exited with {_exit_text(code)}"
                self._ready.set()
                return
            if self._stopping.is_set():
                return
            deaths = 1 if time.monotonic() - started > _STEADY else deaths + 1
            delay = _RESTART_DELAYS[min(deaths, len(_RESTART_DELAYS)) - 1]
            why = f"could not start ({self._failed})" if self._failed else "died"
            logger.error(
                "watch: the watch-and-ingest process (PID %s) %s (%s); files stay in incoming "
                "until it runs again; restarting it in %.0f s",
                self.pid or "?",
                why,
                _exit_text(code),
                delay,
            )
            if self.metrics is not None:
                self.metrics.ingest_restart()
            if self._stopping.wait(delay):
                return
            again = self._restart()
            if again is None:
                return
            peer = again

    def _serve_until_exit(self, peer: Peer) -> int | None:
        try:
            peer.serve()
        finally:
            with self._lock:
                if self._peer is peer:
                    self._peer = None
            peer.sock.close()
            self._healthy = False
        return self._end_process()

    def _end_process(self) -> int | None:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.error("watch: the watch-and-ingest process stopped talking; killing it")
            process.kill()
            return process.wait()

    def _restart(self) -> Peer | None:
        while True:
            with self._life:
                if self._stopping.is_set():
                    return None
                try:
                    return self._spawn()
                except (OSError, subprocess.SubprocessError) as exc:
                    logger.error("watch: cannot start the watch-and-ingest process: %s", exc)
            if self._stopping.wait(5.0):
                return None

    # -- its messages ------------------------------------------------------------------------

    def _handle(self, kind: str, args: tuple[Any, ...]) -> None:
        try:
            self._dispatch(kind, args)
        except Exception:  # a bug of ours: the process goes on
            logger.exception("watch: handling the watch-and-ingest process's %s failed", kind)

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "ingested":
            counts: dict[tuple[bool, str], int] = args[0]
            metrics = self.metrics
            if metrics is not None:
                for (accepted, reason), count in counts.items():
                    metrics.ingested(accepted, reason, count)
            if args[1]:
                self._wake()
        elif kind == "health":
            self._healthy = bool(args[0])
        elif kind == "ready":
            self._healthy = True
            if self._ever_up:
                logger.warning("watch: watching incoming again, in process %s", self.pid)
                self._wake()  # a chunk it queued just before it died may not have said so
                if self.on_restarted is not None:
                    self.on_restarted()
            self._ever_up = True
            self._ready.set()
        elif kind == "finished":
            if self.on_finished is not None:
                self.on_finished(args[0])
        elif kind == "failed":  # it exits next: _supervise says why (or start() does)
            self._failed = str(args[0])


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        return f"signal {-code}"
    return f"exit status {code}"
