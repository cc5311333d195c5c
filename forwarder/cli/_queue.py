"""The queue database as the commands that write to it open it (``retry``, ``pause``,
``resume``): upgraded to this forwarder's schema only when no daemon runs on it.

After a package upgrade the running daemon is the old code until it is restarted (or a newer
forwarder runs from a venv beside the packaged one): a command that upgraded the schema would
change it under that daemon, whose statements may then fail or write rows the new schema
reads otherwise. The daemon upgrades it itself when it starts; ``status`` and ``find`` read an
older schema as it is (``Queue(..., read_only=True)``).
"""

from __future__ import annotations

import os
from pathlib import Path

from forwarder.daemon.queue_lock import lock_path, unless_daemon_runs
from forwarder.errors import QueueSchemaError
from forwarder.queue import Queue


def open_to_write(path: Path, *, create: bool = False) -> Queue:
    """The queue at ``path`` at this forwarder's schema version: one of an older version is
    upgraded when no daemon runs on it (its lock held meanwhile), else QueueSchemaError says
    to restart the daemon. ``create``: a missing database is created (no daemon ran on it)."""
    if create and not os.path.exists(path):
        return Queue(path)
    try:
        return Queue(path, create=False, migrate=False)
    except QueueSchemaError as exc:  # an older version (a newer one is refused as it was)
        found, wanted = exc.found, exc.wanted
    with unless_daemon_runs(path) as no_daemon:
        if not no_daemon:
            raise QueueSchemaError(
                f"queue database {path} is at schema {found}, this forwarder writes {wanted}, "
                f"and a forwarder daemon runs on it (its lock {lock_path(path)} is held): not "
                "upgraded under it, nothing changed; restart the daemon (systemctl restart "
                "forwarder) to upgrade it, then run the command again",
                found=found,
                wanted=wanted,
            )
        return Queue(path, create=False)  # upgraded, as the daemon does at its start
