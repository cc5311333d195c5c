"""The receiving process queues most objects itself (:mod:`forwarder.daemon.listen_queue`).

What must hold: an object the routes send somewhere is queued by the receiving process on its own
connection, with the same rows and origin the daemon would write, and Success follows that
commit, so a daemon that does not run for a while (stopped, or busy) does not hold a modality
up; everything else (no route, discard, conflicting changes, a resend while queued, values read
for routes since replaced, a queue that refuses) is left to the daemon, with nothing written;
the router crosses the process boundary without the daemon's UID map; and a writer waits for
another process's write lock in short naps, up to its busy timeout.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import wait_until
from daemon import Daemon, destination, route
from peers import StoreSCP, free_port
from test_listen import (
    GATEWAY,
    assert_same_datasets,
    copies,
    held,
    listen_daemon,
    listen_port,
    pacs,  # noqa: F401 - the fixture
    pacs_destination,
    push,
    staged,
    uid_of,
)
from test_listen_process import child_pid

from forwarder.config import Route
from forwarder.daemon.listen_queue import DirectQueue, Routing
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool
from forwarder.errors import QueueError
from forwarder.net.scp_object import Origin, ReceivedObject
from forwarder.queue import SCHEMA_VERSION, FileEntry, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
WANTED: tuple[dict[int, str], dict[int, str]] = ({0x00080060: "Modality"}, {0x00080060: "CS"})


def rr(name: str, to: list[str], match: dict[str, object], **kw: object) -> Route:
    return Route.model_validate({"name": name, "match": match, "to": to, **kw})


class Scene:
    """A spool, a queue, and objects placed under ``incoming/.listen`` as the engine leaves
    them; ``direct`` queues through its own connection, as the receiving process does."""

    def __init__(self, root: Path, routes: list[Route] | None) -> None:
        self.spool = Spool(root / "incoming", root / "done", root / "failed")
        self.queue = Queue(root / "q.sqlite")  # the daemon's, created first
        self.router = Router(routes, ["pacs", "archive"], {}, self.queue)
        self.routing = Routing(1, WANTED, pickle.loads(pickle.dumps(self.router)))
        self.direct = DirectQueue(self.queue.path, self.spool)
        self.count = 0

    def close(self) -> None:
        self.direct.close()
        self.queue.close()

    def placed(self, modality: str = "CT", calling: str = "CT01") -> tuple[Path, ReceivedObject]:
        self.count += 1
        uid = f"1.2.3.{self.count}"
        final = self.spool.incoming / ".listen" / calling / "1.2.3" / f"{uid}.dcm"
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"x" * 300)
        obj = ReceivedObject(CT, uid, EXPLICIT, "1.2.3", 300, 132, {"Modality": modality})
        return final, obj

    def queue_it(
        self, final: Path, obj: ReceivedObject, calling: str = "CT01", generation: int = 1
    ) -> list[str] | None:
        origin = Origin(calling, "GATEWAY", "127.0.0.1", 5104, "a-1")
        queued = self.direct.queue(final, obj, origin, self.routing, generation)
        return None if queued is None else queued.destinations

    def jobs(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.queue.path) as conn:
            rows = conn.execute(
                "SELECT f.rel_path, j.destination FROM jobs j JOIN files f ON f.id = j.file_id "
                "ORDER BY f.rel_path, j.destination"
            ).fetchall()
        return [(str(a), str(b)) for a, b in rows]


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(
        tmp_path,
        [
            rr("ct", ["pacs", "archive"], {"Modality": "CT"}),
            rr("sr", ["pacs"], {"Modality": "SR"}, modify={"set": {"InstitutionName": "A"}}),
            rr("sr2", ["pacs"], {"Modality": "SR"}, modify={"set": {"InstitutionName": "B"}}),
            rr("qa", [], {"calling_ae": "QA01"}, action="discard"),
        ],
    )
    yield s
    s.close()


def test_a_routed_object_is_queued_here_with_its_origin(scene: Scene) -> None:
    final, obj = scene.placed("CT")
    assert scene.queue_it(final, obj) == ["pacs", "archive"]
    rel = f"CT01/1.2.3/{obj.sop_instance_uid}.dcm"
    assert scene.jobs() == [(rel, "archive"), (rel, "pacs")]
    (found,) = scene.queue.find([obj.sop_instance_uid])
    assert found.origin == ("CT01", "GATEWAY", "127.0.0.1:5104", "a-1")


@pytest.mark.parametrize(
    ("modality", "calling", "generation", "why"),
    [
        ("MR", "CT01", 1, "no route"),
        ("CT", "QA01", 1, "a discard route"),
        ("SR", "CT01", 1, "two routes, different changes"),
        ("CT", "CT01", 0, "values read for routes since replaced"),
    ],
)
def test_what_the_daemon_decides_is_left_to_it_with_nothing_written(
    scene: Scene, modality: str, calling: str, generation: int, why: str
) -> None:
    final, obj = scene.placed(modality, calling)
    assert scene.queue_it(final, obj, calling, generation) is None, why
    assert scene.jobs() == []
    assert final.exists()


def test_a_resend_of_an_object_still_queued_is_left_to_the_daemon(scene: Scene) -> None:
    final, obj = scene.placed("CT")
    assert scene.queue_it(final, obj) == ["pacs", "archive"]
    assert scene.queue_it(final, obj) is None  # the daemon replaces the queued version
    assert len(scene.jobs()) == 2


def test_a_queue_that_refuses_leaves_it_to_the_daemon(scene: Scene) -> None:
    final, obj = scene.placed("CT")
    scene.direct._queue.close()  # what a queue error looks like from here
    assert scene.queue_it(final, obj) is None
    assert scene.jobs() == []


def test_the_router_crosses_the_process_boundary_without_the_uid_map(tmp_path: Path) -> None:
    routes = [
        rr("ct", ["pacs"], {"Modality": "CT"}, deidentify={"profile": "basic"}),
        rr("all", ["archive"], {"folder": "*"}),
    ]
    with Queue(tmp_path / "q.sqlite") as q:
        router = Router(routes, ["pacs", "archive"], {}, q)
        copy = pickle.loads(pickle.dumps(router))
        header = {"Modality": "CT"}
        assert copy.plan(header, "a/b.dcm").ranked() == router.plan(header, "a/b.dcm").ranked()
        assert copy.keywords == router.keywords
        assert copy.may_edit("pacs") and not copy.may_edit("archive")
        plan = copy.plan(header, "a/b.dcm")
        assert copy.conflict(plan, "pacs") is None
        with pytest.raises(ValueError, match="UID map"):
            copy.edits(plan, "pacs")  # editing stays the daemon's (it has the map)
        assert router.edits(router.plan(header, "a/b.dcm"), "pacs").editors


def test_a_writer_waits_for_another_processs_write_lock(tmp_path: Path) -> None:
    with Queue(tmp_path / "q.sqlite") as q:
        holder = sqlite3.connect(q.path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        released = threading.Event()

        def release() -> None:
            released.wait(10)
            holder.execute("COMMIT")

        t = threading.Thread(target=release)
        t.start()
        threading.Timer(0.05, released.set).start()
        assert q.pause("pacs")  # waited for the holder's commit, then took the lock
        t.join()
        assert list(q.paused()) == ["pacs"]
        holder.close()
    with Queue(tmp_path / "q.sqlite", busy_timeout=0.3) as q:
        holder = sqlite3.connect(q.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(QueueError, match="database is locked"):
            q.resume("pacs")  # held past the busy timeout: refused, as before
        holder.execute("ROLLBACK")
        holder.close()


def _finished(d: Daemon) -> int:
    with contextlib.closing(sqlite3.connect(d.queue)) as conn:
        return int(
            conn.execute("SELECT COUNT(*) FROM files WHERE state = 'FINISHED'").fetchone()[0]
        )


def test_a_stopped_daemon_does_not_hold_up_a_modality(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The receiving process queues and answers while the daemon cannot run (SIGSTOP: a long
    pause of its own); once it runs again it sends them."""
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        port = listen_port(d)
        assert push(port, files[:1]) == [(0, "")]
        wait_until(lambda: len(held(pacs)) == 1, 30, what="the first")
        # Stopped once idle: stopped inside one of its own write transactions (the first
        # object's ack or finish), the daemon would hold the queue's write lock, which the
        # receiving process must wait for, as any writer must.
        wait_until(lambda: _finished(d) == 1, 30, what="the first recorded as finished")
        os.kill(d.pid, signal.SIGSTOP)
        try:
            assert push(port, files[1:]) == [(0, "")] * 2
        finally:
            os.kill(d.pid, signal.SIGCONT)
        wait_until(lambda: len(held(pacs)) == 3, 30, what="all three")
        assert_same_datasets(pacs, files)
        assert d.stop() == 0


