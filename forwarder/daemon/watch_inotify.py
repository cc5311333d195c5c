"""The watcher's inotify reader on Linux: one thread, the kernel's events straight to hints.

watchdog's inotify observer passes each event through three threads (its reader, its emitter
with the move-pairing buffer, its dispatcher) and builds an event object for each, before the
handler sees it. Every file the daemon moves out to ``done/`` makes such an event, and every
object the listener receives makes six under ``incoming/.listen``: GIL time and thread
hand-offs taken from the senders and the listener. This reader does what the watcher needs and
no more:

- one thread reads the inotify descriptor and records each event as a
  :class:`~forwarder.daemon.watch_settle.Hint`, a whole read at a time, through ``note_many``;
- folders with an ignored name (``.listen``, ``.staging``, ``x.tmp``: never candidates) are not
  watched at all, so the kernel makes no event for what happens inside them;
- a folder created or moved in is watched at once and reported (``Hint.DIR``: the settle thread
  scans it, for files that came before its watch); a folder moved away loses its watches;
- a queue overflow asks for a full rescan (``on_overflow``); symbolic links are never followed.

The periodic full rescan stays the backstop for anything missed. Polling (network
filesystems) and other platforms keep watchdog (:mod:`forwarder.daemon.watch_events`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

from forwarder.daemon.watch_settle import Hint, is_ignored_name, then

logger = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
_READ_SIZE = 256 * 1024
_FILE_HINTS = (
    (IN_MOVED_TO, Hint.MOVED_IN),
    (IN_CLOSE_WRITE, Hint.CLOSED),
    (IN_MOVED_FROM | IN_DELETE, Hint.DELETED),
    (IN_MODIFY, Hint.WRITING),
    (IN_CREATE | IN_ATTRIB, Hint.CHANGED),
)


class _Libc:
    """inotify_init1, inotify_add_watch and inotify_rm_watch from the C library."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


_libc: _Libc | None = None


def available() -> bool:
    """Whether this system has inotify (Linux with a C library that exposes it)."""
    global _libc
    if _libc is None:
        try:
            _libc = _Libc()
        except (OSError, AttributeError):
            return False
    return True


def _os_error(what: str, path: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}", path)


