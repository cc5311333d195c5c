"""The persistent queue, on real SQLite files: every transition, concurrency, crashes, pruning."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.errors import QueueError
from forwarder.queue import (
    SCHEMA_VERSION,
    DestinationStats,
    FileEntry,
    FileState,
    Finish,
    JobStatus,
    PendingSyntax,
    Queue,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
T0 = 1_700_000_000.0


def entry(name: str, *, sop_class: str = CT, syntax: str = EXPLICIT) -> FileEntry:
    return FileEntry(
        path=f"/in/{name}",
        rel_path=name,
        size=1234,
        mtime_ns=42,
        sop_class_uid=sop_class,
        sop_instance_uid=f"1.2.3.{abs(hash(name)) % 10_000_000}",
        transfer_syntax=syntax,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite"


@pytest.fixture
def q(db: Path) -> Iterator[Queue]:
    with Queue(db) as queue:
        yield queue


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


def job_rows(db: Path) -> dict[int, tuple[str, int]]:
    conn = raw(db)
    try:
        rows = conn.execute("SELECT id, status, attempts FROM jobs").fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2]) for r in rows}


def finish(q: Queue, file_id: int, now: float = T0) -> None:
    q.begin_finish(file_id, f"/out/{file_id}")
    q.complete_finish(file_id, now=now)


# -- schema and pragmas ------------------------------------------------------------------------


def test_database_is_wal_full_sync_incremental_vacuum(q: Queue, db: Path) -> None:
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        schema = " ".join(r[0] for r in conn.execute("SELECT sql FROM sqlite_master") if r[0])
    finally:
        conn.close()
    for value in [*JobStatus, *FileState, *Finish]:
        assert f"'{value.value}'" in schema  # CHECK constraints spell the enums' values


def test_reopening_keeps_data_and_refuses_newer_schema(db: Path) -> None:
    with Queue(db) as q:
        assert q.enqueue(entry("a"), ["pacs"], now=T0) == 1
    with Queue(db) as q:
        assert q.counts()[JobStatus.READY] == 1
    conn = raw(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(QueueError, match="schema version 99"):
        Queue(db)


# -- enqueue -----------------------------------------------------------------------------------


def test_enqueue_is_idempotent_until_the_file_finished(q: Queue, db: Path) -> None:
    first = q.enqueue(entry("a"), ["pacs", "archive"], now=T0)
    assert first is not None
    assert q.enqueue(entry("a"), ["pacs", "other"], now=T0) is None
    assert len(job_rows(db)) == 2
    assert set(q.active_files()) == {"/in/a"}

    ids = [j.id for j in q.claim("pacs", 10, now=T0) + q.claim("archive", 10, now=T0)]
    assert q.ack_done(ids, now=T0) == [first]
    q.begin_finish(first, "/done/a")
    assert q.enqueue(entry("a"), ["pacs"], now=T0) is None  # still FINISHING
    assert set(q.active_files()) == {"/in/a"}
    q.complete_finish(first, now=T0)
    assert set(q.active_files()) == set()

    second = q.enqueue(entry("a"), ["pacs"], now=T0 + 1)
    assert second is not None and second != first
    assert set(q.active_files()) == {"/in/a"}


def test_where_the_data_set_starts_is_claimed_as_queued_and_as_replaced(q: Queue) -> None:
    """The sender takes the meta header from the queue (worker_batch._queued_meta): the offset
    ingest checked comes back with the job, and a replacement's with the new version."""
    q.enqueue(dataclasses.replace(entry("a"), dataset_offset=332), ["pacs"], now=T0)
    q.enqueue(entry("b"), ["pacs"], now=T0)  # not recorded (0): the sender reads the file
    by_path = {j.path: j for j in q.claim("pacs", 10, now=T0)}
    assert by_path["/in/a"].dataset_offset == 332
    assert by_path["/in/b"].dataset_offset == 0
    new = dataclasses.replace(entry("a"), size=999, mtime_ns=43, dataset_offset=200)
    assert q.replace_file(new, ["pacs"], now=T0 + 1) is not None
    q.ack_done([by_path["/in/a"].id], now=T0 + 1)  # the stale claim goes back to READY
    (again,) = q.claim("pacs", 10, now=T0 + 2)
    assert (again.path, again.size, again.dataset_offset) == ("/in/a", 999, 200)


def test_a_version_8_queue_gains_the_data_set_offset_and_its_files_read_their_header(
    db: Path,
) -> None:
    with Queue(db) as q:
        q.enqueue(dataclasses.replace(entry("old"), dataset_offset=332), ["pacs"], now=T0)
    conn = raw(db)
    conn.execute("ALTER TABLE files DROP COLUMN dataset_offset")  # as version 8 had it
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    with Queue(db) as q:
        (job,) = q.claim("pacs", 10, now=T0)
        assert job.dataset_offset == 0  # not known: the sender reads the meta header
        q.enqueue(dataclasses.replace(entry("new"), dataset_offset=332), ["pacs"], now=T0)
        (job,) = q.claim("pacs", 10, now=T0)
        assert job.dataset_offset == 332
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_enqueue_many_is_one_transaction(q: Queue, db: Path) -> None:
    ids = q.enqueue_many(
        [(entry("a"), ["x", "y", "x"]), (entry("b"), ["x"]), (entry("a"), ["y"])], now=T0
    )
    assert ids[0] is not None and ids[1] is not None and ids[2] is None
    assert q.counts() == {"READY": 3, "CLAIMED": 0, "DONE": 0, "FAILED": 0}
    # an invalid item anywhere means nothing of the batch is written
    with pytest.raises(ValueError, match="at least one destination"):
        q.enqueue_many([(entry("c"), ["x"]), (entry("d"), [])], now=T0)
    assert set(q.active_files()) == {"/in/a", "/in/b"}
    assert q.enqueue_many([]) == []


