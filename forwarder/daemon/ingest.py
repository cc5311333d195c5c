"""Ingest: a complete file in incoming -> checked, routed, and queued for each destination.

A file is checked end to end without being decoded (``dicomfile.check_file_values``, the check
``send`` and ``receive`` use too: Part 10 header, every element's length, every undefined length
closed, the data set's own SOP UIDs, which are what is queued and sent), routed on its header
values and sub-folder, and enqueued with one job per destination in one transaction per batch.
The same walk reads the Study and Series Instance UIDs and the Accession Number, which the queue
records for ``forwarder find``.
Files that are not usable DICOM or match no route go to failed/ with ``NAME.error.json``;
files a discard route matches go to done/ with a log line naming the route; nothing is deleted.
Such a file may have replaced one still queued (rewritten or appended to while being sent): the
queue row of that earlier version ends first, in one transaction (``Queue.retire_file``), then
the file is moved, and its report says how far the earlier version got.
Objects the listener received (:mod:`forwarder.daemon.listen_sink`) come in through
:meth:`Ingest.enqueue_received`: already checked by the SCP engine, whose one walk also read the
values routing needs, they are routed (``calling_ae`` too) and queued in one commit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from forwarder.crashpoints import crash_point
from forwarder.daemon.filesync import close_quietly, open_to_sync, start_writeback, sync_open
from forwarder.daemon.router import Router
from forwarder.daemon.routes_in_use import RoutesInUse
from forwarder.daemon.spool import LISTEN_FOLDER, Spool, SpoolError
from forwarder.dicom.check import check_file_values
from forwarder.errors import InvalidFileError, QueueError, UnreadableFileError
from forwarder.queue import FileEntry, Finish, JobStatus, Queue, Retired

logger = logging.getLogger(__name__)

CHUNK = 64  # files checked, synced and queued together
FIRST_CHUNK = 8  # the first chunk of a hand-over: sending starts after 8 fsyncs, not 64

# Keywords whose values identify a patient (or a person) and so never reach logs or error files
# unless log_phi is on. StationName, InstitutionName and the like stay visible.
_PHI_PREFIXES = ("Patient", "OtherPatient", "Issuer")
_PHI_KEYWORDS = frozenset(
    {
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "OperatorsName",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "ResponsiblePerson",
        "MilitaryRank",
        "BranchOfService",
        "MedicalRecordLocator",
        "EthnicGroup",
        "Occupation",
    }
)


# What the queue records for ``forwarder find``, read in the same walk as the routes' values.
_FIND_TAGS = {
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00080050: ("AccessionNumber", "SH"),
}


def header_tags(router: Router) -> tuple[dict[int, str], dict[int, str]]:
    """The header tags ingest reads (for ``find`` and for the routes) and their VRs."""
    want = {tag: keyword for tag, (keyword, _) in _FIND_TAGS.items()}
    vrs = {tag: vr for tag, (_, vr) in _FIND_TAGS.items()}
    if router.keywords:
        # pydicom's data dictionary, only when routes read the header.
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        for keyword in router.keywords:
            tag = tag_for_keyword(keyword)
            if tag is not None:
                want[int(tag)] = keyword
                vrs[int(tag)] = dictionary_VR(tag).split(" or ")[0]
    return want, vrs


def is_phi(keyword: str) -> bool:
    return keyword.startswith(_PHI_PREFIXES) or keyword in _PHI_KEYWORDS


class ReadyLike(Protocol):
    """What the watcher hands over (``watch_settle.ReadyFile``)."""

    @property
    def path(self) -> Path: ...

    @property
    def rel_path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...


class IngestMetrics(Protocol):
    def ingested(self, accepted: bool, reason: str = "") -> None: ...


class Ingest:
    """The watcher's callback. Thread-safe; keeps the set of queued paths for ``is_known``."""

    def __init__(
        self,
        spool: Spool,
        queue: Queue,
        router: Router,
        *,
        on_enqueued: Callable[[], None] = lambda: None,
        metrics: IngestMetrics | None = None,
        log_phi: bool = False,
        known_under: str | None = None,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.on_enqueued = on_enqueued
        self.metrics = metrics
        self.log_phi = log_phi  # debugging only: "no route" reasons then show patient values
        self._lock = threading.Lock()
        # path -> (size, mtime_ns) of every queued file (``known_under``: of those in that
        # folder, the only ones this Ingest is offered): a re-offered path with other values
        # was replaced in incoming.
        self._known_under = known_under
        self._known: dict[str, tuple[int, int]] = queue.active_files(known_under)
        self._unreadable: set[str] = set()  # warned about once each
        self._in_use = RoutesInUse()  # the files being routed, by the routes they were read for
        self.set_router(router)

    def set_router(self, router: Router, then: Callable[[], None] | None = None) -> None:
        """Route with ``router`` from now on. ``then`` is called once no file is being routed
        with an earlier one any more (at once, here, when none is; else on the thread that
        queued the last such file): a batch under way keeps the routes it was read for."""
        want, vrs = header_tags(router)
        with self._lock:
            self._router = router
            self._want = want
            self._vrs = vrs
        self._in_use.advance(then)  # after the swap (see RoutesInUse.begin)

    @property
    def wanted(self) -> tuple[dict[int, str], dict[int, str]]:
        """The tags (tag -> keyword, tag -> VR) routing and ``find`` read from a header."""
        with self._lock:
            return self._want, self._vrs

    def enqueue_received(
        self,
        entry: FileEntry,
        values: Mapping[str, str],
        collected_for: dict[int, str] | None = None,
    ) -> list[str] | None:
        """A file the listener made durable under ``incoming/.listen`` (its data set already
        checked): routed on ``values`` and its calling AE, and queued in one commit. Returns its
        destinations; ``[]`` when it is not sent anywhere (no route matched: failed/; a discard
        route did, or its changes conflict: done/ or failed/ with a log line); None when an earlier
        version at that path is being moved out right now (the sender should send it again).
        ``collected_for``: the tags (:attr:`wanted`'s first) ``values`` were collected for; when
        a reload has replaced them since, the values are read again from the file, so that the
        routes in force look at what they need. Raises :class:`~forwarder.errors.QueueError`
        when the queue cannot take it (InvalidFileError when it cannot be read again)."""
        with self._lock:
            generation = self._in_use.begin()
            router, want, vrs = self._router, self._want, self._vrs
            queued = self._known.get(entry.path)
        try:
            if collected_for is not None and collected_for is not want:
                _meta, fresh = check_file_values(Path(entry.path), want, vrs)
                values = {**values, **fresh}
            return self._enqueue_received(entry, values, router, queued)
        finally:
            self._in_use.end(generation)

    def _enqueue_received(
        self,
        entry: FileEntry,
        values: Mapping[str, str],
        router: Router,
        queued: tuple[int, int] | None,
    ) -> list[str] | None:
        plan = router.plan(values, entry.rel_path, entry.calling_ae or None)
        ready = _Ready(Path(entry.path), entry.rel_path, entry.size, entry.mtime_ns)
        # Not sent anywhere: [], or None when an earlier version queued at that path is being
        # moved out, and the object was left in place.
        if plan.discarded_by:
            return [] if self._discard(ready, plan.discarded_by, entry.sop_instance_uid) else None
        destinations = plan.ranked()  # name -> priority rank
        for name in destinations:
            conflict = router.conflict(plan, name) if router.may_edit(name) else None
            if conflict is not None:
                extra = {"sop_instance_uid": entry.sop_instance_uid, "calling_ae": entry.calling_ae}
                reason = f"conflicting changes: {conflict}"
                return [] if self._reject(ready, reason, "conflict", extra=extra) else None
        if not destinations:
            extra = {"sop_instance_uid": entry.sop_instance_uid, "calling_ae": entry.calling_ae}
            reason = _no_route(values, router, self.log_phi, entry.calling_ae)
            return [] if self._reject(ready, reason, "no_route", extra=extra) else None
        crash_point("listen-before-commit")
        if queued is None and self.queue.enqueue_many([(entry, destinations)])[0] is not None:
            with self._lock:
                self._known[entry.path] = (entry.size, entry.mtime_ns)
            if self.metrics is not None:
                self.metrics.ingested(True)
            self.on_enqueued()
            return list(destinations)
        # A resend of an object still queued: the new version replaces it.
        if self.queue.replace_file(entry, destinations) is None:
            return None
        with self._lock:
            self._known[entry.path] = (entry.size, entry.mtime_ns)
        self.on_enqueued()
        return list(destinations)

    def received_elsewhere(self, count: int = 1) -> None:
        """``count`` files the listener's receiving process queued on its own connection:
        counted, and the senders woken (``_known`` is for the watch folder, which never sees
        them)."""
        if self.metrics is not None:
            for _ in range(count):
                self.metrics.ingested(True)
        self.on_enqueued()

    def routing(self) -> tuple[Router, dict[int, str], dict[int, str]]:
        """The router in force and the header tags (and their VRs) it reads."""
        with self._lock:
            return self._router, self._want, self._vrs

    def is_known(self, path: str) -> bool:
        """True while ``path`` is queued (the watcher then does not hand it over again)."""
        with self._lock:
            return path in self._known

    @property
    def known_count(self) -> int:
        """How many paths are queued (not finished yet) as far as this Ingest knows."""
        with self._lock:
            return len(self._known)

    def forget(self, paths: Sequence[str]) -> None:
        """Called when files left incoming (finished)."""
        with self._lock:
            for path in paths:
                self._known.pop(path, None)

    def relearn(self) -> None:
        """Drop the known paths the queue no longer holds unfinished: their forgets were lost
        (the process that finished them died before saying so). Paths learnt meanwhile stay."""
        with self._lock:
            before = dict(self._known)
        active = self.queue.active_files(self._known_under)
        with self._lock:
            for path, seen in before.items():
                if path not in active and self._known.get(path) == seen:
                    del self._known[path]

    def __call__(self, files: Sequence[ReadyLike]) -> None:
        with self._lock:
            generation = self._in_use.begin()
            router, want, vrs = self._router, self._want, self._vrs
        try:
            self._chunks(files, router, want, vrs)
        finally:
            self._in_use.end(generation)

    def _chunks(
        self,
        files: Sequence[ReadyLike],
        router: Router,
        want: dict[int, str],
        vrs: dict[int, str],
    ) -> None:
        # In chunks, so that the first files are queued (and sent) while later ones are read.
        # The chunks grow from FIRST_CHUNK to CHUNK: a backlog's first files reach the senders
        # after a few fsyncs (a 64-file chunk of CT images is 32 MB of writeback), and the
        # later, larger chunks keep the queue's transactions few.
        start, size = 0, FIRST_CHUNK
        while start < len(files):
            self._ingest(files[start : start + size], router, want, vrs)
            start, size = start + size, min(CHUNK, size * 2)

    def _ingest(
        self,
        files: Sequence[ReadyLike],
        router: Router,
        want: dict[int, str],
        vrs: dict[int, str],
    ) -> None:
        checked: list[tuple[FileEntry, dict[str, int]]] = []
        replaced: set[str] = set()
        fds: list[tuple[str, int]] = []  # checked files, still open to be fsynced
        try:
            for ready in files:
                path = str(ready.path)
                with self._lock:
                    queued = self._known.get(path)
                if queued == (ready.size, ready.mtime_ns):
                    continue
                routed = self._check(ready, router, want, vrs)
                if routed is None:
                    continue
                fds.append((path, routed.fd))
                start_writeback(routed.fd)
                checked.append((routed.entry, routed.destinations))
                if queued is not None:
                    replaced.add(path)
            # The queue takes responsibility for these files: their data must be on disk
            # first. Each is fsynced through the descriptor its check read it by.
            unsynced = sync_open(fds)
        finally:
            for _, fd in fds:
                close_quietly(fd)
        batch: list[tuple[FileEntry, dict[str, int]]] = []
        for file, destinations in checked:
            error = unsynced.get(file.path)
            if error is not None:
                logger.warning("%s: cannot fsync (%s); will try again", file.path, error)
            elif file.path in replaced:
                self._replaced(file, destinations)
            else:
                batch.append((file, destinations))
        if not batch:
            return
        crash_point("ingest-before-commit")
        # Known before the commit: a sender may take a file, and the finisher move it out and
        # forget it, as soon as it is committed (in the watch-and-ingest process, the forget
        # comes from the daemon): known after that, it would stay known for good.
        with self._lock:
            self._known.update((e.path, (e.size, e.mtime_ns)) for e, _ in batch)
        try:
            ids = self.queue.enqueue_many(batch)
        except BaseException:
            with self._lock:  # none of them was known before (replacements go elsewhere)
                for e, _ in batch:
                    self._known.pop(e.path, None)
            raise
        for (entry, destinations), file_id in zip(batch, ids, strict=True):
            if file_id is None:
                # Queued already, by another process (`forwarder retry` queues a failed file
                # before moving it back): as it lies here, or its row is refreshed from this
                # check, else every sender would wait for a change never registered.
                self._replaced(entry, destinations, changed_only=True)
        added = sum(1 for i in ids if i is not None)
        if self.metrics is not None:
            for _ in range(added):
                self.metrics.ingested(True)
        logger.debug("queued %d files (%d already queued)", added, len(ids) - added)
        self.on_enqueued()

    def _replaced(
        self, entry: FileEntry, destinations: dict[str, int], *, changed_only: bool = False
    ) -> None:
        """A queued file was replaced by another object: it is routed afresh, and every
        destination of the new routing gets the new version (``changed_only``: unless its row
        already has this size and mtime)."""
        replaced = self.queue.replace_file(entry, destinations, changed_only=changed_only)
        if replaced is None:
            return  # already being moved out: the watcher offers it again if it stays
        with self._lock:
            self._known[entry.path] = (entry.size, entry.mtime_ns)
        extra = {"FILE": entry.path, "SOP_INSTANCE_UID": entry.sop_instance_uid}
        logger.warning(
            "%s: replaced while queued; sending the new version (%s) to %s",
            entry.rel_path,
            entry.sop_instance_uid,
            ", ".join(replaced.destinations),
            extra=extra,
        )
        if replaced.dropped:
            logger.warning(
                "%s: the new version is not routed to %s: nothing more is sent there (a send "
                "already under way there completes)",
                entry.rel_path,
                ", ".join(replaced.dropped),
                extra=extra,
            )
        self.on_enqueued()

    def _check(
        self, ready: ReadyLike, router: Router, want: dict[int, str], vrs: dict[int, str]
    ) -> _Checked | None:
        """Check and route one file; on success with a descriptor open on it (the caller
        fsyncs and closes it: the same one the check read through)."""
        path = str(ready.path)
        if not _utf8(path):
            # The queue records names as text: such a file could never be queued, and it made
            # the whole chunk it came in fail, again at every rescan.
            reason = "its name is not valid UTF-8; rename it and move it into incoming again"
            self._reject(ready, reason, "bad_name")
            return None
        try:
            fd = open_to_sync(path)
        except InvalidFileError as exc:
            self._unusable(ready, exc)
            return None
        routed = None
        try:
            routed = self._route(ready, fd, router, want, vrs)
        finally:
            if routed is None:
                close_quietly(fd)
        return None if routed is None else _Checked(routed[0], routed[1], fd)

    def _unusable(self, ready: ReadyLike, exc: InvalidFileError) -> None:
        path = str(ready.path)
        if isinstance(exc, UnreadableFileError):
            # Nothing is known about it: leave it where it is; the watcher's rescan offers it
            # again, and it is taken once it can be read.
            if path not in self._unreadable:
                self._unreadable.add(path)
                logger.warning("%s: %s; left in incoming until it can be read", path, exc.reason)
        elif not os.path.lexists(path):
            logger.info("%s: gone from incoming before it was read", path)
        else:
            self._reject(ready, f"not usable DICOM: {exc.reason}", "not_dicom")

    def _route(
        self,
        ready: ReadyLike,
        fd: int,
        router: Router,
        want: dict[int, str],
        vrs: dict[int, str],
    ) -> tuple[FileEntry, dict[str, int]] | None:
        """The check of the file open at ``fd``, then its routing."""
        path = str(ready.path)
        try:
            meta, values = check_file_values(path, want, vrs, fd=fd)
        except InvalidFileError as exc:
            self._unusable(ready, exc)
            return None
        self._unreadable.discard(path)
        if meta.size != ready.size:
            # It changed since the watcher saw it settle; the watcher will offer it again.
            logger.debug("%s: changed while being read; waiting for it to settle", path)
            return None
        plan = router.plan(values, ready.rel_path)
        if plan.discarded_by:
            self._discard(ready, plan.discarded_by, meta.sop_instance_uid)
            return None
        destinations = plan.ranked()  # name -> priority rank
        for name in destinations:
            conflict = router.conflict(plan, name) if router.may_edit(name) else None
            if conflict is not None:
                reason = f"conflicting changes: {conflict}"
                extra = {"sop_instance_uid": meta.sop_instance_uid}
                self._reject(ready, reason, "conflict", extra=extra)
                return None
        if not destinations:
            reason = _no_route(values, router, self.log_phi)
            self._reject(
                ready, reason, "no_route", extra={"sop_instance_uid": meta.sop_instance_uid}
            )
            return None
        entry = FileEntry(
            path=path,
            rel_path=ready.rel_path,
            size=meta.size,
            mtime_ns=ready.mtime_ns,
            sop_class_uid=meta.sop_class_uid,  # the data set's own, checked
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax=meta.transfer_syntax,
            study_instance_uid=_value(values, "StudyInstanceUID"),
            series_instance_uid=_value(values, "SeriesInstanceUID"),
            accession_number=_value(values, "AccessionNumber"),
            dataset_offset=meta.dataset_offset,
        )
        return entry, destinations

    def _discard(self, ready: ReadyLike, routes: Sequence[str], sop_instance_uid: str) -> bool:
        """A discard route matched: straight to done/, nothing sent, one log line naming the
        route(s). False when it was left in place (see :meth:`_unqueue`)."""
        unqueued = self._unqueue(ready, Finish.DONE)
        if unqueued is None:
            return False
        note = "" if unqueued.retired is None else f"; {unqueued.note}"
        try:
            target = self.spool.discard(Path(ready.path), unqueued.target)
        except SpoolError as exc:
            logger.error("%s: discarded by route %s; and %s", ready.path, ", ".join(routes), exc)
            return True
        self._record_moved(unqueued, target)
        if self.metrics is not None:
            self.metrics.ingested(False, "discarded")
        logger.info(
            "%s: discarded by route %s (%s): moved to %s, nothing sent%s",
            ready.rel_path,
            ", ".join(routes),
            sop_instance_uid,
            target,
            note,
            extra={"FILE": str(ready.path), "OUTCOME": "discarded", "ROUTE": ",".join(routes)},
        )
        return True

    def _unqueue(self, ready: ReadyLike, outcome: Finish) -> _Unqueued | None:
        """Before a file goes to done/ or failed/ unqueued: when an earlier version at its path
        is queued (the file was rewritten or appended to meanwhile, while being sent maybe),
        that row ends first, recorded at the path the file is moved to next, so that nothing
        looks for the file in incoming again (the finisher said "removed by someone else?").
        None when that row is being moved out right now: the file stays where it is, and the
        watcher offers it again once the finisher is done with the row (and forgets it)."""
        path = str(ready.path)
        with self._lock:
            known = path in self._known
        # Not known here may still be queued: by the listener's receiving process on its own
        # connection (most received objects), or by `forwarder retry` before its move (a
        # name that is not UTF-8 never is).
        if not known and (not _utf8(path) or not self.queue.unfinished(path)):
            return _Unqueued(None, None, "")
        failed = outcome is Finish.FAILED
        target = self.spool.target(self.spool.rel_path(Path(path)), failed=failed)
        retired = self.queue.retire_file(path, str(target), outcome)
        if retired is None and self.queue.moving_out(path):
            logger.info(
                "%s: changed while its earlier version is being moved out; taken after that",
                ready.rel_path,
            )
            return None
        with self._lock:  # retired, or finished already (its forget is on its way)
            self._known.pop(path, None)
        if retired is None:
            return _Unqueued(None, None, "")
        crash_point("retire-before-move")
        listen = self.spool.incoming / LISTEN_FOLDER
        how = "received again" if Path(path).is_relative_to(listen) else "rewritten"
        return _Unqueued(target, retired, how)

    def _record_moved(self, unqueued: _Unqueued, target: Path) -> None:
        """The row retired went to ``target``, not the name recorded (taken before the move):
        recorded, so that ``find`` names this file and not the other one."""
        if unqueued.retired is None or unqueued.target is None or target == unqueued.target:
            return
        try:
            self.queue.retarget_retired(unqueued.retired.file_id, str(target))
        except QueueError as exc:
            logger.error(
                "moved to %s, not %s (taken); the queue still names the latter: %s",
                target,
                unqueued.target,
                exc,
            )

    def _reject(
        self, ready: ReadyLike, reason: str, kind: str, extra: dict[str, str] | None = None
    ) -> bool:
        """Not queued: to failed/ with ``NAME.error.json`` saying ``reason``. False when it was
        left in place (see :meth:`_unqueue`)."""
        unqueued = self._unqueue(ready, Finish.FAILED)
        if unqueued is None:
            return False
        report: dict[str, object] = dict(extra or {})
        if unqueued.retired is not None:
            reason = f"{reason}; {unqueued.note}"
            report["queued_before"] = _queued_report(unqueued.retired)
        try:
            target = self.spool.reject(Path(ready.path), reason, report, unqueued.target)
        except SpoolError as exc:
            logger.error("%s: %s; and %s", ready.path, reason, exc)
            return True
        self._record_moved(unqueued, target)
        if self.metrics is not None:
            self.metrics.ingested(False, kind)
        logger.warning(
            "%s: moved to %s: %s",
            ready.rel_path,
            target,
            reason,
            extra={"FILE": str(ready.path), "OUTCOME": "rejected"},
        )
        return True


@dataclass(frozen=True, slots=True)
class _Checked:
    """A file checked and routed, with the descriptor it was read through (to fsync, then
    close)."""

    entry: FileEntry
    destinations: dict[str, int]
    fd: int


class _Unqueued(NamedTuple):
    """A file about to go to done/ or failed/ unqueued, as :meth:`Ingest._unqueue` left it:
    when an earlier version was queued at its path, the path the file goes to (recorded in
    that row), what the row held and how the file came to replace it; else Nones."""

    target: Path | None
    retired: Retired | None
    how: str  # "rewritten" (the watch folder) or "received again" (the listener)

    @property
    def note(self) -> str:
        """How far the version queued before got, for the log line and ``NAME.error.json``."""
        if self.retired is None:
            return ""
        parts = []
        for r in self.retired.results:
            if r.status is JobStatus.DONE:
                parts.append(f"stored by {r.destination}")
            elif r.status is JobStatus.CLAIMED:
                parts.append(f"being sent to {r.destination}")
            else:
                error = f" ({r.last_error})" if r.last_error else ""
                parts.append(f"not stored by {r.destination}{error}")
        return (
            f"{self.how} while queued: the version queued before (SOP Instance UID "
            f"{self.retired.sop_instance_uid}) was {', '.join(parts)}; it is not sent again"
        )


_RESULT_WORDS = {
    JobStatus.DONE: "stored",
    JobStatus.CLAIMED: "being sent",
    JobStatus.READY: "not stored",
    JobStatus.FAILED: "not stored",
}


def _queued_report(retired: Retired) -> dict[str, object]:
    """The same for a script reading ``NAME.error.json``."""
    return {
        "sop_instance_uid": retired.sop_instance_uid,
        "destinations": {r.destination: _RESULT_WORDS[r.status] for r in retired.results},
    }


class _Ready(NamedTuple):
    path: Path
    rel_path: str
    size: int
    mtime_ns: int


def _utf8(path: str) -> bool:
    """Whether ``path`` is valid UTF-8 (a name that is not decodes with lone surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_route(
    values: Mapping[str, str], router: Router, log_phi: bool, calling_ae: str = ""
) -> str:
    """Why a file goes to failed/ unrouted, with the values the routes read (no PHI)."""
    shown = {k: v for k, v in values.items() if k in router.keywords and (log_phi or not is_phi(k))}
    if calling_ae:
        shown["calling_ae"] = calling_ae
    detail = ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items()))
    return "no route: no route matches this file" + (f" ({detail})" if detail else "")


def _value(values: Mapping[str, str], keyword: str) -> str:
    """A recorded value without its padding ("" when the file has none)."""
    return values.get(keyword, "").strip(" \x00")
