"""``forwarder retry`` never replaces a file in incoming: the name it picks for a file coming
back from failed/ may be taken before the move (a modality writing into incoming, a symlink
pointing nowhere). Real daemon, real peer, the CLI as a subprocess."""

from __future__ import annotations

from pathlib import Path

from conftest import wait_until
from daemon import Daemon, destination
from dicomgen import write_file
from peers import ScriptedSCP
from test_admin_cli import forwarder
from test_ingest_process import site_env

# In the retry command's process only: once the file is queued again under its name in
# incoming, before the move, a modality drops another file under that name.
DROP_AFTER_REQUEUE = """\
import os
import sys
from pathlib import Path

if "retry" in sys.argv:
    from forwarder.queue.requeue import Requeue

    requeue = Requeue.requeue_failed

    def requeue_failed(self, file_id, new_path, rel_path, destinations, **kwargs):
        new_id = requeue(self, file_id, new_path, rel_path, destinations, **kwargs)
        part = Path(new_path).with_name(".modality.part")
        part.write_bytes(Path(os.environ["MODALITY_FILE"]).read_bytes())
        os.rename(part, new_path)
        return new_id

    Requeue.requeue_failed = requeue_failed
"""


def _failed_once(d: Daemon, scp: ScriptedSCP) -> bytes:
    """img0000.dcm dropped, refused (0xC001), in failed/; the peer fixed. Its bytes."""
    d.start()
    d.drop_files(1)
    d.wait_failed(1)
    assert d.stop() == 0
    scp.status = 0x0000
    return (d.failed / "img0000.dcm").read_bytes()


def test_retry_skips_a_symlink_pointing_nowhere_at_the_name(tmp_path: Path) -> None:
    """A dangling symlink at incoming/img0000.dcm is a name taken, not a free one: the file
    comes back as img0000.retry1.dcm and the link stays."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        try:
            failed = _failed_once(d, scp)
            link = d.incoming / "img0000.dcm"
            link.symlink_to(tmp_path / "nowhere")
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["requeued img0000.retry1.dcm for pacs"]
            assert link.is_symlink() and link.readlink() == tmp_path / "nowhere"
            assert (d.incoming / "img0000.retry1.dcm").read_bytes() == failed
        finally:
            d.close()


def test_retry_never_replaces_a_file_dropped_at_its_name_before_the_move(tmp_path: Path) -> None:
    """Another file lands at the name retry queued the failed one under, between the queueing
    and the move: it is not replaced; the failed file goes to the next free name, queued
    there, and the daemon delivers both."""
    _, env = site_env(tmp_path, DROP_AFTER_REQUEUE)
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        try:
            failed = _failed_once(d, scp)
            modality = tmp_path / "modality.dcm"
            write_file(modality, seed=7)
            result = forwarder(
                "retry", "-c", str(d.config_path), env={**env, "MODALITY_FILE": str(modality)}
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["requeued img0000.retry1.dcm for pacs"]
            assert "another file is there" in result.stderr, result.stderr
            assert (d.incoming / "img0000.dcm").read_bytes() == modality.read_bytes()
            assert (d.incoming / "img0000.retry1.dcm").read_bytes() == failed
            assert d.failed_files() == []
            d.start()
            wait_until(lambda: len(d.done_files()) == 2, 30, what="both delivered")
            assert sorted(d.done_files()) == ["img0000.dcm", "img0000.retry1.dcm"]
            assert len(scp.received) == 2
            assert d.stop() == 0
        finally:
            d.close()


def test_a_retry_killed_before_its_move_then_a_file_at_its_name_loses_neither(
    tmp_path: Path,
) -> None:
    """retry killed after queueing, before the move; a modality then drops a file at that
    name. The next retry sees the file there is another one (the failed one is still in
    failed/) and moves the failed one back under another name: both delivered."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        try:
            failed = _failed_once(d, scp)
            killed = forwarder(
                "retry", "-c", str(d.config_path), env={"FORWARDER_CRASH_AT": "retry-before-move"}
            )
            assert killed.returncode == -9, killed.stderr
            modality = d.incoming / "img0000.dcm"
            write_file(modality, seed=7)
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert "requeued img0000.retry1.dcm (an interrupted retry finished)" in result.stdout
            assert (d.incoming / "img0000.retry1.dcm").read_bytes() == failed
            assert modality.exists() and d.failed_files() == []
            d.start()
            wait_until(lambda: len(d.done_files()) == 2, 30, what="both delivered")
            assert len(scp.received) == 2
            assert d.stop() == 0
        finally:
            d.close()