def test_a_batch_is_queued_in_its_order_with_every_value_and_priority(q: Queue) -> None:
    """enqueue_many writes a batch in two statements (JSON rows): each file's values, each
    job's priority, the files claimed in the order given, a file already queued skipped."""
    q.enqueue(entry("queued"), ["x"], now=T0)
    names = [f"f{n:02d}" for n in range(20)]
    items: list[tuple[FileEntry, dict[str, int] | list[str]]] = [
        (
            dataclasses.replace(
                entry(name),
                study_instance_uid=f"1.2.{n}",
                accession_number="" if n % 2 else f"ACC{n}",
                calling_ae="MOD" if n % 3 == 0 else "",
                dataset_offset=300 + n,
            ),
            {"x": 0, "y": 2} if n == 7 else ["x"],
        )
        for n, name in enumerate(names)
    ]
    items.insert(5, (entry("queued"), ["y"]))
    ids = q.enqueue_many(items, now=T0 + 1)
    assert ids[5] is None and all(i is not None for i in ids[:5] + ids[6:])
    jobs = q.claim("x", 100, now=T0 + 2)
    # urgent first (f07), then the queue's order: the file queued before, then the batch's
    assert [j.path for j in jobs] == ["/in/f07", "/in/queued"] + [
        f"/in/{n}" for n in names if n != "f07"
    ]
    by_path = {j.path: j for j in jobs}
    assert [by_path[f"/in/{n}"].dataset_offset for n in names] == [300 + n for n in range(20)]
    assert by_path["/in/f03"].calling_ae == "MOD" and by_path["/in/f04"].calling_ae == ""
    (low,) = q.claim("y", 100, now=T0 + 2)
    assert (low.path, low.priority) == ("/in/f07", 2)
    assert [f.path for f in q.find(["1.2.4"])] == ["/in/f04"]
    assert [f.path for f in q.find(["ACC4"])] == ["/in/f04"]
    assert q.find(["ACC5"]) == []  # none recorded: NULL, not ""


def test_one_file_alone_is_stored_as_in_a_batch(q: Queue, db: Path) -> None:
    """A file queued alone (the listener: one object while the modality waits) is bound
    directly, not through JSON: every column and job the same as the batch statement's."""
    full = dataclasses.replace(
        entry("x"),
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        accession_number="\u00c5CC\x001",  # non-ASCII, and a NUL the batch path drops
        calling_ae="MOD",
        called_ae="GW",
        peer="127.0.0.1:4000",
        association="a1",
        dataset_offset=332,
    )
    bare = entry("y")  # no find or origin values: NULL either way
    dests: dict[str, int] = {"pacs": 0, "archive": 2}
    alone = [
        q.enqueue(dataclasses.replace(e, path=f"/alone{e.path}"), dests, now=T0)
        for e in (full, bare)
    ]
    batch = q.enqueue_many(
        [(dataclasses.replace(e, path=f"/batch{e.path}"), dests) for e in (full, bare)], now=T0
    )
    assert None not in alone + batch
    assert q.enqueue(dataclasses.replace(full, path="/alone/in/x"), ["pacs"], now=T0) is None

    conn = raw(db)
    try:
        conn.row_factory = sqlite3.Row

        def row(file_id: int | None) -> dict[str, object]:
            r = dict(conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())
            del r["id"]
            r["path"] = str(r["path"]).split("/", 2)[2]
            jobs = conn.execute(
                "SELECT destination, status, priority, next_attempt_at FROM jobs "
                "WHERE file_id = ? ORDER BY id",
                (file_id,),
            ).fetchall()
            r["jobs"] = [tuple(j) for j in jobs]
            return r

        for a, b in zip(alone, batch, strict=True):
            assert row(a) == row(b)
        assert row(alone[0])["accession_number"] == "\u00c5CC1"
        assert row(alone[1])["study_instance_uid"] is None
        assert row(alone[0])["jobs"] == [("pacs", "READY", 0, T0), ("archive", "READY", 2, T0)]
    finally:
        conn.close()


def test_active_files_under_a_folder_reads_that_folder_only(q: Queue) -> None:
    names = [".listen/CT01/a", ".listen/CT01/b", ".listen0", ".listen-x/c", "d", ".listen"]
    q.enqueue_many([(entry(n), ["pacs"]) for n in names], now=T0)
    assert set(q.active_files(under="/in/.listen")) == {"/in/.listen/CT01/a", "/in/.listen/CT01/b"}
    assert set(q.active_files(under="/in/.listen/")) == set(q.active_files(under="/in/.listen"))
    assert len(q.active_files()) == len(names)


# -- claim -------------------------------------------------------------------------------------


