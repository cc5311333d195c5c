"""The daemon as a Storage SCP (``listen:`` in the config): start, recover, stop.

The engine, the allow lists (calling AE titles, source networks), the called AE check, TLS,
``max_associations`` and ``max_object_size`` are those of ``forwarder receive``
(:class:`forwarder.net.receiver.Receiver`); what differs is the sink: each object is made durable
under ``incoming/.listen/<CALLING_AE>/<Study>/<SOP>.dcm`` and queued before Success is answered
(:mod:`forwarder.daemon.listen_sink`).

:meth:`Listener.recover` runs before the port is opened: every file under ``incoming/.listen``
that the queue does not know (a crash after the object was made durable and before its queue
commit) is checked and queued, its calling AE title read back from its folder; empty folders
left there by finished files are removed. Partial files (``.receiving.*.part``) of a killed
daemon are deleted by the receiver's own sweep. :meth:`Listener.stop` stops accepting, gives
open associations ``drain`` seconds to end, then aborts them: an object cut short leaves
nothing behind, and one answered Success is in the queue.

Storage commitment reports (N-EVENT-REPORT) a PACS sends to this port, on an association where
it proposed itself as SCP of the Storage Commitment Push Model, go to ``reports`` (the
keeper's :meth:`~forwarder.daemon.commitment.CommitmentKeeper.deliver_report`), which answers
their status. A modality's own commitment request (N-ACTION) is answered for what the gateway
holds (:mod:`forwarder.daemon.listen_commitment`): in incoming, done/ or failed/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from forwarder.config import ListenConfig
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.listen_commitment import QueueHoldings
from forwarder.daemon.listen_process import ListenProcess
from forwarder.daemon.listen_sink import (
    ListenSink,
    SpaceWatch,
    ae_from_folder,
    received_entry,
)
from forwarder.daemon.router import Router
from forwarder.daemon.spool import LISTEN_FOLDER, Spool, SpoolError
from forwarder.dicom.check import check_file_values
from forwarder.errors import ForwarderError, InvalidFileError, UnreadableFileError
from forwarder.net.receiver import Receiver, ReceiverSettings, parse_networks
from forwarder.net.scp_commitment import ReportSink
from forwarder.net.scp_object import Origin, ReceivedObject

logger = logging.getLogger(__name__)


class ListenMetrics(Protocol):
    def listen_space(self, accepting: bool, free_bytes: int) -> None: ...

    def listen_object(self, outcome: str) -> None: ...

    def listen_restart(self) -> None: ...


def receiver_settings(listen: ListenConfig, folder: Path, ae_title: str) -> ReceiverSettings:
    """The engine's settings for ``listen`` (TLS material is loaded by :class:`Listener`)."""
    return ReceiverSettings(
        output=folder,
        port=listen.port,
        bind=listen.bind,
        ae_title=listen.ae_title or ae_title,
        require_called_aet=listen.require_called_aet,
        allowed_calling_aets=frozenset(listen.allow_calling_aet),
        allowed_networks=parse_networks(listen.allow_host),
        max_associations=listen.max_associations,
        max_object_size=listen.max_object_size,
        max_pdu=listen.max_pdu,
        promiscuous=listen.promiscuous,
        # Storage commitment both ways: a modality may ask the gateway to commit what it holds
        # (answered from the queue: daemon.listen_commitment), and a PACS sends the reports of
        # what the daemon asked it to commit to this port (as SCP, PS3.4 J.3.3).
        commitment=True,
        reports=True,
    )


