"""Power loss: what a test can show without pulling the plug.

- The queue at any instant is a valid database: the daemon is frozen (SIGSTOP) at random moments
  and its ``queue.sqlite`` + ``-wal`` are copied, which is exactly what a crash at that instant
  leaves on disk; every copy opens, passes ``PRAGMA integrity_check`` and the state-machine
  invariants, also with its WAL torn (cut short, garbage at the end), as a power loss mid-write
  leaves it.
- The ordering that makes a power loss safe, read from the daemon's system calls (strace): every
  commit is synced (``synchronous=FULL``), a moved file's folders are fsynced before the queue
  records the move, ``NAME.error.json`` is durable before its file moves, and
  incoming files are fsynced before the queue says they are safe.

What no test here can show: that the disk honours fsync (write caches, lying firmware), and
what a real power cut does to unsynced data. See docs/guarantees.md.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from invariants import clone_files, open_readonly, queue_problems, snapshot
from peers import Received, ScriptedSCP
from syscalls import STRACE, Call, family, trace

from forwarder.queue import Queue

pytestmark = pytest.mark.faults
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def frozen_copy(pid: int, db: Path, target: Path) -> Path:
    """Copy the queue (WAL first, then the database) while the daemon is stopped (with its
    watch-and-ingest process, which writes the queue too): a snapshot of exactly what a crash
    at this instant leaves on disk."""
    target.mkdir(parents=True)
    pids = family(pid)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        wal = Path(f"{db}-wal")
        if wal.exists():
            shutil.copyfile(wal, target / f"{db.name}-wal")
        shutil.copyfile(db, target / db.name)
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    return target / db.name


def torn(snapshot: Path, target: Path, rng: random.Random) -> Path:
    """The snapshot with the last transaction in its WAL torn, as a power cut during that
    commit leaves it: cut at a random byte after the previous commit, garbage written over the
    end (a half-written sector). Earlier commits were fsynced (synchronous=FULL) and stay."""
    target.mkdir(parents=True)
    db = target / snapshot.name
    shutil.copyfile(snapshot, db)
    wal = Path(f"{snapshot}-wal")
    if not wal.exists() or wal.stat().st_size <= 32:
        return db
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    salts = bytes(data[16:24])
    commits_end = []  # offsets just after each valid commit frame
    pos = 32
    while pos + 24 + page_size <= len(data):
        header = data[pos : pos + 24]
        if bytes(header[8:16]) != salts:
            break  # frames of an older WAL generation: not part of this log
        pos += 24 + page_size
        if int.from_bytes(header[4:8], "big"):
            commits_end.append(pos)
    # tear the last commit (or, when the log holds one only, what follows it)
    start = commits_end[-2] if len(commits_end) >= 2 else (commits_end or [32])[-1]
    cut = rng.randrange(start, len(data) + 1)
    data = data[:cut]
    junk = min(cut - start, rng.randrange(0, 600))
    data[cut - junk : cut] = rng.randbytes(junk)
    Path(f"{db}-wal").write_bytes(bytes(data))
    return db


def test_the_queue_is_valid_at_any_instant_and_survives_a_torn_wal(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    total = 400
    snaps: list[Path] = []
    with ScriptedSCP(transfer_syntaxes=[EXPLICIT, IMPLICIT]) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("a", scp.port, associations=2)])
        clone_files(d.incoming, total)
        with d:
            while len(d.done_files()) < total and len(snaps) < 40:
                time.sleep(rng.uniform(0.01, 0.15))  # the random instant itself
                snaps.append(frozen_copy(d.pid, d.queue, tmp_path / f"snap{len(snaps)}"))
            d.wait_done(total, timeout=60)
            conn = open_readonly(d.queue)
            try:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            finally:
                conn.close()
    assert len(snaps) >= 5, "the daemon finished before enough snapshots were taken"
    for i, snap in enumerate(snaps):
        for db in (snap, torn(snap, tmp_path / f"torn{i}", rng)):
            problems = queue_problems(db, writable_copy=True)
            assert problems == [], f"{db} (seed {seed}): {problems}"
            with Queue(db) as q:  # forwarder itself opens it and recovers
                q.recover()
                q.stats()


# -- the order of system calls ------------------------------------------------------------


def _is_wal(call: Call) -> bool:
    return bool(call.paths) and call.paths[0].endswith("queue.sqlite-wal")


def _is_sync(call: Call) -> bool:
    return call.name in ("fsync", "fdatasync")


def _traced_run(
    tmp_path: Path, good: int, bad: int, *, one_by_one: bool = False
) -> tuple[Daemon, list[Call]]:
    """A daemon storing ``good`` files and failing ``bad`` (status 0xC000), under strace.
    ``one_by_one`` drops each good file only once the one before is in done/, so each goes
    through its own commits (ingest, claim, ack, finish) however the daemon would batch them."""
    fail: set[str] = set()

    def status(rec: Received) -> int:
        return 0xC000 if rec.sop_instance_uid in fail else 0x0000

    with ScriptedSCP(status=status, transfer_syntaxes=[EXPLICIT, IMPLICIT]) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("a", scp.port)])
        with d, trace(d.pid, tmp_path / "strace.log") as t:
            if one_by_one:
                for i in range(good):
                    d.drop(f"one{i:04d}.dcm", seed=1000 + i, rows=8, columns=8)
                    d.wait_done(i + 1)
            else:
                d.drop_files(good, rows=8, columns=8)
            fail.update(f.sop_instance_uid for f in d.drop_files(bad, prefix="bad"))
            d.wait_done(good)
            d.wait_failed(bad)
            d.wait_incoming_empty()
            # The last moves are committed after incoming empties; a WAL commit becomes visible
            # to readers only after its sync, so once every row reads FINISHED, the sync of the
            # last commit is in the trace too (stopping at 'incoming empty' could cut it off).
            wait_until(
                lambda: snapshot(d.queue).files == {"FINISHED": good + bad}, 30,
                what="every file FINISHED in the queue",
            )  # fmt: skip
    assert t.calls, "strace recorded nothing"
    return d, t.calls


@needs_strace
def test_moves_are_durable_before_the_queue_records_them(tmp_path: Path) -> None:
    """For every file moved to done/ or failed/: rename, then fsync of both folders, then the
    queue commit (a synced WAL write), all on the finishing thread. For failed files, the
    NAME.error.json is fsynced and renamed into place before the file itself moves."""
    d, calls = _traced_run(tmp_path, good=4, bad=2)
    incoming, done, failed = str(d.incoming), str(d.done), str(d.failed)
    moves = [
        (i, c)
        for i, c in enumerate(calls)
        if c.name.startswith("rename")
        and c.paths[0].startswith(incoming)
        and c.paths[1].startswith((done, failed))
    ]
    assert len(moves) == 6, [c.paths for _, c in moves]
    for i, move in moves:
        src, dst = move.paths
        later = [c for c in calls[i + 1 :] if c.tid == move.tid]
        synced = [n for n, c in enumerate(later) if _is_sync(c)]
        dst_sync = next((n for n in synced if later[n].paths == (os.path.dirname(dst),)), None)
        src_sync = next((n for n in synced if later[n].paths == (os.path.dirname(src),)), None)
        assert dst_sync is not None, f"{dst}: its folder is never fsynced after the rename"
        assert src_sync is not None, f"{src}: incoming is never fsynced after the rename"
        commit = next((n for n in synced if _is_wal(later[n])), None)
        assert commit is not None and commit > max(dst_sync, src_sync), (
            f"{dst}: the queue committed the move before the folders were synced"
        )
        if dst.startswith(failed):
            error_json = dst + ".error.json"
            before = [c for c in calls[:i] if c.tid == move.tid]
            renamed = [
                n
                for n, c in enumerate(before)
                if c.name.startswith("rename") and c.paths[1:] == (error_json,)
            ]
            assert renamed, f"{error_json} was not renamed into place before {dst} moved"
            tmp = before[renamed[-1]].paths[0]
            assert any(_is_sync(c) and c.paths == (tmp,) for c in before[: renamed[-1]]), (
                f"{tmp} was not fsynced before it became {error_json}"
            )


@needs_strace
def test_every_queue_commit_is_synced_before_the_next(tmp_path: Path) -> None:
    """synchronous=FULL, seen from outside: after each WAL commit frame, the committing thread
    syncs the WAL before it (or anyone) writes another frame. (With NORMAL, a power loss could
    forget acks and moves the daemon has already acted on.)"""
    _, calls = _traced_run(tmp_path, good=5, bad=1, one_by_one=True)
    wal = [c for c in calls if _is_wal(c)]
    commits = 0
    pending: int | None = None  # tid with an unsynced commit
    for c in wal:
        if c.name == "pwrite64" and len(c.data) == 24:  # a WAL frame header
            assert pending is None, "a WAL frame was written after a commit that was not synced"
            if int.from_bytes(c.data[4:8], "big"):  # commit frame: database size > 0
                commits += 1
                pending = c.tid
        elif _is_sync(c) and c.tid == pending:
            pending = None
    assert pending is None
    assert commits >= 10, f"only {commits} commits seen"


@needs_strace
def test_incoming_files_are_fsynced_before_they_are_queued(tmp_path: Path) -> None:
    d, calls = _traced_run(tmp_path, good=3, bad=0)
    for n in range(3):
        path = str(d.incoming / f"img{n:04d}.dcm")
        first_open = next(
            i for i, c in enumerate(calls) if c.name == "openat" and c.paths == (path,)
        )
        # The ingesting thread (the first to open the file) commits the row that queues it:
        # its next WAL sync. Other threads' commits (acks, moves) may come in between.
        ingester = calls[first_open].tid
        enqueued = next(
            i
            for i, c in enumerate(calls)
            if i > first_open and c.tid == ingester and _is_sync(c) and _is_wal(c)
        )
        assert any(_is_sync(c) and c.paths == (path,) for c in calls[first_open:enqueued]), (
            f"{path} was queued before its data was fsynced"
        )
