"""The queue with many pending jobs: the hot path looks rows up by key, and the long reads
(statistics, sweeps) never hold up a claim, an ack or an enqueue.

Latencies at 1M pending jobs are measured by ``python -m bench.queue_depth``, not here; these
tests pin down the two properties that keep those latencies flat.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from forwarder.queue import FileEntry, Queue, sql

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"

# What every file's journey runs, once or per batch: ingest, claim, ack, finish.
HOT = (
    "INSERT_FILES",
    "INSERT_JOBS_MANY",
    "INSERT_JOBS",
    "CLAIM",
    "CLAIM_OLDEST",
    "CLAIMED_JOBS",
    "ACK_TERMINAL",
    "RECORD_SENT_UIDS",
    "FREEZE_OWN_SENT_UIDS",
    "ACK_RETRY",
    "DROP_CLAIMED",
    "RELEASE",
    "BUMP_STATS",
    "TERMINAL_FILES",
    "TO_FINISH_IDS",
    "RESULTS",
    "BEGIN_FINISH",
    "COMPLETE_FINISH",
    "SWEEP_UPTO",
    "TO_FINISH_SLICE",
    # what the status line (every 5 s), forwarder status, the page and every scrape read
    "LIVE_JOBS",
)
PARAMS = {
    "path": "/in/a.dcm",
    "rel_path": "a.dcm",
    "size": 1,
    "mtime_ns": 1,
    "sop_class_uid": CT,
    "sop_instance_uid": "1.2.3",
    "transfer_syntax": EXPLICIT,
    "study_instance_uid": None,
    "series_instance_uid": None,
    "accession_number": None,
    "calling_ae": None,
    "called_ae": None,
    "peer": None,
    "association": None,
    "now": 0.0,
    "file_id": 1,
    "destinations": '["pacs"]',
    "rows": '[{"path": "/in/a.dcm"}]',
    "jobs": '[[1, "pacs", 1]]',
    "items": '[[1, "/done/a.dcm"]]',
    "destination": "pacs",
    "limit": 64,
    "max_rank": 2,
    "commit": 0,
    "own": "",
    "sent": '[[1, ["1.2", "1.2.1", "1.2.1.1"]]]',
    "ids": "[1, 2, 3]",
    "status": "DONE",
    "last_status": 0,
    "error": None,
    "id": 1,
    "next_attempt_at": 0.0,
    "charge": 1,
    "final_path": "/done/a.dcm",
    "done": 1,
    "failed": 0,
    "after": 0,
    "upto": 100,
    "offset": 99,
}


def entry(n: int) -> FileEntry:
    return FileEntry(
        path=f"/in/{n}.dcm",
        rel_path=f"{n}.dcm",
        size=1234,
        mtime_ns=n,
        sop_class_uid=CT,
        sop_instance_uid=f"1.2.3.{n}",
        transfer_syntax=EXPLICIT,
    )


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    q = Queue(tmp_path / "queue.sqlite")
    q.enqueue_many([(entry(n), ["pacs"]) for n in range(2000)])
    return q


@pytest.mark.parametrize("name", HOT)
def test_hot_statements_look_rows_up_by_key(queue: Queue, name: str) -> None:
    """No statement of a file's journey walks a table or an index over every queued file
    (TERMINAL_FILES once picked the files_state index, ~11 ms an ack at 200k pending jobs)."""
    conn = sqlite3.connect(queue.path)
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {getattr(sql, name)}", PARAMS)]
    finally:
        conn.close()
        queue.close()
    # a scan of json_each (a statement's own parameter, a virtual table) is not a walk
    walks = [
        step
        for step in plan
        if step.startswith("SCAN") and "json_each" not in step and "VIRTUAL TABLE" not in step
    ]
    by_state = [step for step in plan if "files_state" in step]
    assert not walks and not by_state, plan


def test_the_destinations_with_jobs_are_found_by_seeks_not_by_reading_every_job(
    queue: Queue,
) -> None:
    """stats() lists the destinations with jobs one index seek each: SELECT DISTINCT (or a
    GROUP BY over the table) read 7 days of finished jobs for every status line and scrape."""
    conn = sqlite3.connect(queue.path)
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql.JOB_DESTINATIONS}")]
        queue.enqueue_many([(entry(n), ["archive"]) for n in range(5000, 5010)])
        found = [r[0] for r in conn.execute(sql.JOB_DESTINATIONS)]
    finally:
        conn.close()
        queue.close()
    assert not [step for step in plan if step.startswith("SCAN jobs")], plan
    assert [step for step in plan if "SEARCH jobs" in step], plan
    assert found == ["archive", "pacs"]


def test_a_long_read_does_not_hold_up_claims_acks_and_enqueues(queue: Queue) -> None:
    """A statistics read in progress (held open here) leaves the writer's path free: claim,
    ack and enqueue complete meanwhile, and the read still sees its own snapshot."""
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def long_read() -> None:
        with queue._scan("holding a read open") as conn:
            seen.append(
                conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'READY'").fetchone()[0]
            )
            inside.set()
            release.wait(30)
            seen.append(
                conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'READY'").fetchone()[0]
            )

    reader = threading.Thread(target=long_read)
    reader.start()
    try:
        assert inside.wait(10)
        done = threading.Event()

        def writes() -> None:
            jobs = queue.claim("pacs", 64)
            queue.ack_done([j.id for j in jobs], status=0)
            queue.enqueue(entry(10_000), ["pacs"])
            done.set()

        writer = threading.Thread(target=writes)
        writer.start()
        writer.join(10)
        assert done.is_set(), "a write waited for the long read"
    finally:
        release.set()
        reader.join(10)
    assert seen == [2000, 2000]  # one snapshot for the whole read
    assert queue.stats()["pacs"].pending == 2000 - 64 + 1
    queue.close()


def test_the_proof_threads_reads_do_not_take_the_writers_lock(queue: Queue) -> None:
    """The storage commitment keeper and the verifying query read every instance awaiting
    proof (up to 10,000 rows, sorted) once a second, and every /, /api/status and /metrics
    request counts them (commitment_counts): at 200,000 awaiting that is 0.1-0.7 s a read,
    which under the lock every claim, ack and enqueue takes held the senders for as long
    (helper-56 measured a claim waiting 681 ms while the page was fetched in a loop). They
    read on the statistics connection: here they finish while the writers' lock is held."""
    claimed = queue.claim("pacs", 300)
    queue.ack_done([j.id for j in claimed], status=0, commitment=True)
    results: dict[str, int] = {}

    def read() -> None:
        results["awaiting"] = len(queue.awaiting_commitment("pacs"))
        results["counted"] = queue.commitment_counts()["pacs"].awaiting

    with queue._lock:  # a writer's transaction in progress
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(10)
        finished = not reader.is_alive()
    reader.join()
    queue.close()
    assert finished, "a proof read waited for the writers' lock"
    assert results == {"awaiting": 300, "counted": 300}


