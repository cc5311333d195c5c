"""A child process for tests/test_child_process.py: ``python -m child_probe PEER_FD PID``.

It does what its ``init`` says, run by run (``run`` counts the spawns): wait ``delays[run]``
seconds before it reads anything (a slow start, or one that hangs), then say ready and its
health every 0.2 s (unless ``mute[run]``: alive but silent), answer ``data`` with ``got``
(the bytes it read), and exit at ``stop``. With ``lock`` (a SQLite database) its first run
takes the database's write lock before it says ready, and keeps it (a child stopped inside a
queue transaction).
"""

from __future__ import annotations

import socket
import sqlite3
import sys
import time
from typing import Any

from forwarder.daemon.listen_wire import Peer, die_with


def main(argv: list[str]) -> int:
    peer_fd, parent = (int(a) for a in argv)
    die_with(parent)
    peer = Peer(socket.socket(fileno=peer_fd))
    _kind, _call, init = peer.receive(60.0)
    run = int(init["run"])
    delays = init.get("delays", [])
    if run < len(delays):
        time.sleep(delays[run])  # busy starting: nothing is read meanwhile
    mute = run < len(init.get("mute", [])) and bool(init["mute"][run])
    held = None
    if init.get("lock") and run == 0:
        held = sqlite3.connect(init["lock"], isolation_level=None)
        held.execute("BEGIN IMMEDIATE")  # kept until it exits
    stop = False

    def handle(kind: str, args: tuple[Any, ...]) -> None:
        nonlocal stop
        if kind == "data":
            peer.send("got", len(args[0]))
        elif kind == "stop":
            stop = True
            raise SystemExit(0)

    def beat() -> None:
        if not mute:
            peer.send("health", True)

    peer.handle = handle
    peer.send("ready")
    try:
        peer.serve(idle=0.2, on_idle=beat)
    except SystemExit:
        pass
    if held is not None:
        held.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
