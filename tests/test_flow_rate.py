"""Rate caps (issue 16): the token bucket's arithmetic on an injected clock, the config's rate
values, and a short tolerant check on real sockets: a daemon destination capped at 512 KB/s
holds its rate within 25% with two associations sharing one bucket, while an uncapped
destination fed the same files is not slowed. The minute-long 20 MB/s measurement with one and
four associations is ``python -m bench.rate`` (bench/rate.py)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from daemon import Daemon, destination, uids
from peers import Received, ScriptedSCP

from forwarder.config.flow import parse_rate
from forwarder.daemon.flow import FlowGate
from forwarder.net.pacing import BURST_SECONDS, Pacer
from forwarder.queue import Job, Queue


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_bucket_paces_to_its_rate_whatever_the_slices() -> None:
    t = _FakeTime()
    pacer = Pacer(1_000_000.0, clock=t.clock, sleep=t.sleep)
    for _ in range(1000):
        pacer.take(10_000)  # 10 MB at 1 MB/s
    assert 9.9 <= t.now <= 10.0
    t.now += 100.0  # idle: at most BURST_SECONDS of tokens are kept
    start = t.now
    for _ in range(100):
        pacer.take(10_000)
    assert 1.0 - BURST_SECONDS - 0.01 <= t.now - start <= 1.0 - BURST_SECONDS + 0.01
    pacer.set_rate(None)  # unlimited: no wait at all
    before = t.now
    pacer.take(10**9)
    assert t.now == before
    assert Pacer(20 * 1024**2).slice_size() == 64 * 1024
    assert Pacer(4096).slice_size() == 1024


def test_urgent_files_bypassing_a_closed_window_go_at_the_cap_and_the_rest_stays_under_it() -> None:
    """Outside the window at outside_window_rate with urgent_bypasses_window: urgent bytes are
    held to max_rate only; the others to the outside rate, and to max_rate too, so that both
    together never exceed max_rate."""
    t = _FakeTime()
    pacer = Pacer(4_000_000.0, clock=t.clock, sleep=t.sleep)  # max_rate 4 MB/s
    pacer.set_rate(1_000_000.0, urgent_apart=True, urgent_rate=4_000_000.0)
    assert pacer.slice_size(urgent=True) == 64 * 1024 and pacer.limited(urgent=True)
    for _ in range(400):
        pacer.take(10_000, urgent=True)  # 4 MB of an urgent file: ~1 s at the cap
    assert 0.9 <= t.now <= 1.0
    t.now += 100.0
    start = t.now
    for _ in range(100):
        pacer.take(10_000)  # 1 MB of an ordinary file: ~1 s at the outside rate
    assert 0.75 <= t.now - start <= 1.0
    # both at once: the ordinary file's bytes use up the cap too, so the urgent ones wait more
    t.now += 100.0
    start = t.now
    for _ in range(100):
        pacer.take(10_000)
        pacer.take(30_000, urgent=True)
    assert 0.75 <= t.now - start <= 1.05  # 4 MB in all, at the 4 MB/s cap
    # the window opens: one rate for all again, urgent or not
    pacer.set_rate(4_000_000.0)
    t.now += 100.0
    start = t.now
    for _ in range(400):
        pacer.take(10_000, urgent=True)
    assert 0.75 <= t.now - start <= 1.0
    # without the bypass, urgent bytes are held to the outside rate like the others
    pacer.set_rate(1_000_000.0)
    t.now += 100.0
    start = t.now
    for _ in range(100):
        pacer.take(10_000, urgent=True)
    assert 0.75 <= t.now - start <= 1.0


@pytest.mark.parametrize(
    ("text", "rate"),
    [("20MB/s", 20 * 1024**2), ("500KB/s", 500 * 1024), ("1.5MiB/s", 1.5 * 1024**2), (4096, 4096)],
)
def test_rates_parse_like_sizes(text: str | int, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["fast", "20MB/h", "10", True])
def test_bad_rates_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_outside_window_rate_is_capped_by_max_rate(tmp_path: Path) -> None:
    from forwarder.config.flow import parse_window

    with Queue(tmp_path / "q.sqlite") as q:
        never = [parse_window("Mon 00:00-00:01")]
        gate = FlowGate(
            "pacs",
            q,
            windows=never,
            max_rate=1e6,
            outside_rate=5e6,
            local_now=lambda: datetime(2026, 11, 25, 12, 0),
        )
        d = gate.decide()
        assert d.claim and d.state == "outside_window" and d.rate == 1e6
        assert not d.urgent_apart  # without the bypass, urgent files go at that rate too
        bypass = FlowGate(
            "pacs",
            q,
            windows=never,
            urgent_bypasses=True,
            max_rate=4e6,
            outside_rate=1e6,
            local_now=lambda: datetime(2026, 11, 25, 12, 0),
        )
        d = bypass.decide()
        assert (d.claim, d.rate, d.urgent_apart, d.urgent_rate) == (True, 1e6, True, 4e6)


class _TimedSCP(ScriptedSCP):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stamps: list[tuple[float, int]] = []
        self._stamps_lock = threading.Lock()
        self.status = self._stamp

    def _stamp(self, rec: Received) -> int:
        with self._stamps_lock:
            self.stamps.append((time.monotonic(), rec.nbytes))
        return 0x0000


RATE = 512 * 1024


def test_a_capped_destination_holds_its_rate_and_an_uncapped_one_is_not_slowed(
    tmp_path: Path,
) -> None:
    with _TimedSCP() as slow, _TimedSCP() as fast:
        dests = [
            destination("slow", slow.port, associations=2, max_rate="512KB/s"),
            destination("fast", fast.port),
        ]
        with Daemon(tmp_path, destinations=dests) as d:
            dropped = d.drop_files(12, rows=256, columns=256)  # 128 KiB of pixels each
            d.wait_status(lambda s: s["fast"]["done"] == 12, 30, "fast done")
            fast_done = time.monotonic()
            with slow._stamps_lock:
                slow_then = len(slow.stamps)
            d.wait_done(12, timeout=60)
            assert slow.uids() == uids(dropped) == fast.uids()
            assert d.stop() == 0
    stamps = sorted(slow.stamps)
    first, last = stamps[0][0], stamps[-1][0]
    sent = sum(n for _, n in stamps[1:])  # the bytes that went between the first and last
    measured = sent / (last - first)
    print(f"capped at {RATE / 1024:.0f} KiB/s: measured {measured / 1024:.0f} KiB/s")
    assert 0.75 * RATE <= measured <= 1.25 * RATE
    # The uncapped destination finished while the capped one was far from done.
    assert slow_then <= 9, slow_then
    assert fast_done < last


def test_a_dicomweb_destination_is_capped_too(tmp_path: Path) -> None:
    from stowserver import StowServer

    with StowServer() as server:
        cloud = {
            "name": "cloud",
            "url": server.url,
            "connect_timeout": "2s",
            "response_timeout": "10s",
            "max_rate": "512KB/s",
        }
        with Daemon(tmp_path, destinations=[cloud]) as d:
            started = time.monotonic()
            dropped = d.drop_files(8, rows=256, columns=256)  # ~1 MiB in all
            d.wait_done(8, timeout=30)
            elapsed = time.monotonic() - started
            assert d.stop() == 0
        assert set(server.uids()) == uids(dropped)
    body = sum((tmp_path / "done" / f"img{i:04d}.dcm").stat().st_size for i in range(8))
    print(f"STOW-RS at 512 KiB/s: {body / 1024:.0f} KiB in {elapsed:.2f}s")
    assert elapsed >= 0.75 * body / RATE


class _Rig:
    """One destination's DestinationWorkers in this process (real queue, spool, finisher,
    sockets) whose send window is judged against ``now[0]`` instead of the wall clock."""

    def __init__(self, root: Path, queue: Queue, fields: dict[str, object]) -> None:
        from forwarder.config import Destination, RetryPolicy
        from forwarder.daemon.finisher import Finisher
        from forwarder.daemon.spool import Spool
        from forwarder.daemon.worker import DestinationWorkers
        from forwarder.net.association import AssociationSettings

        self.now = [datetime(2026, 11, 25, 20, 0)]  # a Wednesday, 20:00
        self.queue = queue
        self.spool = Spool(root / "incoming", root / "done", root / "failed")
        self.finisher = Finisher(queue, self.spool, lambda _: None)
        dest = Destination.model_validate(
            {"name": "pacs", "connect_timeout": 2.0, "response_timeout": 10.0, **fields}
        )
        self.workers = DestinationWorkers(
            dest,
            calling_ae_title="FORWARDER",
            retry=RetryPolicy(initial_delay=0.1, max_delay=0.4),
            queue=queue,
            finisher=self.finisher,
            settings=AssociationSettings(
                calling_ae_title="FORWARDER",
                connect_timeout=2.0,
                response_timeout=10.0,
                release_timeout=2.0,
            ),
        )
        self.workers._gate = FlowGate(
            "pacs",
            queue,
            windows=dest.windows,
            urgent_bypasses=dest.urgent_bypasses_window,
            max_rate=dest.max_rate,
            outside_rate=dest.outside_window_rate,
            local_now=lambda: self.now[0],
        )

    def enqueue(
        self, count: int, *, priority: str = "normal", rows: int = 256, columns: int = 256
    ) -> None:
        """``count`` files (128 KiB of pixels unless told), queued at ``priority``."""
        from dicomgen import write_file

        from forwarder.config import Route
        from forwarder.daemon.ingest import Ingest
        from forwarder.daemon.router import Router
        from forwarder.daemon.watch_settle import ReadyFile

        batch = []
        for i in range(count):
            path = self.spool.incoming / f"f{i:03d}.dcm"
            write_file(path, rows=rows, columns=columns, seed=i)
            st = path.stat()
            batch.append(ReadyFile(path, path.name, st.st_size, st.st_mtime_ns))
        router = Router([Route(name="r", to=["pacs"], priority=priority)], ["pacs"])
        Ingest(self.spool, self.queue, router)(batch)

    def stop(self) -> None:
        self.workers.stop(10.0)
        self.finisher.stop()


def test_a_window_closing_during_a_batch_slows_the_rest_of_it_to_the_outside_rate(
    tmp_path: Path,
) -> None:
    """A batch claimed inside the window (64 files a claim) and the window closes while it is
    being sent: the files after the one in hand go at ``outside_window_rate``, not at the
    rate the batch was claimed at (here: unlimited) until the batch ends."""
    with Queue(tmp_path / "q.sqlite") as queue, _TimedSCP(delay=0.15) as scp:
        fields = {"ae_title": "SCP", "host": "127.0.0.1", "port": scp.port}
        rig = _Rig(tmp_path, queue, {**fields, "window": ["19:00-07:00"],
                                      "outside_window_rate": "64KB/s"})  # fmt: skip
        rig.enqueue(20)  # 128 KiB each: 2 s a file at the outside rate
        rig.workers.start()
        try:
            wait_until(lambda: len(scp.stamps) >= 2, 20, what="2 files stored inside the window")
            rig.now[0] = datetime(2026, 11, 25, 12, 0)  # the window closes during the batch
            closed = time.monotonic()
            # The file in hand finishes; then 128 KiB at 64 KiB/s is ~2 s a file.
            while time.monotonic() < closed + 3.0:
                with scp._stamps_lock:
                    late = [t for t, _ in scp.stamps if t > closed]
                assert len(late) <= 3, f"{len(late)} files stored within 3 s of the window closing"
                time.sleep(0.05)
        finally:
            rig.stop()


def test_urgent_stow_rs_files_bypassing_a_closed_window_are_not_held_to_the_outside_rate(
    tmp_path: Path,
) -> None:
    """As for C-STORE: outside the window, with ``urgent_bypasses_window``, urgent files go at
    ``max_rate`` (here: unlimited), not at ``outside_window_rate``."""
    from stowserver import StowServer

    with Queue(tmp_path / "q.sqlite") as queue, StowServer() as server:
        rig = _Rig(tmp_path, queue, {"url": server.url, "window": ["Mon 08:00-09:00"],
                                     "outside_window_rate": "64KB/s",
                                     "urgent_bypasses_window": True})  # fmt: skip
        rig.now[0] = datetime(2026, 11, 25, 12, 0)  # outside
        rig.enqueue(4, priority="urgent")  # 512 KiB: 8 s at the outside rate
        started = time.monotonic()
        rig.workers.start()
        try:
            wait_until(lambda: queue.stats()["pacs"].done == 4, 20, what="4 urgent files stored")
            elapsed = time.monotonic() - started
            assert elapsed < 3.0, f"the urgent files took {elapsed:.1f}s"
        finally:
            rig.stop()


def test_a_file_in_hand_when_the_destination_is_paused_finishes_at_max_rate(
    tmp_path: Path,
) -> None:
    """``forwarder pause`` (or a window closing) lets the file being sent finish, still held
    to ``max_rate``: an idle sibling thread seeing the pause must not lift the cap."""
    with Queue(tmp_path / "q.sqlite") as queue, _TimedSCP() as scp:
        fields = {"ae_title": "SCP", "host": "127.0.0.1", "port": scp.port, "associations": 2}
        rig = _Rig(tmp_path, queue, {**fields, "max_rate": "64KB/s"})
        rig.enqueue(1, rows=512, columns=512)  # 512 KiB: 8 s at 64 KiB/s
        rig.workers.start()
        try:
            wait_until(lambda: queue.stats()["pacs"].in_flight == 1, 10, what="the file claimed")
            queue.pause("pacs")
            paused = time.monotonic()
            while time.monotonic() < paused + 3.0:
                assert not scp.stamps, f"stored {scp.stamps[0][0] - paused:.1f}s after the pause"
                time.sleep(0.05)
            wait_until(lambda: len(scp.stamps) == 1, 15, what="the file in hand stored")
        finally:
            rig.stop()


class _CountingQueue(Queue):
    """A real queue that counts the claims made of it."""

    claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> list[Job]:
        self.claims += 1
        return super().claim(*args, **kwargs)


def test_urgent_only_outside_the_window_does_not_claim_in_a_tight_loop(tmp_path: Path) -> None:
    """Outside the window with ``urgent_bypasses_window`` and ordinary files due, the threads
    look for urgent ones a few times a second (new files wake them at once), not 20 times."""
    with _CountingQueue(tmp_path / "q.sqlite") as queue, ScriptedSCP() as scp:
        fields = {"ae_title": "SCP", "host": "127.0.0.1", "port": scp.port}
        rig = _Rig(tmp_path, queue, {**fields, "window": ["Mon 08:00-09:00"],
                                     "urgent_bypasses_window": True})  # fmt: skip
        rig.now[0] = datetime(2026, 11, 25, 12, 0)  # outside
        rig.enqueue(5)  # normal: they wait for the window
        rig.workers.start()
        try:
            wait_until(lambda: queue.claims >= 1, 10, what="a first claim")
            before, started = queue.claims, time.monotonic()
            wait_until(lambda: time.monotonic() - started >= 2.0, 5, what="2 s")
            claims = queue.claims - before
            assert claims <= 12, f"{claims} claims in 2 s"
            assert queue.stats()["pacs"].pending == 5 and not scp.uids()
        finally:
            rig.stop()
