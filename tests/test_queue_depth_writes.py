"""The queue's writes at depth: a write transaction holds SQLite's write lock, which the
listener's receiving process (another process) waits for before it can answer a modality, and
the lock every claim, ack and enqueue of the daemon takes. What a write does must not grow with
the queue, and housekeeping must hand both locks back often.

Deterministic checks (query plans, what each transaction changed as another connection sees it),
not latencies: those are ``python -m bench.queue_depth``'s.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.queue import FileEntry, Queue, sql

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
T0 = 1_000_000.0


def entry(n: int, size: int = 1234) -> FileEntry:
    return FileEntry(
        path=f"/in/{n}.dcm",
        rel_path=f"{n}.dcm",
        size=size,
        mtime_ns=n,
        sop_class_uid=CT,
        sop_instance_uid=f"1.2.3.{n}",
        transfer_syntax=EXPLICIT,
    )


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = Queue(tmp_path / "queue.sqlite")
    try:
        yield q
    finally:
        q.close()


def plans(path: str, statements: list[str]) -> list[tuple[str, list[str]]]:
    conn = sqlite3.connect(path)
    try:
        return [
            (s, [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {s}")]) for s in statements
        ]
    finally:
        conn.close()


def test_a_replaced_file_is_found_by_its_path_not_among_every_queued_file(queue: Queue) -> None:
    """A file replaced while queued (a modality sending an object again, a file rewritten in
    incoming) is looked up by its path: its UPDATE once picked the files_state index and read
    every QUEUED file inside the write transaction (90 ms at 200,000 pending files, while the
    listener's next object waited)."""
    queue.enqueue_many([(entry(n), ["pacs"]) for n in range(500)], now=T0)
    ran: list[str] = []
    conn = queue._conn
    assert conn is not None
    conn.set_trace_callback(ran.append)
    try:
        assert queue.replace_file(entry(7, size=99), ["pacs", "ai"], now=T0 + 1) is not None
    finally:
        conn.set_trace_callback(None)
    statements = [s for s in ran if not s.startswith(("PRAGMA", "BEGIN", "COMMIT"))]
    assert statements
    for statement, plan in plans(queue.path, statements):
        walks = [
            step
            for step in plan
            if (step.startswith("SCAN") and "json_each" not in step and "VIRTUAL" not in step)
            or "files_state" in step
        ]
        assert not walks, (statement, plan)


def test_prune_reads_only_the_rows_it_deletes() -> None:
    """Each prune transaction takes the oldest finished files from the index, a batch at a time:
    it once sorted every finished file past the cutoff by id in every batch (113 ms a batch at
    200,000 finished files, under the write lock)."""
    conn = sqlite3.connect(":memory:")
    try:
        for statement in sql.DDL:
            conn.execute(statement)
        params = {"cutoff": 0.0, "batch": 10}
        plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql.PRUNE}", params)]
    finally:
        conn.close()
    assert not [step for step in plan if "TEMP B-TREE" in step], plan


def finished(queue: Queue, n: int) -> None:
    """``n`` files delivered and moved to done/ at T0."""
    for first in range(0, n, 2000):
        queue.enqueue_many(
            [(entry(i), ["pacs"]) for i in range(first, min(n, first + 2000))], now=T0
        )
        jobs = queue.claim("pacs", 2000, now=T0)
        terminal = queue.ack_done([j.id for j in jobs], now=T0)
        queue.begin_finish_many([(f, f"/done/{f}.dcm") for f in terminal])
        queue.complete_finish_many(terminal, now=T0)


def test_prune_hands_both_locks_back_in_small_transactions(queue: Queue) -> None:
    """Housekeeping deletes old rows and gives their pages back in transactions of a bounded
    size, so that a received object's row (another process) and the workers' acks get in
    between: it once deleted 2,000 files a transaction and gave every freed page back in one
    (591 ms at 200,000 pruned files, with the listener's answer waiting)."""
    finished(queue, 6000)
    queue.enqueue_many([(entry(n), ["pacs"]) for n in range(10_000, 10_100)], now=T0)
    seen: list[tuple[int, int]] = []  # (files, free pages) committed when each write began
    watcher = sqlite3.connect(queue.path)

    def look(statement: str) -> None:
        if statement == "BEGIN IMMEDIATE":
            files = watcher.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            free = watcher.execute("PRAGMA freelist_count").fetchone()[0]
            seen.append((files, free))

    conn = queue._conn
    assert conn is not None
    conn.set_trace_callback(look)
    try:
        assert queue.prune(60, now=T0 + 3600) == 6000
    finally:
        conn.set_trace_callback(None)
    seen.append(
        (
            watcher.execute("SELECT COUNT(*) FROM files").fetchone()[0],
            watcher.execute("PRAGMA freelist_count").fetchone()[0],
        )
    )
    watcher.close()
    assert seen[0][0] == 6100 and seen[-1] == (100, 0)
    deleted = [a[0] - b[0] for a, b in itertools.pairwise(seen)]
    given_back = [a[1] - b[1] for a, b in itertools.pairwise(seen)]
    assert max(given_back) > 0  # pages were given back
    assert max(deleted) <= 500, deleted
    assert max(given_back) <= 256, given_back


