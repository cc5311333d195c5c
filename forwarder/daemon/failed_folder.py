"""What the status page and the metrics read about ``failed/``, without walking it each time.

``forwarder_failed_folder_files`` (every file but the ``NAME.error.json`` reports) and the
page's recent failures (the newest reports) were a walk of the whole folder, a stat of every
report and a read of the newest, on every scrape and page view: a second and more for a few
thousand failed files, taken from the daemon's process while it has the most to forward.

:class:`FailedFolder` keeps each folder's listing and reads a folder again only when its
modification time (or change time, or inode) moved: a file or report added, removed or renamed
there, by the daemon, its watch-and-ingest process or ``forwarder retry``. A request then costs
one stat per folder, not per file. A folder changed less than :data:`SETTLE` seconds before it
was listed is read again next time as well: a change in the same clock tick as the listing
leaves its modification time as it was. Reports are written whole under a temporary name and
renamed into place (:mod:`forwarder.daemon.spool`), so a report's time and content are those of
its listing; one edited in place is not seen again until its folder changes.

The answers are those of a fresh walk: :func:`forwarder.daemon.status.recent_failures` is the
same list from a walk, for a caller without an index.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.daemon.status import ERROR_SUFFIX, failure_entries

SETTLE = 2.0  # seconds; a folder changed more recently than this before its listing is re-read


@dataclass(frozen=True, slots=True)
class _Listing:
    """One folder's entries, as of its stat ``key``."""

    key: tuple[int, int, int]  # st_mtime_ns, st_ctime_ns, st_ino
    settled: bool  # changed long enough before the listing to be trusted while key holds
    files: int  # entries that are not folders, the reports left out
    reports: tuple[tuple[float, str], ...]  # (mtime, path) of each NAME.error.json
    folders: tuple[str, ...]  # sub-folders walked (not symbolic links, as os.walk)


class FailedFolder:
    """The file count and the newest reports of ``failed/``, re-reading only folders that
    changed. Thread-safe: the HTTP server's threads share one."""

    def __init__(
        self, folder: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.folder = Path(folder)
        self._clock = clock
        self._listings: dict[str, _Listing] = {}
        self._lock = threading.Lock()

    def count(self) -> int:
        """Files in ``failed/`` and its sub-folders, not counting ``NAME.error.json`` nor the
        temporaries (dot-names) a kill while writing one left."""
        with self._lock:
            return sum(listing.files for listing in self._refresh())

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest reports, newest first, as
        :func:`~forwarder.daemon.status.recent_failures` says them."""
        with self._lock:
            reports = [r for listing in self._refresh() for r in listing.reports]
        return failure_entries(self.folder, heapq.nlargest(limit, reports))

    def _refresh(self) -> list[_Listing]:
        """Every folder's listing, each re-read if it changed (unreadable folders left out)."""
        seen: dict[str, _Listing] = {}
        pending = [os.fspath(self.folder)]
        while pending:
            path = pending.pop()
            listing = self._listing(path)
            if listing is None:
                continue
            seen[path] = listing
            pending.extend(os.path.join(path, name) for name in listing.folders)
        self._listings = seen
        return list(seen.values())

    def _listing(self, path: str) -> _Listing | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._listings.get(path)
        if cached is not None and cached.key == key and cached.settled:
            return cached
        settled = st.st_mtime_ns < (self._clock() - SETTLE) * 1e9
        try:
            return _read(path, key, settled)
        except OSError:
            return None  # unreadable, or removed meanwhile: skipped, as os.walk does


def _read(path: str, key: tuple[int, int, int], settled: bool) -> _Listing:
    """List one folder as os.walk does (symbolic links to folders neither counted nor
    followed; an entry whose type cannot be read counts as a file)."""
    files = 0
    reports: list[tuple[float, str]] = []
    folders: list[str] = []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    link = entry.is_symlink()
                except OSError:
                    link = False
                if not link:
                    folders.append(entry.name)
                continue
            if entry.name.startswith("."):
                # A temporary a kill left (``.NAME.error.json.tmp``, ``.NAME.moving``): never a
                # failed file, which comes from incoming, where dot-names are never taken.
                continue
            if not entry.name.endswith(ERROR_SUFFIX):
                files += 1
            else:
                try:
                    reports.append((os.stat(entry.path).st_mtime, entry.path))
                except OSError:
                    continue  # retried (removed) meanwhile
    return _Listing(key, settled, files, tuple(reports), tuple(folders))
