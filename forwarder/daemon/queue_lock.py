"""The daemon's lock beside its queue database: ``QUEUE.lock``, held (``flock``) by a running
``forwarder run`` for as long as it runs, so that a second daemon on the same queue refuses to
start, and probed by the commands that would upgrade the queue's schema (``forwarder retry``,
``pause``, ``resume``): never under a running daemon, which may be an older forwarder until it
is restarted (after a package upgrade, or beside a newer forwarder run from a venv).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from forwarder.errors import QueueError


def lock_path(queue: str | os.PathLike[str]) -> str:
    """The lock file of the queue database ``queue``."""
    return f"{os.fspath(queue)}.lock"


@contextmanager
def unless_daemon_runs(queue: str | os.PathLike[str]) -> Iterator[bool]:
    """True when no daemon runs on ``queue``, and then its lock is held until the block ends,
    so that none starts meanwhile (one starting then exits 1, and systemd starts it again);
    False when a daemon holds it. Without a lock file no daemon ever ran on this queue (it
    takes the lock before it opens the queue): True, and nothing is held. The file is never
    created here: made by another user (root), the daemon's user could not open it."""
    path = lock_path(queue)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    except OSError as exc:
        raise QueueError(
            f"cannot tell whether a forwarder daemon runs on the queue {os.fspath(queue)}: "
            f"cannot open its lock {path} ({exc.strerror or exc})"
        ) from None
    try:
        try:
            # flock needs no write access: the daemon's user may own the file.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise QueueError(
                    f"cannot tell whether a forwarder daemon runs on the queue "
                    f"{os.fspath(queue)}: cannot lock {path} ({exc.strerror or exc})"
                ) from None
            held = False
        else:
            held = True
        yield held
    finally:
        os.close(fd)  # lets go of the lock, if held
