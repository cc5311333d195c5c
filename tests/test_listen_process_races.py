"""Review of the receiving process's supervisor (:class:`ListenProcess`) driven directly.

A real child process, a real port, a real queue; the ``recover`` callback (what the daemon
runs between a child's death and its restart) tells the test when a restart is about to spawn.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import wait_until
from peers import free_port

from forwarder.config import ListenConfig
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.listen_commitment import QueueHoldings
from forwarder.daemon.listen_process import ListenProcess
from forwarder.daemon.listen_sink import ListenSink, SpaceWatch
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool
from forwarder.queue import Queue


def receiving_children() -> set[int]:
    """PIDs of this process's live ``listen_child`` children (zombies excluded)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == os.getpid() and b"listen_child" in cmdline:
            found.add(int(name))
    return found


@contextmanager
def supervisor(tmp_path: Path, recover: object) -> Iterator[ListenProcess]:
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    folder = spool.incoming / ".listen"
    folder.mkdir(parents=True)
    before = receiving_children()
    with Queue(tmp_path / "queue.sqlite") as queue:
        ingest = Ingest(spool, queue, Router(None, ["pacs"]))
        space = SpaceWatch(spool.incoming, 1)
        listen = ListenConfig(port=free_port(), bind="127.0.0.1")
        process = ListenProcess(
            listen,
            ae_title="GATEWAY",
            incoming=spool.incoming,
            sink=ListenSink(folder, spool, ingest, space),
            holdings=QueueHoldings(queue).failure,
            reports=None,
            recover=recover,  # type: ignore[arg-type]
            on_space=space.check,
            on_object=lambda _outcome: None,
            log_level="INFO",
        )
        try:
            yield process
        finally:
            process.stop(0.0)  # again: stops a child the first stop() left running
            for pid in receiving_children() - before:  # what the test started and left
                os.kill(pid, signal.SIGKILL)


def test_stop_while_a_dead_child_is_being_restarted_stops_the_new_child_promptly(
    tmp_path: Path,
) -> None:
    """SIGTERM can come at any moment, also while the supervisor restarts a dead child: stop()
    must then stop the child it is starting, and promptly (not wait out a join timeout and
    leave that child running with the port until the daemon's process exits)."""
    recovering = threading.Event()

    def recover() -> None:
        recovering.set()  # the restart spawns right after this returns

    with supervisor(tmp_path, recover) as process:
        process.start()
        first = process.pid
        assert first is not None and process.healthy
        os.kill(first, signal.SIGKILL)
        assert recovering.wait(10), "the supervisor saw the death"
        started = time.monotonic()
        process.stop(0.0)
        took = time.monotonic() - started
        left = receiving_children()
        assert left == set(), f"stop() returned after {took:.1f} s leaving {left} running"
        assert took < 5.0, f"stop() took {took:.1f} s"


def test_restarts_leave_no_sockets_behind(tmp_path: Path) -> None:
    """Each start makes a peer pair and a carrier pair: a dead child's must be closed. The
    first child's peer socket is held by the ``listen-calls`` thread's arguments for its whole
    life; later ones are closed by the garbage collector only (a ResourceWarning each)."""

    def sockets() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with_target = f"/proc/self/fd/{fd}"
            try:
                n += os.readlink(with_target).startswith("socket:")
            except OSError:
                pass
        return n

    with supervisor(tmp_path, lambda: None) as process:
        process.restart_delays = (0.0,) * 5  # not 0, 1, 2 s: the backoff is not what is counted
        process.start()
        baseline = sockets()
        for _ in range(3):
            old = process.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            wait_until(
                lambda old=old: process.pid != old and process.healthy,  # type: ignore[misc]
                30,
                what="a new receiving process",
            )
        wait_until(lambda: sockets() <= baseline, 10, what=f"back to {baseline} sockets")
