"""The daemon's side of its watch-and-ingest process (:mod:`forwarder.daemon.ingest_child`).

:class:`IngestProcess` stands where the :class:`~forwarder.daemon.watcher.Watcher` stood in the
service (``start``, ``healthy``, ``rescan``, ``stop``) and adds what the process needs from the
daemon: the routes after a reload (:meth:`IngestProcess.routes_changed`), the ids of the files
to finish (:meth:`IngestProcess.finish`: its finisher moves them, see
:mod:`forwarder.daemon.finish_relay`), and the paths the daemon's own finisher moved out of
incoming when the process did not finish them (:meth:`IngestProcess.forget`: a file of that
name dropped again is then ingested again). The process's counts go to the daemon's metrics
as before (``forwarder_ingest_accepted_total``, ``forwarder_ingest_rejected_total{reason}``),
and each chunk it queued wakes the senders.

:meth:`IngestProcess.start` returns once the process watches (the daemon reports ready only
then) and raises :class:`~forwarder.errors.ForwarderError` with its reason when it cannot (no
incoming folder, no queue). When it dies alone, the death is logged at ERROR, ``healthy`` is
False meanwhile (the service stops feeding systemd's watchdog) and it is started again after a
backoff; its first scan takes the files that arrived meanwhile, and those it had checked but
not committed. Nothing is queued twice: it learns the queued paths from the queue at each
start, and the queue takes a path once. It dies with the daemon (``PR_SET_PDEATHSIG``). A
process that stops reading or talking (SIGSTOP, a hung mount) is killed and started again
(:mod:`forwarder.daemon.child_process`): forgets lost with it are safe, the next process
learns the queued paths afresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from forwarder.config import WatchConfig
from forwarder.daemon.child_process import ChildProcess, exit_text
from forwarder.daemon.listen_wire import Peer
from forwarder.daemon.router import Router

logger = logging.getLogger(__name__)

_STOP_GRACE = 10.0  # seconds for it to stop watching and exit before it is killed
_HOLD_AT_MOST = 100_000  # file ids held for a process not ready yet


class IngestCounts(Protocol):
    """Where the process's counts go (:class:`~forwarder.daemon.metrics.Metrics`)."""

    def ingested(self, accepted: bool, reason: str = "", count: int = 1) -> None: ...

    def ingest_restart(self) -> None: ...


