"""Which routes work in progress was routed with: when a reload's routes are the only ones left.

After a reload that changed ``routes:``, a job queued with the old routes must be routed again
before it is sent (:mod:`forwarder.daemon.edits`). Until every process that queues files (the
daemon's own ingest, the watch-and-ingest process, the receiving process) has taken the new
routes and finished what it was routing with the old ones, any job may be such a one; how long
that takes is not bounded (a loaded machine, a big batch, a child stopped for a while). So each
of them counts its work in progress per generation of routes (:class:`RoutesInUse`) and says so
when nothing older than the current generation is left; the daemon then closes the window
(:meth:`forwarder.daemon.router.Router.settle`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class RoutesInUse:
    """Work in progress per routes generation. ``begin`` before reading the routes for a piece
    of work, ``end`` once its rows are committed (or it was dropped); ``advance`` after the
    routes were replaced. Callbacks run outside the lock, on the thread that made them due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = 0
        self._busy: dict[int, int] = {}  # generation -> pieces of work in progress
        self._waiting: list[tuple[int, Callable[[], None]]] = []

    def begin(self) -> int:
        """A piece of work starts: its generation (pass it to :meth:`end`). Call it before
        reading the routes: a generation older than the routes read only delays ``advance``'s
        callback, never the other way round."""
        with self._lock:
            generation = self._current
            self._busy[generation] = self._busy.get(generation, 0) + 1
            return generation

    def end(self, generation: int) -> None:
        with self._lock:
            left = self._busy[generation] - 1
            if left:
                self._busy[generation] = left
            else:
                del self._busy[generation]
            due = self._due()
        for then in due:
            then()

    def advance(self, then: Callable[[], None] | None = None) -> None:
        """The routes were replaced (call it after the swap): ``then`` is called once no piece
        of work begun before is in progress (at once, here, when none is)."""
        with self._lock:
            self._current += 1
            if then is not None:
                self._waiting.append((self._current, then))
            due = self._due()
        for call in due:
            call()

    def _due(self) -> list[Callable[[], None]]:
        oldest = min(self._busy, default=self._current)
        due = [then for generation, then in self._waiting if generation <= oldest]
        self._waiting = [(g, then) for g, then in self._waiting if g > oldest]
        return due