class Listener:
    """The daemon's Storage SCP; :meth:`recover`, then :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        listen: ListenConfig,
        *,
        ae_title: str,
        spool: Spool,
        ingest: Ingest,
        metrics: ListenMetrics | None = None,
        reports: ReportSink | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.config = listen
        self.folder = spool.incoming / LISTEN_FOLDER
        self._spool = spool
        self._ingest = ingest
        self._metrics = metrics
        self.space = SpaceWatch(spool.incoming, listen.min_free_space, self._space_changed)
        self._sink = ListenSink(self.folder, spool, ingest, self.space, self._object)
        tls = None
        if listen.tls is not None:
            from forwarder.net.tls import check_private_key_permissions, server_context

            check_private_key_permissions(listen.tls.key)
            tls = server_context(listen.tls.cert, listen.tls.key, listen.tls.ca)
        settings = receiver_settings(listen, self.folder, ae_title)
        self.settings = dataclasses.replace(settings, tls=tls)
        holdings = QueueHoldings(ingest.queue).failure
        self._receiver: Receiver | ListenProcess
        if listen.separate_process and sys.platform == "linux":
            self._receiver = ListenProcess(
                listen,
                ae_title=ae_title,
                incoming=spool.incoming,
                sink=self._sink,
                holdings=holdings,
                reports=reports,
                recover=self._restarting,
                on_space=self.space.check,
                on_object=self._object,
                log_level=log_level,
            )
            # It writes the queue too: stopped inside a transaction, it is killed within seconds.
            self._receiver.queue_locked = ingest.queue.lock_waited
        else:
            self._receiver = Receiver(
                self.settings, sink=self._sink, reports=reports, holdings=holdings
            )

    @property
    def port(self) -> int:
        return self._receiver.port

    @property
    def healthy(self) -> bool:
        """Whether the port is open and its accept thread runs."""
        return self._receiver.healthy

    def recover(self, when: str = "forwarder stopped") -> int:
        """Queue what an earlier run made durable under ``.listen`` but did not queue; remove
        the empty folders finished files left. Returns how many files were queued. ``when``
        says in the log line what had stopped (the receiving process, on its restart)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ForwarderError(f"cannot create {self.folder}: {exc.strerror or exc}") from None
        self._sweep_partials()
        queued = replaced = 0
        # The queue's own list for .listen (read once, at the first file), not ingest's memory:
        # what the receiving process queued itself is not there. A file whose size or mtime is
        # not what was queued is a resend placed over it whose replacement was never committed:
        # queued again, it replaces the old version (the senders refuse to send a changed file).
        in_queue: dict[str, tuple[int, int]] | None = None
        for dirpath, dirnames, filenames in os.walk(self.folder, topdown=False):
            for name in filenames:
                if name.startswith(".") or not name.endswith(".dcm"):
                    continue  # partial files: the receiver's sweep
                path = Path(dirpath, name)
                if in_queue is None:
                    in_queue = self._ingest.queue.active_files(under=str(self.folder))
                try:
                    st = os.lstat(path)
                except OSError:
                    continue  # finished meanwhile
                known = in_queue.get(str(path))
                if known == (st.st_size, st.st_mtime_ns):
                    continue
                if self._recover_file(path):
                    queued += 1
                    replaced += known is not None
            if dirpath != str(self.folder) and not dirnames and not filenames:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only ever empty: rmdir refuses otherwise
        if queued:
            logger.warning(
                "listen: %d received files were durable but not queued when %s; queued now%s",
                queued,
                when,
                f" ({replaced} of them resends that replace the copy queued before)"
                if replaced
                else "",
            )
        return queued

    def _sweep_partials(self) -> None:
        """Delete the partial objects a killed run left (``.receiving.*.part``), whatever their
        age: the daemon holds the queue's lock, so no other writer uses this folder (the
        receiver's own sweep keeps those younger than 10 minutes)."""
        removed = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".receiving.") and entry.name.endswith(".part"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            logger.info("listen: removed %d partial objects a stopped run left", removed)

    def _recover_file(self, path: Path) -> bool:
        rel = path.relative_to(self.folder).parts
        calling_ae = ae_from_folder(rel[0]) if len(rel) > 1 else ""
        want, vrs = self._sink.wanted
        try:
            meta, values = check_file_values(path, want, vrs)
            st = os.lstat(path)
        except (UnreadableFileError, OSError) as exc:
            logger.warning("listen: %s: cannot read it (%s); left where it is", path, exc)
            return False
        except InvalidFileError as exc:
            try:
                target = self._spool.reject(path, f"not usable DICOM: {exc.reason}")
            except SpoolError as err:
                logger.error("listen: %s: not usable DICOM, and %s", path, err)
                return False
            logger.warning("listen: %s: moved to %s: not usable DICOM", path, target)
            return False
        obj = ReceivedObject(
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax=meta.transfer_syntax,
            study_instance_uid=values.get("StudyInstanceUID", ""),
            size=meta.size,
            dataset_offset=meta.dataset_offset,
            values=values,
        )
        origin = Origin(calling_ae, "", "", 0, "")
        entry = received_entry(self._spool, path, st.st_size, st.st_mtime_ns, obj, origin)
        return bool(self._ingest.enqueue_received(entry, values))

    def start(self, cancelled: Callable[[], bool] | None = None) -> bool:
        """Open the port (raises :class:`~forwarder.errors.ForwarderError`); False when
        ``cancelled()`` turned true while the receiving process started (nothing listens)."""
        self.space.check()
        try:
            if isinstance(self._receiver, ListenProcess):
                if not self._receiver.start(cancelled):
                    return False
            else:
                self._receiver.start()
        except ForwarderError as exc:
            if self.config.port < 1024 and "Permission denied" in str(exc):
                raise ForwarderError(
                    f"{exc} (ports below 1024 need CAP_NET_BIND_SERVICE: under the packaged "
                    "systemd unit use a port from 1024 up, e.g. 11112, or see README's listen "
                    "section for the drop-in that grants it)"
                ) from None
            raise
        s = self.settings
        where = "the daemon's process"
        if isinstance(self._receiver, ListenProcess):
            where = f"process {self._receiver.pid}"
        logger.info(
            "listen: Storage SCP %s on %s:%d (TLS %s), received objects are queued from %s; "
            "receiving in %s",
            s.ae_title,
            s.bind,
            self.port,
            "on" if s.tls is not None else "off",
            self.folder,
            where,
        )
        return True

    def stop(self, drain: float) -> None:
        """Stop accepting; open associations have ``drain`` seconds to end, then are aborted."""
        started = time.monotonic()
        still_open = self._receiver.stop_accepting()
        logger.info(
            "listen: no longer accepting associations; %d open, given up to %.0f s to end",
            still_open,
            drain,
        )
        self._receiver.stop(drain)
        logger.info("listen: stopped (%.1f s)", time.monotonic() - started)

    def routes_changed(self) -> None:
        """Called after a reload replaced the router: a receiving process routes with the new
        one from now on (in-process, the sink reads the daemon's at each object)."""
        if isinstance(self._receiver, ListenProcess):
            self._receiver.routes_changed()

    def routes_taken(self, router: Router) -> bool:
        """Whatever this listener queues from now on is routed with ``router`` (in-process:
        by the daemon's Ingest, which says so itself)."""
        if isinstance(self._receiver, ListenProcess):
            return self._receiver.routes_taken(router)
        return True

    def on_routes_taken(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when a receiving process says it routes with new routes."""
        if isinstance(self._receiver, ListenProcess):
            self._receiver.on_routes_taken = callback

    def _space_changed(self, ok: bool, free: int) -> None:
        if self._metrics is not None:
            self._metrics.listen_space(ok, free)

    def _restarting(self) -> None:
        """The receiving process died: count it, and queue what it made durable."""
        if self._metrics is not None:
            self._metrics.listen_restart()
        self.recover("the receiving process died")

    def _object(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.listen_object(outcome)
