"""When a file in the incoming folder is complete: the watcher's settle-thread logic.

A file is *ready* once its size and modification time have been observed identical across the
settle time. A file renamed into place (inotify ``IN_MOVED_TO``, or a move the polling observer
pairs) is ready at the first ``lstat`` after the rename: the rename is its writer saying it is
complete, and a write after it would be seen as a new event (a folder renamed in while a copy
into it goes on breaks that word: don't). A close-after-write shortens the wait to
:data:`CLOSED_SETTLE`, but such a file is never ready before two ``lstat`` calls agree, and any
write seen after the close cancels the shortcut. A file with no close seen (seen written, found
by a scan, polled, or empty) is ready only once no process holds it open for writing (/proc),
however long its writer pauses.

:class:`Settler` holds every candidate, applies the :class:`Hint` s the event handler recorded,
scans folders (without following symlinks), and hands settled files on in batches. It runs on
the watcher's settle thread alone and knows nothing about watchdog or threads: the event side is
:mod:`forwarder.daemon.watch_events`, the threads and the observer :mod:`forwarder.daemon.watcher`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CLOSED_SETTLE = 0.25
"""Stability window after a close-after-write or a rename into place (capped by ``settle``)."""
MIN_WINDOW = 0.05
"""Floor for every stability window, so that ``settle: 0`` cannot spin."""
STALE_WRITER = 60.0
"""Seconds without a close before /proc is asked who still writes a file."""

_IGNORED_SUFFIXES = (".tmp", ".part", ".partial")
_UNOBSERVED = -1


@dataclass(frozen=True, slots=True)
class ReadyFile:
    """A complete file in the incoming folder."""

    path: Path  # absolute
    rel_path: str  # relative to the watched root, '/'-separated
    size: int
    mtime_ns: int


def is_ignored_name(name: str) -> bool:
    """True for names left alone until renamed: dot-files, ``*.tmp``, ``*.part``, ``*.partial``."""
    return name.startswith(".") or name.lower().endswith(_IGNORED_SUFFIXES)


class Hint(enum.Enum):
    """What an event says about a path; the latest hint for a path wins."""

    CHANGED = "changed"  # created, attributes changed: wait the full settle time
    WRITING = "writing"  # written (IN_MODIFY): wait for the close, then settle
    CLOSED = "closed"  # closed after writing: the short window applies
    MOVED_IN = "moved_in"  # renamed into place: complete at the next lstat, no window
    DELETED = "deleted"  # gone (deleted or moved away): forget it
    DIR = "dir"  # a directory appeared: scan it (files may predate its inotify watch)


def then(earlier: Hint | None, later: Hint) -> Hint:
    """The one hint kept for a path that had ``earlier``, then ``later`` (one read of events,
    or the inbox between two turns of the settle thread): the later, except that an attribute
    change does not erase a close or a rename into place. ``cp -p`` and Python's
    ``shutil.copy`` change the mode (IN_ATTRIB) right after the close; a candidate already
    seen written would otherwise wait for a close that came and went, until
    :data:`STALE_WRITER`. The close's short window still needs two ``lstat`` calls to agree,
    so a change of size or time the attribute change brought is seen."""
    if later is Hint.CHANGED and (earlier is Hint.CLOSED or earlier is Hint.MOVED_IN):
        return earlier
    return later


@dataclass(slots=True)
class _Candidate:
    """A file being watched until it settles (settle-thread state, mutable on purpose)."""

    size: int  # _UNOBSERVED until the next lstat
    mtime_ns: int
    since: float  # monotonic time at which (size, mtime_ns) was first observed
    closed: bool  # a close-after-write / move-in was the latest event
    due: float  # monotonic time of the next lstat; heap entries with another due are stale
    writing: bool = False  # seen written (IN_CREATE/IN_MODIFY) and not closed since
    moved_in: bool = False  # renamed into place and nothing seen since: take at the next lstat
    held_said: bool = False  # "still open for writing" logged (once, after STALE_WRITER)


class Settler:
    """The candidates of one incoming folder, and when each is ready (settle thread only).

    ``on_ready`` is called with batches of settled files, ``is_known`` as
    :class:`~forwarder.daemon.watcher.Watcher` documents; ``stopping`` (the watcher's) cuts a
    scan or a hand-on short. ``real_root`` is the resolved folder, set by the watcher at start.
    """

    def __init__(
        self,
        root: str,
        on_ready: Callable[[list[ReadyFile]], None],
        *,
        settle: float,
        polling: bool,
        is_known: Callable[[str], bool] | None,
        batch_max: int,
        stopping: threading.Event,
    ) -> None:
        self._prefix = os.path.join(root, "")
        self.real_root = root
        self._on_ready = on_ready
        self._is_known = is_known
        self._polling = polling
        self._settle = max(settle, MIN_WINDOW)
        self._fast = max(min(settle, CLOSED_SETTLE), MIN_WINDOW)
        self._batch_max = batch_max
        self._stopping = stopping

        self._pending: dict[str, _Candidate] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._emitted: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) handed on
        self._warned_links: set[str] = set()
        # When work last moved on (a folder listed, a batch handed on): a long scan or a long
        # backlog is not a stuck one (Watcher.stuck_for).
        self.progressed = 0.0

    def next_due(self) -> float | None:
        """The monotonic time of the earliest scheduled look, if any."""
        return self._heap[0][0] if self._heap else None

    def apply(self, inbox: dict[str, Hint], now: float) -> None:
        for path, hint in inbox.items():
            if hint is Hint.DELETED:
                self._pending.pop(path, None)
                self._emitted.pop(path, None)
                continue
            if self._rel(path) is None:
                continue
            if hint is Hint.DIR and self.scan(path, now, full=False):
                continue
            # A file, or a "directory" that is a file now (the polling diff pairs paths by
            # inode, and inodes get reused): make it a candidate.
            closed = hint is Hint.CLOSED or hint is Hint.MOVED_IN
            cand = self._pending.get(path)
            if cand is None:
                cand = _Candidate(_UNOBSERVED, _UNOBSERVED, now, closed, now)
                cand.writing = hint is Hint.WRITING and not self._polling
                cand.moved_in = hint is Hint.MOVED_IN
                self._pending[path] = cand
                self._schedule(path, cand, now)
                continue
            cand.size = _UNOBSERVED  # written after the last lstat: observe afresh
            cand.closed = closed
            cand.moved_in = hint is Hint.MOVED_IN
            if closed:
                cand.writing = False
            elif hint is Hint.WRITING and not self._polling:
                cand.writing = True
            if closed and cand.due > now:
                self._schedule(path, cand, now)

    def scan(self, top: str, now: float, *, full: bool) -> bool:
        """Walk ``top`` without following symlinks; a full scan also forgets vanished files.

        Returns False when ``top`` is not a directory (nothing was scanned).
        """
        seen: set[str] = set()
        links: set[str] = set()
        complete = True
        if not full:
            try:
                if not stat.S_ISDIR(os.lstat(top).st_mode):
                    return False
            except OSError:
                return False
        stack = [top]
        while stack:
            if self._stopping.is_set():
                return True
            folder = stack.pop()
            self.progressed = time.monotonic()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if is_ignored_name(entry.name):
                            continue
                        try:
                            if entry.is_symlink():
                                links.add(entry.path)
                                self._warn_link(entry.path)
                            elif entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                st = entry.stat(follow_symlinks=False)
                                seen.add(entry.path)
                                self._consider(entry.path, st.st_size, st.st_mtime_ns, now)
                        except FileNotFoundError:
                            continue  # vanished between listing and stat
            except OSError as exc:
                complete = False
                logger.warning("cannot list %s: %s", folder, exc)
        if full and complete:
            for path in [p for p in self._emitted if p not in seen]:
                del self._emitted[path]
            self._warned_links &= links
        return True

    def _consider(self, path: str, size: int, mtime_ns: int, now: float) -> None:
        """A scan found a regular file: make it a candidate unless it is already handled."""
        if path in self._pending:
            return
        stamp = self._emitted.get(path)
        if stamp == (size, mtime_ns):
            if self._is_known is None or self._is_known(path):
                return
            logger.info("%s was handed on but is not queued: offering it again", path)
            del self._emitted[path]
        elif stamp is None and self._is_known is not None and self._is_known(path):
            self._emitted[path] = (size, mtime_ns)
            return
        # The mtime is evidence too: a file last modified longer ago than the settle window has
        # already been unchanged that long (a writer moves mtime forward; cp -p sets an old
        # mtime only after the data is written). It still needs a confirming lstat below.
        settled = time.time() - mtime_ns / 1e9 >= self._settle
        since = now - self._settle if settled else now
        cand = _Candidate(size, mtime_ns, since, False, now)
        self._pending[path] = cand
        self._schedule(path, cand, now if settled else now + self._settle)

    def check_due(self, now: float) -> None:
        due: list[tuple[str, _Candidate]] = []
        while self._heap and self._heap[0][0] <= now:
            when, _, path = heapq.heappop(self._heap)
            cand = self._pending.get(path)
            if cand is not None and cand.due == when:
                due.append((path, cand))
        ready: list[ReadyFile] = []
        # Candidates to take unless /proc shows a writer: (path, candidate, inode, stamp).
        unsure: list[tuple[str, _Candidate, tuple[int, int], tuple[int, int]]] = []
        for path, cand in due:
            try:
                st = os.lstat(path)
            except OSError:
                del self._pending[path]  # gone; a rescan finds it again if it comes back
                continue
            if not stat.S_ISREG(st.st_mode):
                del self._pending[path]
                if stat.S_ISLNK(st.st_mode):
                    self._warn_link(path)
                elif stat.S_ISDIR(st.st_mode):  # a file event for what is a folder now
                    self.scan(path, now, full=False)
                continue
            size, mtime_ns = st.st_size, st.st_mtime_ns
            if cand.moved_in:
                # Renamed into place, and no event since: complete now (zero-wait hand-off).
                # The rename is its writer's word (the contract's "renamed into place"): no
                # /proc walk on this path, which every object storescp or a scanner renames in
                # takes, its latency and the watch-and-ingest process's CPU.
                self._take(path, size, mtime_ns, ready)
            elif size != cand.size or mtime_ns != cand.mtime_ns:
                if cand.size != _UNOBSERVED:
                    cand.closed = False  # changed after the close: the writer is back
                cand.size, cand.mtime_ns, cand.since = size, mtime_ns, now
                self._schedule(path, cand, now + self._window(cand))
            elif cand.writing and not self._writer_gone(path, cand, now):
                # Open for writing: the contract wants "closed after writing", however long a
                # slow copy pauses. Look again soon.
                self._schedule(path, cand, now + min(self._window(cand), 1.0))
            elif now >= cand.since + self._window(cand):
                if not cand.closed:
                    # Unchanged, but no close seen (found by a scan, polled, created only, or
                    # empty): a writer may hold it open and pause longer than the window (a
                    # stalled network copy, a writer yet to write its first byte). Asked
                    # below, with one look at /proc for all.
                    unsure.append((path, cand, (st.st_dev, st.st_ino), (size, mtime_ns)))
                    continue
                self._take(path, size, mtime_ns, ready)
            else:
                self._schedule(path, cand, cand.since + self._window(cand))
        if unsure:
            # Taken now, a file its writer has yet to finish would go to failed/ as truncated
            # (or empty) while the writer goes on writing into it there.
            writers = _writers_of({inode for _, _, inode, _ in unsure})
            for path, cand, inode, (size, mtime_ns) in unsure:
                if inode not in writers:
                    if _stamp(path) == (size, mtime_ns):
                        self._take(path, size, mtime_ns, ready)
                    else:
                        # Written (and closed) during the walk, or gone: look again now.
                        cand.size, cand.closed = _UNOBSERVED, False
                        self._schedule(path, cand, now)
                    continue
                if now - cand.since >= STALE_WRITER and not cand.held_said:
                    cand.held_said = True  # a stall, or a process that never closes it
                    logger.info(
                        "%s: unchanged for %.0fs but still open for writing: taken once its "
                        "writer closes it",
                        path,
                        now - cand.since,
                    )
                self._schedule(path, cand, now + min(self._window(cand), 1.0))
        if ready:
            self._emit(ready)

    def _take(self, path: str, size: int, mtime_ns: int, ready: list[ReadyFile]) -> None:
        """A candidate has settled: stop watching it, and hand it on unless it already was."""
        del self._pending[path]
        rel = self._rel(path)
        if rel is not None and self._emitted.get(path) != (size, mtime_ns):
            ready.append(ReadyFile(Path(path), rel, size, mtime_ns))

    def _emit(self, ready: list[ReadyFile]) -> None:
        parents: dict[str, bool] = {}
        files = [f for f in ready if self._parent_is_real(f, parents)]
        for start in range(0, len(files), self._batch_max):
            if self._stopping.is_set():
                return  # not marked as handed on: found again at the next start
            batch = files[start : start + self._batch_max]
            self.progressed = time.monotonic()
            try:
                self._on_ready(batch)
            except Exception:
                logger.exception(
                    "on_ready failed for %d file(s); the next rescan offers them again", len(batch)
                )
                continue
            for f in batch:
                self._emitted[str(f.path)] = (f.size, f.mtime_ns)
            logger.debug("handed on %d file(s)", len(batch))

    # -- helpers ---------------------------------------------------------------------------

    def _writer_gone(self, path: str, cand: _Candidate, now: float) -> bool:
        """A write was seen and no close since. After a long quiet spell, ask /proc whether
        anyone still holds the file open for writing (a hard link, for one, is created without
        an open/close pair, so its close never comes)."""
        if now - cand.since < max(STALE_WRITER, self._settle * 10):
            return False
        if _open_for_writing(path):
            return False
        logger.info("%s: no close seen, but nobody has it open for writing: taking it", path)
        cand.writing = False
        return True

    def _window(self, cand: _Candidate) -> float:
        return self._fast if cand.closed else self._settle

    def _schedule(self, path: str, cand: _Candidate, when: float) -> None:
        cand.due = when
        heapq.heappush(self._heap, (when, next(self._seq), path))

    def _rel(self, path: str) -> str | None:
        """The '/'-separated path below root, or None when outside it or in an ignored name."""
        if not path.startswith(self._prefix):
            return None
        rel = path[len(self._prefix) :]
        if not rel or any(is_ignored_name(part) for part in rel.split(os.sep)):
            return None
        return rel if os.sep == "/" else rel.replace(os.sep, "/")

    def _parent_is_real(self, f: ReadyFile, cache: dict[str, bool]) -> bool:
        """False when a folder on the way was swapped for a symlink after the event."""
        if "/" not in f.rel_path:
            return True
        parent = os.path.dirname(str(f.path))
        if parent not in cache:
            expected = os.path.join(self.real_root, os.path.dirname(f.rel_path))
            cache[parent] = os.path.realpath(parent) == expected
            if not cache[parent]:
                logger.warning("%s leads through a symbolic link: not followed", parent)
        return cache[parent]

    def _warn_link(self, path: str) -> None:
        if path not in self._warned_links:
            self._warned_links.add(path)
            logger.warning(
                "%s is a symbolic link: not followed (it may point outside incoming)", path
            )


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of ``path`` now, None when it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _open_for_writing(path: str) -> bool:
    """True if a process visible in /proc has ``path`` open for writing."""
    try:
        target = os.stat(path)
    except OSError:
        return False
    return bool(_writers_of({(target.st_dev, target.st_ino)}, first=True))


def _writers_of(inodes: set[tuple[int, int]], *, first: bool = False) -> set[tuple[int, int]]:
    """Those of ``inodes`` (st_dev, st_ino) that a process visible in /proc has open for
    writing: one walk of /proc for all of them (stops at the first hit with ``first``)."""
    found: set[tuple[int, int]] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                key = (st.st_dev, st.st_ino)
                if key not in inodes or key in found:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("flags:"):
                            if int(line.split()[1], 8) & (os.O_WRONLY | os.O_RDWR):
                                found.add(key)
                                if first:
                                    return found
                            break
            except (OSError, ValueError):
                continue
    return found
