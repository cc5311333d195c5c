"""What the daemon's listener does with each checked object before it answers Success.

The SCP engine (:mod:`forwarder.net.scp_object`) hands over a file it has written, checked
end to end and fsynced. :class:`ListenSink` then, on the association's thread:

1. refuses it with 0xA700 (out of resources) while the free space on the incoming filesystem is
   below ``listen.min_free_space`` (:class:`SpaceWatch`: one log line when that changes, not one
   per object; the state is a metric and ``forwarder status`` shows it);
2. renames it to ``incoming/.listen/<CALLING_AE>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` and
   fsyncs the folders (:func:`forwarder.net.placement.place`): from here a crash loses nothing,
   and the calling AE title is kept in the path. ``.listen`` is a dot-folder: the watcher never
   takes anything from it;
3. routes it on the values the engine's one walk collected and its calling AE title, and queues
   it with its origin in one commit (:meth:`forwarder.daemon.ingest.Ingest.enqueue_received`);
4. only then answers Success: a modality's Success means the gateway holds the object.

A crash between 2 and 3 leaves a durable file the queue does not know: the listener's start
(:meth:`forwarder.daemon.listener.Listener.recover`) queues it, the calling AE title read back
from its folder name. The file's name under ``done/`` and ``failed/`` is its path without
``.listen/`` (``done/CT01/<study>/<sop>.dcm``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder.crashpoints import crash_point
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool, StrPath
from forwarder.errors import ForwarderError
from forwarder.net.placement import NO_STUDY_FOLDER, place, safe_uid_name
from forwarder.net.scp_object import (
    BASE_WANTED,
    STATUS_OUT_OF_RESOURCES,
    SUCCESS,
    Answer,
    Origin,
    ReceivedObject,
    shown,
    write_error_reason,
)
from forwarder.queue import FileEntry

logger = logging.getLogger(__name__)

LOW_SPACE_COMMENT = "the gateway is low on disk space"
_AE_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def ae_folder(ae_title: str) -> str:
    """A folder name for a calling AE title: letters, digits, ``_`` and ``-`` as they are, any
    other character as ``%XX`` (so never ``.``, ``..``, a dot-name or a ``/``), and
    reversible by :func:`ae_from_folder`. An empty title is ``%20``."""
    text = ae_title.strip() or " "
    return "".join(c if c in _AE_SAFE else f"%{ord(c):02X}" for c in text)


def ae_from_folder(name: str) -> str:
    """The calling AE title a :func:`ae_folder` name stands for."""
    from urllib.parse import unquote

    return unquote(name).strip()


class SpaceWatch:
    """Free space on a filesystem against a watermark; says so once each time it crosses."""

    def __init__(
        self,
        folder: Path,
        minimum: int,
        on_change: Callable[[bool, int], None] = lambda _ok, _free: None,
        *,
        announce: bool = True,
    ) -> None:
        self.folder = folder
        self.minimum = minimum
        self._on_change = on_change
        self._announce = announce  # log the crossings (the receiving process leaves it to us)
        self._lock = threading.Lock()
        self._ok: bool | None = None
        self.free = -1

    @property
    def accepting(self) -> bool:
        """The last measurement was at or above the watermark (True before the first)."""
        return self._ok is not False

    def check(self) -> bool:
        """Measure now; True while the free space is at or above the watermark."""
        try:
            st = os.statvfs(self.folder)
            free = st.f_bavail * st.f_frsize
        except OSError as exc:
            logger.warning("cannot measure the free space of %s: %s", self.folder, exc)
            return self.accepting
        ok = free >= self.minimum
        with self._lock:
            self.free = free
            before, self._ok = self._ok, ok
        if ok != before and self._announce:
            if not ok:
                logger.error(
                    "listen: %s has %d MB free, below min_free_space (%d MB): answering 0x%04X "
                    "(out of resources) to every object until space is freed",
                    self.folder,
                    free // 2**20,
                    self.minimum // 2**20,
                    STATUS_OUT_OF_RESOURCES,
                )
            elif before is not None:
                logger.info(
                    "listen: %s has %d MB free (min_free_space %d MB): accepting objects",
                    self.folder,
                    free // 2**20,
                    self.minimum // 2**20,
                )
        self._on_change(ok, free)
        return ok


class Placement:
    """Steps 1 and 2: the space check and the durable rename under ``incoming/.listen``.

    Runs where the engine runs: on the association's thread, in the daemon or in its receiving
    process (:mod:`forwarder.daemon.listen_process`)."""

    def __init__(
        self,
        root: Path,
        space: SpaceWatch,
        on_object: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self.root = root  # incoming/.listen
        self._root = os.fspath(root)  # as text: the paths of each object are joined from it
        self._space = space
        self._on_object = on_object
        self._lock = threading.Lock()
        self._folders: set[str] = set()  # calling AE folders known to exist (and be durable)

    def place(self, path: str, obj: ReceivedObject, origin: Origin) -> str | Answer:
        """The object's durable path, or the refusal to answer."""
        if not self._space.check():
            self._on_object("refused")
            return Answer(STATUS_OUT_OF_RESOURCES, LOW_SPACE_COMMENT)
        folder = ae_folder(origin.calling_ae)
        study = safe_uid_name(obj.study_instance_uid) if obj.study_instance_uid else NO_STUDY_FOLDER
        name = safe_uid_name(obj.sop_instance_uid) + ".dcm"
        output = os.path.join(self._root, folder)
        final = os.path.join(output, study, name)
        try:
            self._ae_folder(folder)
            place(output, path, study, name)
        except OSError as exc:
            reason = write_error_reason(exc)
            logger.error(
                "listen: cannot store SOP Instance %s from %s at %s: %s (%s); answering 0x%04X",
                shown(obj.sop_instance_uid),
                origin.calling_ae,
                final,
                reason,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            self._on_object("refused")
            return Answer(STATUS_OUT_OF_RESOURCES, f"cannot store: {reason}")
        crash_point("listen-after-place")
        return final

    def _ae_folder(self, folder: str) -> None:
        """Make ``.listen/<folder>`` and fsync ``.listen`` the first time (then it is known)."""
        with self._lock:
            if folder in self._folders:
                return
        try:
            os.mkdir(self.root / folder)
        except FileExistsError:
            pass
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._folders.add(folder)


def merged_wanted(
    source: tuple[dict[int, str], dict[int, str]],
) -> tuple[dict[int, str], dict[int, str]]:
    """What the engine collects for routing: ``source`` (the routes') and :data:`BASE_WANTED`."""
    return {**BASE_WANTED[0], **source[0]}, {**BASE_WANTED[1], **source[1]}


class ListenSink:
    """The :class:`~forwarder.net.scp_object.ObjectSink` of the daemon's listener: steps 1-4
    in the daemon's process. :meth:`queue` is steps 3-4 alone, for an object the receiving
    process placed."""

    def __init__(
        self,
        root: Path,
        spool: Spool,
        ingest: Ingest,
        space: SpaceWatch,
        on_object: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self._spool = spool
        self._ingest = ingest
        self._on_object = on_object
        self.placement = Placement(root, space, on_object)
        self._wanted_from: tuple[dict[int, str], dict[int, str]] | None = None
        self._wanted = BASE_WANTED
        self._local = threading.local()  # per association thread: the tags it collected

    @property
    def spool(self) -> Path:
        return self.placement.root

    @property
    def wanted(self) -> tuple[dict[int, str], dict[int, str]]:
        # Read by the engine on the association's thread as an object's check starts: the
        # routes' tags are remembered for that thread's queue() (a reload may come between).
        _router, want, vrs = self._ingest.routing()
        self._local.collected = want
        return self._merged(want, vrs)

    def routing(self) -> tuple[Router, tuple[dict[int, str], dict[int, str]]]:
        """The router in force and what the engine collects for it, read together (a reload
        replaces both at once)."""
        router, want, vrs = self._ingest.routing()
        return router, self._merged(want, vrs)

    def _merged(
        self, want: dict[int, str], vrs: dict[int, str]
    ) -> tuple[dict[int, str], dict[int, str]]:
        known = self._wanted_from
        # New dicts when a reload changed the routes (the pair itself is new at every call).
        if known is None or want is not known[0] or vrs is not known[1]:
            self._wanted, self._wanted_from = merged_wanted((want, vrs)), (want, vrs)
        return self._wanted

    def accept(self, path: str, obj: ReceivedObject, origin: Origin) -> Answer:
        final = self.placement.place(path, obj, origin)
        if isinstance(final, Answer):
            return final
        return self.queue(final, obj, origin)

    def queue(self, final: StrPath, obj: ReceivedObject, origin: Origin) -> Answer:
        """Route and queue an object placed at ``final``; Success once it is queued."""
        try:
            st = os.lstat(final)
        except OSError as exc:
            logger.error(
                "listen: cannot read back %s from %s: %s; answering 0x%04X",
                final,
                origin.calling_ae,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            self._on_object("refused")
            return Answer(STATUS_OUT_OF_RESOURCES, "cannot store the object")
        entry = received_entry(self._spool, final, st.st_size, st.st_mtime_ns, obj, origin)
        # The tags this thread's engine collected for (None: an object the receiving process
        # placed, read again by ListenProcess when its routes were replaced).
        collected, self._local.collected = getattr(self._local, "collected", None), None
        try:
            destinations = self._ingest.enqueue_received(entry, obj.values, collected)
        except ForwarderError as exc:
            # Durable but not queued: the next start queues it (Listener.recover); the modality
            # is told to send it again meanwhile.
            logger.error(
                "listen: cannot queue %s from %s: %s; answering 0x%04X",
                entry.rel_path,
                origin.calling_ae,
                exc,
                STATUS_OUT_OF_RESOURCES,
            )
            self._on_object("refused")
            return Answer(STATUS_OUT_OF_RESOURCES, "cannot queue the object")
        if destinations is None:
            self._on_object("refused")
            return Answer(STATUS_OUT_OF_RESOURCES, "an earlier copy is being finished; send again")
        crash_point("listen-before-answer")
        self._on_object("stored")
        log_received(entry, origin, destinations)
        return SUCCESS

    @property
    def queue_path(self) -> str:
        """The queue database (the receiving process queues on a connection of its own)."""
        return self._ingest.queue.path

    @property
    def spool_folders(self) -> Spool:
        return self._spool

    def queued_elsewhere(self, count: int = 1) -> None:
        """``count`` objects the receiving process queued itself: counted, the senders woken."""
        self._ingest.received_elsewhere(count)
        for _ in range(count):
            self._on_object("stored")


def log_received(entry: FileEntry, origin: Origin, destinations: Sequence[str]) -> None:
    """The INFO line of an object received and queued (in either process)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        "%s: received %s from %s (%s:%d, association %s), queued for %s",
        entry.rel_path,
        entry.sop_instance_uid,
        origin.calling_ae,
        origin.host,
        origin.port,
        origin.association,
        ", ".join(destinations) or "nothing (discarded, or no route: see above)",
        extra={
            "FILE": entry.path,
            "SOP_INSTANCE_UID": entry.sop_instance_uid,
            "CALLING_AE": origin.calling_ae,
            "PEER": entry.peer,
            "ASSOCIATION": origin.association,
            "OUTCOME": "received",
        },
    )


def received_entry(
    spool: Spool, path: StrPath, size: int, mtime_ns: int, obj: ReceivedObject, origin: Origin
) -> FileEntry:
    """The queue entry of a received object staged at ``path``."""
    values = obj.values
    return FileEntry(
        path=os.fspath(path),
        rel_path=spool.rel_path(path),
        size=size,
        mtime_ns=mtime_ns,
        sop_class_uid=obj.sop_class_uid,
        sop_instance_uid=obj.sop_instance_uid,
        transfer_syntax=obj.transfer_syntax,
        study_instance_uid=values.get("StudyInstanceUID", "").strip(" \x00"),
        series_instance_uid=values.get("SeriesInstanceUID", "").strip(" \x00"),
        accession_number=values.get("AccessionNumber", "").strip(" \x00"),
        calling_ae=origin.calling_ae,
        called_ae=origin.called_ae,
        peer=f"{origin.host}:{origin.port}" if origin.host else "",
        association=origin.association,
        dataset_offset=obj.dataset_offset,
    )
