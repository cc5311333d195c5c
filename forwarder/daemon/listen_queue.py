"""Queueing in the receiving process: what most received objects need, without a call.

Once an object is durable under ``incoming/.listen``
(:class:`~forwarder.daemon.listen_sink.Placement`), :class:`DirectQueue` routes it with the
daemon's router (a copy, sent down at start and after each reload) and queues it in one commit
on the process's own connection to the queue database: the same rows, in the same commit, as
:meth:`~forwarder.daemon.ingest.Ingest.enqueue_received` makes in the daemon. The daemon is then
told, without waiting for it, so that its senders wake and its metrics count the object; only
then is Success answered. The daemon's own work per object falls from a call (two pickled
messages, a thread wake-up, the routing and the commit, all under its interpreter lock, which
its senders need) to that one message.

Everything else is the daemon's, as before (the ``queue`` call, answered by
:meth:`~forwarder.daemon.listen_sink.ListenSink.queue`): an object routed nowhere (failed/),
discarded (done/), with conflicting changes, sent again while its earlier copy is still queued
(the new version replaces it), read for routes a reload has since replaced, or refused by the
queue here (the daemon tries, and answers 0xA700 when it cannot either). :meth:`DirectQueue.queue`
returns None for those, and has then written nothing.

Two processes write to the queue: SQLite's write lock serializes them, and a writer waits for
the other in short naps (:meth:`forwarder.queue.store.Store._begin_immediate`).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from forwarder.crashpoints import crash_point
from forwarder.daemon.listen_sink import received_entry
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool, StrPath
from forwarder.errors import ForwarderError
from forwarder.net.scp_object import Origin, ReceivedObject
from forwarder.queue import FileEntry, Queue

logger = logging.getLogger(__name__)


class Routing(NamedTuple):
    """The routes in force, as the daemon sends them down: a generation (a new one after each
    reload), the header tags the routes read (tag -> keyword, tag -> VR) and the router."""

    generation: int
    wanted: tuple[dict[int, str], dict[int, str]]
    router: Router


class Queued(NamedTuple):
    entry: FileEntry
    destinations: list[str]


class DirectQueue:
    """The receiving process's connection to the queue, and the rule for using it."""

    def __init__(self, path: str, spool: Spool) -> None:
        # Never migrated from here: after a package upgrade a restarted receiving process runs
        # the new code beside the daemon's old one, which must find its schema as it left it.
        # Commits not fsynced (sync_commits=False): the object is durable under .listen before
        # its row is written, and a row a power loss drops is written again by
        # Listener.recover before the port opens (the daemon's own commits sync the log, and
        # with it these, as soon as it acts on them: claims, acks, finishing).
        self._queue = Queue(path, create=False, migrate=False, sync_commits=False)
        self._spool = spool
        self._refused = ""  # the queue's last refusal, logged once

    def close(self) -> None:
        self._queue.close()

    def queue(
        self,
        final: StrPath,
        obj: ReceivedObject,
        origin: Origin,
        routing: Routing,
        generation: int,
    ) -> Queued | None:
        """Queue the object placed at ``final`` here; None when the daemon must (see the
        module's text). ``generation``: that of the routes its values were collected for."""
        if generation != routing.generation:
            return None
        try:
            st = os.lstat(final)
        except OSError:
            return None  # the daemon says why
        entry = received_entry(self._spool, final, st.st_size, st.st_mtime_ns, obj, origin)
        router = routing.router
        plan = router.plan(obj.values, entry.rel_path, origin.calling_ae or None)
        destinations = plan.ranked()  # name -> priority rank
        if plan.discarded_by or not destinations:
            return None
        if any(router.may_edit(n) and router.conflict(plan, n) for n in destinations):
            return None
        crash_point("listen-before-commit")
        try:
            ids = self._queue.enqueue_many([(entry, destinations)])
        except ForwarderError as exc:
            if str(exc) != self._refused:
                self._refused = str(exc)
                logger.warning("listen: cannot queue here (%s); the daemon queues instead", exc)
            return None
        self._refused = ""
        if ids[0] is None:
            return None  # an earlier copy is still queued: the daemon replaces it
        return Queued(entry, list(destinations))
