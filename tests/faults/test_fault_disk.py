"""Disk trouble: done/ and failed/ on a full filesystem, the queue's filesystem full, a file in
incoming that cannot be read or cannot be moved. No file may vanish: it stays where it was or
is delivered; the condition is logged (and shown by ``forwarder status``); the daemon recovers
by itself when the trouble ends.

Mechanisms (we run as root): small tmpfs mounts filled to the last byte; ``chattr +i`` for a
file nobody may move; for a file nobody may read, the daemon runs as root *without*
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (``setpriv --bounding-set``), which makes root obey file
modes (running it as ``nobody`` would need every folder handed over to that user).
"""

from __future__ import annotations

import os
from pathlib import Path

import daemon as daemon_module
import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination
from disk import CHATTR, SETPRIV, can_mount, fill, immutable, tmpfs, without_dac_override
from invariants import queue_problems, settled_problems
from peers import Received, ScriptedSCP

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs"),
]

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
SMALL = {"rows": 8, "columns": 8}
RETRY_PENDING_EVERY = 5.0  # service._FINISH_RETRY_EVERY: how often stuck moves are retried


def names_everywhere(d: Daemon) -> set[str]:
    found = set()
    for folder in (d.incoming, d.done, d.failed):
        for p in folder.rglob("*"):
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".json"):
                found.add(p.name)
    return found


@pytest.mark.skipif(CHATTR is None, reason="chattr is not installed")
def test_done_and_failed_full_and_an_immovable_file_then_recovery(tmp_path: Path) -> None:
    """done/ and failed/ are full tmpfs mounts and one delivered file is immutable: every file
    is delivered (or failed) but stays in incoming, the daemon logs why and keeps running; once
    space returns and the file is mutable again, every file reaches its folder without a
    restart."""
    fail: set[str] = set()

    def status(rec: Received) -> int:
        return 0xC000 if rec.sop_instance_uid in fail else 0x0000

    root = tmp_path / "d"
    with (
        ScriptedSCP(status=status, transfer_syntaxes=[EXPLICIT, IMPLICIT]) as scp,
        tmpfs(root / "done", "1m"),
        tmpfs(root / "failed", "1m"),
    ):
        d = Daemon(root, destinations=[destination("pacs", scp.port)])
        fillers = [fill(d.done), fill(d.failed)]
        with d:
            good = d.drop_files(4, **SMALL)
            bad = d.drop_files(2, prefix="bad", **SMALL)
            fail.update(f.sop_instance_uid for f in bad)
            stuck = d.incoming / good[0].rel_path
            wait_until(lambda: len(scp.received) >= 4, 15, what="the good files delivered")
            with immutable(stuck):
                d.wait_log("could not finish", count=1, timeout=15)
                status_doc = d.wait_status(
                    lambda s: s["pacs"]["done"] == 4 and s["pacs"]["failed"] == 2,
                    what="every job terminal",
                )
                # delivered, but nothing could be moved: all still in incoming
                assert sorted(d.incoming_files()) == sorted(f.rel_path for f in good + bad)
                assert d.running()
                log = d.log_text()
                assert "No space left on device" in log or "no space" in log.lower()
                for filler in fillers:
                    filler.unlink()
                # space is back; the immutable file must still stay where it is
                d.wait_done(3, timeout=RETRY_PENDING_EVERY + 15)
                d.wait_failed(2, timeout=15)
                assert stuck.exists()
                assert "Operation not permitted" in d.log_text()
            d.wait_done(4, timeout=RETRY_PENDING_EVERY + 15)
            d.wait_incoming_empty()
            assert d.stop() == 0
        assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=4) == []
        for f in bad:
            assert d.error_json(f.rel_path)["destinations"][0]["status"] == "0xC000"
    assert status_doc["destinations"]["pacs"]["pending"] == 0


def test_status_shows_files_that_cannot_be_moved(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with ScriptedSCP() as scp, tmpfs(root / "done", "1m"):
        d = Daemon(root, destinations=[destination("pacs", scp.port)])
        fill(d.done)
        with d:
            d.drop_files(2, **SMALL)
            d.wait_log("could not finish", timeout=15)
            result = d.cli("status")
            assert result.returncode == 0
            assert "No space left on device" in result.stdout + result.stderr, result.stdout


def test_files_wait_in_incoming_while_the_queue_filesystem_is_full(tmp_path: Path) -> None:
    """The queue's filesystem is full before the files arrive: they cannot be queued, so they
    stay in incoming (logged); once space returns, the next rescan queues and delivers them."""
    root = tmp_path / "d"
    with ScriptedSCP() as scp, tmpfs(root / "q", "2m") as qfs:
        d = Daemon(
            root, destinations=[destination("pacs", scp.port)], extra={"queue": str(qfs / "q.db")}
        )
        d.queue = qfs / "q.db"
        with d:
            d.drop_files(2, prefix="before", **SMALL)
            d.wait_done(2)
            filler = fill(qfs)
            dropped = d.drop_files(10, **SMALL)
            d.wait_log("database or disk is full", timeout=15)
            assert d.running()
            assert len(d.incoming_files()) == 10, "the files must wait in incoming"
            filler.unlink()
            d.wait_done(12, timeout=30)
            d.wait_incoming_empty()
            assert d.stop() == 0
        assert scp.uids() >= {f.sop_instance_uid for f in dropped}
        assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=12) == []


