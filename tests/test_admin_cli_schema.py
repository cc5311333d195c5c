"""The admin commands on a queue database of an older schema version, as subprocesses: after a
package upgrade the running daemon is the old code until systemd restarts it, and it must find
its schema as it left it. ``status`` and ``find`` read an older schema as it is (or say in one
line that they cannot), never upgrading it; ``retry``, ``pause`` and ``resume`` upgrade it only
when no daemon runs on the queue (its lock), else they change nothing and say so in one line.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from daemon import Daemon, destination
from peers import ScriptedSCP

from forwarder.queue import SCHEMA_VERSION
from forwarder.queue.sql import COMMITMENT_JOB_COLUMNS, COMMITMENT_STATS_COLUMNS, FIND_COLUMNS

RESTART = "restart the daemon (systemctl restart forwarder) to upgrade it"


def user_version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        return version
    finally:
        conn.close()


def columns(db: Path, table: str) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def downgrade(db: Path, to: int) -> None:
    """Make the queue database what version ``to`` (3 or later) had: the later versions' tables,
    columns and indexes dropped (with the daemon stopped), the rows kept."""
    steps: dict[int, list[str]] = {
        10: ["ALTER TABLE jobs DROP COLUMN sent_uids"],
        9: ["ALTER TABLE files DROP COLUMN dataset_offset"],
        8: [
            "DROP INDEX jobs_awaiting_commitment",
            "DROP INDEX jobs_commit_txn",
            "DROP TABLE commitments",
            *(f"ALTER TABLE jobs DROP COLUMN {name}" for name, _ in COMMITMENT_JOB_COLUMNS),
            *(
                f"ALTER TABLE destination_stats DROP COLUMN {name}"
                for name, _ in COMMITMENT_STATS_COLUMNS
            ),
        ],
        7: [
            "DROP INDEX jobs_claim_priority",
            "ALTER TABLE jobs DROP COLUMN priority",
            "DROP TABLE paused_destinations",
        ],
        6: ["DROP TABLE uid_map"],
        5: [
            f"ALTER TABLE files DROP COLUMN {c}"
            for c in ("calling_ae", "called_ae", "peer", "association")
        ],
        4: [
            *(
                f"DROP INDEX {i}"
                for i in ("files_sop_instance", "files_study", "files_series", "files_accession")
            ),
            *(f"ALTER TABLE files DROP COLUMN {c}" for c in FIND_COLUMNS),
        ],
    }
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        for version in range(SCHEMA_VERSION, to, -1):
            for statement in steps[version]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {to}")
    finally:
        conn.close()


def failed_queue(tmp_path: Path, scp: ScriptedSCP) -> tuple[Daemon, str]:
    """A daemon's folders and queue with two files failed (0xC001) at ``scp``, stopped; and
    the SOP Instance UID of the first."""
    d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
    with d:
        dropped = d.drop_files(2)
        d.wait_failed(2)
        assert d.stop() == 0
    return d, dropped[0].sop_instance_uid


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_status_find_retry_and_pause_leave_the_schema_of_a_running_daemon_alone(
    tmp_path: Path,
) -> None:
    """The daemon here is this forwarder, on a queue marked as version 9 once it runs: what
    the commands see of an older daemon (its lock held, an older version; the tests below
    read genuinely older schemas). Stopped, the queue is upgraded by `retry` as before."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            dropped = d.drop_files(2)
            d.wait_failed(2)
            conn = sqlite3.connect(d.queue, isolation_level=None)
            try:
                conn.execute("PRAGMA user_version = 9")
            finally:
                conn.close()

            status = d.cli("status", "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["destinations"]["pacs"]["failed"] == 2
            assert user_version(d.queue) == 9
            found = d.cli("find", dropped[0].sop_instance_uid)
            assert found.returncode == 0, found.stderr
            assert "pacs: failed" in found.stdout
            assert user_version(d.queue) == 9

            for command in (["retry"], ["pause", "pacs"]):
                result = d.cli(*command)
                assert result.returncode == 1, result
                line = one_line(result.stderr)
                assert line.startswith(f"forwarder {command[0]}: queue database {d.queue} "), line
                assert f"is at schema 9, this forwarder writes {SCHEMA_VERSION}" in line
                assert "a forwarder daemon runs on it" in line and "nothing changed" in line
                assert RESTART in line
                assert result.stdout == ""
                assert user_version(d.queue) == 9
            assert d.failed_files() == ["img0000.dcm", "img0001.dcm"]
            assert len(list(d.failed.glob("*.error.json"))) == 2
            assert d.status_json()["destinations"]["pacs"]["state"] != "paused"
            assert d.running()
            assert d.stop() == 0

        # No daemon: `retry` upgrades the queue as it always did, and the files go out.
        scp.status = 0x0000
        result = d.cli("retry")
        assert result.returncode == 0, result.stderr
        assert "2 files requeued" in result.stderr
        assert user_version(d.queue) == SCHEMA_VERSION
        with d:
            assert d.wait_done(2) == ["img0000.dcm", "img0001.dcm"]
            assert d.stop() == 0
        d.assert_no_phi()


def test_status_and_find_read_an_older_schema_as_it_is(tmp_path: Path) -> None:
    with ScriptedSCP(status=0xC001) as scp:
        d, uid = failed_queue(tmp_path, scp)
    downgrade(d.queue, 9)
    status = d.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    pacs = json.loads(status.stdout)["destinations"]["pacs"]
    assert (pacs["failed"], pacs["pending"], pacs["done"]) == (2, 0, 0)
    text = d.cli("status")
    assert text.returncode == 0, text.stderr
    found = d.cli("find", "--json", uid)
    assert found.returncode == 0, found.stderr
    (file,) = json.loads(found.stdout)["files"]
    assert file["where"] == "failed" and file["rel_path"] == "img0000.dcm"
    # read as it was: not upgraded, although no daemon runs
    assert user_version(d.queue) == 9
    assert "sent_uids" not in columns(d.queue, "jobs")
    # a command that writes upgrades it when no daemon runs (as before)
    retry = d.cli("retry", "--destination", "pacs")
    assert retry.returncode == 0, retry.stderr
    assert user_version(d.queue) == SCHEMA_VERSION
    assert "sent_uids" in columns(d.queue, "jobs")


def test_status_and_find_say_in_one_line_that_they_cannot_read_an_older_schema(
    tmp_path: Path,
) -> None:
    with ScriptedSCP(status=0xC001) as scp:
        d, uid = failed_queue(tmp_path, scp)
    downgrade(d.queue, 4)
    for command in (["status"], ["status", "--json"], ["find", uid]):
        result = d.cli(*command)
        assert result.returncode == 1, result
        line = one_line(result.stderr)
        assert line.startswith(
            f"forwarder {command[0]}: queue database {d.queue} is at schema 4, this "
            f"forwarder reads {SCHEMA_VERSION} and cannot read it as it is (no such "
        ), line
        assert line.endswith(RESTART), line
        assert user_version(d.queue) == 4
    # the daemon upgrades it at its start, as before; then both read it
    with ScriptedSCP(status=0xC001) as scp:
        d.write_config(destinations=[destination("pacs", scp.port)])
        with d:
            assert user_version(d.queue) == SCHEMA_VERSION
            assert d.status_json()["destinations"]["pacs"]["failed"] == 2
            assert d.cli("find", uid).returncode == 0
            assert d.stop() == 0