def test_claim_oldest_due_first_with_limit(q: Queue) -> None:
    for i in range(5):
        q.enqueue(entry(f"f{i}"), ["pacs", "other"], now=T0 + i)
    assert q.claim("pacs", 0, now=T0 + 10) == []
    assert [j.rel_path for j in q.claim("pacs", 3, now=T0 + 1)] == ["f0", "f1"]  # due by then
    jobs = q.claim("pacs", 2, now=T0 + 10)
    assert [j.rel_path for j in jobs] == ["f2", "f3"]
    job = jobs[0]
    assert (job.destination, job.path, job.sop_class_uid, job.transfer_syntax) == (
        "pacs",
        "/in/f2",
        CT,
        EXPLICIT,
    )
    assert (job.size, job.attempts, job.created_at) == (1234, 0, T0 + 2)
    assert [j.rel_path for j in q.claim("pacs", 10, now=T0 + 10)] == ["f4"]
    assert q.claim("pacs", 10, now=T0 + 10) == []
    assert q.claim("nowhere", 10, now=T0 + 10) == []
    assert q.counts() == {"READY": 5, "CLAIMED": 5, "DONE": 0, "FAILED": 0}
    assert q.next_due("pacs") is None
    assert q.next_due("other") == T0


def test_claim_returns_due_jobs_in_order(q: Queue) -> None:
    q.enqueue_many([(entry(f"f{i}"), ["pacs"]) for i in range(4)], now=T0)
    jobs = q.claim("pacs", 10, now=T0)
    assert [j.rel_path for j in jobs] == ["f0", "f1", "f2", "f3"]
    assert [j.id for j in jobs] == sorted(j.id for j in jobs)


def test_retry_counts_an_attempt_and_waits_until_due(q: Queue, db: Path) -> None:
    q.enqueue(entry("a"), ["pacs"], now=T0)
    (job,) = q.claim("pacs", 1, now=T0)
    q.ack_retry(job.id, next_attempt_at=T0 + 60, error="connection refused", now=T0 + 1)
    assert job_rows(db)[job.id] == ("READY", 1)
    assert q.next_due("pacs") == T0 + 60
    assert q.claim("pacs", 1, now=T0 + 59) == []
    (again,) = q.claim("pacs", 1, now=T0 + 60)
    assert (again.id, again.attempts, again.created_at) == (job.id, 1, T0)
    assert q.stats(now=T0 + 60)["pacs"].last_error == "connection refused"


def test_release_returns_jobs_without_counting_an_attempt(q: Queue, db: Path) -> None:
    q.enqueue_many([(entry("a"), ["pacs"]), (entry("b"), ["pacs"])], now=T0)
    jobs = q.claim("pacs", 2, now=T0)
    q.release([j.id for j in jobs])
    assert set(job_rows(db).values()) == {("READY", 0)}
    assert len(q.claim("pacs", 5, now=T0)) == 2


def test_acks_of_jobs_not_claimed_raise_and_change_nothing(q: Queue, db: Path) -> None:
    q.enqueue_many([(entry("a"), ["pacs"]), (entry("b"), ["pacs"])], now=T0)
    (claimed,) = q.claim("pacs", 1, now=T0)
    ready = claimed.id + 1
    with pytest.raises(QueueError, match=rf"job {ready} is READY; only CLAIMED jobs"):
        q.ack_done([claimed.id, ready], now=T0)
    with pytest.raises(QueueError, match="job 999 does not exist"):
        q.ack_failed(999, error="x")
    with pytest.raises(QueueError, match=rf"job {ready} is READY"):
        q.ack_retry(ready, next_attempt_at=T0, error="x")
    with pytest.raises(QueueError, match=rf"job {ready} is READY"):
        q.release([ready])
    assert job_rows(db) == {claimed.id: ("CLAIMED", 0), ready: ("READY", 0)}
    assert q.stats(now=T0)["pacs"].done == 0
    q.ack_done([claimed.id], now=T0)
    with pytest.raises(QueueError, match=rf"job {claimed.id} is DONE"):
        q.ack_done([claimed.id], now=T0)


# -- finishing ---------------------------------------------------------------------------------


def test_file_is_terminal_only_when_every_destination_is(q: Queue) -> None:
    fid = q.enqueue(entry("a", sop_class=MR), ["pacs", "archive", "ai"], now=T0)
    assert fid is not None
    (pacs,) = q.claim("pacs", 5, now=T0)
    (archive,) = q.claim("archive", 5, now=T0)
    (ai,) = q.claim("ai", 5, now=T0)
    assert q.ack_done([pacs.id], status=0xB000, now=T0 + 1) == []
    q.ack_retry(archive.id, next_attempt_at=T0, error="timeout", now=T0 + 1)
    assert q.ack_failed(ai.id, error="0xA900 data set does not match", status=0xA900) == []
    assert q.to_finish() == []
    with pytest.raises(QueueError, match="still has jobs that are READY or CLAIMED"):
        q.begin_finish(fid, "/failed/a")
    (archive,) = q.claim("archive", 5, now=T0 + 2)
    assert q.ack_done([archive.id], now=T0 + 3) == [fid]

    (todo,) = q.to_finish()
    assert q.to_finish([fid]) == [todo]
    assert q.to_finish([fid + 1]) == []
    assert (todo.file_id, todo.path, todo.rel_path) == (fid, "/in/a", "a")
    assert (todo.state, todo.outcome, todo.final_path) == (FileState.QUEUED, "failed", None)
    results = {r.destination: r for r in todo.results}
    assert [r.destination for r in todo.results] == ["ai", "archive", "pacs"]
    assert results["ai"].status is JobStatus.FAILED
    assert (results["ai"].last_status, results["ai"].attempts) == (0xA900, 1)
    assert results["ai"].last_error == "0xA900 data set does not match"
    assert (results["pacs"].status, results["pacs"].last_status) == (JobStatus.DONE, 0xB000)
    assert (results["archive"].attempts, results["archive"].finished_at) == (2, T0 + 3)
    # stored at last: the earlier attempt's error is not the outcome's (error.json, find)
    assert results["archive"].last_error is None
    assert results["archive"].created_at == T0

    q.begin_finish(fid, "/failed/a")
    (again,) = q.to_finish()
    assert (again.state, again.final_path, again.outcome) == (
        FileState.FINISHING,
        "/failed/a",
        Finish.FAILED,
    )
    with pytest.raises(QueueError, match=rf"cannot begin_finish file {fid}: it is FINISHING"):
        q.begin_finish(fid, "/failed/b")
    q.complete_finish(fid, now=T0 + 4)
    assert q.to_finish() == []
    with pytest.raises(QueueError, match="it is FINISHED"):
        q.complete_finish(fid)
    with pytest.raises(QueueError, match="file 77: it does not exist"):
        q.complete_finish(77)