class InotifyReader:
    """Watch the tree under ``root`` (an absolute, resolved path) and report what changes.

    ``note_many(hints)`` gets ``{path: Hint}`` for each read (in event order; the last hint for
    a path wins); ``on_overflow()`` is called when the kernel dropped events. Both run on the
    reader thread. :meth:`start` raises OSError when the tree cannot be watched (e.g. the
    ``fs.inotify.max_user_watches`` limit).
    """

    def __init__(
        self,
        root: str,
        note_many: Callable[[dict[str, Hint]], None],
        on_overflow: Callable[[], None],
    ) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "inotify is not available here")
        assert _libc is not None
        self._libc = _libc
        self._root = root
        self._note_many = note_many
        self._on_overflow = on_overflow
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._paths: dict[int, str] = {}  # watch descriptor -> folder (reader thread only)
        self._stopping = threading.Event()
        self._root_gone = False
        self._starting = False
        self._out_of_watches = False  # the kernel's limit was hit: not healthy (as watchdog)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, name: str = "forwarder-watcher-inotify") -> None:
        fd = self._libc.init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1", self._root)
        self._fd = fd
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._starting = True  # any folder that cannot be watched fails the start
            self._watch_tree(self._root, report=None)
            self._starting = False
            if not self._paths:
                raise OSError(errno.ENOENT, "cannot watch the folder", self._root)
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop and join the reader thread, then close the descriptors; idempotent."""
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: the thread is being woken anyway
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("inotify reader did not stop within %.1fs", timeout)
                return  # its descriptors stay open rather than be closed under it
        self._close()

    @property
    def alive(self) -> bool:
        """The thread runs, the watched folder itself still exists, and no folder below it
        went unwatched for want of inotify watches."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and not self._root_gone
            and not self._out_of_watches
        )

    def watched_folders(self) -> list[str]:
        """The folders watched now (for tests and diagnostics)."""
        return sorted(self._paths.values())

    def _close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._paths.clear()

    # -- watches -----------------------------------------------------------------------------

    def _watch_tree(
        self, top: str, report: dict[str, Hint] | None, *, moved_in: bool = False
    ) -> set[int]:
        """Watch ``top`` and every folder below it, ignored names excepted; returns their watch
        descriptors. With ``report``: each folder below ``top`` is reported for a scan
        (``top`` itself by the caller), or, for a tree renamed into place (``moved_in``), each
        file in it as moved in (complete: taken at once, as a file renamed in is). Every folder
        is watched before it is listed, so a file made after the listing has events of its own.
        """
        wds: set[int] = set()
        wd = self._add(top)
        if wd is None:
            return wds
        wds.add(wd)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
            if moved_in and report is not None:
                for name in filenames:
                    if not is_ignored_name(name):
                        report[os.path.join(dirpath, name)] = Hint.MOVED_IN
            kept = []
            for d in dirnames:
                path = os.path.join(dirpath, d)
                wd = self._add(path)
                if wd is None:
                    continue
                wds.add(wd)
                kept.append(d)
                if report is not None and not moved_in:
                    report[path] = Hint.DIR
            dirnames[:] = kept
        return wds

    def _add(self, path: str) -> int | None:
        wd: int = self._libc.add_watch(self._fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None  # gone or replaced already: its own events say so
            if self._starting or not self._paths:
                raise _os_error("inotify_add_watch", path)
            if code == errno.ENOSPC:
                # As watchdog's reader died of it: the watcher is unhealthy (the service says
                # so); the periodic full rescan still finds the files of this folder.
                if not self._out_of_watches:
                    logger.error(
                        "cannot watch %s: out of inotify watches; raise "
                        "fs.inotify.max_user_watches (files below it are found by the "
                        "periodic rescan only)",
                        path,
                    )
                self._out_of_watches = True
                return None
            logger.warning(
                "cannot watch %s (%s): its files are found by the periodic rescan",
                path,
                os.strerror(code),
            )
            return None
        self._paths[wd] = path
        return wd

    def _forget_tree(self, top: str) -> None:
        """A folder moved away: drop its watches (and those below it)."""
        prefix = os.path.join(top, "")
        for wd, path in list(self._paths.items()):
            if path == top or path.startswith(prefix):
                del self._paths[wd]
                self._libc.rm_watch(self._fd, wd)  # EINVAL when already gone: fine

    def _reconcile(self) -> None:
        """After an overflow (events lost, folder events among them): watch every folder of the
        tree again, under its present name, and drop the watches of folders no longer there.
        Adding a watch to a watched folder gives its descriptor back, so this only adds what is
        missing."""
        keep = self._watch_tree(self._root, report=None)
        for wd in [wd for wd in self._paths if wd not in keep]:
            del self._paths[wd]
            self._libc.rm_watch(self._fd, wd)

    # -- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if self._stopping.is_set():
                return
            if not any(fd == self._fd for fd, _ in ready):
                continue
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                logger.exception("inotify: cannot read events; the periodic rescan carries on")
                return
            try:
                self._handle(data)
            except Exception:
                logger.exception("inotify: unexpected error, carrying on")

    def _handle(self, data: bytes) -> None:
        hints: dict[str, Hint] = {}
        overflow = False
        paths = self._paths
        pos, end, size = 0, len(data), _EVENT.size
        while pos + size <= end:
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            raw = data[pos + size : pos + size + length].rstrip(b"\0")
            pos += size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            folder = paths.get(wd)
            if folder is None:
                continue  # a watch removed a moment ago
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                if mask & IN_IGNORED:
                    del paths[wd]
                if folder == self._root and not self._root_gone:
                    self._root_gone = True  # removed, moved away or unmounted
                    logger.error("the watched folder %s was removed, moved or unmounted", folder)
                continue
            name = os.fsdecode(raw)
            if not name or is_ignored_name(name):
                continue  # a dot-folder's or temporary file's own events: never a candidate
            path = os.path.join(folder, name)
            if mask & IN_ISDIR:
                if mask & IN_MOVED_FROM:
                    self._forget_tree(path)
                elif mask & IN_MOVED_TO:
                    # A finished tree renamed into place: its files are taken at once.
                    self._watch_tree(path, hints, moved_in=True)
                elif mask & IN_CREATE:
                    self._watch_tree(path, hints)
                    hints.pop(path, None)
                    hints[path] = Hint.DIR  # after those below it: scanned whole
                continue
            for bits, hint in _FILE_HINTS:
                if mask & bits:
                    # The latest event's hint (see ``then``), in event order.
                    hints[path] = then(hints.pop(path, None), hint)
                    break
        if hints:
            self._note_many(hints)
        if overflow:
            logger.warning("inotify: the kernel's event queue overflowed; rescanning incoming")
            self._reconcile()
            self._on_overflow()