def test_acks_failing_on_a_full_queue_filesystem_recover_without_a_restart(
    tmp_path: Path,
) -> None:
    """The queue's filesystem fills up while files are being sent: the acks fail. Once space
    returns, every file must be delivered and moved without restarting the daemon."""
    root = tmp_path / "d"
    with ScriptedSCP(delay=0.2) as scp, tmpfs(root / "q", "2m") as qfs:
        d = Daemon(
            root, destinations=[destination("pacs", scp.port)], extra={"queue": str(qfs / "q.db")}
        )
        d.queue = qfs / "q.db"
        # Present at start, so that one claim takes them all (files arriving one by one are
        # claimed a few at a time, and a small batch could be acked before the disk fills).
        d.drop_files(20, **SMALL)
        with d:
            wait_until(lambda: len(scp.received) >= 2, 15, what="sending under way")
            filler = fill(qfs)
            # the batch's acks come after its last file is sent: keep the disk full until then
            d.wait_log("database or disk is full while acking", timeout=15)
            filler.unlink()
            scp.delay = 0.0  # its slowness served its purpose: the disk filled mid-batch
            assert names_everywhere(d) == {f"img{i:04d}.dcm" for i in range(20)}
            d.wait_done(20, timeout=8)


def test_claims_refused_by_a_full_queue_filesystem_log_once_and_resume(tmp_path: Path) -> None:
    """Jobs waiting for their retry when the queue's filesystem fills up: every claim fails.
    One error line says so (not one per attempt), and once space returns the claims resume
    and the files are delivered, without a restart."""
    attempts: dict[str, int] = {}

    def status(rec: Received) -> int:
        attempts[rec.sop_instance_uid] = attempts.get(rec.sop_instance_uid, 0) + 1
        return 0xA700 if attempts[rec.sop_instance_uid] == 1 else 0x0000

    root = tmp_path / "d"
    with ScriptedSCP(status=status) as scp, tmpfs(root / "q", "2m") as qfs:
        d = Daemon(
            root,
            destinations=[destination("pacs", scp.port)],
            extra={"queue": str(qfs / "q.db"), "retry": {"initial_delay": "6s"}},
        )
        d.queue = qfs / "q.db"
        dropped = d.drop_files(5, **SMALL)
        with d:

            def waiting_for_retry() -> bool:
                doc = d.status_json()["destinations"]["pacs"]
                return bool(doc["pending"] == 5 and doc["in_flight"] == 0)

            wait_until(waiting_for_retry, 15, what="five jobs waiting for their retry")
            filler = fill(qfs)
            d.wait_log("cannot claim jobs", timeout=15)
            # an operator looks while the disk is full: status still answers
            assert d.cli("status").returncode == 0
            filler.unlink()
            d.wait_log("claiming jobs works again", timeout=15)
            d.wait_done(5, timeout=15)
            assert d.log_text().count("cannot claim jobs") == 1, d.log_tail()
            assert d.stop() == 0
        assert scp.uids() >= {f.sop_instance_uid for f in dropped}
        assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=5) == []


@pytest.mark.skipif(SETPRIV is None, reason="setpriv is not installed")
def test_an_unreadable_file_stays_in_incoming_until_it_can_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        daemon_module, "FORWARDER", str(without_dac_override(tmp_path / "fwd", FORWARDER))
    )
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        staged = d.drop_files(1, prefix="ok", **SMALL)
        with d:
            d.wait_done(1)
            secret = d.incoming / "secret.dcm"
            data = (d.done / staged[0].rel_path).read_bytes()
            tmp = d.incoming / ".secret.tmp"
            tmp.write_bytes(data)
            tmp.chmod(0)
            os.rename(tmp, secret)
            d.wait_log("Permission denied", timeout=15)
            assert secret.exists(), "an unreadable file must stay where it is"
            assert not d.failed_files()
            secret.chmod(0o644)
            d.wait_done(2, timeout=15)
    assert queue_problems(d.queue) == []


def test_retry_across_filesystems_delivers_the_files(tmp_path: Path) -> None:
    """failed/ on another filesystem than incoming: a file is copied there and back (a rename
    cannot cross), and a plain copy gets a new mtime, so the row `forwarder retry` queues (the
    size and mtime the queue had) no longer matched the file: every sender waited for it to
    settle, forever. The copies keep the mtime, as a rename does."""
    root = tmp_path / "d"
    with ScriptedSCP(status=0xC001) as scp, tmpfs(root / "failed", "4m"):
        d = Daemon(root, destinations=[destination("pacs", scp.port)])
        with d:
            dropped = d.drop_files(2, **SMALL)
            d.wait_failed(2)
            scp.status = 0x0000  # the PACS got fixed
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert "2 files requeued, 0 skipped" in result.stderr
            d.wait_done(2, timeout=30)
            assert scp.uids() >= {f.sop_instance_uid for f in dropped}
            # Sent as queued: the moves kept the mtime, as renames do (no replacement seen).
            assert "replaced while queued" not in d.log_text()
            assert d.stop() == 0
        assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=2) == []