def test_a_batch_begins_and_completes_finishing_each_file_or_none(q: Queue, db: Path) -> None:
    """The finisher's batch is one statement each way: each file gets its own final path and
    outcome; one file that cannot begin (a job still READY) leaves the whole batch QUEUED."""
    ids = [q.enqueue(entry(n), ["pacs"], now=T0) for n in ("a", "b", "c", "d")]
    assert all(i is not None for i in ids)
    a, b, c, d = (int(i) for i in ids if i is not None)
    jobs = {j.file_id: j for j in q.claim("pacs", 3, now=T0)}  # d stays READY
    q.ack_done([jobs[a].id, jobs[c].id], now=T0)
    q.ack_failed(jobs[b].id, error="0xA700", status=0xA700, now=T0)
    with pytest.raises(QueueError, match=rf"cannot begin_finish file {d}: it still has jobs"):
        q.begin_finish_many([(a, "/done/a"), (b, "/failed/b"), (d, "/done/d")])
    conn = raw(db)
    states = dict(conn.execute("SELECT id, state FROM files").fetchall())
    assert states == {a: "QUEUED", b: "QUEUED", c: "QUEUED", d: "QUEUED"}
    q.begin_finish_many([(c, "/done/c"), (a, "/done/a"), (b, "/failed/b")])
    rows = conn.execute("SELECT id, state, final_path, outcome FROM files ORDER BY id").fetchall()
    assert rows[:3] == [
        (a, "FINISHING", "/done/a", "done"),
        (b, "FINISHING", "/failed/b", "failed"),
        (c, "FINISHING", "/done/c", "done"),
    ]
    with pytest.raises(QueueError, match=rf"cannot complete_finish file {d}: it is QUEUED"):
        q.complete_finish_many([a, d], now=T0 + 1)
    q.complete_finish_many([b, a, c], now=T0 + 2)
    rows = conn.execute("SELECT id, state, finished_at FROM files ORDER BY id").fetchall()
    conn.close()
    assert rows == [
        (a, "FINISHED", T0 + 2),
        (b, "FINISHED", T0 + 2),
        (c, "FINISHED", T0 + 2),
        (d, "QUEUED", None),
    ]


def test_a_finish_batch_names_each_file_once(q: Queue) -> None:
    fid = q.enqueue(entry("a"), ["pacs"], now=T0)
    assert fid is not None
    (job,) = q.claim("pacs", 1, now=T0)
    q.ack_done([job.id], now=T0)
    with pytest.raises(QueueError, match="cannot begin_finish a file twice in a batch"):
        q.begin_finish_many([(fid, "/done/a"), (fid, "/done/a.1")])
    q.begin_finish_many([(fid, "/done/a")])
    with pytest.raises(QueueError, match="cannot complete_finish a file twice in a batch"):
        q.complete_finish_many([fid, fid])


def test_a_nul_inside_a_recorded_value_is_dropped_not_cut_at(q: Queue) -> None:
    """The batch statement reads values from JSON, where SQLite cuts text at a NUL: a
    malformed header's inner NUL is dropped instead (the value stays findable)."""
    q.enqueue(dataclasses.replace(entry("a"), accession_number="A\x00B7"), ["pacs"], now=T0)
    assert [f.path for f in q.find(["AB7"])] == ["/in/a"]


def test_all_done_gives_outcome_done(q: Queue) -> None:
    fid = q.enqueue(entry("a"), ["pacs"], now=T0)
    (job,) = q.claim("pacs", 1, now=T0)
    assert q.ack_done([job.id], now=T0) == [fid]
    (todo,) = q.to_finish()
    assert todo.outcome == "done"
    assert todo.outcome is Finish.DONE


