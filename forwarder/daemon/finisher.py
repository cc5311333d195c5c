"""Finishing files whose jobs are all terminal: the crash-safe two-step move out of incoming.

1. ``queue.begin_finish(id, final_path)`` records where the file goes (durable);
2. ``NAME.error.json`` is written (failed files), the file is moved, folders are fsynced;
3. ``queue.complete_finish(id)``.
A crash between the steps is repaired by :meth:`Finisher.finish` on the rows ``recover()``
returns: a file still in incoming is moved, one already at its final path is just completed.
If the move fails (disk full, permissions), the file stays in incoming, the row stays
FINISHING, and :meth:`Finisher.retry_pending` tries again later: nothing is lost.
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import queue as stdqueue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from forwarder.crashpoints import crash_point
from forwarder.daemon.spool import (
    ERROR_SUFFIX,
    TAKEN_TRIES,
    DestinationResult,
    SourceGoneError,
    Spool,
    SpoolError,
    TargetTakenError,
    drop_written,
)
from forwarder.errors import QueueError
from forwarder.queue import FileState, FileToFinish, Finish, JobStatus, Queue

logger = logging.getLogger(__name__)

_SLICE = 500  # files finished together at most (the queue's to_finish reads 1000 a call)


class FinishSink(Protocol):
    """Where senders and proof of delivery hand finished file ids: a :class:`Finisher`, or
    the daemon's :class:`~forwarder.daemon.finish_relay.ChildFinisher`."""

    def submit(self, file_ids: Sequence[int]) -> None: ...


