"""The daemon: wires watcher -> ingest -> queue -> workers -> finisher, owns threads and signals.

Start order: lock the queue, recover it (stale claims back to READY, half-finished moves
completed), start workers, start the watch-and-ingest process and wait until it watches
(:mod:`forwarder.daemon.ingest_process`; its first scan picks up files that arrived while we
were stopped; it finishes files too, :mod:`forwarder.daemon.finish_relay`), with ``listen:``
queue what the listener left unqueued and open its port (:mod:`forwarder.daemon.listener`),
then tell systemd READY=1. SIGTERM/SIGINT: stop watching (the process stops its watcher),
stop the listener (new associations refused, open ones drained then aborted), let each worker
finish the file it is sending, put claimed-but-unsent jobs back, release associations; then
the process finishes what the workers handed over and exits; exit 0.
SIGHUP: re-read the config; apply it if valid, else log every problem and keep the old one.
Signal handlers only set flags (uvicorn's ``Server.capture_signals``); the main thread acts.

This module holds the start-up, the wiring and the reload; the main loop (signals, health and
systemd's watchdog, status, periodic chores) and the shutdown sequence are
:mod:`forwarder.daemon.service_loop`.
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forwarder.config import Config, Destination, load_config
from forwarder.config.routing import bracket_notes
from forwarder.crashpoints import crash_point
from forwarder.daemon.commitment import CommitmentKeeper, ProofTarget
from forwarder.daemon.edits import EditResolver
from forwarder.daemon.failed_folder import FailedFolder
from forwarder.daemon.finish_relay import ChildFinisher
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.ingest_process import IngestProcess
from forwarder.daemon.listener import Listener
from forwarder.daemon.notify import Notifier
from forwarder.daemon.outcomes import LastOutcome
from forwarder.daemon.queue_lock import lock_path
from forwarder.daemon.router import Router
from forwarder.daemon.service_loop import _STOP_TIMEOUT, ServiceLoop
from forwarder.daemon.signals import SignalWaiter
from forwarder.daemon.spool import LISTEN_FOLDER, Spool
from forwarder.daemon.status import listen_status
from forwarder.daemon.status_page import StatusPage
from forwarder.daemon.verify_query import QueryTarget, QueryVerifier
from forwarder.daemon.worker import DestinationWorkers
from forwarder.errors import ConfigError, ForwarderError, SetupError, TLSSetupError
from forwarder.net.association import AssociationSettings
from forwarder.queue import Queue

logger = logging.getLogger(__name__)


def association_settings(dest: Destination, config: Config) -> AssociationSettings:
    """Sender settings for a destination; raises TLSSetupError for unusable TLS material (and
    for a DICOMweb destination's unusable secret files)."""
    if dest.url is not None:
        from forwarder.dicomweb.http import check_credentials

        check_credentials(dest)
    tls = None
    if dest.tls is not None:
        from forwarder.net.tls import check_private_key_permissions, client_context

        if dest.tls.key is not None:
            check_private_key_permissions(dest.tls.key)
        tls = client_context(
            dest.tls.ca, dest.tls.cert, dest.tls.key, verify_hostname=dest.tls.verify_hostname
        )
    return AssociationSettings(
        calling_ae_title=dest.calling_ae_title or config.ae_title,
        connect_timeout=dest.connect_timeout,
        response_timeout=dest.response_timeout,
        release_timeout=dest.release_timeout,
        max_pdu_receive=dest.max_pdu,
        tls=tls,
    )


class Service(ServiceLoop):
    """``forwarder run``. Construct on the main thread, then call :meth:`run`."""

    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self._stop = threading.Event()
        self._reload = False
        self._signals: SignalWaiter | None = None
        self._workers: dict[str, DestinationWorkers] = {}
        self._last: LastOutcome | None = None
        self._unhealthy: list[str] = []  # what the last health check found wrong
        self._lock_fd: int | None = None
        self.metrics: Any = None  # forwarder.daemon.metrics.Metrics when metrics.listen is set
        self.commitment: CommitmentKeeper | None = None  # storage commitment (issue 14)
        self.verifier: QueryVerifier | None = None  # verify_by_query (issue 14)
        self.status_page: StatusPage | None = None  # on the metrics listener
        self.listener: Listener | None = None  # the Storage SCP, when listen: is set
        self._started = time.time()
        # After a reload that changed the routes: the router the daemon's own Ingest says it
        # routes with, nothing older in progress (see _routes_taken).
        self._ingest_took: Router | None = None
        self._routes_lock = threading.Lock()

    # -- signals ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the service to stop (tests and embedding; the same as SIGTERM)."""
        self._stop.set()
        if self._signals is not None:
            self._signals.wake()

    def _stop_asked(self) -> bool:
        """A stop was asked for (SIGTERM, SIGINT, :meth:`request_stop`) and the main loop has
        not run yet: start-up gives up what it waits for."""
        signals = self._signals
        pending = signals.pending() if signals is not None else ()
        return self._stop.is_set() or signal.SIGTERM in pending or signal.SIGINT in pending

    # -- run --------------------------------------------------------------------------------

    def run(self) -> int:
        stop_reload_dump = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with SignalWaiter(stop_reload_dump) as signals:
            # SIGUSR1: every thread's stack on stderr, written from C (so even with the main
            # thread stuck), then the main loop passes the signal on to the watch-and-ingest
            # process, which writes its own. `systemctl kill -s USR1 forwarder` or kill -USR1.
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
            self._signals = signals
            try:
                return self._run()
            finally:
                self._signals = None
                faulthandler.unregister(signal.SIGUSR1)

    def _run(self) -> int:
        c = self.config
        self._take_lock(c.queue)
        self.queue = Queue(c.queue)
        try:
            self.spool = Spool(c.incoming, c.done, c.failed)
            self.spool.check_writable()
            report = self.queue.recover()
            self.ingest = Ingest(
                self.spool,
                self.queue,
                Router(
                    c.routes,
                    [d.name for d in c.destinations],
                    {d.name: d.modify for d in c.destinations},
                    self.queue,
                ),
                on_enqueued=self._wake_workers,
                log_phi=c.log_phi,
                # The listener's: the watch folder's files are the watch-and-ingest process's.
                known_under=str(self.spool.incoming / LISTEN_FOLDER),
            )
            # Moves a crash left half done, here before anything else runs; from then on the
            # watch-and-ingest process finishes (forwarder.daemon.finish_relay).
            local = Finisher(self.queue, self.spool, self._finished_here)
            local.finish(report.finishing)
            self.finisher = ChildFinisher(local)
            self._fail_orphans()
            if c.metrics is not None:
                from forwarder.daemon.metrics import (
                    Metrics,  # prometheus_client only when asked for
                )

                self.metrics = Metrics()
                self.ingest.metrics = self.metrics
                self.metrics.set_queue_source(self._queue_stats)
                self.metrics.set_commitment_source(self.queue.commitment_counts)
                # One listing of failed/ for the scrapes and the page, re-read where it changed.
                failed = FailedFolder(c.failed)
                self.metrics.set_failed_folder(failed)
                for d in c.destinations:
                    self.metrics.add_destination(d.name)
                self.status_page = StatusPage(
                    self.queue,
                    self._destination_names,
                    failed,
                    started=self._started,
                    proof=self._proof_names,
                )
                self._sample_rates()  # before the first file is sent: the rates start at zero
                self.metrics.set_status_app(self.status_page)
                self.metrics.start_server(c.metrics.listen)
            for dest in c.destinations:
                self._start_workers(dest)
            self._start_proof()
            self.watcher = IngestProcess(
                incoming=c.incoming,
                done=c.done,
                failed=c.failed,
                queue=c.queue,
                watch=c.watch,
                router=self.ingest.routing()[0],
                wake=self._wake_workers,
                metrics=self.metrics,
                log_level=c.log_level,
                log_phi=c.log_phi,
            )
            self.watcher.on_finished = self.ingest.forget
            self.watcher.queue_locked = self.queue.lock_waited
            self.watcher.on_restarted = self.ingest.relearn
            self.watcher.on_routes_taken = self._routes_taken
            started = self.watcher.start(cancelled=self._stop_asked)
            if started:
                self.finisher.attach(self.watcher)
            if not started or (c.listen is not None and not self._start_listener()):
                logger.info("forwarder: stopped during start-up")
                return 0
            for note in bracket_notes(c.routes):
                logger.warning("config: %s", note)
            logger.info(
                "forwarder running: watching %s, %d destinations (%s)",
                c.incoming,
                len(c.destinations),
                ", ".join(f"{d.name}={d.target}" for d in c.destinations),
            )
            self.notifier.ready(self._status_line())
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _start_listener(self) -> bool:
        """Queue what a crash left durable but unqueued under incoming/.listen, then open the
        port: from then on a modality's Success means the object is queued. False when a stop
        was asked for while its process started."""
        assert self.config.listen is not None
        if self._stop_asked():
            return False
        listener = Listener(
            self.config.listen,
            ae_title=self.config.ae_title,
            spool=self.spool,
            ingest=self.ingest,
            metrics=self.metrics,
            reports=self.commitment.deliver_report if self.commitment is not None else None,
            log_level=self.config.log_level,
        )
        listener.on_routes_taken(self._routes_taken)
        listener.recover()
        if not listener.start(cancelled=self._stop_asked):
            return False
        self.listener = listener
        if self.status_page is not None:
            c = self.config
            self.status_page.listen_status = lambda: listen_status(c.listen, c.incoming, c.ae_title)
        return True

    def _take_lock(self, queue_path: Path) -> None:
        try:
            queue_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(queue_path), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SetupError(
                f"the queue folder {queue_path.parent} is not writable ({exc.strerror or exc}); "
                f"forwarder keeps its queue database {queue_path.name} there. Make it writable "
                f"by the forwarder user; under the packaged systemd unit, a folder outside "
                f"ReadWritePaths= is read-only: add it with `systemctl edit forwarder` "
                f"([Service] ReadWritePaths={queue_path.parent})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ForwarderError(
                f"another forwarder is running with the queue {queue_path} "
                f"(lock {lock_path(queue_path)} is held: a daemon, or for a moment a "
                "`forwarder retry`, `pause` or `resume` upgrading the queue's schema)"
            ) from None
        self._lock_fd = fd

    def _start_workers(self, dest: Destination) -> None:
        workers = DestinationWorkers(
            dest,
            calling_ae_title=dest.calling_ae_title or self.config.ae_title,
            retry=self.config.retry,
            queue=self.queue,
            finisher=self.finisher,
            settings=association_settings(dest, self.config),
            metrics=self.metrics,
            on_outcome=self._on_outcome,
            edits=EditResolver(self.ingest),
        )
        workers.start()
        self._workers[dest.name] = workers

    def _start_proof(self) -> None:
        """The storage commitment keeper, for the destinations that require commitment."""
        # Both ask by the UIDs a destination's changes sent a file with (deidentify).
        sent_uids = EditResolver(self.ingest).sent_uids
        self.commitment = CommitmentKeeper(
            self.queue,
            self.finisher,
            wake_workers=self._wake_workers,
            metrics=self.metrics,
            sent_uids=sent_uids,
            unreachable=self._unreachable,
        )
        self.commitment.configure(self._proof_targets())
        self.commitment.start()
        self.verifier = QueryVerifier(
            self.queue,
            self.finisher,
            wake_workers=self._wake_workers,
            metrics=self.metrics,
            sent_uids=sent_uids,
            unreachable=self._unreachable,
        )
        self.verifier.configure(self._query_targets())
        self.verifier.start()
        self._settle_proof()

    def _settle_proof(self) -> None:
        """Destinations (configured or not) with instances awaiting proof that no longer
        require it: those count as delivered, as they would have without proof."""
        wanted = {
            d.name for d in self.config.destinations if d.storage_commitment or d.verify_by_query
        }
        for name, counts in self.queue.commitment_counts().items():
            if name in wanted or not counts.awaiting:
                continue
            released, files = self.queue.drop_proof(name)
            logger.warning(
                "%s no longer requires proof of delivery: %d stored instance(s) no longer await "
                "it and count as delivered",
                name,
                released,
            )
            self.finisher.submit(files)

    def _proof_targets(self) -> list[ProofTarget]:
        return [
            ProofTarget(d, association_settings(d, self.config))
            for d in self.config.destinations
            if d.storage_commitment is not None
        ]

    def _query_targets(self) -> list[QueryTarget]:
        """Destinations verified by C-FIND (storage commitment, when also set, wins)."""
        return [
            QueryTarget(d, association_settings(d, self.config))
            for d in self.config.destinations
            if d.verify_by_query is not None and d.storage_commitment is None
        ]

    def _fail_orphans(self) -> None:
        """Jobs for destinations no longer configured go to failed/ (``retry`` brings them back)."""
        names = {d.name for d in self.config.destinations}
        for name, stats in self.queue.stats().items():
            if name not in names and (stats.pending or stats.in_flight):
                ids = self.queue.fail_pending(
                    name, error=f"destination {name!r} is no longer in the configuration"
                )
                logger.warning(
                    "%d jobs were queued for %r, which is no longer configured: failed",
                    stats.pending,
                    name,
                )
                self.finisher.finish_ids(ids)
        for name in set(self.queue.destination_states()) - names:
            # Not sending there any more: its last state ("down: files stay queued") is moot.
            self.queue.clear_destination_state(name)

    def _destination_names(self) -> list[str]:
        return [d.name for d in self.config.destinations]

    def _proof_names(self) -> list[str]:
        """The destinations requiring proof of delivery (``status --json`` names them too)."""
        return [
            d.name for d in self.config.destinations if d.storage_commitment or d.verify_by_query
        ]

    def _queue_stats(self) -> dict[str, Any]:
        """Every configured destination, with zeros before it has rows (metrics, alerts)."""
        return dict(self.queue.stats(destinations=[d.name for d in self.config.destinations]))

    def _finished_here(self, paths: Sequence[str]) -> None:
        """The daemon's own finisher moved ``paths`` out of incoming (at start, at a stop while
        the watch-and-ingest process is down, or taking over from one that keeps failing): no
        Ingest holds them now, the process's included (it may have started meanwhile and
        learnt them from the queue)."""
        self.ingest.forget(paths)
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            watcher.forget(paths)

    def _unreachable(self, name: str) -> bool:
        """Whether C-STORE finds destination ``name`` down now: what the proof threads see of
        the workers (the workers of a destination a reload replaced start up)."""
        workers = self._workers.get(name)
        return workers is not None and workers.unreachable

    def _wake_workers(self) -> None:
        for w in list(self._workers.values()):
            w.wake()

    def _on_outcome(self, last: LastOutcome) -> None:
        self._last = last

    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            for d in new.destinations:
                association_settings(d, new)  # refuse unusable TLS material before applying
        except (ConfigError, TLSSetupError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for p in problems:
                logger.error("reload: %s: %s", self.config_path, p)
            logger.error("reload: config invalid; still running on the previous one")
            self.notifier.ready(self._status_line())
            return
        for note in bracket_notes(new.routes):
            logger.warning("reload: %s", note)
        old = self.config
        # log_level and log_phi: set in each process's logging and ingest at start.
        fixed: tuple[str, ...] = ("incoming", "done", "failed", "queue", "metrics", "watch")
        fixed += ("listen", "log_level", "log_phi")
        for key in fixed:
            if getattr(old, key) != getattr(new, key):
                logger.warning("reload: %s changed; restart forwarder to apply it", key)
        new = new.model_copy(update={k: getattr(old, k) for k in fixed})
        old_dests = {d.name: d for d in old.destinations}
        new_dests = {d.name: d for d in new.destinations}
        self.config = new
        crash_point("reload")
        for name, dest in old_dests.items():
            changed = name in new_dests and (
                new_dests[name] != dest or new.ae_title != old.ae_title
            )
            if name not in new_dests or changed:
                self._workers.pop(name).stop(_STOP_TIMEOUT)
        router = Router(
            new.routes,
            list(new_dests),
            {n: d.modify for n, d in new_dests.items()},
            self.queue,
        ).after(self.ingest.routing()[0])
        self.ingest.set_router(router, then=lambda: self._ingest_taken(router))
        self.watcher.routes_changed(router)
        if self.listener is not None:
            self.listener.routes_changed()
        self._routes_taken()
        for name, dest in new_dests.items():
            if name not in self._workers:
                if self.metrics is not None:
                    self.metrics.add_destination(name)
                self._start_workers(dest)
            else:
                self._workers[name].retry = new.retry
        self._fail_orphans()
        if self.commitment is not None:
            self.commitment.configure(self._proof_targets())
        if self.verifier is not None:
            self.verifier.configure(self._query_targets())
            self._settle_proof()
        added = sorted(set(new_dests) - set(old_dests))
        removed = sorted(set(old_dests) - set(new_dests))
        if self.metrics is not None:
            for name in removed:
                self.metrics.remove_destination(name)
        logger.info(
            "reload: applied (%d destinations; added: %s; removed: %s)",
            len(new_dests),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )
        self.notifier.ready(self._status_line())
        self.watcher.rescan()

    def _ingest_taken(self, router: Router) -> None:
        self._ingest_took = router
        self._routes_taken()

    def _routes_taken(self) -> None:
        """After a reload that changed the routes, every job is routed again before it is
        sent (forwarder.daemon.edits) until each process that queues files (this one's
        Ingest, the watch-and-ingest process, the receiving process) has said it routes with
        the new routes and finished what it routed with the old ones, however long that
        takes; then only the jobs queued before. Called by each as it says so."""
        with self._routes_lock:
            router = self.ingest.routing()[0]
            if router.settled or self._ingest_took is not router:
                return
            if not self.watcher.routes_taken(router):
                return
            if self.listener is not None and not self.listener.routes_taken(router):
                return
            router.settle()
        logger.info(
            "reload: every process routes with the new routes; files queued before are routed "
            "again before they are sent"
        )