def test_the_sweep_finds_every_leftover_once_a_cycle_a_slice_at_a_time(queue: Queue) -> None:
    """Files whose jobs ended without the finisher being told are found by the periodic sweep,
    one slice of ``span`` files per call; a file left FINISHING (its move failed) by every call."""
    claimed = queue.claim("pacs", 2000)
    leftovers = [j.file_id for j in claimed if j.file_id % 7 == 0]
    queue.ack_done([j.id for j in claimed if j.file_id % 7 == 0], status=0)
    stuck = leftovers.pop()
    queue.begin_finish(stuck, "/done/stuck.dcm")
    found: list[int] = []
    after, calls = 0, 0
    while True:
        items, after = queue.sweep_to_finish(after, span=300)
        calls += 1
        assert stuck in [i.file_id for i in items]  # in every slice
        found += [i.file_id for i in items if i.file_id != stuck]
        if after == 0:
            break
        assert calls < 20
    assert calls == 7  # 2000 files, 300 a slice
    assert sorted(found) == sorted(leftovers)  # each exactly once
    first, _ = queue.sweep_to_finish(0, span=300)  # the next cycle starts again
    assert {i.file_id for i in first} == {stuck} | {f for f in leftovers if f <= 300}
    queue.close()


def test_a_full_slice_goes_on_after_its_last_file(queue: Queue) -> None:
    claimed = queue.claim("pacs", 50)
    queue.ack_done([j.id for j in claimed], status=0)
    items, after = queue.sweep_to_finish(0, span=1000, limit=20)
    assert [i.file_id for i in items] == sorted(j.file_id for j in claimed)[:20]
    assert after == items[-1].file_id
    rest, after = queue.sweep_to_finish(after, span=1000, limit=20)
    assert [i.file_id for i in rest] == sorted(j.file_id for j in claimed)[20:40]
    queue.close()


def test_statistics_are_read_again_only_when_the_database_changed(queue: Queue) -> None:
    """Every status line, scrape and page view asks for stats() and waiting_to_move(): they
    count the backlog again only after a commit, of this queue or of another connection (the
    watch-and-ingest process's), and say what a new reading says."""
    other = Queue(queue.path)  # another connection, as another process has
    conn = queue._scan_connection("test")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        first = queue.stats(now=1e10)["pacs"]
        assert (first.pending, first.in_flight, queue.waiting_to_move()) == (2000, 0, 0)
        counted = len([s for s in statements if "COUNT(*)" in s])
        again = queue.stats(now=1e10 + 5)["pacs"]
        assert queue.waiting_to_move() == 0
        assert len([s for s in statements if "COUNT(*)" in s]) == counted  # nothing recounted
        assert again.pending == 2000
        assert again.oldest_pending_seconds == pytest.approx(first.oldest_pending_seconds + 5)

        other.enqueue(entry(20_000), ["pacs", "archive"])
        jobs = other.claim("pacs", 10)
        assert {n: (s.pending, s.in_flight) for n, s in queue.stats().items()} == {
            "archive": (1, 0),
            "pacs": (1991, 10),
        }
        other.ack_done([j.id for j in jobs], status=0)
        assert queue.waiting_to_move() == 10  # stored everywhere, still in incoming
        assert queue.stats()["pacs"].done == 10
        queue.enqueue(entry(20_001), ["pacs"])  # this queue's own connection
        assert queue.stats()["pacs"].pending == 1992
    finally:
        conn.set_trace_callback(None)
        other.close()
        queue.close()