# As DROP_AFTER_REQUEUE, then waits (up to 20 s) until the running daemon has taken the file
# dropped for the requeued row's (a replacement: the row's size changes), before the move.
DROP_AND_WAIT_FOR_DAEMON = """\
import os
import sqlite3
import sys
import time
from pathlib import Path

if "retry" in sys.argv:
    from forwarder.queue.requeue import Requeue

    requeue = Requeue.requeue_failed

    def requeue_failed(self, file_id, new_path, rel_path, destinations, **kwargs):
        new_id = requeue(self, file_id, new_path, rel_path, destinations, **kwargs)
        part = Path(new_path).with_name(".modality.part")
        part.write_bytes(Path(os.environ["MODALITY_FILE"]).read_bytes())
        os.rename(part, new_path)
        conn = sqlite3.connect(os.environ["QUEUE_DB"], timeout=10)
        query = "SELECT size FROM files WHERE id = ?"
        first = conn.execute(query, (new_id,)).fetchone()
        deadline = time.monotonic() + 20
        while conn.execute(query, (new_id,)).fetchone() == first and time.monotonic() < deadline:
            time.sleep(0.02)
        conn.close()
        return new_id

    Requeue.requeue_failed = requeue_failed
"""


def test_retry_leaves_the_file_in_failed_when_the_daemon_took_the_other_for_its_row(
    tmp_path: Path,
) -> None:
    """The file dropped at retry's name is taken by a running daemon before the move, as the
    requeued row's new version (and sent). The failed file is not moved over it: it stays in
    failed/ with its report, one line says so, and the next retry requeues it afresh."""
    _, env = site_env(tmp_path, DROP_AND_WAIT_FOR_DAEMON)
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        try:
            failed = _failed_once(d, scp)
            modality = tmp_path / "modality.dcm"
            write_file(modality, seed=7, rows=32)  # another size than the failed file's
            d.start()
            hook = {**env, "MODALITY_FILE": str(modality), "QUEUE_DB": str(d.queue)}
            result = forwarder("retry", "-c", str(d.config_path), env=hook)
            assert result.returncode == 1, result.stderr
            assert "the daemon queued that one in its place" in result.stderr, result.stderr
            assert (d.failed / "img0000.dcm").read_bytes() == failed
            assert (d.failed / "img0000.dcm.error.json").exists()
            wait_until(lambda: d.done_files() == ["img0000.dcm"], 30, what="the other file sent")
            assert (d.done / "img0000.dcm").read_bytes() == modality.read_bytes()
            again = d.cli("retry")
            assert again.returncode == 0, again.stderr
            assert again.stdout.splitlines() == ["requeued img0000.dcm for pacs"]
            wait_until(lambda: len(d.done_files()) == 2, 30, what="the failed file sent")
            assert len(scp.received) == 2
            assert d.stop() == 0
        finally:
            d.close()


def test_a_second_retry_leaves_another_file_with_the_same_uid_in_failed_alone(
    tmp_path: Path,
) -> None:
    """img0000.dcm is retried with the daemon stopped (queued again, back in incoming).
    Another file with the same SOP Instance UID, one byte different, is then put at
    failed/img0000.dcm with its own report. A second retry must not take it for a file an
    interrupted retry left behind: the requeued row's file is in incoming already; the other
    file and its report stay in failed/."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        try:
            failed = _failed_once(d, scp)
            report = (d.failed / "img0000.dcm.error.json").read_bytes()
            first = d.cli("retry")
            assert first.returncode == 0, first.stderr
            assert (d.incoming / "img0000.dcm").read_bytes() == failed
            other = bytearray(failed)
            other[-1] ^= 0xFF
            (d.failed / "img0000.dcm").write_bytes(bytes(other))
            (d.failed / "img0000.dcm.error.json").write_bytes(report)
            second = d.cli("retry")
            assert second.returncode == 0, second.stderr
            assert "interrupted retry" not in second.stdout + second.stderr
            assert (d.failed / "img0000.dcm").read_bytes() == bytes(other)
            assert (d.failed / "img0000.dcm.error.json").read_bytes() == report
            assert (d.incoming / "img0000.dcm").read_bytes() == failed
            assert not (d.incoming / "img0000.retry1.dcm").exists()
        finally:
            d.close()
