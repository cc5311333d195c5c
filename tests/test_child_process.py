"""The daemon's supervision of its child processes (forwarder/daemon/child_process.py), with a
real child (tests/child_probe.py) and short deadlines: a slow start is not a stuck child, a
restart that hangs is killed and tried again, a silent child is unhealthy then restarted, and
one silent while holding the queue's write lock is killed at once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from test_ingest_process import alive

from forwarder.daemon.child_process import LOCKED_SILENCE, ChildProcess
from forwarder.daemon.listen_wire import Peer
from forwarder.errors import QueueError
from forwarder.queue import Queue

TESTS = str(Path(__file__).resolve().parent)


class Probe(ChildProcess):
    module = "child_probe"
    area = "probe"
    what = "the probe process"
    restart_delays = (0.0,)
    start_timeout = 6.0
    send_timeout = 1.0
    silent_after = 1.0
    kill_after = 2.0

    def __init__(self, **plan: Any) -> None:
        super().__init__()
        self.plan = plan
        self.runs = 0
        self.got: list[int] = []
        self.pids: list[int] = []

    def _init(self, peer: Peer) -> None:
        assert self._process is not None
        self.pids.append(self._process.pid)
        self._send(peer, "init", {"run": self.runs, **self.plan})
        self.runs += 1

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "got":
            self.got.append(int(args[0]))


@pytest.fixture(autouse=True)
def _probe_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, path])))


def test_a_child_slow_to_start_is_not_taken_for_stuck() -> None:
    """Messages sent while it starts (3 s, three times the send deadline) fill its socket:
    they wait for it instead of getting it killed."""
    probe = Probe(delays=[3.0])
    chunk = b"x" * 300_000

    def fill() -> None:  # from another thread while start() waits (it spawned the child:
        # PR_SET_PDEATHSIG kills a child whose spawning thread ends)
        wait_until(lambda: probe._peer is not None, 10, what="the child spawned")
        for _ in range(4):  # far more than the socket holds
            probe.tell("data", chunk)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    try:
        assert probe.start()
        thread.join(15)
        wait_until(lambda: len(probe.got) == 4, 10, what="every message read")
        assert probe.got == [len(chunk)] * 4
        assert probe.runs == 1 and alive(probe.pids[0])
    finally:
        probe._stop_process(("stop",), 5.0)


def test_a_restart_that_hangs_before_ready_is_killed_and_tried_again() -> None:
    probe = Probe(delays=[0.0, 3600.0])
    try:
        assert probe.start()
        first = probe.pids[0]
        os.kill(first, 9)
        wait_until(lambda: probe.runs == 2, 10, what="the restart")
        hung = probe.pids[1]
        started = time.monotonic()
        wait_until(lambda: probe.runs == 3, 20, what="the hung restart killed and tried again")
        assert time.monotonic() - started >= Probe.start_timeout - 1.0
        assert not alive(hung)
        wait_until(lambda: probe.healthy, 10, what="the third child healthy")
    finally:
        probe._stop_process(("stop",), 5.0)


def test_a_silent_child_is_unhealthy_then_killed_and_restarted() -> None:
    probe = Probe(mute=[True])
    try:
        assert probe.start()
        first = probe.pids[0]
        wait_until(lambda: not probe.healthy, 5, what="the silent child unhealthy")
        assert alive(first) and probe.runs == 1  # unhealthy first, not yet killed
        wait_until(lambda: probe.runs == 2, 10, what="the silent child killed and restarted")
        assert not alive(first)
        wait_until(lambda: probe.healthy, 10, what="the next child healthy")
    finally:
        probe._stop_process(("stop",), 5.0)


def _write_in_thread(queue: Queue) -> tuple[threading.Thread, list[object]]:
    """A queue write (a problem recorded) from another thread: it waits for the write lock.
    The list gets the seconds it took, or the QueueError it ended with."""
    out: list[object] = []

    def write() -> None:
        started = time.monotonic()
        try:
            queue.set_problem("finish", "a test's write")
            out.append(time.monotonic() - started)
        except QueueError as exc:
            out.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread, out


def test_a_silent_child_holding_the_queue_locked_is_killed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped inside a queue transaction (SIGSTOP, a hang), a child holds every write of the
    daemon: silent while the daemon waits for the lock, it is killed after a few seconds
    (not after ``kill_after``), and the daemon's write goes through."""
    with Queue(tmp_path / "queue.db") as queue:
        probe = Probe(mute=[True], lock=str(tmp_path / "queue.db"))
        probe.kill_after = 60.0  # the plain silence rule must not be what kills it
        probe.queue_locked = queue.lock_waited
        try:
            assert probe.start()
            first = probe.pids[0]
            thread, out = _write_in_thread(queue)
            wait_until(lambda: queue.lock_waited() > 0.5, 5, what="the write waiting")
            thread.join(LOCKED_SILENCE + 15)
            assert out and isinstance(out[0], float), out
            assert LOCKED_SILENCE - 0.5 <= out[0] < LOCKED_SILENCE + 10
            assert queue.lock_waited() == 0.0
            assert not alive(first)
            assert (
                "for the queue's write lock (stopped or hung, perhaps inside a queue" in caplog.text
            )
            wait_until(lambda: probe.runs == 2 and probe.healthy, 10, what="the restart")
        finally:
            probe._stop_process(("stop",), 5.0)


def test_a_child_that_talks_is_not_killed_for_a_queue_held_by_it(tmp_path: Path) -> None:
    """The lock held long by a child that still says its health (a long transaction, a
    command's big update) is waited for, up to the busy timeout; the child lives."""
    Queue(tmp_path / "queue.db").close()
    with Queue(tmp_path / "queue.db", busy_timeout=LOCKED_SILENCE + 2) as queue:
        probe = Probe(lock=str(tmp_path / "queue.db"))
        probe.queue_locked = queue.lock_waited
        try:
            assert probe.start()
            thread, out = _write_in_thread(queue)
            thread.join(LOCKED_SILENCE + 15)
            assert out and isinstance(out[0], QueueError), out
            assert "database is locked" in str(out[0])
            assert alive(probe.pids[0]) and probe.runs == 1 and probe.healthy
        finally:
            probe._stop_process(("stop",), 5.0)