class Finisher:
    """Thread-safe. Workers hand file ids over with :meth:`submit` and go on sending; the
    finisher thread moves them in batches (two queue transactions and one fsync per folder per
    batch), so disk work overlaps network work. :meth:`finish_ids` does it synchronously."""

    def __init__(
        self, queue: Queue, spool: Spool, on_finished: Callable[[Sequence[str]], None]
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self.last_error: str | None = None
        # A 'finish' problem may be recorded in the queue (by a previous run, too): the first
        # clean finish clears it, so `forwarder status` does not show it after the fix.
        self._reported = True
        # Batches of file ids (a sender's batch is one item: one wake-up, not one a file).
        self._inbox: stdqueue.SimpleQueue[list[int] | None] = stdqueue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._sweep_from = 0  # where retry_pending's next slice of the queue starts

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forwarder-finisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish everything submitted so far, then stop the thread; False when it had not
        ended within ``timeout`` seconds."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._inbox.put(None)
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, file_ids: Sequence[int]) -> None:
        """Queue files for finishing (falls back to finishing now when no thread runs)."""
        if self._thread is None:
            self.finish_ids(file_ids)
            return
        if file_ids:
            self._inbox.put(list(file_ids))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._inbox.get()
            batch: list[int] = []
            if first is None:
                stopping = True
            else:
                batch.extend(first)
            while len(batch) < 500:
                try:
                    item = self._inbox.get_nowait()
                except stdqueue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.extend(item)
            try:
                self.finish_ids(batch)
            except Exception:
                # Rows stay QUEUED/FINISHING; retry_pending() and recover() pick them up.
                logger.exception("finishing %d files failed", len(batch))

    def finish_ids(self, file_ids: Sequence[int]) -> None:
        # In slices: one submitted list may be long (every file a commitment settled), and
        # to_finish reads at most 1000 a call; the rest would wait for the slow sweep.
        for start in range(0, len(file_ids), _SLICE):
            with self._lock:
                self._finish(self.queue.to_finish(file_ids[start : start + _SLICE]))

    def retry_pending(self) -> None:
        """Finish what is terminal but not moved yet (a move that failed, a replaced file's job
        dropped): every FINISHING file, and a slice of the queue (``Queue.sweep_to_finish``),
        so that a call costs the same with 1M files queued as with 100."""
        with self._lock:
            items, self._sweep_from = self.queue.sweep_to_finish(self._sweep_from)
            self._finish(items)

    def sweep_all(self, until: threading.Event | None = None) -> int:
        """:meth:`retry_pending` over the whole queue (one cycle of the sweep): what a previous
        finisher was handed but did not finish (it was killed) is finished now; FINISHING rows
        once, in the first slice. Stops between two slices once ``until`` is set. Returns how
        many files it took."""
        after, found, first = 0, 0, True
        while until is None or not until.is_set():
            with self._lock:
                items, after = self.queue.sweep_to_finish(after, finishing=first)
                self._finish(items)
            found += len(items)
            first = False
            if after == 0:
                break
        return found

    def finish(self, items: Sequence[FileToFinish]) -> None:
        """Finish ``items`` as returned by ``Queue.recover()``."""
        with self._lock:
            self._finish(items)

    def _finish(self, items: Sequence[FileToFinish], *, listed_again: bool = False) -> None:
        if not items:
            return
        targets: dict[int, str] = {}
        taken: set[str] = set()
        begin: list[tuple[int, str]] = []
        for item in items:
            if item.state == FileState.QUEUED or item.final_path is None:
                target = self.spool.free_path(
                    item.rel_path, failed=item.outcome == Finish.FAILED, taken=taken
                )
                begin.append((item.file_id, target))
            else:
                target = item.final_path
            targets[item.file_id] = target
            taken.add(target)
        try:
            self.queue.begin_finish_many(begin)
        except QueueError as exc:
            again = None
            if not listed_again:
                # A file may have left the state it was listed in meanwhile (ingest ended the
                # row of a file rewritten into one not queued, or queued a replaced one
                # afresh): the batch, listed again, goes on without it.
                with contextlib.suppress(QueueError):
                    again = self.queue.to_finish([i.file_id for i in items])
            if again is not None:
                self._finish(again, listed_again=True)
                return
            self.last_error = str(exc)
            logger.error("could not record where %d files go: %s", len(begin), exc)
            return
        completed: list[FileToFinish] = []
        dirs: set[str] = set()
        for item in items:
            try:
                self._move(item, targets[item.file_id], dirs)
                completed.append(item)
            except SpoolError as exc:
                # The file stays in incoming, its row FINISHING: retry_pending() tries again.
                self.last_error = str(exc)
                logger.error("%s: could not finish: %s", item.rel_path, exc)
        self.spool.sync_dirs(dirs)
        self.queue.complete_finish_many([i.file_id for i in completed])
        self.spool.prune_listen_studies(dirs)
        if completed:
            self.on_finished([i.path for i in completed])
        self._report(failed_now=len(completed) < len(items))

    def _report(self, *, failed_now: bool) -> None:
        """Keep the queue's 'finish' problem in step, for ``forwarder status``."""
        try:
            if failed_now and self.last_error is not None:
                self.queue.set_problem("finish", self.last_error)
                self._reported = True
            elif not failed_now and self._reported:
                self.queue.clear_problem("finish")
                self._reported = False
                self.last_error = None
        except QueueError as exc:
            logger.error("cannot record the finishing problem in the queue: %s", exc)

    def _move(self, item: FileToFinish, target: str, dirs: set[str]) -> None:
        failed = item.outcome == Finish.FAILED
        source = item.path
        recorded = item.state != FileState.QUEUED and item.final_path is not None
        if recorded and _another_file(source, target) and _moved_already(source, target, item):
            # Moved already (a crash, or a queue error, kept the row FINISHING): its target
            # was a free name when recorded. What is in incoming under that name now is
            # another file (dropped again): it must not replace the delivered copy. (When the
            # target is not the version queued and the source is, another file took the name
            # recorded meanwhile: the move below takes another name.)
            logger.info("%s: already moved to %s", item.rel_path, target)
            return
        if not _as_queued(source, item):
            # Another file was dropped under this name over the one queued (a resend), which
            # is gone: the new one is not moved in its place (it was never sent). This row is
            # finished as it stands, and the new file is left to be taken as new: the watch
            # folder's rescan takes it; under .listen its sender was answered 'send again'
            # (0xA700), and the listener's start queues it if it never does.
            if not (recorded and os.path.lexists(target)):
                outcome = "delivered" if not failed else "failed: " + _failures(item)
                logger.warning(
                    "%s: replaced by another file before it could be moved (the file queued was "
                    "%s); the new file stays where it is, to be taken as a new one",
                    item.rel_path,
                    outcome,
                )
            return
        reason = ""
        results: list[DestinationResult] = []
        origin = {"calling_ae": item.calling_ae} if item.calling_ae else None
        if failed:
            results = [
                DestinationResult(
                    destination=r.destination,
                    outcome="stored" if r.status == JobStatus.DONE else "failed",
                    status=r.last_status,
                    error=r.last_error,
                    attempts=r.attempts,
                    first_queued=r.created_at,
                    finished=r.finished_at,
                )
                for r in item.results
            ]
            reason = _failures(item)
        for attempt in range(TAKEN_TRIES):
            written: os.stat_result | None = None
            try:
                if failed:
                    # A report at the name recorded, with no file there, is ours from an
                    # attempt a crash cut short (the name was chosen free of reports): it is
                    # written again. Any other is another file's, never replaced.
                    ours = recorded and attempt == 0 and not os.path.lexists(target)
                    written = self.spool.write_report(
                        Path(target), item.rel_path, reason, results, origin, replace=ours
                    )
                if attempt == 0:
                    crash_point("finish-before-move")
                self.spool.move(source, target, sync=False)
            except TargetTakenError as exc:
                # Another file (or its report) was put at the name recorded (never
                # replaced): another name, recorded before the move as the first was.
                if written is not None:  # ours, beside that other file: it goes
                    drop_written(target + ERROR_SUFFIX, written)
                if attempt == TAKEN_TRIES - 1:
                    raise
                target = self._retarget(item, failed, exc)
                continue
            except SourceGoneError:
                if not os.path.lexists(target):
                    logger.error(
                        "%s: neither in incoming nor at %s: removed by someone else?",
                        item.rel_path,
                        target,
                    )
            else:
                dirs.update((os.path.dirname(source), os.path.dirname(target)))
                crash_point("finish-after-move")
            break
        if failed:
            logger.warning("%s: moved to failed/ (%s): %s", item.rel_path, target, reason)
        else:
            logger.debug("%s: moved to done/ (%s)", item.rel_path, target)

    def _retarget(self, item: FileToFinish, failed: bool, taken: TargetTakenError) -> str:
        """A free name for ``item`` in place of one taken, recorded in the queue."""
        target = self.spool.free_path(item.rel_path, failed=failed)
        try:
            self.queue.retarget_finish(item.file_id, target)
        except QueueError as exc:
            raise SpoolError(f"{taken}; and {exc}") from None
        logger.warning("%s: %s; moving it to %s instead", item.rel_path, taken, target)
        return target