def test_a_reader_does_not_make_prune_hold_the_writers(queue: Queue) -> None:
    """The checkpoint after a prune waits for no reader: a reader on an older snapshot (the
    status page, ``forwarder status``) once held the checkpoint, with the lock every claim and
    ack takes and SQLite's write lock, for its 2 s busy timeout."""
    finished(queue, 10)
    queue.enqueue_many([(entry(n), ["pacs"]) for n in range(100, 110)], now=T0)
    reader = sqlite3.connect(queue.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchall()  # holds a snapshot
        started = time.monotonic()
        assert queue.prune(60, now=T0 + 3600) == 10
        took = time.monotonic() - started
        # and a claim right after it is not held either
        claim_started = time.monotonic()
        assert len(queue.claim("pacs", 1, now=T0)) == 1
        claimed = time.monotonic() - claim_started
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert took < 1.0 and claimed < 1.0, (took, claimed)


def test_prune_deletes_a_backlog_a_slice_a_call(queue: Queue) -> None:
    """``limit`` bounds one call (the daemon's main loop calls again at its next tick): the
    first prune after a long stop once deleted every row past the cutoff in one call, 80 s at
    1,000,000 finished files, with signals and systemd's watchdog (120 s) waiting."""
    finished(queue, 250)
    assert queue.prune(60, now=T0 + 3600, limit=120) == 120
    assert queue.prune(60, now=T0 + 3600, limit=120) == 120
    assert queue.prune(60, now=T0 + 3600, limit=120) == 10
    assert queue.prune(60, now=T0 + 3600) == 0
    assert queue.counts()["DONE"] == 0


def test_a_removed_destinations_jobs_fail_in_small_transactions(queue: Queue) -> None:
    """A destination removed by a reload with a backlog: its jobs fail a slice a transaction
    (all at once held the write lock 2.2 s at 200,000 pending jobs, with the listener's next
    answer waiting), and every file that only went there is handed to the finisher."""
    queue.enqueue_many([(entry(n), ["gone"]) for n in range(1000)], now=T0)
    queue.enqueue_many([(entry(n), ["gone", "pacs"]) for n in range(1000, 1100)], now=T0)
    seen: list[int] = []  # READY jobs of "gone" committed when each write began
    watcher = sqlite3.connect(queue.path)

    def look(statement: str) -> None:
        if statement == "BEGIN IMMEDIATE":
            seen.append(
                watcher.execute(
                    "SELECT COUNT(*) FROM jobs WHERE destination = 'gone' AND status = 'READY'"
                ).fetchone()[0]
            )

    conn = queue._conn
    assert conn is not None
    conn.set_trace_callback(look)
    try:
        terminal = queue.fail_pending("gone", error="no longer configured", now=T0 + 1)
    finally:
        conn.set_trace_callback(None)
    watcher.close()
    assert sorted(terminal) == list(range(1, 1001))
    assert queue.stats()["gone"].failed == 1100 and queue.stats()["gone"].pending == 0
    seen.append(0)
    failed_each = [a - b for a, b in itertools.pairwise(seen)]
    assert seen[0] == 1100 and max(failed_each) <= 500, failed_each


def test_proof_dropped_by_a_reload_is_released_in_small_transactions(queue: Queue) -> None:
    """A destination that no longer requires proof (a reload) with many instances awaiting it:
    they are released a slice a transaction (all at once held the write lock 382 ms at 50,000
    awaiting, 1.5 s at 200,000, with the listener's next answer waiting). An open transaction
    is cancelled with its last instances: none is left requested in a cancelled one."""
    queue.enqueue_many([(entry(n), ["pacs"]) for n in range(1100)], now=T0)
    jobs = queue.claim("pacs", 1100, now=T0)
    queue.ack_done([j.id for j in jobs], now=T0, commitment=True)
    queue.begin_commitment("2.25.1", "pacs", "stgcmt", [j.id for j in jobs[:300]], deadline=T0)
    seen: list[int] = []  # instances awaiting proof, committed when each write began
    watcher = sqlite3.connect(queue.path)

    def look(statement: str) -> None:
        if statement == "BEGIN IMMEDIATE":
            seen.append(
                watcher.execute("SELECT COUNT(*) FROM jobs WHERE commitment IN (1, 2)").fetchone()[
                    0
                ]
            )

    conn = queue._conn
    assert conn is not None
    conn.set_trace_callback(look)
    try:
        released, files = queue.drop_proof("pacs")
    finally:
        conn.set_trace_callback(None)
    watcher.close()
    assert released == 1100 and sorted(files) == sorted(j.file_id for j in jobs)
    assert queue.open_commitments() == []
    assert all(c.awaiting == 0 for c in queue.commitment_counts().values())
    seen.append(0)
    each = [a - b for a, b in itertools.pairwise(seen)]
    assert seen[0] == 1100 and max(each) <= 500, each
