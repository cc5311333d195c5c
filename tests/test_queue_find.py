"""``Queue.find`` on real SQLite files: every key kind, finished files, replaced and retried
files, and a version 3 database (before the lookup columns) opened and used."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.queue import (
    SCHEMA_VERSION,
    FileEntry,
    FileState,
    Finish,
    JobStatus,
    KeyKind,
    Queue,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
T0 = 1_700_000_000.0
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"


def entry(name: str, series: str = SERIES_A, accession: str = "ACC-1") -> FileEntry:
    return FileEntry(
        path=f"/in/{name}",
        rel_path=name,
        size=1234,
        mtime_ns=42,
        sop_class_uid=CT,
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.9.{name}",
        transfer_syntax=EXPLICIT,
        study_instance_uid=STUDY,
        series_instance_uid=series,
        accession_number=accession,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite"


@pytest.fixture
def q(db: Path) -> Iterator[Queue]:
    with Queue(db) as queue:
        yield queue


def test_find_by_each_kind_of_key(q: Queue) -> None:
    a, b, c = q.enqueue_many(
        [
            (entry("1"), ["pacs"]),
            (entry("2", SERIES_B), ["pacs", "ai"]),
            (entry("3", SERIES_B, accession="ACC-2"), ["ai"]),
        ],
        now=T0,
    )
    other = q.enqueue(
        FileEntry("/in/x", "x", 1, 1, CT, "1.2.3.4", EXPLICIT), ["pacs"], now=T0
    )  # no study, series or accession recorded: found by its SOP Instance UID only
    assert [f.file_id for f in q.find([STUDY])] == [a, b, c]
    assert [f.file_id for f in q.find([SERIES_B])] == [b, c]
    assert [f.file_id for f in q.find(["ACC-1"])] == [a, b]
    (found,) = q.find(["1.2.826.0.1.3680043.8.498.9.3"])
    assert found.file_id == c and found.matched == (
        ("1.2.826.0.1.3680043.8.498.9.3", KeyKind.SOP_INSTANCE),
    )
    assert [f.file_id for f in q.find(["1.2.3.4"])] == [other]
    assert q.find(["1.2.3"]) == [] and q.find(["acc-1"]) == [] and q.find(["", "  "]) == []
    assert q.find([""]) == [] and q.find([]) == []
    # Several keys: each file once, with every key it matched, in the order given.
    both = q.find([SERIES_A, "ACC-2", " ACC-1 "])
    assert [f.file_id for f in both] == [a, b, c]
    assert both[0].matched == ((SERIES_A, KeyKind.SERIES), ("ACC-1", KeyKind.ACCESSION))
    assert both[1].matched == (("ACC-1", KeyKind.ACCESSION),)
    assert both[2].matched == (("ACC-2", KeyKind.ACCESSION),)
    f = both[1]
    assert f.path == "/in/2" and f.rel_path == "2" and f.state is FileState.QUEUED
    assert f.outcome is None and f.study_instance_uid == STUDY and f.series_instance_uid == SERIES_B
    assert [(j.destination, j.status, j.attempts, j.next_attempt_at) for j in f.jobs] == [
        ("ai", JobStatus.READY, 0, T0),
        ("pacs", JobStatus.READY, 0, T0),
    ]


def test_find_shows_each_destination_state_and_finished_files(q: Queue) -> None:
    file_id = q.enqueue(entry("1"), ["pacs", "ai", "cloud"], now=T0)
    assert file_id is not None
    (pacs,) = q.claim("pacs", 1, now=T0)
    (ai,) = q.claim("ai", 1, now=T0)
    (cloud,) = q.claim("cloud", 1, now=T0)
    q.ack_done([pacs.id], status=0, now=T0 + 1)
    q.ack_retry(ai.id, next_attempt_at=T0 + 60, error="connection refused", now=T0 + 1)
    (found,) = q.find([STUDY])
    jobs = {j.destination: j for j in found.jobs}
    assert jobs["pacs"].status is JobStatus.DONE and jobs["pacs"].finished_at == T0 + 1
    assert jobs["pacs"].next_attempt_at is None and jobs["pacs"].last_status == 0
    assert jobs["ai"].status is JobStatus.READY and jobs["ai"].next_attempt_at == T0 + 60
    assert jobs["ai"].attempts == 1 and jobs["ai"].last_error == "connection refused"
    assert jobs["cloud"].status is JobStatus.CLAIMED
    (ai,) = q.claim("ai", 1, now=T0 + 60)
    for job in (ai, cloud):
        q.ack_failed(job.id, status=0xA700, error="out of resources", now=T0 + 61)
    assert [f.file_id for f in q.to_finish([file_id])] == [file_id]
    q.begin_finish(file_id, "/failed/1")
    (found,) = q.find([STUDY])
    assert found.state is FileState.FINISHING and found.path == "/in/1"  # not moved yet
    q.complete_finish(file_id, now=T0 + 62)
    (found,) = q.find(["ACC-1"])
    assert found.state is FileState.FINISHED and found.outcome is Finish.FAILED
    assert found.path == "/failed/1" and found.finished_at == T0 + 62
    jobs = {j.destination: j for j in found.jobs}
    assert jobs["ai"].status is JobStatus.FAILED and jobs["ai"].last_status == 0xA700
    assert jobs["ai"].last_error == "out of resources" and jobs["ai"].attempts == 2
    # Retried: a new row with the same values; the old one says which.
    new_id = q.requeue_failed(file_id, "/in/1", "1", ["ai", "cloud"], now=T0 + 70)
    old, new = q.find([SERIES_A])
    assert old.retried_as == new_id and new.file_id == new_id and new.retried_as is None
    assert new.state is FileState.QUEUED and new.path == "/in/1"
    assert (new.study_instance_uid, new.series_instance_uid) == (STUDY, SERIES_A)
    assert [f.file_id for f in q.find(["ACC-1"])] == [file_id, new_id]
    # Pruned: no longer known.
    assert q.prune(10, now=T0 + 100) == 1
    assert [f.file_id for f in q.find([STUDY])] == [new_id]


def test_a_replaced_file_is_found_by_its_new_values(q: Queue) -> None:
    file_id = q.enqueue(entry("1"), ["pacs"], now=T0)
    replaced = q.replace_file(entry("1", SERIES_B, accession="ACC-9"), ["pacs"], now=T0 + 1)
    assert replaced is not None
    assert q.find([SERIES_A]) == [] and q.find(["ACC-1"]) == []
    assert [f.file_id for f in q.find([SERIES_B, "ACC-9"])] == [file_id]


def test_lookups_use_the_indexes(q: Queue, db: Path) -> None:
    """At a million files, a key is one index search per column, never a scan of files."""
    from forwarder.queue.sql import FIND_KEY

    conn = sqlite3.connect(db)
    try:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {FIND_KEY}", {"key": "x"}).fetchall()
    finally:
        conn.close()
    details = [r[3] for r in plan if "files" in r[3]]
    assert len(details) == 4 and all("USING" in d and "INDEX" in d for d in details), details


def _downgrade_to_version_3(db: Path) -> None:
    """What a version 3 database looks like: files without the lookup columns or indexes."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for index in ("files_sop_instance", "files_study", "files_series", "files_accession"):
            conn.execute(f"DROP INDEX {index}")
        for column in ("study_instance_uid", "series_instance_uid", "accession_number"):
            conn.execute(f"ALTER TABLE files DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 3")
    finally:
        conn.close()