class IngestProcess(ChildProcess):
    """The watch folder's Watcher and Ingest in a process of their own; :meth:`start`, then
    :meth:`request_stop` (optional, to stop taking files at once) and :meth:`stop`."""

    module = "forwarder.daemon.ingest_child"
    area = "watch"
    what = "the watch-and-ingest process"

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
        super().__init__()
        self._folders = (str(incoming), str(done), str(failed))
        self._queue = str(queue)
        self._watch = watch
        self._router = router
        self._wake = wake
        self.metrics = metrics
        self._log_level = log_level
        self._log_phi = log_phi
        # The finisher runs in the process too (:mod:`forwarder.daemon.finish_relay`): the
        # paths under incoming/.listen it moved out, and each restart, are told there.
        self.on_finished: Callable[[list[str]], None] | None = None
        self.on_restarted: Callable[[], None] | None = None
        # Ids handed over while no process is ready, sent when one is (none waits for a
        # process that starts; too many are dropped: every start sweeps the queue anyway).
        self._held: list[int] = []
        self._held_lock = threading.Lock()
        # The routes: the generation of the router last sent (``init`` or ``routing``), and
        # the one the running process said it routes with, nothing older in progress
        # (``routed``); :meth:`routes_taken`. Called when it says so (or a new one starts).
        self._generation = 0
        self._taken = 0
        self._routes_lock = threading.Lock()  # not _lock: held while a message is sent
        self.on_routes_taken: Callable[[], None] | None = None

    def request_stop(self) -> None:
        """Stop taking files from incoming now (the process exits); :meth:`stop` waits."""
        self._request_stop(("stop",))

    def stop(self, timeout: float = _STOP_GRACE) -> None:
        """Stop the process (killed if it has not exited within ``timeout`` seconds) and wait
        for its last counts. After :meth:`request_stop` it still finishes files: ``exit`` (the
        second message) has it finish what it was handed, then exit."""
        self._stop_process(("exit",), timeout)

    @property
    def finishing(self) -> bool:
        """The process runs and said ready (it finishes files even while its watcher is
        unhealthy)."""
        process = self._process
        return self._up and process is not None and process.poll() is None

    def finish(self, file_ids: Sequence[int]) -> None:
        """Have the process's finisher move ``file_ids`` out of incoming (one message). Held
        while no process is ready (sent once one is), never waited for; lost with a process
        killed holding them: each start's sweep finds such files in the queue."""
        if not file_ids:
            return
        with self._held_lock:
            if not self._up:
                if len(self._held) < _HOLD_AT_MOST:
                    self._held.extend(file_ids)
                return
        self.tell("finish", list(file_ids))

    @property
    def exit_code(self) -> int | None:
        """The last process's exit status (None while it runs)."""
        process = self._process
        return None if process is None else process.poll()

    def rescan(self) -> None:
        """Ask for a full scan of incoming as soon as possible."""
        self.tell("rescan")

    def forget(self, paths: Sequence[str]) -> None:
        """The finisher moved ``paths`` out of incoming. Lost when the process is not running:
        the next one learns the queued paths from the queue."""
        if paths:
            self.tell("forget", list(paths))

    def routes_changed(self, router: Router) -> None:
        """A reload replaced the router: files are routed with ``router`` from now on (the
        process says when: :meth:`routes_taken`)."""
        with self._lock:
            with self._routes_lock:
                self._router = router
                self._generation += 1
                generation = self._generation
            peer = self._peer
            if peer is not None:
                self._send(peer, "routing", router, generation)

    def routes_taken(self, router: Router) -> bool:
        """The process routes with ``router`` and nothing it routed with an earlier one is
        still being queued (True too while none runs: the next one starts with it)."""
        with self._routes_lock:
            return router is self._router and self._taken == self._generation

    # -- the process -------------------------------------------------------------------------

    def _init(self, peer: Peer) -> None:
        # Under the lock from the router read to the peer set: a reload in between would
        # otherwise send its router to no one, and this process would route with the old one.
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
        self._send(peer, "init", init)
        with self._routes_lock:
            self._taken = self._generation  # a new process: it never routed with another

    def _death(self, code: int | None, delay: float) -> None:
        why = f"could not start ({self._failed})" if self._failed else "died"
        logger.error(
            "watch: the watch-and-ingest process (PID %s) %s (%s); files stay in incoming "
            "until it runs again; restarting it in %.0f s",
            self.pid or "?",
            why,
            exit_text(code),
            delay,
        )
        if self.metrics is not None:
            self.metrics.ingest_restart()

    # -- its messages ------------------------------------------------------------------------

    def _on_ready(self, again: bool) -> None:
        with self._held_lock:
            held, self._held = self._held, []
        if held:
            self.tell("finish", held)
        self._routes_news()
        if again:
            logger.warning("watch: watching incoming again, in process %s", self.pid)
            self._wake()  # a chunk it queued just before it died may not have said so
            if self.on_restarted is not None:
                self.on_restarted()

    def _routes_news(self) -> None:
        if self.on_routes_taken is not None:
            self.on_routes_taken()

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> None:
        try:
            if kind == "ingested":
                counts: dict[tuple[bool, str], int] = args[0]
                metrics = self.metrics
                if metrics is not None:
                    for (accepted, reason), count in counts.items():
                        metrics.ingested(accepted, reason, count)
                if args[1]:
                    self._wake()
            elif kind == "finished" and self.on_finished is not None:
                self.on_finished(args[0])
            elif kind == "routed":
                with self._routes_lock:
                    if int(args[0]) == self._generation:
                        self._taken = self._generation
                self._routes_news()
        except Exception:  # a bug of ours: the process goes on
            logger.exception("watch: handling the watch-and-ingest process's %s failed", kind)
