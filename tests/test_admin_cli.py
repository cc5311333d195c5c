"""``check-config``, ``status`` and ``retry`` as subprocesses: exit codes, output, and what
they do to the queue and the folders (with a real daemon and real peers where it matters)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination, subprocess_env, uids
from peers import ScriptedSCP, free_port

from forwarder.dicom.part10 import read_meta

REPO = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace")

GOOD = """\
ae_title: FORWARDER
incoming: in
done: done
failed: failed
queue: queue.sqlite
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: 11112
"""


def forwarder(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "forwarder.yaml"
    path.write_text(text)
    return path


# -- check-config ------------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK (1 destinations, every file to every destination)"
    assert result.stderr == ""


def test_check_config_notes_a_bracket_in_a_route_value(tmp_path: Path) -> None:
    """Only * and ? are wildcards: a [ in a route value is itself. Earlier builds read [CM]T as
    a character class, so a config written for that is told (exit 0: it is valid)."""
    text = GOOD + (
        "routes:\n  - name: ct\n    match:\n      Modality: {not: '[CM]T'}\n"
        "      StudyDescription: CT HEAD*\n      folder: 'ct[12]/*'\n    to: [pacs]\n"
    )
    path = write_config(tmp_path, text)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if ": note: " in line]
    assert [n.split(": note: ")[1].split(":")[0] for n in notes] == [
        "routes[0].match.Modality",
        "routes[0].match.folder",
    ]
    assert "'[CM]T' is matched with its [ as itself" in notes[0]
    assert result.stdout.splitlines()[-1] == f"{path}: OK (1 destinations, 1 routes)"


def test_check_config_of_the_shipped_config() -> None:
    result = forwarder("check-config", "-c", str(REPO / "config" / "forwarder.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK (1 destinations, 1 routes)" in result.stdout


def test_check_config_on_a_bad_port_names_key_and_line_and_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD.replace("port: 11112", "port: 111120"))
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{path}: destinations[0].port (line 10): must be 1..65535",
        f"forwarder check-config: invalid config file {path}",
    ]
    assert result.stdout == ""


def test_check_config_prints_every_problem(tmp_path: Path) -> None:
    text = GOOD.replace("port: 11112", "port: 0").replace("host: 127.0.0.1", "hots: x") + (
        "retry:\n  initial_delay: soon\nwatch:\n  settle: 1 fortnight\ncolour: red\n"
    )
    path = write_config(tmp_path, text)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 78
    problems = [line for line in result.stderr.splitlines() if line.startswith(f"{path}: ")]
    keys = [p.split(": ", 2)[1] for p in problems]
    assert keys == [
        "destinations[0].host (line 7)",
        "destinations[0].port (line 10)",
        "destinations[0].hots (line 9)",
        "retry.initial_delay (line 12)",
        "watch.settle (line 14)",
        "colour (line 15)",
    ], problems


def test_check_config_unknown_route_destination(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD + "routes:\n  - name: r\n    to: [pacs, archive]\n")
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 78
    assert (
        f"{path}: routes[0].to[1] (line 13): unknown destination 'archive' (known: pacs)"
        in result.stderr
    )


def test_check_config_of_a_missing_file_exits_78(tmp_path: Path) -> None:
    result = forwarder("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 78
    assert "cannot read the config file: No such file or directory" in result.stderr


def test_check_config_reads_forwarder_config_from_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = forwarder("check-config", env={"FORWARDER_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout


def test_check_config_rejects_unusable_tls_material(tmp_path: Path) -> None:
    text = GOOD + "    tls:\n      ca: missing-ca.pem\n"
    path = write_config(tmp_path, text)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 78
    assert "destinations[0].tls" in result.stderr


def test_check_config_schema_is_json(tmp_path: Path) -> None:
    result = forwarder("check-config", "--schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "destinations" in schema["properties"]


def test_run_on_an_invalid_config_exits_78_at_once(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD.replace("port: 11112", "port: -1") + "extra: 1\n")
    result = forwarder("run", "-c", str(path))
    assert result.returncode == 78
    assert f"{path}: destinations[0].port (line 10): must be 1..65535" in result.stderr
    assert f"{path}: extra (line 11): unknown key" in result.stderr
    assert not (tmp_path / "queue.sqlite").exists()  # nothing was started


@pytest.mark.parametrize(
    "args",
    [["status", "--bogus"], ["retry", "--destination"], ["check-config", "extra-arg"], ["nope"]],
)
def test_bad_command_lines_exit_2(args: list[str]) -> None:
    assert forwarder(*args).returncode == 2


# -- status ----------------------------------------------------------------------------------

STATUS_KEYS = {"pending", "in_flight", "done", "failed", "oldest_pending_seconds", "last_error"}
STATUS_KEYS |= {"state", "state_since"}  # CONTRACT.md, Second stage: Status


def check_status_shape(doc: dict[str, Any]) -> None:
    """Exactly CONTRACT.md's shape and types."""
    assert set(doc) == {"destinations"}
    for name, s in doc["destinations"].items():
        assert isinstance(name, str)
        assert set(s) == STATUS_KEYS, s
        for key in ("pending", "in_flight", "done", "failed"):
            assert type(s[key]) is int and s[key] >= 0, (key, s)
        assert s["oldest_pending_seconds"] is None or type(s["oldest_pending_seconds"]) is float
        assert s["last_error"] is None or isinstance(s["last_error"], str)
        assert s["state"] in ("up", "down", "paused", "outside_window"), s
        assert s["state_since"] is None or isinstance(s["state_since"], str)


def test_status_before_the_daemon_ever_ran(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = forwarder("status", "-c", str(path), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    check_status_shape(doc)
    assert doc == {
        "destinations": {
            "pacs": {
                "pending": 0,
                "in_flight": 0,
                "done": 0,
                "failed": 0,
                "oldest_pending_seconds": None,
                "last_error": None,
                "state": "up",
                "state_since": None,
            }
        }
    }
    assert not (tmp_path / "queue.sqlite").exists()  # status never creates the queue
    text = forwarder("status", "-c", str(path))
    assert text.returncode == 0
    assert text.stdout.split() == [
        *("DESTINATION", "PENDING", "IN", "FLIGHT", "DONE", "FAILED", "OLDEST"),
        *("pacs", "0", "0", "0", "0", "-"),
    ]


def test_status_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD.replace("port: 11112", "port: x"))
    assert forwarder("status", "-c", str(path), "--json").returncode == 78


def test_status_while_running_counts_per_destination(tmp_path: Path) -> None:
    down_port = free_port()
    with ScriptedSCP() as up:
        d = Daemon(
            tmp_path,
            destinations=[destination("up", up.port), destination("down", down_port)],
        )
        with d:
            dropped = d.drop_files(4)
            wait_until(lambda: up.uids() == uids(dropped), 30, what="4 files at 'up'")
            doc = d.wait_status(
                lambda s: s["down"]["state"] == "down" and s["up"]["done"] == 4,
                what="the down destination's error",
            )
            check_status_shape(doc)
            up_s, down_s = doc["destinations"]["up"], doc["destinations"]["down"]
            assert up_s.pop("state") == "up" and up_s.pop("state_since")
            assert up_s == {
                "pending": 0,
                "in_flight": 0,
                "done": 4,
                "failed": 0,
                "oldest_pending_seconds": None,
                "last_error": None,
            }
            assert down_s["pending"] + down_s["in_flight"] == 4
            assert (down_s["done"], down_s["failed"]) == (0, 0)
            assert isinstance(down_s["oldest_pending_seconds"], float)
            assert down_s["oldest_pending_seconds"] >= 0.0
            assert down_s["last_error"] and "refused" in down_s["last_error"]
            assert down_s["state_since"]
            text = d.cli("status")
            assert text.returncode == 0
            assert "last error: " in text.stdout and "DOWN since" in text.stdout
            assert d.stop() == 0
        # status reads the queue database after the daemon stopped too
        after = d.status_json()
        assert after["destinations"]["up"]["done"] == 4


def test_status_forgets_an_error_once_the_destination_recovers(tmp_path: Path) -> None:
    """The last error is the last one since a file was stored: after an outage is over,
    status shows the destination healthy, not the outage's error (issue 17, item 6)."""
    port = free_port()
    d = Daemon(tmp_path, destinations=[destination("pacs", port)])
    with d:
        dropped = d.drop_files(2)
        d.wait_status(
            lambda s: bool(s["pacs"]["last_error"]) and "refused" in s["pacs"]["last_error"],
            what="the refused connection as pacs's last error",
        )
        with ScriptedSCP(port=port) as scp:
            wait_until(lambda: scp.uids() == uids(dropped), 60, what="the 2 files after the outage")
            doc = d.wait_status(
                lambda s: s["pacs"]["done"] == 2 and s["pacs"]["pending"] == 0,
                what="both files counted done",
            )
            pacs = doc["destinations"]["pacs"]
            assert pacs["last_error"] is None
            assert pacs["state"] == "up"
            text = d.cli("status").stdout
            assert "last error" not in text and "DOWN" not in text


def test_status_drops_a_finishing_error_of_an_earlier_run(tmp_path: Path) -> None:
    """A 'cannot move out of incoming' error recorded by an earlier run is cleared by the first
    clean move, and status prints no line about files waiting when none wait."""
    from forwarder.queue import Queue

    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with Queue(d.queue) as queue:
            queue.set_problem("finish", "cannot move a.dcm to done/: Read-only file system")
        before = d.cli("status").stdout
        assert "Read-only file system" not in before  # nothing waits: history, not news
        with d:
            d.drop_files(1)
            d.wait_done(1)
            wait_until(
                lambda: "finish" not in _problems(d.queue), 15, what="the old problem cleared"
            )
        assert "wait to be moved" not in d.cli("status").stdout


def _problems(path: Path) -> dict[str, Any]:
    from forwarder.queue import Queue

    with Queue(path, create=False) as queue:
        return dict(queue.problems())


# -- retry -----------------------------------------------------------------------------------


def test_retry_without_a_queue_is_a_no_op(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = forwarder("retry", "-c", str(path))
    assert result.returncode == 0
    assert "nothing to retry" in result.stderr


def test_retry_for_an_unknown_destination_exits_1(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = forwarder("retry", "-c", str(path), "--destination", "nope")
    assert result.returncode == 1
    assert "no destination 'nope' in the config (known: pacs)" in result.stderr


def test_retry_brings_failed_files_back_and_they_get_delivered(tmp_path: Path) -> None:
    with ScriptedSCP(status=0xC001) as scp:  # permanent failure until "fixed"
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            dropped = d.drop_files(3, folder="ct")
            d.wait_failed(3)
            assert d.error_json("ct/img0000.dcm")["destinations"][0]["status"] == "0xC001"
            assert d.status_json()["destinations"]["pacs"]["failed"] == 3
            scp.status = 0x0000  # the PACS got fixed
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert sorted(result.stdout.splitlines()) == [
                f"requeued ct/img000{i}.dcm for pacs" for i in range(3)
            ]
            assert "3 files requeued, 0 skipped" in result.stderr
            assert d.wait_done(3) == [f"ct/img000{i}.dcm" for i in range(3)]
            assert scp.uids() == uids(dropped)
            assert d.failed_files() == []
            assert list(d.failed.rglob("*.error.json")) == []
            # nothing left to retry
            again = d.cli("retry")
            assert again.returncode == 0 and "0 files requeued" in again.stderr
            assert d.stop() == 0
        d.assert_no_phi()


def test_retry_sends_a_file_fixed_in_failed_as_it_is_now(tmp_path: Path) -> None:
    """An operator fixes a failed file where it lies in failed/ (rewrites it), then runs
    `forwarder retry`, which queues it with the header values and size the queue had. The
    daemon finds the file unlike its row, refreshes the row from the file (a replacement,
    logged) and sends the fixed version: not the stale values, and not a wait for ever."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            (dropped,) = d.drop_files(1, folder="ct")
            d.wait_failed(1)
            failed = d.failed / dropped.rel_path
            ds = pydicom.dcmread(failed)
            ds.StudyDescription = "FIXED BY THE OPERATOR"
            ds.save_as(failed)
            fixed = read_meta(failed)
            scp.status = 0x0000
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            d.wait_done(1, timeout=30)
            assert [r.nbytes for r in scp.received] == [fixed.size - fixed.dataset_offset]
            assert "replaced while queued; sending the new version" in d.log_text()
            assert d.stop() == 0


def test_retry_one_destination_of_a_fan_out(tmp_path: Path) -> None:
    """A file stored at A but permanently failed at B lands in failed/ with both outcomes;
    ``retry --destination b`` sends it to B only, then it lands in done/."""
    with ScriptedSCP() as a, ScriptedSCP(status=0xA900) as b:  # 0xA900: dataset mismatch
        d = Daemon(tmp_path, destinations=[destination("a", a.port), destination("b", b.port)])
        with d:
            (dropped,) = d.drop_files(1)
            d.wait_failed(1)
            doc = d.error_json("img0000.dcm")
            by_dest = {r["destination"]: r for r in doc["destinations"]}
            assert set(by_dest) == {"a", "b"}
            assert by_dest["a"]["outcome"] == "stored" and by_dest["a"]["status"] == "0x0000"
            assert by_dest["b"]["outcome"] == "failed" and by_dest["b"]["status"] == "0xA900"
            assert "0xA900" in doc["reason"] and doc["reason"].startswith("b: ")
            assert a.uids() == {dropped.sop_instance_uid}
            b.status = 0x0000
            result = d.cli("retry", "--destination", "b")
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "requeued img0000.dcm for b"
            d.wait_done(1)
            assert b.uids() == {dropped.sop_instance_uid}
            assert len(a.received) == 1  # A was not sent it again
            assert d.stop() == 0


def test_retry_only_touches_the_named_destination(tmp_path: Path) -> None:
    with ScriptedSCP(status=0xC000) as a, ScriptedSCP(status=0xC000) as b:
        d = Daemon(
            tmp_path,
            destinations=[destination("a", a.port), destination("b", b.port)],
            routes=[
                {"name": "ct", "match": {"Modality": "CT"}, "to": ["a"]},
                {"name": "mr", "match": {"Modality": "MR"}, "to": ["b"]},
            ],
        )
        with d:
            d.drop("ct.dcm", modality="CT")
            d.drop("mr.dcm", modality="MR")
            d.wait_failed(2)
            result = d.cli("retry", "--destination", "a")
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "requeued ct.dcm for a"
            # a still fails: ct.dcm comes back to failed/, mr.dcm never left it
            wait_until(
                lambda: d.status_json()["destinations"]["a"]["failed"] == 2,
                30,
                what="the retried file to fail again",
            )
            d.wait_failed(2)
            assert d.failed_files() == ["ct.dcm", "mr.dcm"]
            assert d.stop() == 0


def _killed_retry(d: Daemon) -> None:
    """``forwarder retry`` killed (SIGKILL) after it queued the file again, before the move."""
    result = forwarder(
        "retry", "-c", str(d.config_path), env={"FORWARDER_CRASH_AT": "retry-before-move"}
    )
    assert result.returncode == -9, result.stderr


def test_retry_killed_before_the_move_while_the_daemon_runs_can_be_run_again(
    tmp_path: Path,
) -> None:
    """A retry killed between queueing the file and moving it back leaves the file in failed/;
    the daemon fails the queued copy it cannot find. Running `forwarder retry` again must bring
    the file back (it is still in failed/), not skip it as "no longer in failed/" for ever."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            (dropped,) = d.drop_files(1)
            d.wait_failed(1)
            scp.status = 0x0000
            _killed_retry(d)
            assert d.failed_files() == ["img0000.dcm"]
            wait_until(
                lambda: d.status_json()["destinations"]["pacs"]["failed"] == 2,
                30,
                what="the daemon to fail the queued copy it cannot find",
            )
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert "1 files requeued, 0 skipped" in result.stderr
            d.wait_done(1)
            assert scp.uids() == {dropped.sop_instance_uid}
            assert d.failed_files() == []
            assert list(d.failed.rglob("*.error.json")) == []
            assert d.stop() == 0


def test_retry_killed_before_the_move_while_the_daemon_is_stopped_can_be_run_again(
    tmp_path: Path,
) -> None:
    """The same crash with the daemon stopped: the next `forwarder retry` finishes the move, so
    the daemon sends the file when it starts (and does not fail it as gone)."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            (dropped,) = d.drop_files(1)
            d.wait_failed(1)
            assert d.stop() == 0
            scp.status = 0x0000
            _killed_retry(d)
            result = d.cli("retry")
            assert result.returncode == 0, result.stderr
            assert d.incoming_files() == ["img0000.dcm"], result.stderr
            assert d.failed_files() == []
            assert list(d.failed.rglob("*.error.json")) == []
            d.start()
            d.wait_done(1)
            assert scp.uids() == {dropped.sop_instance_uid}
            assert d.stop() == 0


def test_retry_killed_after_the_move_leaves_no_failure_report_for_a_delivered_file(
    tmp_path: Path,
) -> None:
    """A retry killed (SIGKILL) once the file is back in incoming must not leave its old
    NAME.error.json in failed/: the file is then delivered, and failed/ (the status page's
    recent failures, an operator's `ls`) would still report it failed, beside nothing."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            d.drop_files(1)
            d.wait_failed(1)
            assert d.stop() == 0
            scp.status = 0x0000
            result = forwarder(
                "retry", "-c", str(d.config_path), env={"FORWARDER_CRASH_AT": "retry-after-move"}
            )
            assert result.returncode == -9, result.stderr
            d.start()
            d.wait_done(1)
            assert d.stop() == 0
    assert d.failed_files() == []
    assert list(d.failed.rglob("*.error.json")) == []


def test_retry_of_one_destination_keeps_the_other_failure_of_a_fan_out(tmp_path: Path) -> None:
    """A file that failed at A and at B, retried for A only and then stored there, is still
    not delivered to B: it goes back to failed/ (not done/), and `retry --destination b` can
    still bring it back for B."""
    with ScriptedSCP(status=0xC000) as a, ScriptedSCP(status=0xC000) as b:
        d = Daemon(tmp_path, destinations=[destination("a", a.port), destination("b", b.port)])
        with d:
            (dropped,) = d.drop_files(1)
            d.wait_failed(1)
            a.status = 0x0000
            result = d.cli("retry", "--destination", "a")
            assert result.stdout.strip() == "requeued img0000.dcm for a", result.stderr
            wait_until(lambda: len(a.received) == 1, 30, what="the retry to be stored at A")
            d.wait_incoming_empty()
            assert d.done_files() == []
            d.wait_failed(1)
            by_dest = {r["destination"]: r for r in d.error_json("img0000.dcm")["destinations"]}
            assert by_dest["a"]["outcome"] == "stored" and by_dest["a"]["status"] == "0x0000"
            assert by_dest["b"]["outcome"] == "failed" and by_dest["b"]["status"] == "0xC000"
            b.status = 0x0000
            result = d.cli("retry", "--destination", "b")
            assert result.stdout.strip() == "requeued img0000.dcm for b", result.stderr
            d.wait_done(1)
            assert b.uids() == {dropped.sop_instance_uid}
            assert len(a.received) == 1  # A was not sent it again
            assert d.stop() == 0


def _failed_and_stopped(tmp_path: Path, count: int, folder: str = "") -> Daemon:
    """A stopped daemon whose ``count`` files failed for good at its one destination."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            d.drop_files(count, folder=folder)
            d.wait_failed(count)
            assert d.stop() == 0
    return d


def _retry_with_faulty_writes(
    d: Daemon, paths: list[Path], fault: str
) -> subprocess.CompletedProcess[str]:
    """`forwarder retry` under strace, its writes to ``paths`` met with ``fault`` from the
    first (``signal=SIGKILL``: killed there; ``error=ENOSPC``: the disk full)."""
    assert STRACE is not None
    return subprocess.run(
        [
            *(STRACE, "-f", "-qq", "-o", "/dev/null"),
            *(arg for path in paths for arg in ("-P", str(path))),
            *("-e", "trace=write", "-e", f"inject=write:{fault}"),
            *(FORWARDER, "retry", "-c", str(d.config_path)),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(STRACE is None, reason="needs strace to kill or refuse a write")
@pytest.mark.parametrize("fault", ["signal=SIGKILL", "error=ENOSPC"])
def test_a_report_put_back_after_a_failed_move_is_whole_or_absent(
    tmp_path: Path, fault: str
) -> None:
    """`forwarder retry` takes a file's NAME.error.json away before moving the file back and
    puts it back when the move fails (here a plain file is where the folder should be). That
    write killed (SIGKILL) or refused (disk full) at its first byte leaves the report whole or
    absent, the file queued (the next retry finishes the move), never an empty or cut report."""
    d = _failed_and_stopped(tmp_path, 1, folder="ct")
    report = d.failed / "ct" / "img0000.dcm.error.json"
    before = report.read_bytes()
    shutil.rmtree(d.incoming / "ct", ignore_errors=True)
    (d.incoming / "ct").write_bytes(b"a file where the folder goes")
    watched = [report, report.with_name(f".{report.name}.tmp")]  # the report, its temp file
    faulted = _retry_with_faulty_writes(d, watched, fault)
    assert faulted.returncode == (-9 if "KILL" in fault else 1), faulted.stderr
    if "ENOSPC" in fault:
        assert f"cannot write {report}: No space left on device: the report is not put back" in (
            faulted.stderr
        )
    assert d.failed_files() == ["ct/img0000.dcm"]
    assert not report.exists() or report.read_bytes() == before
    (d.incoming / "ct").unlink()
    result = d.cli("retry")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "requeued ct/img0000.dcm (an interrupted retry finished)"
    assert d.incoming_files() == ["ct/img0000.dcm"]
    assert d.failed_files() == [] and list(d.failed.rglob("*.error.json")) == []


def test_a_file_whose_name_is_still_queued_stays_in_failed_and_the_others_are_retried(
    tmp_path: Path,
) -> None:
    """img0000.dcm failed; the modality sent it again, that copy was stored and moved to
    done/, and the daemon was killed before it recorded the move (the copy's row unfinished,
    under incoming/img0000.dcm, until the next start). `forwarder retry` cannot queue the
    failed img0000.dcm under that name meanwhile: it says so in one line, leaves the file in
    failed/ with its report, retries img0001.dcm all the same, and exits 1."""
    with ScriptedSCP(status=0xC001) as scp:
        dest = destination("pacs", scp.port)
        d = Daemon(tmp_path, destinations=[dest], env={"FORWARDER_CRASH_AT": "finish-after-move:3"})
        with d:
            d.drop_files(2)
            d.wait_failed(2)
            scp.status = 0x0000
            d.drop("img0000.dcm", seed=0)  # sent again: the third file finished
            assert d.wait_exit() == -9, d.log_tail()
            del d.env["FORWARDER_CRASH_AT"]
            assert d.done_files() == ["img0000.dcm"]
            report = d.failed / "img0000.dcm.error.json"
            before = report.read_bytes()
            result = d.cli("retry")
            assert result.returncode == 1, result.stderr
            assert result.stdout.strip() == "requeued img0001.dcm for pacs", result.stderr
            (line,) = [x for x in result.stderr.splitlines() if "img0000.dcm" in x]
            assert line.startswith(f"forwarder retry: {d.failed / 'img0000.dcm'}: "), line
            assert "left in failed/ as it is: the queue still holds" in line, line
            assert "1 files requeued" in result.stderr
            assert d.failed_files() == ["img0000.dcm"] and report.read_bytes() == before
            assert d.incoming_files() == ["img0001.dcm"]
            # Once the daemon has recorded the earlier move, the file can be retried.
            d.start()
            d.wait_done(2)
            again = d.cli("retry")
            assert again.returncode == 0, again.stderr
            assert again.stdout.strip() == "requeued img0000.dcm for pacs", again.stderr
            assert d.failed_files() == [] and list(d.failed.rglob("*.error.json")) == []
            assert d.stop() == 0


def test_a_file_that_cannot_be_moved_back_does_not_stop_the_others(tmp_path: Path) -> None:
    """One file's move back fails (a plain file is where its folder goes): that file is named
    with the reason and stays in failed/ with its report, queued (the next retry finishes the
    move); the files after it are retried all the same; the exit status is 1."""
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            d.drop("ct/a.dcm", seed=1)
            d.wait_failed(1)
            d.drop("b.dcm", seed=2)
            d.wait_failed(2)
            assert d.stop() == 0
    shutil.rmtree(d.incoming / "ct", ignore_errors=True)
    (d.incoming / "ct").write_bytes(b"a file where the folder goes")
    result = d.cli("retry")
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "requeued b.dcm for pacs"
    (line,) = [x for x in result.stderr.splitlines() if "a.dcm" in x]
    assert line.startswith(f"forwarder retry: cannot move {d.failed / 'ct/a.dcm'} to "), line
    assert "Not a directory; it stays in place" in line, line
    assert "1 files requeued, 0 skipped, 1 left in failed/" in result.stderr
    assert d.failed_files() == ["ct/a.dcm"] and d.error_json("ct/a.dcm")["file"] == "ct/a.dcm"
    (d.incoming / "ct").unlink()
    again = d.cli("retry")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "requeued ct/a.dcm (an interrupted retry finished)"
    assert d.incoming_files() == ["b.dcm", "ct/a.dcm"] and d.failed_files() == []


def test_a_report_that_cannot_be_removed_is_named_and_the_others_are_retried(
    tmp_path: Path,
) -> None:
    """`forwarder retry` removes a file's NAME.error.json before moving the file back. When
    that fails (here the report's name is a folder: removing it fails for root too), the
    report is named with the reason in one line, not a traceback; the file stays in failed/
    and the files after it are retried; the exit status is 1."""
    d = _failed_and_stopped(tmp_path, 2)
    report = d.failed / "img0000.dcm.error.json"
    report.unlink()
    report.mkdir()
    result = d.cli("retry")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip() == "requeued img0001.dcm for pacs", result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "img0000.dcm" in x]
    assert line == f"forwarder retry: cannot remove {report}: Is a directory", line
    assert "1 files requeued, 0 skipped, 1 left in failed/" in result.stderr
    assert d.failed_files() == ["img0000.dcm"] and d.incoming_files() == ["img0001.dcm"]


@pytest.mark.skipif(STRACE is None, reason="needs strace to kill a write")
def test_a_report_put_back_killed_midway_leaves_no_file_counted_in_failed(
    tmp_path: Path,
) -> None:
    """`forwarder retry` killed while it puts a report back (its temporary `.NAME.tmp` made,
    not renamed): once the next retry has moved the file back, failed/ holds no failed file.
    The temporary left behind is not counted as one by the metrics' failed-folder count
    (`forwarder_failed_folder_files`), which an operator alerts on."""
    from forwarder.daemon.failed_folder import FailedFolder

    d = _failed_and_stopped(tmp_path, 1, folder="ct")
    report = d.failed / "ct" / "img0000.dcm.error.json"
    shutil.rmtree(d.incoming / "ct", ignore_errors=True)
    (d.incoming / "ct").write_bytes(b"a file where the folder goes")
    assert FailedFolder(d.failed).count() == 1
    temporary = report.with_name(f".{report.name}.tmp")
    killed = _retry_with_faulty_writes(d, [temporary], "signal=SIGKILL")
    assert killed.returncode == -9, killed.stderr
    (d.incoming / "ct").unlink()
    result = d.cli("retry")
    assert result.returncode == 0, result.stderr
    assert d.incoming_files() == ["ct/img0000.dcm"] and d.failed_files() == []
    assert FailedFolder(d.failed).count() == 0, sorted(p.name for p in d.failed.rglob("*"))