def test_a_version_3_database_opens_and_keeps_working(db: Path) -> None:
    old = FileEntry("/in/old", "old", 10, 1, CT, "1.2.3.1", EXPLICIT)
    with Queue(db) as q:
        old_id = q.enqueue(old, ["pacs"], now=T0)
        assert len(q.claim("pacs", 1, now=T0)) == 1  # left CLAIMED, as by a crash
    _downgrade_to_version_3(db)
    conn = sqlite3.connect(db)
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(files)")}
    finally:
        conn.close()
    assert "study_instance_uid" not in columns
    with Queue(db) as q:
        assert q.recover().requeued == 1  # the claimed job of the old run, sent again
        (found,) = q.find(["1.2.3.1"])
        assert found.file_id == old_id and found.study_instance_uid is None
        new_id = q.enqueue(entry("new"), ["pacs"], now=T0 + 1)
        assert [f.file_id for f in q.find([STUDY])] == [new_id]
        jobs = q.claim("pacs", 10, now=T0 + 1)
        assert {j.file_id for j in jobs} == {old_id, new_id}
        q.ack_done([j.id for j in jobs], now=T0 + 2)
        assert sorted(f.file_id for f in q.to_finish()) == sorted([old_id, new_id])
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(files)")}
    finally:
        conn.close()
    assert {"files_sop_instance", "files_study", "files_series", "files_accession"} <= indexes