def _jobs_by_destination(db: Path, file_id: int) -> dict[str, tuple[str, int, int]]:
    conn = raw(db)
    try:
        rows = conn.execute(
            "SELECT destination, status, attempts, stale FROM jobs WHERE file_id = ?", (file_id,)
        ).fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_a_replaced_file_is_routed_afresh(q: Queue, db: Path) -> None:
    """CT image a.dcm is queued for ct-pacs, archive, ai and research; before it is done, an MR
    image replaces it under the same name, routed to archive, mr-pacs and ai. Nothing more goes
    to ct-pacs or research; archive and ai get the new version; mr-pacs is new."""
    fid = q.enqueue(entry("a"), ["ct-pacs", "archive", "ai", "research"], now=T0)
    assert fid is not None
    (archive,) = q.claim("archive", 1, now=T0)
    q.ack_done([archive.id], now=T0)
    (ai,) = q.claim("ai", 1, now=T0)
    q.ack_failed(ai.id, error="0xA900", status=0xA900, now=T0)
    (research,) = q.claim("research", 1, now=T0)  # being sent when the file is replaced
    # ct-pacs: still READY (its peer is down)

    new = dataclasses.replace(entry("a", sop_class=MR), size=999, mtime_ns=43)
    replaced = q.replace_file(new, ["archive", "mr-pacs", "ai"], now=T0 + 1)
    assert replaced is not None
    assert replaced.file_id == fid
    assert replaced.destinations == ("archive", "mr-pacs", "ai")
    assert replaced.dropped == ("ct-pacs", "research")
    assert _jobs_by_destination(db, fid) == {
        "archive": ("READY", 0, 0),  # delivered the old version: gets the new one
        "ai": ("READY", 0, 0),  # failed with the old version: tries the new one
        "research": ("CLAIMED", 0, 2),  # dropped when its claim ends
        "mr-pacs": ("READY", 0, 0),
    }
    # The claim on research ends however the send went: the job is gone, nothing is counted.
    assert q.ack_done([research.id], now=T0 + 2) == []
    assert "research" not in _jobs_by_destination(db, fid)
    assert "research" not in q.stats(now=T0 + 2)
    # The new version reaches its three destinations; then the file is terminal.
    for name in ("archive", "mr-pacs"):
        (job,) = q.claim(name, 1, now=T0 + 2)
        assert (job.sop_class_uid, job.size, job.mtime_ns) == (MR, 999, 43)
        assert q.ack_done([job.id], now=T0 + 3) == []
    (job,) = q.claim("ai", 1, now=T0 + 2)
    assert q.ack_done([job.id], now=T0 + 3) == [fid]
    (todo,) = q.to_finish()
    assert todo.outcome is Finish.DONE
    assert [r.destination for r in todo.results] == ["ai", "archive", "mr-pacs"]


@pytest.mark.parametrize("end", ["retry", "release", "recover"])
def test_a_dropped_claim_ends_in_nothing_whatever_ends_it(q: Queue, db: Path, end: str) -> None:
    fid = q.enqueue(entry("a"), ["old", "kept"], now=T0)
    assert fid is not None
    (old,) = q.claim("old", 1, now=T0)
    assert q.replace_file(entry("a"), ["kept"], now=T0 + 1) is not None
    if end == "retry":
        q.ack_retry(old.id, next_attempt_at=T0 + 5, error="timeout", now=T0 + 2)
    elif end == "release":
        q.release([old.id])
    else:
        q.recover()
    assert set(_jobs_by_destination(db, fid)) == {"kept"}
    (kept,) = q.claim("kept", 1, now=T0 + 2)
    assert q.ack_done([kept.id], now=T0 + 3) == [fid]


def test_a_replaced_stale_claim_is_sent_again_once_after_recovery(q: Queue, db: Path) -> None:
    """recover() after a kill: a stale claim goes back to READY as a plain job (the next send
    reads the current version), not one that its ack would send yet again."""
    fid = q.enqueue(entry("a"), ["pacs"], now=T0)
    assert fid is not None
    q.claim("pacs", 1, now=T0)
    assert q.replace_file(entry("a"), ["pacs"], now=T0 + 1) is not None
    q.recover()
    assert _jobs_by_destination(db, fid) == {"pacs": ("READY", 0, 0)}
    (job,) = q.claim("pacs", 1, now=T0 + 2)
    assert q.ack_done([job.id], now=T0 + 3) == [fid]


def test_fail_pending_gives_up_a_destination(q: Queue) -> None:
    a = q.enqueue(entry("a"), ["gone"], now=T0)
    b = q.enqueue(entry("b"), ["gone", "pacs"], now=T0)
    assert q.fail_pending("gone", error="destination removed from the config") == [a]
    assert q.fail_pending("gone", error="again") == []
    assert q.stats(now=T0)["gone"].failed == 2
    (job,) = q.claim("pacs", 1, now=T0)
    assert q.ack_done([job.id], now=T0) == [b]


# -- recovery ----------------------------------------------------------------------------------

CHILD_CLAIMS = """
import sys
from forwarder.queue import Queue
q = Queue(sys.argv[1])
jobs = q.claim("pacs", 7)
print(" ".join(str(j.id) for j in jobs), flush=True)
sys.stdin.read()  # hold the claims until killed
"""


def test_recover_after_sigkill_returns_claimed_jobs(q: Queue, db: Path) -> None:
    q.enqueue_many([(entry(f"f{i}"), ["pacs"]) for i in range(10)], now=T0)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_CLAIMS, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            claimed = [int(x) for x in child.stdout.readline().split()]
            assert len(claimed) == 7
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
    assert q.counts()["CLAIMED"] == 7
    report = q.recover()
    assert (report.requeued, report.finishing) == (7, ())
    assert q.counts() == {"READY": 10, "CLAIMED": 0, "DONE": 0, "FAILED": 0}
    assert {rows[1] for rows in job_rows(db).values()} == {0}  # no attempt counted
    assert len(q.claim("pacs", 100, now=T0)) == 10


