"""The watcher's watchdog side: events turned into hints, and the observer made and halted.

:class:`EventHandler` runs on watchdog's observer thread and only records, through a callback,
what each event says about a path (a :class:`~forwarder.daemon.watch_settle.Hint`); it knows
nothing about threads or settling. :func:`make_observer` chooses inotify (full events) or the
polling observer, :func:`halt` stops one with its emitter threads. With
:mod:`forwarder.daemon.watcher` the only modules that import watchdog; deciding when a file is
complete is :mod:`forwarder.daemon.watch_settle`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from forwarder.daemon.watch_settle import Hint

logger = logging.getLogger(__name__)

#: The events the handler is given (watchdog's ``event_filter``).
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


class EventHandler(FileSystemEventHandler):
    """Turns watchdog events into hints; knows nothing about threads or settling."""

    def __init__(self, note: Callable[[str, Hint], None]) -> None:
        super().__init__()
        self._note = note

    def on_created(self, event: DirCreatedEvent | FileCreatedEvent) -> None:
        # Not WRITING: watchdog also emits created events for files found in a folder it has
        # just started watching, and no close follows those.
        hint = Hint.DIR if event.is_directory else Hint.CHANGED
        self._note(os.fsdecode(event.src_path), hint)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(os.fsdecode(event.src_path), Hint.WRITING)

    def on_attrib(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(os.fsdecode(event.src_path), Hint.CHANGED)

    def on_closed(self, event: FileClosedEvent) -> None:
        self._note(os.fsdecode(event.src_path), Hint.CLOSED)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(os.fsdecode(event.src_path), Hint.DELETED)

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path)
        if event.is_directory:
            if dest:
                self._note(dest, Hint.DIR)
            return
        if src:
            self._note(src, Hint.DELETED)
        if dest:
            self._note(dest, Hint.MOVED_IN)


#: How long watchdog's inotify emitter waits to pair an IN_MOVED_FROM with its IN_MOVED_TO
#: (watchdog's default, 0.5 s, delays every later event by as much).
MOVE_PAIRING_WINDOW = 0.01


def make_observer(polling: bool, settle: float) -> BaseObserver:
    """The observer: polling (for network filesystems) at an interval from ``settle``, else
    inotify with full events, or the platform's native one off Linux."""
    if polling:
        # lstat, not stat: the snapshot must not descend into symlinked directories.
        interval = min(max(settle, 0.5), 5.0)
        return PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
    try:
        from watchdog.observers.inotify import InotifyObserver
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not Linux: the platform's native observer
        from watchdog.observers import Observer

        return Observer()
    # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and every
    # event behind it waits: each file the finisher moves out of incoming (to done/) held up
    # the next file renamed in by ~0.5 s. The kernel queues both halves of a rename together,
    # so they are read in one batch: 10 ms pairs them as well. An unpaired half is harmless
    # here (full events: a deletion and a move-in, which is what the handler makes of a pair).
    InotifyMoveEventGrouper.delay = MOVE_PAIRING_WINDOW
    # Full events: a file moved in from outside is a move (complete), not a creation.
    return InotifyObserver(generate_full_events=True)


def halt(observer: BaseObserver, timeout: float) -> None:
    """Stop a watchdog observer and join it; also stops its emitter and inotify threads."""
    observer.stop()
    if observer.ident is not None:
        observer.join(timeout)
        if observer.is_alive():
            logger.warning("watchdog observer did not stop within %.1fs", timeout)


class _StopRaceFilter(logging.Filter):
    """watchdog's inotify emitter logs an ERROR when its read loop races its own shutdown
    ("queue_events() called when the thread is inactive"); nothing is lost, and an ERROR on
    every clean stop would send operators hunting. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())
