"""Rate caps (issue 16): the token bucket's arithmetic on an injected clock, the config's rate
values, and a short tolerant check on real sockets: a daemon destination capped at 512 KB/s
holds its rate within 25% with two associations sharing one bucket, while an uncapped
destination fed the same files is not slowed. The minute-long 20 MB/s measurement with one and
four associations is ``python -m bench.rate`` (bench/rate.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from daemon import Daemon, destination, uids
from peers import Received, ScriptedSCP

from forwarder.config.flow import parse_rate
from forwarder.daemon.flow import FlowGate
from forwarder.net.pacing import BURST_SECONDS, Pacer
from forwarder.queue import Queue


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
    from datetime import datetime

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