def test_recover_returns_finishing_and_unfinished_terminal_files(db: Path) -> None:
    with Queue(db) as q:
        ids = q.enqueue_many([(entry(n), ["pacs"]) for n in "abc"], now=T0)
        a, b, c = ids
        assert a is not None and b is not None and c is not None
        jobs = q.claim("pacs", 3, now=T0)
        q.ack_done([jobs[0].id, jobs[1].id], now=T0)
        q.begin_finish(a, "/done/a")  # then "crash" before the file was moved
    with Queue(db) as q:
        report = q.recover()
        assert report.requeued == 1
        assert [(f.file_id, f.state, f.final_path) for f in report.finishing] == [
            (a, FileState.FINISHING, "/done/a"),
            (b, FileState.QUEUED, None),
        ]
        q.complete_finish(a)
        q.begin_finish(b, "/done/b")
        q.complete_finish(b)
        assert q.recover().finishing == ()


CHILD_WRITES = """
import sys
from forwarder.queue import FileEntry, Queue
q = Queue(sys.argv[1])
for i in range(1_000_000):
    e = FileEntry(f"/in/{i}", str(i), 1, 1, "1.2", f"1.2.{i}", "1.2.840.10008.1.2.1")
    print(q.enqueue(e, ["a", "b"]), flush=True)
    for fid in q.ack_done([j.id for j in q.claim("a", 3) + q.claim("b", 3)]):
        q.begin_finish(fid, f"/out/{fid}")
"""


