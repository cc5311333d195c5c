"""``forwarder run`` end to end, as a subprocess, against DCMTK storescp, Orthanc and scripted
pynetdicom SCPs on loopback: the folder semantics, statuses, routing, crashes, signals, reloads.

Every test drives a :class:`daemon.Daemon` (its own tmp_path tree and log) and asserts on what
arrived where: at the peers, in ``done/``, in ``failed/`` with ``NAME.error.json``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination, route, subprocess_env, uids
from dicomgen import PATIENT_ID, PATIENT_NAME, write_file
from peers import Received, ScriptedSCP, free_port, orthanc, storescp
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

REPO = Path(__file__).resolve().parent.parent


def dicom_bytes(tmp_path: Path, **kwargs: object) -> bytes:
    """The bytes of a generated file (kept out of incoming)."""
    path = tmp_path / "scratch" / f"{time.monotonic_ns()}.dcm"
    write_file(path, **kwargs)
    return path.read_bytes()


# -- interoperability: three kinds of peer ---------------------------------------------------


def test_delivers_to_dcmtk_storescp(tmp_path: Path) -> None:
    with storescp(tmp_path / "storescp") as peer:
        d = Daemon(
            tmp_path / "fw", destinations=[destination("dcmtk", peer.port, ae_title="STORESCP")]
        )
        with d:
            d.drop_files(3, modality="CT")
            d.drop_files(2, prefix="mr", modality="MR", transfer_syntax=ImplicitVRLittleEndian)
            d.drop("rle.dcm", transfer_syntax=RLELossless)
            assert len(d.wait_done(6)) == 6
            wait_until(lambda: len(peer.files()) == 6, 15, what="6 files written by storescp")
            assert d.failed_files() == [] and d.incoming_files() == []
            assert d.stop() == 0
        d.assert_no_phi()


def test_delivers_to_orthanc(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as peer:
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                destination("orthanc", peer.port, ae_title=peer.ae_title, associations=2)
            ],
        )
        with d:
            d.drop_files(4, folder="ct")
            d.drop("mr/one.dcm", modality="MR")
            d.drop("rle.dcm", transfer_syntax=RLELossless)
            assert d.wait_done(6) == [
                "ct/img0000.dcm",
                "ct/img0001.dcm",
                "ct/img0002.dcm",
                "ct/img0003.dcm",
                "mr/one.dcm",
                "rle.dcm",
            ]
            wait_until(lambda: peer.instance_count() == 6, 30, what="6 instances in Orthanc")
            assert d.stop() == 0
        d.assert_no_phi()


def test_delivers_to_a_scripted_scp_with_several_associations(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port, associations=3)])
        with d:
            dropped = d.drop_files(40)
            d.wait_done(40)
            assert scp.uids() == uids(dropped)
            assert {r.calling_ae for r in scp.received} == {"FORWARDER"}
            assert d.stop() == 0
        d.assert_no_phi()


# -- how files arrive in incoming -------------------------------------------------------------


def test_files_present_before_start_are_picked_up(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port)])
        dropped = d.drop_files(5, folder="early/sub")
        dropped += d.drop_files(2, prefix="top")
        with d:
            done = d.wait_done(7)
            assert done == sorted(x.rel_path for x in dropped)  # relative paths kept
            assert scp.uids() == uids(dropped)
            assert d.stop() == 0


def test_a_file_written_slowly_in_place_arrives_once_complete(tmp_path: Path) -> None:
    """A writer that keeps appending (gaps shorter than settle) for many settle windows."""
    data = dicom_bytes(tmp_path, rows=128, columns=128)  # 32 KB
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "fw", destinations=[destination("a", scp.port)])
        with d:
            target = d.incoming / "slow" / "file.dcm"
            target.parent.mkdir()
            chunk = len(data) // 30 + 1
            with open(target, "wb") as f:
                for i in range(0, len(data), chunk):
                    f.write(data[i : i + chunk])
                    f.flush()
                    time.sleep(0.05)  # the slow writer (1.5 s in all, settle is 200 ms)
            assert d.wait_done(1) == ["slow/file.dcm"]
            assert (d.done / "slow" / "file.dcm").read_bytes() == data
            assert d.failed_files() == []
            assert len(scp.received) == 1 and scp.received[0].nbytes > 30_000
            assert d.stop() == 0


def test_a_writer_pausing_longer_than_settle_does_not_lose_its_file(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path, rows=64, columns=64)
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "fw", destinations=[destination("a", scp.port)])
        with d:
            with open(d.incoming / "paused.dcm", "wb") as f:
                f.write(data[:4000])
                f.flush()
                time.sleep(1.0)  # the writer stalls for 5 settle windows, file still open
                f.write(data[4000:])
            wait_until(
                lambda: "paused.dcm" in d.done_files() + d.failed_files(),
                20,
                what="paused.dcm to be taken",
            )
            assert d.done_files() == ["paused.dcm"]
            assert scp.uids()
            assert d.stop() == 0


def test_hidden_and_partial_files_are_left_alone_until_renamed(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path)
    ignored = [
        ".hidden.dcm",
        "x.dcm.part",
        "y.dcm.tmp",
        "z.dcm.partial",
        "UPPER.PART",
        ".staging/inner.dcm",
        "sub/.also-hidden.dcm",
    ]
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "fw", destinations=[destination("a", scp.port)])
        for name in ignored[:3]:  # some there at start (initial scan)
            d.drop_bytes(name, data)
        with d:
            for name in ignored[3:]:  # some appear while running (events)
                d.drop_bytes(name, data)
            d.drop_files(1, prefix="barrier")
            d.wait_done(1)
            d.drop_files(1, prefix="barrier2")  # one more round of the watcher
            assert d.wait_done(2) == ["barrier0000.dcm", "barrier20000.dcm"]
            assert sorted(d.incoming_files()) == sorted(ignored)
            assert len(scp.received) == 2 and d.failed_files() == []
            # renamed into place: now they go
            os.rename(d.incoming / ".hidden.dcm", d.incoming / "hidden.dcm")
            os.rename(d.incoming / "x.dcm.part", d.incoming / "x.dcm")
            os.rename(d.incoming / ".staging", d.incoming / "staging")
            done = d.wait_done(5)
            assert {"hidden.dcm", "x.dcm", "staging/inner.dcm"} <= set(done)
            assert sorted(d.incoming_files()) == sorted(
                ["y.dcm.tmp", "z.dcm.partial", "UPPER.PART", "sub/.also-hidden.dcm"]
            )
            assert d.stop() == 0


def test_done_keeps_relative_paths_and_suffixes_name_clashes(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port)])
        with d:
            first = d.drop("a/b/c.dcm", seed=1)
            d.wait_done(1)
            second = d.drop("a/b/c.dcm", seed=2)
            d.wait_done(2)
            third = d.drop("a/b/c.dcm", seed=3)
            assert d.wait_done(3) == ["a/b/c.1.dcm", "a/b/c.2.dcm", "a/b/c.dcm"]
            assert scp.uids() == uids([first, second, third])
            assert d.stop() == 0


# -- bad files --------------------------------------------------------------------------------


def test_bad_files_go_to_failed_with_a_reason_while_good_files_keep_flowing(
    tmp_path: Path,
) -> None:
    good = dicom_bytes(tmp_path, rows=32, columns=32)
    bad = {
        "garbage.dcm": os.urandom(5000),
        "empty.dcm": b"",
        "truncated.dcm": good[: len(good) - 700],
        "meta-cut.dcm": good[:153],
        "notes.txt": b"this is not DICOM\n" * 20,
        "deep/er/preamble-only.dcm": b"\x00" * 128 + b"DICM",
    }
    reasons = {
        "garbage.dcm": "not usable DICOM: not a DICOM Part 10 file",
        "empty.dcm": "not usable DICOM: empty file",
        "truncated.dcm": "not usable DICOM: truncated",
        "meta-cut.dcm": "not usable DICOM: ",
        "notes.txt": "not usable DICOM: not a DICOM Part 10 file",
        "deep/er/preamble-only.dcm": "not usable DICOM: ",
    }
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "fw", destinations=[destination("a", scp.port)])
        with d:
            before = d.drop_files(3, prefix="before")
            for name, data in bad.items():
                d.drop_bytes(name, data)
            with open(d.incoming / "empty-in-place.dcm", "wb"):
                pass  # an empty file made in place, not renamed
            after = d.drop_files(3, prefix="after")
            assert d.wait_done(6) == sorted(x.rel_path for x in before + after)
            failed = d.wait_failed(len(bad) + 1)
            assert failed == sorted([*bad, "empty-in-place.dcm"])
            for name, data in bad.items():
                assert (d.failed / name).read_bytes() == data  # nothing altered or deleted
                doc = d.error_json(name)
                assert doc["file"] == name
                assert doc["reason"].startswith(reasons[name]), (name, doc["reason"])
                assert doc["destinations"] == []
            assert scp.uids() == uids(before + after)
            assert d.incoming_files() == []
            assert d.stop() == 0
        d.assert_no_phi()


# -- destinations down, statuses --------------------------------------------------------------


def test_a_destination_down_at_first_receives_everything_once_it_comes_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    d = Daemon(tmp_path, destinations=[destination("late", port)])
    with d:
        dropped = d.drop_files(10)
        d.wait_status(lambda s: s["late"]["last_error"] is not None, what="a connect failure")
        assert d.done_files() == [] and d.failed_files() == []
        with ScriptedSCP(port=port) as scp:
            d.wait_done(10, timeout=60)
            assert scp.uids() == uids(dropped)
        assert d.failed_files() == []
        assert d.stop() == 0


def test_a_destination_that_is_down_does_not_slow_another(tmp_path: Path) -> None:
    down_port = free_port()
    with ScriptedSCP() as up:
        d = Daemon(
            tmp_path,
            destinations=[
                destination("down", down_port, associations=2),
                destination("up", up.port),
            ],
        )
        with d:
            first = d.drop_files(20, prefix="a")
            wait_until(lambda: up.uids() == uids(first), 30, what="first batch at 'up'")
            # still down: a second batch flows to the healthy one just the same
            second = d.drop_files(20, prefix="b")
            wait_until(lambda: up.uids() == uids(first + second), 30, what="second batch at 'up'")
            status = d.wait_status(lambda s: s["up"]["done"] == 40, what="the acks")["destinations"]
            assert status["down"]["done"] == 0 and status["down"]["last_error"]
            assert d.done_files() == []  # not delivered everywhere yet
            with ScriptedSCP(port=down_port) as late:
                d.wait_done(40, timeout=60)
                assert late.uids() == uids(first + second)
            assert d.stop() == 0


def test_statuses_transient_retried_permanent_failed_at_once_warnings_stored(
    tmp_path: Path,
) -> None:
    """CT: 0x0110, 0xA700, 0xA7FF, then Success (retried); MR: 0xA900 (failed at once, the
    status in the reason); US: a Warning (0xB000, 0xB006, 0xB007, 0x0001), which is stored."""
    seen: dict[str, int] = {}
    warned: dict[str, int] = {}
    lock = threading.Lock()
    transient = [0x0110, 0xA700, 0xA7FF]
    warnings = [0xB000, 0xB006, 0xB007, 0x0001]

    def status(rec: Received) -> int:
        with lock:
            n = seen.get(rec.sop_instance_uid, 0)
            seen[rec.sop_instance_uid] = n + 1
        if rec.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4":  # MR
            return 0xA900
        if rec.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and rec.nbytes < 4000:  # small CT
            code = warnings[len(warned) % len(warnings)]
            warned[rec.sop_instance_uid] = code
            return code
        return transient[n] if n < len(transient) else 0x0000

    with ScriptedSCP(status=status) as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port)])
        with d:
            ct = d.drop_files(3, prefix="ct", modality="CT")
            mr = d.drop_files(2, prefix="mr", modality="MR")
            warn = d.drop_files(4, prefix="w", modality="CT", rows=32, columns=32)
            assert d.wait_failed(2) == ["mr0000.dcm", "mr0001.dcm"]
            d.wait_done(7)
            assert uids(ct) <= scp.uids()
            assert all(seen[u] == 4 for u in uids(ct)), seen  # retried until stored
            assert all(seen[u] == 1 for u in uids(mr)), seen  # not retried
            assert set(warned) == uids(warn) and sorted(warned.values()) == sorted(warnings)
            assert all(seen[u] == 1 for u in uids(warn))  # a warning is not retried either
            doc = d.error_json("mr0000.dcm")
            (result,) = doc["destinations"]
            assert result["status"] == "0xA900" and result["attempts"] == 1
            assert doc["reason"] == "a: status 0xA900"
            status_doc = d.status_json()["destinations"]["a"]
            assert (status_doc["done"], status_doc["failed"]) == (7, 2)
            assert d.stop() == 0


def test_error_json_lists_every_destination_of_a_fan_out(tmp_path: Path) -> None:
    """Stored (with a warning) at A, permanently failed at B: failed/ with both outcomes."""
    with ScriptedSCP(status=0xB000) as a, ScriptedSCP(status=0xC211) as b:
        d = Daemon(tmp_path, destinations=[destination("a", a.port), destination("b", b.port)])
        with d:
            (one,) = d.drop_files(1, folder="x/y")
            assert d.wait_failed(1) == ["x/y/img0000.dcm"]
            doc = d.error_json("x/y/img0000.dcm")
            assert set(doc) >= {"file", "reason", "failed_at", "destinations"}
            assert doc["file"] == "x/y/img0000.dcm"
            assert doc["reason"] == "b: status 0xC211"
            iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            assert iso.match(doc["failed_at"])
            results = {r["destination"]: r for r in doc["destinations"]}
            assert list(results) == ["a", "b"]
            assert results["a"]["outcome"] == "stored"
            assert results["a"]["status"] == "0xB000"  # the warning stays visible
            assert results["b"] == {
                "destination": "b",
                "outcome": "failed",
                "status": "0xC211",
                "error": "status 0xC211",
                "attempts": 1,
                "first_queued": results["b"]["first_queued"],
                "finished": results["b"]["finished"],
            }
            for r in results.values():
                assert iso.match(r["first_queued"]) and iso.match(r["finished"])
                assert r["attempts"] == 1
            assert a.uids() == {one.sop_instance_uid}
            assert d.stop() == 0


# -- routing ------------------------------------------------------------------------------------


def test_routing_by_modality_with_fan_out(tmp_path: Path) -> None:
    with ScriptedSCP() as pacs, ScriptedSCP() as mri, ScriptedSCP() as archive:
        d = Daemon(
            tmp_path,
            destinations=[
                destination("pacs", pacs.port),
                destination("mri", mri.port),
                destination("archive", archive.port),
            ],
            routes=[
                route("ct", ["pacs"], Modality="CT"),
                route("mr", ["mri", "pacs"], Modality=["MR", "MRS"]),
                route("all", ["archive"]),
                route("night-shift", ["mri"], folder="night/*"),
            ],
        )
        with d:
            ct = d.drop_files(3, prefix="ct", modality="CT")
            mr = d.drop_files(2, prefix="mr", modality="MR")
            night_ct = d.drop_files(1, prefix="n", folder="night", modality="CT")
            d.wait_done(6)
            assert pacs.uids() == uids(ct + mr + night_ct)
            assert mri.uids() == uids(mr + night_ct)
            assert archive.uids() == uids(ct + mr + night_ct)
            assert d.stop() == 0


# -- crashes and signals ------------------------------------------------------------------------


def test_kill_9_several_times_during_a_300_file_backlog_loses_nothing(tmp_path: Path) -> None:
    with ScriptedSCP(delay=0.01) as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port, associations=2)])
        dropped = d.drop_files(300, rows=16, columns=16)
        expected = uids(dropped)
        d.start()
        for threshold in (40, 130, 220):
            wait_until(
                lambda t=threshold: len(scp.uids()) >= t,  # type: ignore[misc]
                60,
                what=f"{threshold} files at the peer",
            )
            assert d.kill() == -signal.SIGKILL
            d.start()
        d.wait_done(300, timeout=120)
        d.wait_incoming_empty()
        assert scp.uids() == expected  # at least once: every one arrived
        assert d.failed_files() == []
        assert len(d.done_files()) == 300
        status = d.status_json()["destinations"]["a"]
        assert (status["done"], status["failed"], status["pending"], status["in_flight"]) == (
            300,
            0,
            0,
            0,
        )
        assert d.stop() == 0
        assert d.exit_codes == [-9, -9, -9, 0]
    d.assert_no_phi()


def test_sigterm_exits_promptly_with_0_and_a_restart_finishes_the_work(tmp_path: Path) -> None:
    with ScriptedSCP(delay=0.1) as scp:  # slow peer: a long backlog
        d = Daemon(tmp_path, destinations=[destination("a", scp.port, associations=2)])
        with d:
            dropped = d.drop_files(40)
            wait_until(lambda: len(scp.received) >= 5, 30, what="the first stores")
            started = time.monotonic()
            assert d.stop() == 0
            took = time.monotonic() - started
            assert took < 5.0, f"SIGTERM took {took:.1f}s"
            assert "stopped" in d.log_text(current_run=True)
            left = d.incoming_files()
            assert left, "the backlog should not be finished yet"
            status = d.status_json()["destinations"]["a"]
            assert status["in_flight"] == 0  # claimed jobs were put back
            assert status["pending"] == len(left)
            scp.delay = 0.0  # its slowness served its purpose: the stop came mid-backlog
            d.start()
            d.wait_done(40, timeout=90)
            assert scp.uids() == uids(dropped)
            assert d.failed_files() == []
            assert d.stop() == 0


def test_a_second_daemon_on_the_same_queue_refuses_to_start(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("a", scp.port)])
        with d:
            result = subprocess.run(
                [FORWARDER, "run", "-c", str(d.config_path)],
                capture_output=True,
                text=True,
                env=subprocess_env(),
                timeout=60,
                check=False,
            )
            assert result.returncode == 1
            assert "another forwarder is running with the queue" in result.stderr
            assert d.running()
            d.signal(signal.SIGINT)  # Ctrl-C is like SIGTERM
            assert d.wait_exit(10) == 0


# -- SIGHUP --------------------------------------------------------------------------------------


def test_sighup_adding_a_destination_starts_delivering_to_it(tmp_path: Path) -> None:
    with ScriptedSCP() as a, ScriptedSCP() as b:
        d = Daemon(tmp_path, destinations=[destination("a", a.port)])
        with d:
            pid = d.pid
            early = d.drop_files(2, prefix="early")
            d.wait_done(2)
            d.write_config(destinations=[destination("a", a.port), destination("b", b.port)])
            d.reload()
            assert "added: b" in d.log_text(current_run=True)
            late = d.drop_files(3, prefix="late")
            d.wait_done(5)
            assert a.uids() == uids(early + late)
            assert b.uids() == uids(late)
            assert d.pid == pid and d.running()
            assert set(d.status_json()["destinations"]) == {"a", "b"}
            assert d.stop() == 0


def _still_delivers_with_the_old_config(d: Daemon, a: ScriptedSCP, pid: int | None) -> None:
    """After a refused reload: the same process, still delivering with the old config."""
    dropped = d.drop_files(2)
    d.wait_done(2)
    assert a.uids() == uids(dropped)
    assert d.pid == pid
    assert d.stop() == 0


def test_sighup_with_an_invalid_config_keeps_the_old_one(tmp_path: Path) -> None:
    with ScriptedSCP() as a:
        d = Daemon(tmp_path, destinations=[destination("a", a.port)])
        with d:
            pid = d.pid
            good = d.config_path.read_text()
            broken = good.replace(f"port: {a.port}", "port: 0") + "surprise: 1\n"
            d.write_raw(broken)
            d.reload(expect_applied=False)
            log = d.log_text(current_run=True)
            port_line = broken.splitlines().index("  port: 0") + 1
            assert f"destinations[0].port (line {port_line}): must be 1..65535" in log
            surprise_line = len(broken.splitlines())
            assert f"surprise (line {surprise_line}): unknown key" in log
            _still_delivers_with_the_old_config(d, a, pid)


def test_sighup_with_a_config_that_is_not_utf8_keeps_the_old_one(tmp_path: Path) -> None:
    # An editor that saves in Latin-1 (a comment naming "München"): the reload is refused
    # with the reason, and the daemon goes on with the old config (it used to exit).
    with ScriptedSCP() as a:
        d = Daemon(tmp_path, destinations=[destination("a", a.port)])
        with d:
            pid = d.pid
            text = d.config_path.read_text() + "# Klinikum M\u00fcnchen\n"
            tmp = d.config_path.with_name(".latin1.tmp")
            tmp.write_bytes(text.encode("latin-1"))
            os.rename(tmp, d.config_path)
            d.reload(expect_applied=False)
            log = d.log_text(current_run=True)
            line = len(text.splitlines())
            assert f"(line {line}): not UTF-8 text" in log
            _still_delivers_with_the_old_config(d, a, pid)


def test_sighup_changing_log_phi_or_log_level_says_a_restart_applies_it(tmp_path: Path) -> None:
    # Both are set in each process at start: a reload turning log_phi off must not report
    # itself applied while patient values still go to the log.
    with ScriptedSCP() as a:
        d = Daemon(tmp_path, destinations=[destination("a", a.port)], extra={"log_phi": True})
        with d:
            d.write_config(extra={"log_phi": False}, log_level="DEBUG")
            d.reload()
            log = d.log_text(current_run=True)
            assert "reload: log_phi changed; restart forwarder to apply it" in log
            assert "reload: log_level changed; restart forwarder to apply it" in log
            assert d.stop() == 0


def test_sighup_removing_a_destination_fails_its_pending_files(tmp_path: Path) -> None:
    down = free_port()
    with ScriptedSCP() as a:
        d = Daemon(tmp_path, destinations=[destination("a", a.port), destination("gone", down)])
        with d:
            dropped = d.drop_files(2)
            wait_until(lambda: a.uids() == uids(dropped), 30, what="files at 'a'")
            d.write_config(destinations=[destination("a", a.port)])
            d.reload()
            assert d.wait_failed(2) == ["img0000.dcm", "img0001.dcm"]
            doc = d.error_json("img0000.dcm")
            results = {r["destination"]: r for r in doc["destinations"]}
            assert results["a"]["outcome"] == "stored"
            assert "no longer in the configuration" in results["gone"]["error"]
            assert d.stop() == 0


def test_sighup_removing_a_deidentifying_route_never_sends_its_queued_files_as_they_are(
    tmp_path: Path,
) -> None:
    # A file queued for "research" by a de-identifying route, the route removed by a reload
    # while the peer is down: when the peer comes back, the file must not go there (the routes
    # in force no longer send it there), least of all unchanged, with the patient's identity.
    research_port = free_port()
    with ScriptedSCP() as archive:
        d = Daemon(
            tmp_path,
            destinations=[
                destination("archive", archive.port),
                destination("research", research_port),
            ],
            routes=[
                {"name": "archive", "to": ["archive"]},
                {"name": "research", "to": ["research"], "deidentify": "basic"},
            ],
        )
        with d:
            (dropped,) = d.drop_files(1)
            wait_until(lambda: archive.uids() == {dropped.sop_instance_uid}, 30, what="archive")
            d.wait_status(lambda s: s["research"]["last_error"] is not None, what="research down")
            d.write_config(routes=[{"name": "archive", "to": ["archive"]}])
            d.reload()
            with ScriptedSCP(port=research_port) as research:
                wait_until(
                    lambda: d.failed_files() or research.received, 30, what="failed/ or a send"
                )
                assert research.uids() == set()  # never its original SOP Instance UID
                assert d.wait_failed(1) == [dropped.rel_path]
                results = {
                    r["destination"]: r for r in d.error_json(dropped.rel_path)["destinations"]
                }
                assert results["archive"]["outcome"] == "stored"
                assert "no longer send it to research" in results["research"]["error"]
            assert d.stop() == 0


def test_sighup_removing_a_down_destination_no_longer_reports_it_down(tmp_path: Path) -> None:
    # Its files were failed: status must not go on saying "DOWN: files stay queued", nor the
    # metrics forwarder_destination_up 0 (an alert for ever).
    down, metrics = free_port(), free_port()
    with ScriptedSCP() as a:
        d = Daemon(
            tmp_path,
            destinations=[destination("a", a.port), destination("gone", down)],
            extra={"metrics": {"listen": f"127.0.0.1:{metrics}"}},
        )
        with d:
            dropped = d.drop_files(2)
            wait_until(lambda: a.uids() == uids(dropped), 30, what="files at 'a'")
            d.wait_status(lambda s: s["gone"]["state"] == "down", what="'gone' down")
            d.write_config(destinations=[destination("a", a.port)])
            d.reload()
            d.wait_failed(2)
            gone = d.status_json()["destinations"]["gone"]
            assert (gone["pending"], gone["failed"], gone["state"]) == (0, 2, "up")
            assert gone["last_error"] == "destination 'gone' is no longer in the configuration"
            assert "files stay queued" not in d.cli("status").stdout
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10)
            series = [
                line
                for line in scraped.read().decode().splitlines()
                if line.startswith("forwarder_destination_") and 'destination="gone"' in line
            ]
            assert series == []
            assert d.stop() == 0


# -- privacy -------------------------------------------------------------------------------------


def test_logs_and_error_files_never_name_the_patient(tmp_path: Path) -> None:
    with ScriptedSCP(status=lambda r: 0xC000 if r.sop_class_uid.endswith(".4") else 0) as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("a", scp.port)],
            routes=[route("not-us", ["a"], Modality=["CT", "MR"])],
            log_level="DEBUG",
        )
        with d:
            d.drop_files(2, prefix="ct", modality="CT")
            d.drop_files(1, prefix="mr", modality="MR")  # fails permanently
            d.drop("us.dcm", modality="US")  # no route
            d.drop_bytes("junk.dcm", b"junk")
            d.wait_done(2)
            assert d.wait_failed(3) == ["junk.dcm", "mr0000.dcm", "us.dcm"]
            reason = d.error_json("us.dcm")["reason"]
            assert reason == "no route: no route matches this file (Modality='US')"
            assert d.stop() == 0
        d.assert_no_phi()
        assert "DEBUG" in d.log_text()
        for path in d.failed.rglob("*.error.json"):
            text = path.read_text()
            assert PATIENT_NAME not in text and PATIENT_ID not in text


# -- the README's first command, from a fresh clone ---------------------------------------------


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Iterator[Path]:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    yield clone


def test_readme_make_run_from_a_fresh_clone(fresh_clone: Path, tmp_path: Path) -> None:
    """``make run``, then ``cp some.dcm run/incoming/``: it arrives in run/received/ and the
    original in run/done/; ``forwarder status -c config/forwarder.yaml`` works; Ctrl-C stops
    both. Two deviations, both to share the machine: the clone uses this checkout's .venv
    (``VENV=`` and ``-o`` so make neither rebuilds nor touches it), and a free port instead of
    11112 (in RECEIVE_PORT and the clone's config), since other test runs may hold 11112."""
    venv = REPO / ".venv"
    port = free_port()
    config = fresh_clone / "config" / "forwarder.yaml"
    text = config.read_text()
    assert "port: 11112" in text
    config.write_text(text.replace("port: 11112", f"port: {port}"))
    log = tmp_path / "make-run.log"
    receiver_pid: int | None = None
    with open(log, "wb") as out:
        make = subprocess.Popen(
            ["make", "-o", str(venv / ".installed"), f"VENV={venv}", f"RECEIVE_PORT={port}", "run"],
            cwd=fresh_clone,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,  # its own process group, as a terminal would give it
        )
    try:
        receiver_log = fresh_clone / "run" / "receiver.log"
        wait_until(
            lambda: (
                (
                    "forwarder running" in log.read_text()
                    and receiver_log.exists()
                    and "listening on" in receiver_log.read_text()
                )
                or make.poll() is not None
            ),
            30,
            what="the receiver and the daemon started by make run",
        )
        assert make.poll() is None, log.read_text()
        sample = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "pydicom" / "data"
        source = sample / "test_files" / "CT_small.dcm"
        shutil.copy(source, fresh_clone / "run" / "incoming")  # cp some.dcm run/incoming/
        done = fresh_clone / "run" / "done" / "CT_small.dcm"
        wait_until(done.exists, 30, what="run/done/CT_small.dcm")
        received = list((fresh_clone / "run" / "received").rglob("*.dcm"))
        assert len(received) == 1
        assert received[0].read_bytes()[132:] != b""  # a real file, <StudyUID>/<SOPUID>.dcm
        status = subprocess.run(
            [str(venv / "bin" / "forwarder"), "status", "-c", "config/forwarder.yaml"],
            cwd=fresh_clone,
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert status.stdout.split()[7:12] == ["local", "0", "0", "1", "0"]
        found = re.search(r"receiver \(pid (\d+)\)", log.read_text())
        assert found is not None
        receiver_pid = int(found.group(1))
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        assert make.wait(20) != 0  # make reports the interrupt
        deadline = time.monotonic() + 20
        while _alive(receiver_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # make run's Ctrl-C delivers SIGINT plus two SIGTERMs (INT and EXIT traps); the receiver
        # must stop on them (signals.SignalWaiter only sets a flag, so no handler can deadlock).
        assert not _alive(receiver_pid), "the receiver did not stop on make run's Ctrl-C"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)
        if receiver_pid is not None and _alive(receiver_pid):
            print(f"receiver {receiver_pid} still running: " + _proc_status(receiver_pid))
            spy = REPO / ".venv" / "bin" / "py-spy"
            if spy.exists():
                dump = subprocess.run(
                    [str(spy), "dump", "--pid", str(receiver_pid)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                print(dump.stdout + dump.stderr)
            os.kill(receiver_pid, signal.SIGKILL)
        # shown by pytest only when the test fails
        print("--- make run output ---\n" + log.read_text(errors="replace"))
        receiver_log = fresh_clone / "run" / "receiver.log"
        if receiver_log.exists():
            print("--- run/receiver.log ---\n" + receiver_log.read_text(errors="replace"))


def _proc_status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return " ".join(
                line.strip() for line in f if line.startswith(("State", "PPid", "SigIgn", "SigCgt"))
            )
    except OSError as exc:
        return str(exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of a finished make is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_queued_file_deleted_fails_at_once_also_for_a_destination_that_modifies_it(
    tmp_path: Path,
) -> None:
    """A file removed from incoming while queued fails at once (retrying cannot bring it back),
    whether or not its destination changes what it sends: the header read for the changes
    finding no file is not a transient failure retried until give_up_after."""
    with ScriptedSCP(status=0xA700) as plain, ScriptedSCP(status=0xA700) as edited:
        d = Daemon(
            tmp_path,
            destinations=[
                destination("plain", plain.port),
                destination("edited", edited.port, modify={"set": {"InstitutionName": "X"}}),
            ],
            retry={"initial_delay": "1s", "max_delay": "2s"},
        )
        with d:
            (dropped,) = d.drop_files(1)
            wait_until(lambda: plain.started and edited.started, 20, what="a first attempt at both")
            (d.incoming / dropped.rel_path).unlink()
            plain.status = edited.status = 0x0000

            def failed_everywhere() -> bool:
                doc = d.status_json()["destinations"]
                return all(doc[n]["failed"] == 1 and doc[n]["pending"] == 0 for n in doc)

            wait_until(failed_everywhere, 20, what="the deleted file to fail at both")
            assert d.stop() == 0
