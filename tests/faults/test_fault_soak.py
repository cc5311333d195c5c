"""Soak: a long stream of files through two destinations, one of them flapping (its process
killed and restarted every few seconds). Nothing is lost, memory and descriptors stay flat, and
the queue database stays bounded (and shrinks when pruned).

``test_soak_20000_files`` is the real one (``make soak``); the short variant runs in the
normal suite with 2,000 files.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from daemon import Daemon, destination
from invariants import clone_files, settled_problems, snapshot
from peers import STORESCP, free_port, stop_process, storescp, wait_for_port

from forwarder.queue import Queue


@dataclass
class Flapper:
    """DCMTK storescp on a fixed port, killed and started again every ``period`` seconds."""

    output: Path
    period: float
    port: int = field(default_factory=free_port)
    ae_title: str = "FLAPPER"
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _steady: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Flapper:
        self.output.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="flapper")
        self._thread.start()
        return self

    def _spawn(self) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}
        cmd = [STORESCP, "-aet", self.ae_title, "-od", str(self.output), str(self.port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._proc = proc
        wait_for_port(self.port, proc=proc)

    def _run(self) -> None:
        up = True
        self._spawn()
        while not self._stop.wait(self.period * (1.0 if up else 0.5)):
            if self._steady.is_set():
                if not up:
                    self._spawn()
                    up = True
                continue
            if up:
                assert self._proc is not None
                self._proc.kill()  # the peer dies: connections reset, nothing listening
                self._proc.wait(10)
            else:
                self._spawn()
                self.restarts += 1
            up = not up

    def steady(self) -> None:
        """Stop flapping; stay (or come) up for good."""
        self._steady.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        if self._proc is not None:
            stop_process(self._proc)

    def uids(self) -> set[str]:
        return received_uids(self.output)


def received_uids(folder: Path) -> set[str]:
    """SOP Instance UIDs of what storescp wrote (files named MODALITY.UID)."""
    return {p.name.split(".", 1)[1] for p in folder.iterdir() if p.is_file() and "." in p.name}


@dataclass
class Sample:
    at: float
    done: int
    rss: int
    fds: int
    db_bytes: int


def run_soak(tmp_path: Path, total: int, wave: int, flap_period: float, timeout: float) -> None:
    root = tmp_path / "d"
    samples: list[Sample] = []
    flapper = Flapper(tmp_path / "flapping", flap_period).start()
    try:
        with storescp(tmp_path / "steady") as steady:
            d = Daemon(
                root,
                destinations=[
                    destination("steady", steady.port, ae_title=steady.ae_title, associations=2),
                    destination(
                        "flapping",
                        flapper.port,
                        ae_title=flapper.ae_title,
                        associations=2,
                        connect_timeout="1s",
                    ),
                ],
                retry={"initial_delay": "200ms", "max_delay": "1s"},
                log_level="WARNING",
            )
            uids: set[str] = set()
            d.start(wait_ready=False)  # the "running" line is INFO: not logged at WARNING
            try:
                proc = psutil.Process(d.pid)

                def sample() -> None:
                    db = sum(
                        p.stat().st_size
                        for p in root.glob("queue.sqlite*")
                        if p.name.endswith(("sqlite", "-wal"))
                    )
                    # The daemon with its watch-and-ingest process (which holds what ingest
                    # keeps, and the files it fsyncs open).
                    rss, fds = proc.memory_info().rss, proc.num_fds()
                    for child in proc.children():
                        try:
                            rss, fds = rss + child.memory_info().rss, fds + child.num_fds()
                        except psutil.Error:
                            continue
                    samples.append(Sample(time.monotonic(), len(d.done_files()), rss, fds, db))

                deadline = time.monotonic() + timeout
                waves = 0
                while len(uids) < total:
                    # The flapping must happen while files flow, however fast the daemon takes
                    # them: the second and third waves wait for the first and second restart.
                    flaps = min(waves, 2)
                    wait_until(
                        lambda flaps=flaps: flapper.restarts >= flaps,  # type: ignore[misc]
                        timeout=max(deadline - time.monotonic(), 1.0),
                        interval=0.1,
                        what=f"the flapping destination to restart {flaps} times",
                    )
                    waves += 1
                    n = min(wave, total - len(uids))
                    uids.update(clone_files(d.incoming, n, start=len(uids), atomic=True))
                    sample()
                    # a steady stream: the next wave once this one is mostly queued
                    wait_until(
                        lambda: len(d.incoming_files()) < wave // 2 or not d.running(),
                        timeout=max(deadline - time.monotonic(), 1.0),
                        interval=0.1,
                        what="the daemon to take the last wave",
                    )
                flapper.steady()
                wait_until(
                    lambda: (sample() or True) and len(d.done_files()) >= total,
                    timeout=max(deadline - time.monotonic(), 1.0),
                    interval=0.5,
                    what=f"{total} files in done/",
                )
                sample()
                assert d.stop() == 0
            finally:
                d.close()
            assert flapper.restarts >= 2, "the flapping destination never flapped"
            assert received_uids(steady.output) == uids, "steady: something was lost"
            assert flapper.uids() == uids, "flapping: something was lost"
            problems = settled_problems(root / "queue.sqlite", d.incoming, d.done, d.failed)
            assert problems == [], problems
            assert snapshot(root / "queue.sqlite").jobs == {"DONE": 2 * total}
    finally:
        flapper.stop()
    # flat memory and descriptors: compare the second half of the run with its first quarter
    warm = [s for s in samples if s.done >= total // 4] or samples
    base_rss = min(s.rss for s in warm[: max(1, len(warm) // 4)])
    peak_rss = max(s.rss for s in warm)
    print(  # shown with -rP / -s: the numbers docs/guarantees.md quotes
        f"soak {total}: {samples[-1].at - samples[0].at:.0f}s, {flapper.restarts} restarts, "
        f"RSS {base_rss >> 20}->{peak_rss >> 20} MB, fds {min(s.fds for s in warm)}-"
        f"{max(s.fds for s in warm)}, queue up to {max(s.db_bytes for s in samples) >> 10} KB"
    )
    assert peak_rss - base_rss < 48 * 1024 * 1024, (
        f"RSS grew from {base_rss >> 20} MB to {peak_rss >> 20} MB"
    )
    # Descriptors: no leak (the floor of the second half is that of the first quarter, give or
    # take 16), and bounded while busy (ingest holds up to 64 files open to fsync them at once).
    fds = [s.fds for s in warm]
    quarter, half = fds[: max(1, len(fds) // 4)], fds[len(fds) // 2 :] or fds
    assert min(half) - min(quarter) <= 16, f"descriptors' floor grew: {fds}"
    assert max(fds) - min(fds) <= 64 + 32, f"descriptors ranged from {min(fds)} to {max(fds)}"
    # the queue: about a kilobyte per file (rows kept 7 days), the WAL checkpointed
    db_bytes = max(s.db_bytes for s in samples)
    assert db_bytes < 16 * 1024 * 1024 + total * 2048, f"queue grew to {db_bytes} bytes"
    wal = root / "queue.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size < 70 * 1024 * 1024
    # pruning the finished rows gives the space back (the daemon does this hourly, 7 days on)
    with Queue(root / "queue.sqlite") as q:
        assert q.prune(0) == total
    size = (root / "queue.sqlite").stat().st_size
    assert size < 1024 * 1024, f"{size} bytes after pruning every file"


@pytest.mark.faults
def test_soak_short_2000_files_one_destination_flapping(tmp_path: Path) -> None:
    run_soak(tmp_path, total=2000, wave=250, flap_period=2.0, timeout=120)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_20000_files(tmp_path: Path) -> None:
    run_soak(tmp_path, total=20_000, wave=500, flap_period=3.0, timeout=1500)
