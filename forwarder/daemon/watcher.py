"""Find complete files in the incoming folder and hand them on in batches.

A file written in place is *ready* once its size and modification time have been observed
identical across the settle time (``settle``); a close-after-write (inotify ``IN_CLOSE_WRITE``)
shortens that wait to :data:`CLOSED_SETTLE`, and any write seen after the close cancels the
shortcut. A file renamed into place (``IN_MOVED_TO``: the usual way scanners, storescp
``--fork``-style receivers and ``forwarder receive`` deliver) is ready at once, at the first
``lstat`` after the rename, with no settle wait. A file with no close seen (found by a scan,
polled) is ready only once no process holds it open for writing (/proc). The rules live in
:mod:`forwarder.daemon.watch_settle`.

Candidates come from three sources, so that no file can be stranded:

- the initial full scan at start (files left in ``incoming`` while the daemon was stopped);
- events: inotify, or watchdog's polling observer for network filesystems (``watch.polling``);
- a periodic full rescan (``watch.rescan_interval``), which also offers again a file that is still
  present but that ``is_known`` says the daemon does not hold (a lost event or a lost row).

Names starting with ``.`` or ending in ``.tmp``, ``.part`` or ``.partial`` (any path component,
so ``.staging/x.dcm`` too) are left alone until renamed. Symbolic links are never followed.

Threads: on Linux (without ``watch.polling``) one inotify reader thread
(:mod:`forwarder.daemon.watch_inotify`) records which paths changed, and never watches an ignored
folder such as the listener's ``.listen``; elsewhere, or polling, watchdog's observer (plus its
emitter threads) does. One settle thread owns every other piece of state, stats candidates,
scans, and calls ``on_ready`` and ``is_known``. Both callbacks therefore run on that one thread.

This module owns those threads and their lifecycle. When a file is complete (the candidates,
scans, /proc) is :mod:`forwarder.daemon.watch_settle`; the watchdog event handler and observer
making are :mod:`forwarder.daemon.watch_events`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.api import BaseObserver

from forwarder.daemon import watch_inotify
from forwarder.daemon.watch_events import EVENTS, EventHandler, halt, make_observer
from forwarder.daemon.watch_inotify import InotifyReader
from forwarder.daemon.watch_settle import (
    MIN_WINDOW,
    Hint,
    ReadyFile,
    Settler,
    is_ignored_name,
    then,
)
from forwarder.errors import ForwarderError

logger = logging.getLogger(__name__)

TICK = 0.25
"""Longest sleep of the settle thread between two looks at its work (seconds)."""


class Watcher:
    """Watch ``root`` recursively and call ``on_ready`` with batches of complete files.

    ``is_known(abs_path)`` lets the daemon skip files it already holds; without it, a file is
    offered once per (size, mtime) for as long as it stays in the folder. ``on_ready`` and
    ``is_known`` run on the settle thread; an exception from ``on_ready`` is logged and its
    batch is offered again by the next rescan.
    """

    def __init__(
        self,
        root: Path,
        on_ready: Callable[[list[ReadyFile]], None],
        *,
        settle: float = 1.0,
        polling: bool = False,
        rescan_interval: float = 60.0,
        is_known: Callable[[str], bool] | None = None,
        batch_max: int = 500,
    ) -> None:
        if settle < 0 or rescan_interval < 0:
            raise ValueError("settle and rescan_interval must not be negative")
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, not {batch_max}")
        self._root = os.path.abspath(root)
        self._prefix = os.path.join(self._root, "")
        self._real_root = self._root  # resolved at start: the folder the observer watches
        self._real_prefix = self._prefix
        self._polling = polling
        self._settle = max(settle, MIN_WINDOW)
        self._rescan_interval = max(rescan_interval, TICK)

        # Shared with the observer thread and callers of rescan(): guarded by _lock.
        self._lock = threading.Lock()
        self._inbox: dict[str, Hint] = {}
        self._rescan_requested = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self._observer: BaseObserver | None = None
        self._reader: InotifyReader | None = None  # Linux without polling: instead of watchdog
        self._thread: threading.Thread | None = None
        self._turned: float | None = None  # when the settle loop last came round

        # Owned by the settle thread alone.
        self._settler = Settler(
            self._root,
            on_ready,
            settle=settle,
            polling=polling,
            is_known=is_known,
            batch_max=batch_max,
            stopping=self._stopping,
        )

    # -- public API ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer and the settle thread; the latter begins with a full scan."""
        if self._started or self._stopping.is_set():
            raise RuntimeError("a Watcher can be started only once, and not after stop()")
        self._started = True
        if not os.path.isdir(self._root):
            raise ForwarderError(
                f"incoming folder {self._root} does not exist or is not a directory: "
                "create it, or fix 'incoming' in the config"
            )
        self._real_root = os.path.realpath(self._root)
        self._real_prefix = os.path.join(self._real_root, "")
        self._settler.real_root = self._real_root
        # watchdog's recursive inotify bookkeeping warns when adding watches races a `mkdir -p`
        # (a callback registered twice, or removed twice); the outcome is right. Under
        # `-W error` (pytest's filterwarnings) the warning would kill its reader thread.
        warnings.filterwarnings(
            "ignore",
            message=r"Callback with id .* (already exists|does not exist)",
            category=RuntimeWarning,
            module=r"watchdog\.",
        )
        if not self._polling and watch_inotify.available():
            self._start_reader()
        else:
            self._start_observer()
        self._thread = threading.Thread(
            target=self._run, name="forwarder-watcher-settle", daemon=True
        )
        self._thread.start()
        logger.info(
            "watching %s (%s), settle %.2fs, full rescan every %.0fs",
            self._root,
            "polling" if self._polling else "inotify",
            self._settle,
            self._rescan_interval,
        )

    def _start_reader(self) -> None:
        reader = InotifyReader(self._real_root, self._note_many, self.rescan)
        try:
            reader.start()
        except OSError as exc:
            raise ForwarderError(
                f"cannot watch {self._root}: {exc}; raise fs.inotify.max_user_watches and "
                "fs.inotify.max_user_instances, or set watch.polling: true"
            ) from exc
        self._reader = reader

    def _start_observer(self) -> None:
        observer: BaseObserver | None = None
        try:
            observer = make_observer(self._polling, self._settle)
            observer.name = "forwarder-watcher-observer"
            # The resolved path: with an `incoming` that is itself a symlink, inotify would
            # otherwise watch the link (IN_DONT_FOLLOW), not the folder.
            observer.schedule(
                EventHandler(self._note), self._real_root, recursive=True, event_filter=EVENTS
            )
            observer.start()
        except OSError as exc:
            if observer is not None:
                halt(observer, 5.0)
            raise ForwarderError(
                f"cannot watch {self._root}: {exc}; raise fs.inotify.max_user_watches and "
                "fs.inotify.max_user_instances, or set watch.polling: true"
            ) from exc
        self._observer = observer

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the observer (with its emitters) and the settle thread; idempotent."""
        deadline = time.monotonic() + timeout
        first = not self._stopping.is_set()
        self._stopping.set()
        self._wake.set()
        if self._observer is not None and (first or self._observer.is_alive()):
            halt(self._observer, timeout)
        if self._reader is not None:
            self._reader.stop(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                logger.warning(
                    "settle thread did not stop within %.1fs (on_ready blocked?)", timeout
                )

    def rescan(self) -> None:
        """Ask for a full scan of the folder as soon as possible (thread-safe)."""
        with self._lock:
            self._rescan_requested = True
        self._wake.set()

    @property
    def healthy(self) -> bool:
        """True while the inotify reader (or the observer and its emitters) and the settle
        thread are alive, and the watched folder is still there."""
        observer, thread, reader = self._observer, self._thread, self._reader
        if thread is None or self._stopping.is_set():
            return False
        if reader is not None:
            return reader.alive and thread.is_alive()
        if observer is None:
            return False
        try:
            emitters = list(observer.emitters)
        except RuntimeError:  # the set changed while copied; ask again next time
            return True
        reader = getattr(observer, "_inotify_fd", None)  # InotifyObserver's reader thread
        return (
            thread.is_alive()
            and observer.is_alive()
            and (not isinstance(reader, threading.Thread) or reader.is_alive())
            and bool(emitters)
            and all(e.is_alive() for e in emitters)
        )

    # -- observer side ---------------------------------------------------------------------

    def _note(self, path: str, hint: Hint) -> None:
        """Record a hint (observer thread); the settle thread applies it."""
        if self._real_prefix != self._prefix and path.startswith(self._real_prefix):
            path = self._prefix + path[len(self._real_prefix) :]  # report under root as given
        if path.startswith(self._prefix) and any(
            is_ignored_name(part) for part in path[len(self._prefix) :].split(os.sep)
        ):
            # Never a candidate (a dot-folder such as the listener's .listen, a .part file):
            # the settle thread is not woken for it. Each received object makes six events.
            return
        with self._lock:
            self._inbox[path] = then(self._inbox.get(path), hint)
        self._wake.set()

    def _note_many(self, hints: dict[str, Hint]) -> None:
        """Record one read's hints (inotify reader thread; it watches no ignored folder and
        reports no ignored name, so only the root's spelling is adjusted)."""
        if self._real_prefix != self._prefix:
            real, given = self._real_prefix, self._prefix
            hints = {
                (given + p[len(real) :] if p.startswith(real) else p): h for p, h in hints.items()
            }
        with self._lock:
            inbox = self._inbox
            for path, hint in hints.items():
                inbox[path] = then(inbox.get(path), hint)
        self._wake.set()

    # -- settle thread ---------------------------------------------------------------------

    @property
    def stuck_for(self) -> float:
        """Seconds since the settle loop last moved on: came round, listed a folder, handed a
        batch on (so a long scan or backlog is not stuck; one call hung on a mount is); 0
        before it starts."""
        turned = self._turned
        if turned is None:
            return 0.0
        return max(time.monotonic() - max(turned, self._settler.progressed), 0.0)

    def _run(self) -> None:
        next_rescan = 0.0  # the first tick does the initial full scan
        while not self._stopping.is_set():
            now = self._turned = time.monotonic()
            timeout = min(TICK, max(0.0, next_rescan - now))
            due = self._settler.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                with self._lock:
                    inbox, self._inbox = self._inbox, {}
                    rescan, self._rescan_requested = self._rescan_requested, False
                self._settler.apply(inbox, time.monotonic())
                if rescan or time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + self._rescan_interval
                    self._settler.scan(self._root, time.monotonic(), full=True)
                self._settler.check_due(time.monotonic())
            except Exception:
                logger.exception("watcher: unexpected error, carrying on")