def test_sigkill_mid_write_loses_nothing_committed(db: Path) -> None:
    Queue(db).close()
    printed: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITES, str(db)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            while len(printed) < 300:
                line = child.stdout.readline()
                assert line, "the child stopped early"
                printed.append(int(line))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        files = dict(conn.execute("SELECT file_id, COUNT(*) FROM jobs GROUP BY file_id").fetchall())
        orphans = conn.execute(
            "SELECT COUNT(*) FROM files WHERE id NOT IN (SELECT file_id FROM jobs)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert all(files.get(fid) == 2 for fid in printed)  # every acknowledged enqueue is there
    assert orphans == 0  # a file and its jobs commit together
    with Queue(db) as q:
        report = q.recover()
        assert report.requeued <= 6  # at most one claim per destination was in flight
        states = [f.state for f in report.finishing]
        assert states.count(FileState.FINISHING) > 100  # begun, never completed
        assert states.count(FileState.QUEUED) <= 3  # acked, killed before begin_finish
        assert all(f.outcome is Finish.DONE for f in report.finishing)
        assert q.counts()["CLAIMED"] == 0


# -- concurrency -------------------------------------------------------------------------------


def test_two_connections_racing_claims_hand_every_job_out_exactly_once(db: Path) -> None:
    # Two Queue instances are two SQLite connections on one file, as the daemon and
    # `forwarder retry` are: each one's lock serialises only its own threads, so only the claim's
    # transaction keeps the two from handing out the same job. (Threads racing on ONE Queue
    # would prove nothing: its lock serialises them whatever claim does.)
    threads_per_queue, total = 3, 3000
    with Queue(db) as first, Queue(db) as second:
        first.enqueue_many([(entry(f"f{i}"), ["pacs"]) for i in range(total)], now=T0)
        queues = [first] * threads_per_queue + [second] * threads_per_queue
        barrier = threading.Barrier(len(queues))
        claimed: list[list[int]] = [[] for _ in queues]
        share = total // len(queues)
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                barrier.wait(timeout=10)
                # A share each, so that one connection cannot take every job while SQLite's busy
                # handler has the other asleep: both must claim. (Shares add up to the total, so
                # every job is still claimed.)
                while len(claimed[n]) < share and (jobs := queues[n].claim("pacs", 7, now=T0)):
                    claimed[n].extend(j.id for j in jobs)
                    queues[n].ack_done([j.id for j in jobs], now=T0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(queues))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        every = [i for ids in claimed for i in ids]
        assert len(every) == len(set(every))  # no job handed out twice
        assert set(every) == set(job_rows(db))  # and none lost
        by_first = sum(len(ids) for ids in claimed[:threads_per_queue])
        assert 0 < by_first < total  # both connections claimed
        assert second.counts() == {"READY": 0, "CLAIMED": 0, "DONE": total, "FAILED": 0}
        assert first.stats(now=T0)["pacs"].done == total


def test_second_connection_reads_consistent_snapshots_while_first_writes(
    q: Queue, db: Path
) -> None:
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with Queue(db, busy_timeout=0.5, create=False) as other:
                while not stop.is_set():
                    stats = other.stats()
                    seen.append(
                        sum(s.pending + s.in_flight + s.done + s.failed for s in stats.values())
                    )
                    other.counts()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for batch in range(30):
            q.enqueue_many([(entry(f"{batch}-{i}"), ["x", "y"]) for i in range(5)], now=T0)
            for dest in ("x", "y"):
                jobs = q.claim(dest, 3, now=T0)
                q.ack_done([j.id for j in jobs[:2]], now=T0)
                q.ack_failed(jobs[2].id, error="nope", now=T0)
        wait_for(lambda: len(seen) > 5 and seen[-1] == 300)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == []
    assert all(n % 10 == 0 for n in seen)  # enqueue_many adds 10 jobs at once; never half seen


def test_a_long_reader_blocks_neither_writes_nor_prune(q: Queue, db: Path) -> None:
    fid = q.enqueue(entry("a"), ["pacs"], now=T0)
    assert fid is not None
    reader = raw(db)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchall()  # holds a snapshot
        started = time.monotonic()
        (job,) = q.claim("pacs", 1, now=T0)
        q.ack_done([job.id], now=T0)
        finish(q, fid)
        assert q.prune(0, now=T0 + 1) == 1
        assert time.monotonic() - started < 10
        assert reader.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1  # old snapshot
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert q.counts()["DONE"] == 0


# -- stats, syntaxes ---------------------------------------------------------------------------


def test_stats_and_counts(q: Queue) -> None:
    assert q.stats(destinations=["pacs"]) == {"pacs": DestinationStats(0, 0, 0, 0, None, None)}
    q.enqueue(entry("old"), ["pacs", "archive"], now=T0)
    q.enqueue_many([(entry(f"f{i}"), ["pacs"]) for i in range(4)], now=T0 + 10)
    pacs = q.claim("pacs", 3, now=T0 + 20)
    q.ack_done([pacs[0].id], now=T0 + 21)
    q.ack_failed(pacs[1].id, error="0xC000 cannot understand", status=0xC000, now=T0 + 22)

    stats = q.stats(now=T0 + 100, destinations=["spare", "pacs"])
    assert list(stats) == ["archive", "pacs", "spare"]
    assert stats["pacs"] == DestinationStats(
        pending=2,
        in_flight=1,
        done=1,
        failed=1,
        oldest_pending_seconds=90.0,  # f1 (CLAIMED) and f2, f3 (READY) were enqueued at T0+10
        last_error="0xC000 cannot understand",
    )
    assert stats["archive"] == DestinationStats(1, 0, 0, 0, 100.0, None)
    assert stats["spare"] == DestinationStats(0, 0, 0, 0, None, None)
    assert q.counts() == {"READY": 3, "CLAIMED": 1, "DONE": 1, "FAILED": 1}

    q.ack_retry(pacs[2].id, next_attempt_at=T0 + 200, error="timed out", now=T0 + 101)
    assert q.stats(now=T0 + 101)["pacs"].last_error == "timed out"
    (job,) = q.claim("archive", 1, now=T0 + 102)
    q.ack_done([job.id], now=T0 + 103)
    # A success elsewhere says nothing about pacs.
    assert q.stats(now=T0 + 103)["pacs"].last_error == "timed out"
    # pacs stores a file again: it recovered, and status no longer shows the old error. The
    # permanent failure stays counted.
    (job,) = q.claim("pacs", 1, now=T0 + 300)
    q.ack_done([job.id], now=T0 + 301)
    after = q.stats(now=T0 + 301)["pacs"]
    assert after.last_error is None
    assert after.failed == 1
    # And a new error after the recovery shows again.
    (job,) = q.claim("pacs", 1, now=T0 + 302)
    q.ack_retry(job.id, next_attempt_at=T0 + 400, error="refused", now=T0 + 303)
    assert q.stats(now=T0 + 303)["pacs"].last_error == "refused"


def test_pending_syntaxes_most_common_first(q: Queue) -> None:
    q.enqueue_many(
        [
            (entry("a", sop_class=MR, syntax=IMPLICIT), ["pacs"]),
            (entry("b"), ["pacs"]),
            (entry("c"), ["pacs"]),
            (entry("d", sop_class=MR), ["pacs", "other"]),
            (entry("e", sop_class=MR), ["other"]),
        ],
        now=T0,
    )
    q.claim("pacs", 1, now=T0)  # CLAIMED still counts
    assert q.pending_syntaxes("pacs") == [(CT, EXPLICIT), (MR, IMPLICIT), (MR, EXPLICIT)]
    assert q.pending_syntaxes("pacs", limit=1) == [PendingSyntax(CT, EXPLICIT)]
    assert q.pending_syntaxes("other") == [(MR, EXPLICIT)]
    assert q.pending_syntaxes("nowhere") == []


# -- prune -------------------------------------------------------------------------------------


def db_bytes(db: Path) -> int:
    return db.stat().st_size + Path(f"{db}-wal").stat().st_size


def test_prune_keeps_the_database_small_and_the_counters(q: Queue, db: Path) -> None:
    sizes: list[int] = []
    payload = "x" * 300
    for cycle in range(12):
        now = T0 + cycle * 100
        q.enqueue_many(
            [(entry(f"{cycle}/{i}/{payload}"), ["pacs", "ai"]) for i in range(150)], now=now
        )
        terminal: list[int] = []
        for dest in ("pacs", "ai"):
            terminal += q.ack_done([j.id for j in q.claim(dest, 1000, now=now)], now=now)
        assert len(terminal) == 150
        for f in q.to_finish(terminal):
            q.begin_finish(f.file_id, f"/done/{f.rel_path}")
            q.complete_finish(f.file_id, now=now)
        assert q.prune(50, now=now) == (150 if cycle else 0)  # the previous cycle's files
        sizes.append(db_bytes(db))
    assert q.prune(0, now=T0 + 10_000) == 150
    assert q.counts() == {"READY": 0, "CLAIMED": 0, "DONE": 0, "FAILED": 0}
    assert q.stats(now=T0)["pacs"].done == 12 * 150
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        conn.close()
    assert max(sizes[4:]) <= max(sizes[:4]) * 1.2, sizes
    # empty again: freed pages given back, as small as a new database (one page per table and
    # index) give or take two pages
    fresh = db.with_name("fresh.sqlite")
    Queue(fresh).close()
    assert db.stat().st_size <= fresh.stat().st_size + 8 * 1024
    assert Path(f"{db}-wal").stat().st_size == 0  # and the WAL truncated


def test_prune_keeps_unfinished_and_recent_files(q: Queue) -> None:
    a, b = q.enqueue_many([(entry("a"), ["pacs"]), (entry("b"), ["pacs"])], now=T0)
    assert a is not None and b is not None
    (job, _) = q.claim("pacs", 2, now=T0)
    q.ack_done([job.id], now=T0)
    finish(q, a, now=T0 + 10)
    assert q.prune(60, now=T0 + 69) == 0
    assert q.prune(60, now=T0 + 71) == 1
    assert set(q.active_files()) == {"/in/b"}


# -- forwarder retry ---------------------------------------------------------------------------


def test_requeue_failed(q: Queue, db: Path) -> None:
    ok, bad = q.enqueue_many([(entry("ok"), ["pacs"]), (entry("bad"), ["pacs", "ai"])], now=T0)
    assert ok is not None and bad is not None
    pacs_ok, pacs_bad = q.claim("pacs", 2, now=T0)
    (ai,) = q.claim("ai", 1, now=T0)
    q.ack_done([pacs_ok.id], now=T0)
    q.ack_failed(pacs_bad.id, error="refused for good", now=T0)
    q.ack_failed(ai.id, error="rejected", now=T0)
    for fid in (ok, bad):
        (todo,) = q.to_finish([fid])
        q.begin_finish(fid, f"/{todo.outcome}/{todo.rel_path}")
        q.complete_finish(fid, now=T0 + 5)

    (failed,) = q.failed_files()
    assert (failed.file_id, failed.final_path, failed.rel_path) == (bad, "/failed/bad", "bad")
    assert (failed.destinations, failed.finished_at) == (("ai", "pacs"), T0 + 5)
    assert q.failed_files("pacs") == [failed]
    assert q.failed_files("elsewhere") == []

    new = q.requeue_failed(bad, "/in/bad", "bad", ["pacs"], now=T0 + 10)
    assert q.failed_files() == []
    assert set(q.active_files()) == {"/in/bad"}
    assert q.enqueue(entry("bad"), ["pacs"]) is None  # the watcher sees it as queued
    (job,) = q.claim("pacs", 5, now=T0 + 10)
    assert (job.file_id, job.attempts, job.created_at, job.path) == (new, 0, T0 + 10, "/in/bad")
    assert (job.sop_class_uid, job.transfer_syntax, job.size) == (CT, EXPLICIT, 1234)
    assert q.claim("ai", 5, now=T0 + 10) == []
    with pytest.raises(QueueError, match="retried already"):
        q.requeue_failed(bad, "/in/bad2", "bad2", ["pacs"])
    with pytest.raises(QueueError, match="not a finished, failed file"):
        q.requeue_failed(ok, "/in/ok2", "ok2", ["pacs"])
    with pytest.raises(ValueError, match="at least one destination"):
        q.requeue_failed(bad, "/in/bad3", "bad3", [])


def test_requeue_onto_a_queued_path_is_refused(q: Queue) -> None:
    fid = q.enqueue(entry("a"), ["pacs"], now=T0)
    assert fid is not None
    (job,) = q.claim("pacs", 1, now=T0)
    q.ack_failed(job.id, error="no", now=T0)
    finish(q, fid)
    q.enqueue(entry("a"), ["pacs"], now=T0)  # a new file with the same name arrived
    with pytest.raises(QueueError, match="a file with that path is already queued"):
        q.requeue_failed(fid, "/in/a", "a", ["pacs"])
    assert len(q.failed_files()) == 1  # unchanged


# -- errors ------------------------------------------------------------------------------------


def test_open_errors_say_what_and_where(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "queue.sqlite"
    with pytest.raises(QueueError, match=r"queue database .*nowhere/queue.sqlite: unable to open"):
        Queue(missing)
    with pytest.raises(QueueError, match=r"while opening it \(does .*nowhere exist"):
        Queue(missing)
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(b"this is not a database, just some text that is long enough" * 20)
    with pytest.raises(QueueError, match="file is not a database while opening it"):
        Queue(garbage)
    with pytest.raises(QueueError, match="does not exist: check the 'queue' key"):
        Queue(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()


def test_a_locked_database_names_the_operation(db: Path) -> None:
    with Queue(db, busy_timeout=0.05) as q:
        q.enqueue(entry("a"), ["pacs"], now=T0)
        (job,) = q.claim("pacs", 1, now=T0)
        blocker = raw(db)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(
                QueueError, match=rf"queue\.sqlite: database is locked while acking job {job.id}"
            ):
                q.ack_done([job.id])
            assert q.counts()["CLAIMED"] == 1  # reads still work while a writer holds the lock
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert q.ack_done([job.id]) == [1]


def test_a_closed_queue_raises_queue_error(db: Path) -> None:
    q = Queue(db)
    q.close()
    q.close()
    with pytest.raises(QueueError, match="closed, while counting jobs"):
        q.counts()
