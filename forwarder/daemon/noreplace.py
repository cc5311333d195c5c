"""A rename that never replaces what is at the target: ``renameat2(RENAME_NOREPLACE)``.

``os.rename`` replaces a file at the target without a word. Where forwarder picks a free name
and then moves a file there (``forwarder retry`` into incoming, the finisher into done/ and
failed/, ingest into failed/), a file dropped under that name in between would be destroyed:
a study lost. :func:`rename_noreplace` raises :class:`FileExistsError` instead, whatever is
there (a file, a folder, a dangling symlink), and the caller picks another name or says so.

Linux's ``renameat2`` (glibc 2.28, Linux 3.15; ext4, xfs, btrfs, tmpfs) checks and renames in
one step. Where it is missing (another libc, an older kernel: ENOSYS; a filesystem without the
flag, such as some network filesystems: EINVAL) the fallback is ``link`` + ``unlink``: the link
fails with EEXIST when the name is taken, so nothing is replaced either, but a process killed
between the two leaves the file under both names (never under none). Callers that move a file
again after a crash treat a target that is the same file as the source as moved already
(:func:`same_file`). A filesystem with no hard links either (vfat) gets a check and a rename:
nothing there is replaced unless a file appears in the instant between the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from collections.abc import Callable

#: From <linux/fs.h>.
RENAME_NOREPLACE = 1
_AT_FDCWD = -100

StrPath = str | os.PathLike[str]

# renameat2 is not supported here: use the fallback.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# link is not supported here (no hard links on this filesystem, or refused for this file).
_NO_LINK = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK})


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # a libc without it (glibc before 2.28, some musl)
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    renameat2: Callable[[int, bytes, int, bytes, int], int] = func
    return renameat2


_renameat2 = _load_renameat2()


def rename_noreplace(source: StrPath, target: StrPath) -> None:
    """Rename ``source`` to ``target`` unless something is at ``target``: then
    :class:`FileExistsError`, and both stay as they were. Other failures raise the
    :class:`OSError` rename(2) would (ENOENT, EXDEV across filesystems, EACCES ...)."""
    if _renameat2 is not None:
        src, dst = os.fsencode(source), os.fsencode(target)
        if _renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fspath(source), None, os.fspath(target))
    link_noreplace(source, target)


def link_noreplace(source: StrPath, target: StrPath) -> None:
    """The fallback of :func:`rename_noreplace` (public for its tests): ``link`` then
    ``unlink``; on a filesystem without hard links, a check then ``rename``."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if os.path.lexists(target):
            raise FileExistsError(
                errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(source), None, target
            ) from None
        os.rename(source, target)
        return
    try:
        os.unlink(source)
    except OSError:
        # Not moved after all: the second name goes (it is the same file), the error stands.
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def same_file(a: StrPath, b: StrPath) -> bool:
    """Whether ``a`` and ``b`` are one file (two names of one inode: a fallback move killed
    between its link and its unlink). False when either is missing."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False
