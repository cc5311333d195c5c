"""The queue keeps where a file came from (schema 5): written at enqueue, returned by find, claim
and finishing, copied by ``retry``, replaced with a resend, and added to an older database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from forwarder.queue import SCHEMA_VERSION, FileEntry, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
T0 = 1_700_000_000.0
ORIGIN = {
    "calling_ae": "CT01",
    "called_ae": "GATEWAY",
    "peer": "10.1.2.3:5104",
    "association": "a-1",
}


def received(name: str, uid: str, **origin: str) -> FileEntry:
    return FileEntry(f"/in/.listen/CT01/{name}", f"CT01/{name}", 10, 1, CT, uid, EXPLICIT, **origin)


def test_origin_round_trips(tmp_path: Path) -> None:
    with Queue(tmp_path / "q.sqlite") as q:
        listened = q.enqueue(received("a.dcm", "1.2.3.1", **ORIGIN), ["pacs"], now=T0)
        watched = q.enqueue(
            FileEntry("/in/b.dcm", "b.dcm", 10, 1, CT, "1.2.3.2", EXPLICIT), ["pacs"], now=T0
        )
        found = {f.file_id: f for f in q.find(["1.2.3.1", "1.2.3.2"])}
        assert found[listened].origin == ("CT01", "GATEWAY", "10.1.2.3:5104", "a-1")
        assert found[watched].origin is None
        jobs = {j.file_id: j for j in q.claim("pacs", 10, now=T0)}
        assert jobs[listened].calling_ae == "CT01" and jobs[watched].calling_ae == ""
        # a resend from another association replaces the queued copy and its origin
        q.release([jobs[listened].id])
        resent = received("a.dcm", "1.2.3.1", **{**ORIGIN, "association": "a-2"})
        assert q.replace_file(resent, ["pacs"]) is not None
        assert q.find(["1.2.3.1"])[0].origin == ("CT01", "GATEWAY", "10.1.2.3:5104", "a-2")
        # failed, then retried: the new row keeps where it came from
        job = next(j for j in q.claim("pacs", 10, now=T0 + 100) if j.file_id == listened)
        q.ack_failed(job.id, error="refused", status=0xC000, now=T0 + 101)
        (item,) = [f for f in q.to_finish() if f.file_id == listened]
        assert item.calling_ae == "CT01"
        q.begin_finish(listened, "/failed/CT01/a.dcm")
        q.complete_finish(listened, now=T0 + 102)
        new_id = q.requeue_failed(listened, "/in/.listen/CT01/a.dcm", "CT01/a.dcm", ["pacs"])
        again = {f.file_id: f for f in q.find(["1.2.3.1"])}
        assert again[new_id].origin == again[listened].origin


def test_a_version_4_database_gains_the_origin_columns(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    with Queue(db) as q:
        q.enqueue(FileEntry("/in/old.dcm", "old.dcm", 10, 1, CT, "1.2.3.9", EXPLICIT), ["pacs"])
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for column in ORIGIN:
            conn.execute(f"ALTER TABLE files DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    finally:
        conn.close()
    with Queue(db) as q:
        assert q.find(["1.2.3.9"])[0].origin is None
        q.enqueue(received("n.dcm", "1.2.3.10", **ORIGIN), ["pacs"])
        assert q.find(["1.2.3.10"])[0].origin == tuple(ORIGIN.values())
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert set(ORIGIN) <= {r[1] for r in conn.execute("PRAGMA table_info(files)")}
    finally:
        conn.close()