def test_a_job_queued_for_a_destination_a_reload_removed_is_failed_soon_after(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The receiving process routes with the old routes until the new ones reach it: a file
    it queues for a destination the reload removed, after the reload looked for such jobs, goes
    to failed/ a moment later, not pending for good."""
    gone = destination("gone", 9, ae_title="GONE")
    d = listen_daemon(tmp_path / "gw", [pacs_destination(pacs), gone])
    with d:
        d.write_config(destinations=[pacs_destination(pacs)])
        d.reload()
        (src,) = copies(tmp_path / "m", "CT_small.dcm", 1)
        final = d.incoming / ".listen" / "CT01" / "late.dcm"
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(src.read_bytes())
        entry = FileEntry(
            str(final), "CT01/late.dcm", final.stat().st_size, final.stat().st_mtime_ns,
            CT, "1.2.3.9", EXPLICIT, calling_ae="CT01", called_ae=GATEWAY,
        )  # fmt: skip
        with Queue(d.queue) as q:  # as the receiving process queues, on its own connection
            assert q.enqueue_many([(entry, {"gone": 1})]) != [None]
        wait_until(lambda: "CT01/late.dcm" in d.failed_files(), 15, what="failed")
        reason = (d.failed / "CT01/late.dcm.error.json").read_text()
        assert "no longer in the configuration" in reason
        assert d.stop() == 0


def _queue_rows(d: Daemon) -> tuple[int, list[tuple[str, str | None, str | None]]]:
    """pacs's cumulative done count, and each queued file's (rel_path, peer, association)."""
    with sqlite3.connect(d.queue) as conn:
        row = conn.execute(
            "SELECT done_total FROM destination_stats WHERE destination = 'pacs'"
        ).fetchone()
        files = conn.execute(
            "SELECT rel_path, peer, association FROM files ORDER BY rel_path"
        ).fetchall()
    return (0 if row is None else int(row[0])), [(str(a), b, c) for a, b, c in files]


def test_a_restarted_receiving_process_leaves_what_it_queued_alone(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The objects the receiving process queued itself are not in the daemon's memory: when
    the process dies and ``recover`` looks for durable files the queue does not know, they must
    not be taken for such files (queued "again" as a replacement: their delivered copies sent
    again, their origin blanked)."""
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    down = destination("down", free_port(), ae_title="DOWN")  # keeps the files queued
    with listen_daemon(
        tmp_path / "gw", [pacs_destination(pacs), down], routes=[route("all", ["pacs", "down"])]
    ) as d:
        port = listen_port(d)
        first = child_pid(d)
        assert push(port, files) == [(0, "")] * 3
        wait_until(lambda: _queue_rows(d)[0] == 3, 30, what="all three stored at pacs")
        _done, before = _queue_rows(d)
        assert len(before) == 3 and all(peer and assoc for _, peer, assoc in before), before
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child_pid(d) != first, 30, what="a new receiving process")
        assert "durable but not queued" not in d.log_text(), d.log_tail()
        assert _queue_rows(d) == (3, before)  # nothing sent again, the origin kept
        assert len(staged(d)) == 3  # still queued (for down)
        assert d.stop() == 0


