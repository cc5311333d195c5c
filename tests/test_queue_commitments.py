"""The queue's proof-of-delivery states (forwarder.queue.commitments) on a real SQLite file:
a stored job awaiting commitment holds its file back; a transaction is recorded before the
request; its outcome commits, resends (up to the limit) or fails, once; a version 4 database
upgrades."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.queue import SCHEMA_VERSION, FileEntry, Finish, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
T0 = 1_700_000_000.0
STUDY = "1.2.826.0.1.3680043.8.498.7"


def entry(i: int) -> FileEntry:
    return FileEntry(
        f"/in/{i}", f"{i}", 10, 1, CT, f"1.2.3.{i}", EXPLICIT, STUDY, f"{STUDY}.1", "ACC"
    )


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue


def _store(q: Queue, n: int, dests: list[str] | None = None) -> list[int]:
    """Enqueue n files, claim and ack their pacs jobs stored-awaiting-commitment."""
    q.enqueue_many([(entry(i), dests or ["pacs"]) for i in range(n)], now=T0)
    jobs = q.claim("pacs", 100, now=T0)
    assert q.ack_done([j.id for j in jobs], now=T0 + 1, commitment=True) == []
    return [j.id for j in jobs]


def test_a_stored_job_awaiting_commitment_holds_its_file(q: Queue) -> None:
    job_ids = _store(q, 3)
    assert q.to_finish() == []
    items = q.awaiting_commitment("pacs")
    assert [i.job_id for i in items] == job_ids
    assert {i.study_instance_uid for i in items} == {STUDY}
    assert q.commitment_counts()["pacs"].awaiting == 3
    assert q.recover().finishing == ()  # a restart does not finish them either


def test_the_outcome_commits_resends_and_fails(q: Queue) -> None:
    job_ids = _store(q, 3)
    q.begin_commitment("9.1", "pacs", "stgcmt", job_ids, deadline=T0 + 60, now=T0 + 2)
    assert q.awaiting_commitment("pacs") == []
    (txn,) = q.open_commitments()
    assert (txn.uid, [i.job_id for i in txn.items]) == ("9.1", job_ids)
    res = q.resolve_commitment(
        "9.1",
        [job_ids[0]],
        [(job_ids[1], "0x0112 (no such object instance)")],
        max_resends=1,
        outcome="report",
        now=T0 + 3,
    )
    assert res is not None and (res.committed, res.resent, res.failed) == (1, 2, 0)
    (done,) = q.to_finish(list(res.finished_files))
    assert done.outcome is Finish.DONE
    # a second outcome for the same transaction changes nothing
    assert q.resolve_commitment("9.1", job_ids, [], max_resends=1, outcome="x") is None
    again = q.claim("pacs", 10, now=T0 + 4)
    assert sorted(j.id for j in again) == job_ids[1:]
    q.ack_done([j.id for j in again], now=T0 + 5, commitment=True)
    q.begin_commitment("9.2", "pacs", "stgcmt", job_ids[1:], deadline=T0 + 60, now=T0 + 6)
    res = q.resolve_commitment(
        "9.2", [], [(job_ids[1], "0x0110 (processing failure)")], max_resends=1, outcome="r"
    )
    assert res is not None and (res.committed, res.resent, res.failed) == (0, 0, 2)
    finished = q.to_finish(list(res.finished_files))
    assert {f.outcome for f in finished} == {Finish.FAILED}
    errors = {r.last_error for f in finished for r in f.results}
    assert errors == {
        "stored but not committed: 0x0110 (processing failure)",
        "stored but not committed: not reported",
    }
    counts = q.commitment_counts()["pacs"]
    assert (counts.awaiting, counts.committed, counts.uncommitted) == (0, 1, 4)
    assert q.stats()["pacs"].failed == 2


def test_a_file_waits_for_every_destination_that_requires_proof(q: Queue) -> None:
    job_ids = _store(q, 1, ["pacs", "archive"])
    (other,) = q.claim("archive", 10, now=T0)
    assert q.ack_done([other.id], now=T0) == []  # pacs still awaits commitment
    q.begin_commitment("9.3", "pacs", "stgcmt", job_ids, deadline=T0 + 60)
    res = q.resolve_commitment("9.3", job_ids, [], max_resends=3, outcome="report")
    assert res is not None and len(res.finished_files) == 1


def test_a_cancelled_request_leaves_the_jobs_awaiting(q: Queue) -> None:
    job_ids = _store(q, 2)
    q.begin_commitment("9.4", "pacs", "stgcmt", job_ids, deadline=T0 + 60)
    q.cancel_commitment("9.4")
    assert [i.job_id for i in q.awaiting_commitment("pacs")] == job_ids
    assert q.open_commitments() == []
    assert q.resolve_commitment("9.4", job_ids, [], max_resends=3, outcome="late") is None


def test_a_version_4_database_upgrades(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    with Queue(db) as q:
        q.enqueue(entry(1), ["pacs"], now=T0)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for index in ("jobs_awaiting_commitment", "jobs_commit_txn", "commitments_open"):
            conn.execute(f"DROP INDEX {index}")
        conn.execute("DROP TABLE commitments")
        for column in ("commitment", "commit_txn", "resends"):
            conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        for column in ("committed_total", "uncommitted_total"):
            conn.execute(f"ALTER TABLE destination_stats DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    finally:
        conn.close()
    with Queue(db) as q:
        (job,) = q.claim("pacs", 1, now=T0)
        q.ack_done([job.id], commitment=True)
        assert q.commitment_counts()["pacs"].awaiting == 1
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_the_uids_a_job_was_sent_with_are_recorded_with_its_ack(q: Queue) -> None:
    """What the proof asks the destination by: the UIDs an edited send (deidentify) gave the
    object, else the file's own, as recorded in the ack's transaction; None only when the ack
    did not say (the proof then works them out from the routes, as for an older row)."""
    q.enqueue_many([(entry(i), ["pacs"]) for i in range(3)], now=T0)
    a, b, c = (j.id for j in q.claim("pacs", 10, now=T0))
    deid = ("2.25.1", "2.25.2", "2.25.3")
    q.ack_done([a, b], now=T0 + 1, commitment=True, sent_uids={a: deid, c: ("x", "y", "z")})
    q.ack_done([c], now=T0 + 1, commitment=True)
    items = {i.job_id: i for i in q.awaiting_commitment("pacs")}
    assert items[a].sent_uids == deid
    assert items[b].sent_uids == (STUDY, f"{STUDY}.1", "1.2.3.1")  # its own
    assert items[c].sent_uids is None  # not said (c was not in the first ack)
    q.begin_commitment("9.5", "pacs", "query", [a, b, c], deadline=T0 + 60)
    (txn,) = q.open_commitments()
    assert [i.sent_uids for i in txn.items] == [items[a].sent_uids, items[b].sent_uids, None]
    # Not held: sent again, this time unchanged (a reload took deidentify away): its own now.
    q.resolve_commitment(
        "9.5", [b, c], [(a, "not held")], max_resends=1, outcome="query", now=T0 + 2
    )
    (again,) = q.claim("pacs", 10, now=T0 + 2)
    q.ack_done([again.id], now=T0 + 3, commitment=True, sent_uids={})
    (item,) = q.awaiting_commitment("pacs")
    assert item.sent_uids == (STUDY, f"{STUDY}.1", "1.2.3.0")


def test_a_version_9_database_upgrades_keeping_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    with Queue(db) as q:
        q.enqueue_many([(entry(i), ["pacs"]) for i in range(2)], now=T0)
        stored, waiting = q.claim("pacs", 10, now=T0)
        q.ack_done([stored.id], now=T0 + 1, commitment=True)
        q.release([waiting.id])
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("ALTER TABLE jobs DROP COLUMN sent_uids")  # as version 9 had it
        conn.execute("PRAGMA user_version = 9")
    finally:
        conn.close()
    with Queue(db) as q:
        # Stored before the upgrade: not recorded, its proof works them out from the routes.
        (old,) = q.awaiting_commitment("pacs")
        assert (old.job_id, old.sent_uids, old.sop_instance_uid) == (stored.id, None, "1.2.3.0")
        (job,) = q.claim("pacs", 10, now=T0 + 2)
        assert job.id == waiting.id
        q.ack_done([job.id], now=T0 + 3, commitment=True, sent_uids={job.id: ("1", "2", "3")})
        assert {i.job_id: i.sent_uids for i in q.awaiting_commitment("pacs")} == {
            stored.id: None,
            waiting.id: ("1", "2", "3"),
        }
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
    finally:
        conn.close()


def test_a_file_replaced_by_another_object_keeps_what_a_destination_not_routed_now_holds(
    q: Queue,
) -> None:
    """pacs stored the file unchanged and awaits its proof when a different object replaces it
    under the same name, routed only to archive: pacs keeps what it stored (DONE), and its
    proof asks by the UIDs pacs was sent (the old version's), not by the new row's."""
    q.enqueue_many([(entry(0), ["pacs"])], now=T0)
    (job,) = q.claim("pacs", 1, now=T0)
    q.ack_done([job.id], now=T0 + 1, commitment=True, sent_uids={})  # sent as it is
    stored = job.id
    other = FileEntry("/in/0", "0", 20, 2, CT, "9.9.9.1", EXPLICIT, "9.9.9", "9.9.9.2", "ACC")
    replaced = q.replace_file(other, ["archive"], now=T0 + 2)
    assert replaced is not None and replaced.dropped == ()
    (item,) = q.awaiting_commitment("pacs")
    assert item.job_id == stored
    assert item.sent_uids == (STUDY, f"{STUDY}.1", "1.2.3.0")


@pytest.mark.parametrize(
    "recorded",
    ['"1.2.3.4.5"', '[null, "2.25.2", "2.25.3"]', "[1, 2, 3]", '["a", "b", "c", "d"]', "[]", "x"],
)
def test_a_recorded_value_this_code_does_not_write_counts_as_not_recorded(
    tmp_path: Path, recorded: str
) -> None:
    """Only a JSON array of three strings is taken as the UIDs sent: anything else (a JSON
    string, numbers, null, four items) is not recorded, and the proof works them out as for a
    row acked before schema 10, instead of asking by a SOP Instance UID such as 'None' or '1'."""
    db = tmp_path / "queue.sqlite"
    with Queue(db) as q:
        q.enqueue_many([(entry(0), ["pacs"])], now=T0)
        (job,) = q.claim("pacs", 1, now=T0)
        q.ack_done([job.id], now=T0 + 1, commitment=True, sent_uids={})
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("UPDATE jobs SET sent_uids = ? WHERE id = ?", (recorded, job.id))
        finally:
            conn.close()
        (item,) = q.awaiting_commitment("pacs")
        assert item.sent_uids is None
