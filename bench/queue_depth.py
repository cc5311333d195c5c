"""The queue at depth: claim, ack and enqueue latencies with N pending jobs while the daemon's
periodic reads (statistics, counts, files to finish, pending syntaxes) run as often as they can.

``python -m bench.queue_depth`` (default 1,000,000 pending jobs; ``--rows 200000`` for a quick
look). Issue 13's goal: each of claim, ack and enqueue at most 1 ms at the 99th percentile, and
the periodic reads never blocking them. ``--finished N`` adds N files finished 8 days ago and a
third round, measured while the daemon's hourly prune deletes them (in its slices). The queue
lives on the filesystem of ``--dir`` (default: a temporary folder), with the daemon's pragmas
(WAL, synchronous FULL): an fsync per commit is part of what is measured, as it is in the
daemon.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from forwarder.queue import FileEntry, Queue

DESTINATION = "pacs"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_BATCH = 20_000
_NEW = itertools.count(10**9)  # files enqueued while measuring: new paths every time
_PRUNE_SLICE = 10_000  # as the daemon's main loop prunes (service_loop._PRUNE_SLICE)


def _entry(n: int) -> FileEntry:
    study, series = n // 500, n // 100
    return FileEntry(
        path=f"/srv/incoming/{study}/{n}.dcm",
        rel_path=f"{study}/{n}.dcm",
        size=9000,
        mtime_ns=n,
        sop_class_uid=CT,
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}",
        transfer_syntax=EXPLICIT_LE,
        study_instance_uid=f"1.2.826.0.1.3680043.10.2.{study}",
        series_instance_uid=f"1.2.826.0.1.3680043.10.3.{series}",
    )


def fill(queue: Queue, rows: int) -> None:
    """``rows`` READY jobs, one destination each, in large transactions."""
    started = time.monotonic()
    for first in range(0, rows, _BATCH):
        items = [(_entry(n), [DESTINATION]) for n in range(first, min(rows, first + _BATCH))]
        queue.enqueue_many(items)
    print(f"filled {rows:,} pending jobs in {time.monotonic() - started:.1f} s")


def fill_finished(queue: Queue, rows: int) -> None:
    """``rows`` files delivered and moved to done/ 8 days ago: what the next prune deletes.
    Before the pending ones, which would otherwise be claimed here."""
    started = time.monotonic()
    at = time.time() - 8 * 86400
    for first in range(0, rows, _BATCH):
        n = min(rows, first + _BATCH) - first
        queue.enqueue_many([(_entry(next(_NEW)), [DESTINATION]) for _ in range(n)], now=at)
        jobs = queue.claim(DESTINATION, n, now=at)
        files = queue.ack_done([j.id for j in jobs], now=at)
        queue.begin_finish_many([(f, f"/srv/done/{f}.dcm") for f in files])
        queue.complete_finish_many(files, now=at)
    print(f"filled {rows:,} finished files in {time.monotonic() - started:.1f} s")


def _prune(queue: Queue, stop: threading.Event, timings: list[float]) -> None:
    """The daemon's prune (service_loop): a slice a call, the next one a tick later."""
    while not stop.is_set():
        started = time.monotonic()
        deleted = queue.prune(7 * 86400, limit=_PRUNE_SLICE)
        timings.append(time.monotonic() - started)
        if deleted < _PRUNE_SLICE:
            return
        stop.wait(1.0)


def _percentiles(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{name:<10} n={len(ms):>5}  p50 {statistics.median(ms):7.3f} ms  "
        f"p99 {p99:7.3f} ms  max {ms[-1]:7.3f} ms"
    )


def _periodic_reads(queue: Queue, stop: threading.Event, timings: list[float]) -> None:
    """What the daemon reads every few seconds, back to back: the worst case."""
    after = 0
    while not stop.is_set():
        started = time.monotonic()
        queue.stats(destinations=[DESTINATION])  # metrics, status page
        queue.counts()  # systemd status line
        _, after = queue.sweep_to_finish(after)  # the finisher's periodic sweep
        queue.pending_syntaxes(DESTINATION)  # each destination's proposals
        queue.waiting_to_move()  # forwarder status
        timings.append(time.monotonic() - started)


def measure(
    queue: Queue, rounds: int, *, with_reads: bool, with_prune: bool = False
) -> dict[str, list[float]]:
    """``rounds`` times (claim 64, ack those, enqueue one file), timed one by one."""
    samples: dict[str, list[float]] = {"claim": [], "ack": [], "enqueue": []}
    stop = threading.Event()
    reads: list[float] = []
    target = _prune if with_prune else _periodic_reads
    reader = threading.Thread(target=target, args=(queue, stop, reads), daemon=True)
    if with_reads or with_prune:
        reader.start()
    try:
        for _ in range(rounds):
            t: Callable[[], float] = time.perf_counter
            started = t()
            jobs = queue.claim(DESTINATION, 64)
            samples["claim"].append(t() - started)
            started = t()
            queue.ack_done([j.id for j in jobs], status=0)
            samples["ack"].append(t() - started)
            started = t()
            queue.enqueue(_entry(next(_NEW)), [DESTINATION])
            samples["enqueue"].append(t() - started)
    finally:
        stop.set()
        if with_reads or with_prune:
            reader.join()
    if reads:
        samples["prune" if with_prune else "reads"] = reads
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="pending jobs (1,000,000)")
    parser.add_argument("--rounds", type=int, default=500, help="claim/ack/enqueue rounds (500)")
    parser.add_argument("--dir", type=Path, default=None, help="where the queue file goes")
    parser.add_argument("--finished", type=int, default=0, help="finished files to prune (0)")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(dir=args.dir, prefix="queue-depth-") as tmp,
        Queue(Path(tmp) / "queue.db") as queue,
    ):
        if args.finished:
            fill_finished(queue, args.finished)
        fill(queue, args.rows)
        for with_reads in (False, True):
            title = "with the periodic reads running" if with_reads else "alone"
            print(f"-- {title}")
            for name, samples in measure(queue, args.rounds, with_reads=with_reads).items():
                print(_percentiles(name, samples))
        if args.finished:
            print(f"-- while the prune deletes {args.finished:,} finished files")
            rounds = measure(queue, args.rounds, with_reads=False, with_prune=True)
            for name, samples in rounds.items():
                print(_percentiles(name, samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