def _synchronous(queue: Queue) -> int:
    """The queue connection's PRAGMA synchronous (2 FULL: each commit fsynced; 1 NORMAL)."""
    with queue._lock:
        conn = queue._connection("reading its synchronous setting")
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def test_only_the_receiving_processs_commits_go_unsynced(scene: Scene) -> None:
    """The receiving process's commits are not fsynced (its rows are rebuilt from the files
    under .listen, next test); every other connection's are."""
    assert _synchronous(scene.queue) == 2
    assert _synchronous(scene.direct._queue) == 1


def test_a_row_a_power_loss_dropped_is_written_again_before_the_port_opens(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """What a power loss leaves after unsynced commits: objects durable under .listen (fsynced
    before Success) whose rows the log lost. The daemon's start queues them again before the
    listener takes anything, and they are delivered intact with their calling AE title."""
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        assert d.cli("pause", "pacs").returncode == 0
        d.wait_status(lambda s: s["pacs"]["state"] == "paused", 10, "pacs paused")
        assert push(listen_port(d), files, calling="CT07") == [(0, "")] * 3
        assert len(staged(d)) == 3
        os.kill(d.pid, signal.SIGKILL)  # the receiving process dies with it
        d.wait_exit(15)
    with sqlite3.connect(d.queue) as conn:  # the last commits lost, as a power loss may
        conn.execute("PRAGMA foreign_keys = ON")  # whole transactions: their jobs too
        dropped = conn.execute("DELETE FROM files WHERE calling_ae = 'CT07'").rowcount
    assert dropped == 3
    with d:
        assert "3 received files were durable but not queued" in d.log_text()
        assert d.cli("resume", "pacs").returncode == 0
        wait_until(lambda: len(held(pacs)) == 3, 30, what="all three")
        assert_same_datasets(pacs, files)
        assert all(f.startswith("CT07/") for f in d.done_files())
        assert d.stop() == 0


def two_versions(tmp_path: Path) -> tuple[Path, Path]:
    """A real file and a second version of it: the same SOP Instance, other content."""
    (v1,) = copies(tmp_path / "m", "CT_small.dcm", 1)
    v2 = tmp_path / "v2.dcm"
    ds = pydicom.dcmread(v1)
    ds.SeriesDescription = "the second version"
    ds.save_as(v2, enforce_file_format=True)
    return v1, v2


def test_a_resend_placed_but_never_recorded_is_sent_in_its_new_version_after_a_restart(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """A receiving process that dies after placing a resend over a queued object, before the
    daemon recorded the new version, leaves a file that is not what the queue holds: the
    senders refuse to send a changed file, so recover must queue it again (a replacement),
    whether the old version was queued here or by the daemon (a resend of a resend)."""
    v1, v2 = two_versions(tmp_path)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        assert d.cli("pause", "pacs").returncode == 0
        d.wait_status(lambda s: s["pacs"]["state"] == "paused", 10, "pacs paused")
        port = listen_port(d)
        first = child_pid(d)
        assert push(port, [v1]) == [(0, "")]  # queued by the receiving process
        assert push(port, [v1]) == [(0, "")]  # a resend: recorded by the daemon
        (placed,) = staged(d)
        # what placing the new version leaves when the process dies before it is recorded
        tmp = placed.with_name(".v2.tmp")
        shutil.copyfile(v2, tmp)
        os.rename(tmp, placed)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child_pid(d) != first, 30, what="a new receiving process")
        assert "1 of them resends that replace the copy queued before" in d.log_text()
        assert d.cli("resume", "pacs").returncode == 0
        wait_until(lambda: uid_of(v1) in held(pacs), 30, what="the object at the PACS")
        assert_same_datasets(pacs, [v2])
        assert d.stop() == 0


def _read_once(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("SELECT 1 FROM files").fetchall()
    finally:
        conn.close()


def test_a_writer_waits_while_another_connection_recovers_the_wal(tmp_path: Path) -> None:
    """A process killed while writing the WAL index leaves it unreliable; the next connection
    to use the queue rebuilds it from the WAL (recovery), and meanwhile every other one gets
    SQLITE_BUSY_RECOVERY (an extended code of SQLITE_BUSY): a writer must wait for it as for
    any other writer (SQLite's own busy handler does), not fail at once."""
    path = tmp_path / "q.sqlite"
    with Queue(path) as q:
        q.pause("warm")  # the connection has read the WAL index once
        filler = sqlite3.connect(path, isolation_level=None)
        filler.execute("PRAGMA wal_autocheckpoint = 0")
        filler.execute("CREATE TABLE filler (x BLOB)")
        refused: list[str] = []
        for attempt in range(5):
            filler.execute("BEGIN")
            filler.executemany(
                "INSERT INTO filler VALUES (?)", ((os.urandom(2000),) for _ in range(10000))
            )
            filler.execute("COMMIT")  # a WAL of ~20 MB, so that a recovery takes a while
            with open(f"{path}-shm", "r+b") as shm:
                shm.write(bytes(136))  # the WAL index header as a killed writer may leave it
            recovering = threading.Thread(target=_read_once, args=(path,))
            recovering.start()
            time.sleep(0.005)  # let it start the recovery
            try:
                q.pause(f"d{attempt}")
            except QueueError as exc:
                refused.append(str(exc))
            recovering.join()
        filler.close()
        assert refused == []


def test_a_resend_of_a_queued_object_through_the_receiving_process_sends_its_new_version(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The first copy is queued by the receiving process; its resend (other content, another
    association) is placed over it and left to the daemon, which replaces the queued version:
    the PACS gets the new version once, and the queue names the resend's association."""
    v1, v2 = two_versions(tmp_path)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        assert d.cli("pause", "pacs").returncode == 0
        d.wait_status(lambda s: s["pacs"]["state"] == "paused", 10, "pacs paused")
        port = listen_port(d)
        assert push(port, [v1]) == [(0, "")]
        (_, first), *_ = _origins(d)
        assert push(port, [v2]) == [(0, "")]
        ((_, second),) = _origins(d)
        assert second and second != first  # one row, now the resend's
        assert d.cli("resume", "pacs").returncode == 0
        wait_until(lambda: _queue_rows(d)[0] == 1, 30, what="stored at the PACS")
        wait_until(lambda: staged(d) == [], 15, what="finished")
        assert_same_datasets(pacs, [v2])
        assert _queue_rows(d)[0] == 1  # once
        assert d.stop() == 0


def _origins(d: Daemon) -> list[tuple[str, str | None]]:
    with sqlite3.connect(d.queue) as conn:
        rows = conn.execute("SELECT rel_path, association FROM files").fetchall()
    return [(str(a), b) for a, b in rows]


def test_the_receiving_process_never_migrates_the_queue(tmp_path: Path) -> None:
    """After a package upgrade a restarted receiving process runs newer code than the daemon:
    it refuses a queue of another schema version (the daemon then queues every object), and
    leaves the schema as the daemon knows it."""
    path = tmp_path / "q.sqlite"
    Queue(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    with pytest.raises(QueueError, match="not upgrading it here"):
        DirectQueue(str(path), spool)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1
    Queue(path).close()  # the daemon's own open upgrades it
    DirectQueue(str(path), spool).close()