def _failures(item: FileToFinish) -> str:
    """Why a file failed: each destination that did not store it, with its last error."""
    return "; ".join(
        f"{r.destination}: {r.last_error or 'failed'}"
        for r in item.results
        if r.status != JobStatus.DONE
    )


def _as_queued(source: str, item: FileToFinish) -> bool:
    """What is at ``source`` is the version queued (size and mtime as recorded), or gone (the
    move says so), or not known (a row queued before the queue recorded them)."""
    if not item.mtime_ns:
        return True
    try:
        st = os.lstat(source)
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)


def _exactly_as_queued(source: str, item: FileToFinish) -> bool:
    """What is at ``source`` (in incoming, or the target) is the version queued, by size and
    mtime (False when either is not known)."""
    if not item.mtime_ns:
        return False
    try:
        st = os.lstat(source)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)


def _moved_already(source: str, target: str, item: FileToFinish) -> bool:
    """Whether the file at ``target`` (another file than the one at ``source``) is the copy
    moved there: it has the queued size and mtime (a rename keeps them), whatever is at
    ``source`` (a file copied with ``cp -p`` can have both too). Only a target that is not
    the version queued, with a source that is, means the name was taken by someone else."""
    return _exactly_as_queued(target, item) or not _exactly_as_queued(source, item)


def _another_file(source: str, target: str) -> bool:
    """Both exist and differ: the target is the delivered copy, the source a file dropped
    again under its name. The same bytes at both are the original still in place (a move
    across filesystems copied it, then could not remove it): the move goes on."""
    if not (os.path.lexists(source) and os.path.lexists(target)):
        return False
    try:
        return not filecmp.cmp(source, target, shallow=False)
    except OSError:
        return False  # unreadable: the move says why
