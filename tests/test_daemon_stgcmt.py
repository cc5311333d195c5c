"""The daemon with ``storage_commitment:`` per destination (``forwarder run`` as a subprocess):
files reach done/ only once the PACS committed them; what it fails or never reports is sent
again, only that, up to ``max_resends``, then failed/ with "stored but not committed"; a report
hours late (after a restart) is still taken; status, metrics and the journal line per
transaction; SIGKILL between the request and the report loses nothing and commits nothing the
PACS did not."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from commitment_peer import CommitmentSCP
from conftest import wait_until
from daemon import Daemon, destination
from peers import free_port, orthanc
from pydicom import dcmread

STUDY = "1.2.826.0.1.3680043.10.1284.55.1"


def _dest(scp: CommitmentSCP, **commitment: Any) -> dict[str, Any]:
    policy = {"timeout": "20s", "max_resends": 2, "settle": "300ms", **commitment}
    return destination("pacs", scp.port, ae_title=scp.ae_title, storage_commitment=policy)


def _metrics(listen: str) -> str:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _same_as_sent(d: Daemon, scp: CommitmentSCP) -> None:
    """Every file in done/ is held by the PACS, equal to the original."""
    for rel in d.done_files():
        ds = dcmread(d.done / rel)
        theirs = scp.held[str(ds.SOPInstanceUID)]
        assert theirs.PixelData == ds.PixelData and theirs.SOPClassUID == ds.SOPClassUID


def test_files_finish_only_once_committed(tmp_path: Path) -> None:
    report = threading.Event()
    scp = CommitmentSCP(mode="same", hold_report=report)
    listen = f"127.0.0.1:{free_port()}"
    extra = {"metrics": {"listen": listen}}
    with scp, Daemon(tmp_path, destinations=[_dest(scp)], extra=extra) as d:
        dropped = d.drop_files(3, study_uid=STUDY)
        wait_until(lambda: len(scp.actions) == 1, 20, what="the N-ACTION")
        # Stored, requested, not yet reported: nothing is done.
        assert len(scp.held) == 3 and d.done_files() == []
        status = d.status_json()["destinations"]["pacs"]
        assert status["awaiting_commitment"] == 3 and status["stored"] == 3
        assert 'forwarder_awaiting_commitment{destination="pacs"} 3.0' in _metrics(listen)
        assert d.done_files() == []
        report.set()  # within the 10 s the daemon keeps the association open for it
        d.wait_done(3)
        status = d.status_json()["destinations"]["pacs"]
        assert (status["awaiting_commitment"], status["committed"]) == (0, 3)
        d.wait_log("storage commitment transaction")
        text = _metrics(listen)
        assert (
            'forwarder_commitment_instances_total{destination="pacs",outcome="committed"} 3.0'
            in text
        )
        assert 'forwarder_awaiting_commitment{destination="pacs"} 0.0' in text
        out = d.cli("status").stdout
        assert "3 stored, 0 awaiting commitment, 3 committed, 0 not committed" in out
        with urllib.request.urlopen(f"http://{listen}/", timeout=10) as resp:
            assert "3 committed, 0 awaiting" in resp.read().decode()
        assert d.stop() == 0
    asked = {str(r.ReferencedSOPInstanceUID) for r in scp.actions[0].ReferencedSOPSequence}
    assert asked == {f.sop_instance_uid for f in dropped}
    assert "3 committed, 0 sent again, 0 failed" in d.log_text()
    _same_as_sent(d, scp)
    d.assert_no_phi()


def test_what_the_pacs_does_not_commit_is_resent_then_failed(tmp_path: Path) -> None:
    scp = CommitmentSCP(mode="same")
    with scp, Daemon(tmp_path, destinations=[_dest(scp, max_resends=2)]) as d:
        dropped = d.drop_files(3, study_uid=STUDY)
        lost = dropped[1].sop_instance_uid
        scp.forget.add(lost)
        d.wait_done(2)
        (failed,) = d.wait_failed(1)
        assert failed == dropped[1].rel_path
        report = d.error_json(failed)
        text = str(report)
        assert "stored but not committed" in text and "0x0110" in text
        status = d.status_json()["destinations"]["pacs"]
        assert status["committed"] == 2 and status["commitment_failures"] == 3
        assert d.stop() == 0
    # sent once, then again max_resends times: only the uncommitted one
    assert scp.stores.count(lost) == 3
    assert all(
        scp.stores.count(f.sop_instance_uid) == 1 for f in dropped if f.sop_instance_uid != lost
    )
    assert "1 sent again" in d.log_text() and "1 failed" in d.log_text()


@pytest.mark.parametrize("script", ["none", "wrong_transaction", "extra_instance"])
def test_no_trustworthy_report_expires_and_resends(script: str, tmp_path: Path) -> None:
    port = free_port()
    scp = CommitmentSCP(mode="none" if script == "none" else "new")
    scp.report_to = ("127.0.0.1", port, "FORWARDER")
    scp.wrong_transaction = script == "wrong_transaction"
    scp.extra_instance = script == "extra_instance"
    with scp:
        # 1 s: the untrustworthy report comes within milliseconds of the request (and one
        # coming later is ignored all the same: its transaction unknown by then)
        dest = _dest(scp, timeout="1s", max_resends=1, port=port, bind="127.0.0.1")
        with Daemon(tmp_path, destinations=[dest]) as d:
            (f,) = d.drop_files(1, study_uid=STUDY)
            (failed,) = d.wait_failed(1, timeout=40)
            assert d.done_files() == []
            assert "no storage commitment report within 1s" in str(d.error_json(failed))
            assert d.stop() == 0
    assert scp.stores.count(f.sop_instance_uid) == 2
    if script != "none":
        assert "ignored" in d.log_text()


def test_a_late_report_after_a_restart_is_taken(tmp_path: Path) -> None:
    port = free_port()
    report = threading.Event()
    scp = CommitmentSCP(mode="new", report_to=("127.0.0.1", port, "FORWARDER"), hold_report=report)
    with scp:
        dest = _dest(scp, port=port, bind="127.0.0.1", timeout="60s")
        with Daemon(tmp_path, destinations=[dest]) as d:
            d.drop_files(2, study_uid=STUDY)
            wait_until(lambda: len(scp.actions) == 1, 20, what="the N-ACTION")
            assert d.stop() == 0  # the report is not sent yet
            assert d.done_files() == []
            d.start()
            d.wait_log("still awaiting their report")
            report.set()  # only now, to the daemon started again
            d.wait_done(2)
            assert d.stop() == 0
    assert len(scp.actions) == 1 and len(scp.stores) == 2  # nothing sent or asked twice
    _same_as_sent(d, scp)


@pytest.mark.parametrize("point", ["stgcmt-before-action", "stgcmt-before-record"])
def test_kill_9_between_request_and_report_loses_nothing(point: str, tmp_path: Path) -> None:
    with CommitmentSCP(mode="same") as scp:
        dest = _dest(scp, timeout="3s", max_resends=3)
        d = Daemon(tmp_path, destinations=[dest], env={"FORWARDER_CRASH_AT": point})
        with d:
            dropped = d.drop_files(3, study_uid=STUDY)
            assert d.wait_exit(30) == -9
            assert d.done_files() == []  # nothing is done before the PACS committed it
            d.env.pop("FORWARDER_CRASH_AT")
            d.start()
            d.wait_done(3, timeout=60)
            assert d.failed_files() == []
            assert d.stop() == 0
    assert {f.sop_instance_uid for f in dropped} <= set(scp.held)
    _same_as_sent(d, scp)


def test_orthanc_commits_and_what_it_loses_ends_in_failed(tmp_path: Path) -> None:
    from test_send_stgcmt import _orthanc_extra

    port = free_port()
    with orthanc(tmp_path / "orthanc", extra=_orthanc_extra(tmp_path, port, "FORWARDER")) as pacs:
        policy = {"timeout": "30s", "max_resends": 1, "settle": "300ms", "port": port}
        dest = destination(
            "pacs",
            pacs.port,
            ae_title=pacs.ae_title,
            storage_commitment={**policy, "bind": "127.0.0.1"},
        )
        with Daemon(tmp_path / "fwd", destinations=[dest]) as d:
            kept = d.drop_files(3, study_uid=STUDY)
            lost = d.drop("lost.dcm", study_uid=STUDY, station="LOSER")
            d.wait_done(3, timeout=60)
            (failed,) = d.wait_failed(1, timeout=60)
            assert failed == lost.rel_path
            text = str(d.error_json(failed))
            assert "stored but not committed" in text and "0x0112" in text
            assert d.stop() == 0
        held = {}
        for iid in pacs.instances():
            ds = dcmread(io.BytesIO(pacs.instance_file(iid)))
            held[str(ds.SOPInstanceUID)] = ds
    assert set(held) == {f.sop_instance_uid for f in kept}
    for rel in d.done_files():
        ds = dcmread(d.done / rel)
        assert held[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
    assert "1 sent again" in d.log_text()


def test_kill_9_during_a_resend_loses_nothing(tmp_path: Path) -> None:
    with CommitmentSCP(mode="same") as scp:
        dest = _dest(scp, max_resends=2)
        d = Daemon(tmp_path, destinations=[dest], env={"FORWARDER_CRASH_AT": "after-response:4"})
        with d:
            dropped = d.drop_files(3, study_uid=STUDY)
            lost = dropped[2].sop_instance_uid
            scp.forget.add(lost)
            assert d.wait_exit(60) == -9  # the PACS answered the resend; the queue was not told
            assert scp.stores.count(lost) == 2
            d.env.pop("FORWARDER_CRASH_AT")
            d.start()
            d.wait_done(2, timeout=60)
            (failed,) = d.wait_failed(1, timeout=60)
            assert failed == dropped[2].rel_path
            assert "stored but not committed" in str(d.error_json(failed))
            assert d.stop() == 0
    assert scp.stores.count(lost) >= 3
    assert {f.sop_instance_uid for f in dropped[:2]} <= set(scp.held)
    _same_as_sent(d, scp)


def test_turning_commitment_off_releases_what_awaits_it(tmp_path: Path) -> None:
    scp = CommitmentSCP(mode="none")
    with scp, Daemon(tmp_path, destinations=[_dest(scp, timeout="1h")]) as d:
        d.drop_files(2, study_uid=STUDY)
        wait_until(lambda: len(scp.actions) == 1, 20, what="the N-ACTION")
        assert d.stop() == 0
        assert d.done_files() == []
        d.write_config(destinations=[destination("pacs", scp.port, ae_title=scp.ae_title)])
        d.start()
        d.wait_done(2)
        status = d.status_json()["destinations"]["pacs"]
        assert "awaiting_commitment" not in status or status["committed"] == 0
        assert d.stop() == 0
    assert "no longer requires proof of delivery: 2 stored instance(s)" in d.log_text()
    assert len(scp.stores) == 2  # nothing sent again


def test_two_files_of_one_instance_in_a_study_are_committed(tmp_path: Path) -> None:
    """A modality that exports an image twice (two names, one SOP Instance UID) into the same
    study: the PACS commits that instance. Asking for it twice in one N-ACTION gets a report
    naming it twice, which is not trusted: the whole study would be sent again and end in
    failed/ as "not committed" although the PACS keeps every instance."""
    with CommitmentSCP(mode="same") as scp:
        dest = _dest(scp, timeout="3s", max_resends=1, settle="2s")
        with Daemon(tmp_path, destinations=[dest]) as d:
            dropped = d.drop_files(2, study_uid=STUDY)
            uid = dropped[0].sop_instance_uid
            again = d.drop("again/img0000.dcm", study_uid=STUDY, sop_instance_uid=uid)
            assert again.sop_instance_uid == uid
            wait_until(
                lambda: len(d.done_files()) + len(d.failed_files()) == 3, 60, what="3 finished"
            )
            assert d.failed_files() == []
            done = sorted([f.rel_path for f in dropped] + [again.rel_path])
            assert sorted(d.done_files()) == done
            assert d.stop() == 0
    for action in scp.actions:
        asked = [str(r.ReferencedSOPInstanceUID) for r in action.ReferencedSOPSequence]
        assert len(asked) == len(set(asked))  # each instance once per transaction


def test_sigterm_while_the_keeper_waits_after_the_pacs_ended_the_association(
    tmp_path: Path,
) -> None:
    """The PACS answers the N-ACTION, then the association ends (its abort, a network failure)
    while the keeper would still wait ``wait_on_association`` for a report on it: SIGTERM must
    not wait for that (README: "SIGTERM does not wait on a PACS ... exits within seconds"),
    and the keeper must stop, not be left running past its join."""
    scp = CommitmentSCP(mode="none", abort_after_action=True)
    with scp:
        dest = _dest(scp, timeout="1h", wait_on_association="120s")
        with Daemon(tmp_path, destinations=[dest]) as d:
            d.drop_files(1, study_uid=STUDY)
            wait_until(lambda: scp.aborted_after_action == 1, 30, what="the abort after the answer")
            started = time.monotonic()
            assert d.stop() == 0
            took = time.monotonic() - started
    assert "did not stop" not in d.log_text()
    assert took < 4.5, f"SIGTERM took {took:.1f}s"  # the keeper's join alone is 5 s


def test_deidentified_instances_are_committed_by_the_uids_they_were_sent_with(
    tmp_path: Path,
) -> None:
    """deidentify replaces the SOP Instance UIDs of what is sent: the N-ACTION must name those
    (the PACS holds nothing by the file's own), and the report is matched by them."""
    scp = CommitmentSCP(mode="same")
    routes = [{"name": "deid", "to": ["pacs"], "deidentify": "basic"}]
    with scp, Daemon(tmp_path, destinations=[_dest(scp)], routes=routes) as d:
        dropped = d.drop_files(2, study_uid=STUDY)
        d.wait_done(2, timeout=60)
        assert d.failed_files() == []
        status = d.status_json()["destinations"]["pacs"]
        assert (status["committed"], status["commitment_failures"]) == (2, 0)
        assert d.stop() == 0
    asked = {str(r.ReferencedSOPInstanceUID) for a in scp.actions for r in a.ReferencedSOPSequence}
    assert asked == set(scp.held) and not asked & {f.sop_instance_uid for f in dropped}


def test_an_instance_whose_sent_uids_cannot_be_told_after_a_restart_does_not_await_forever(
    tmp_path: Path,
) -> None:
    """Stored to a de-identifying destination by a version that did not record the UIDs it
    was sent with (the queue row upgraded from schema 9), then killed (SIGKILL) before the
    N-ACTION; the config the daemon restarts with sends the file there with conflicting
    changes, so the UIDs it was sent with cannot be worked out. It must not await commitment
    for ever: after a few tries it counts as not committed, is sent again, and fails with the
    reason (failed/)."""
    scp = CommitmentSCP(mode="same")
    deid = {"name": "deid", "match": {"Modality": "CT"}, "to": ["pacs"], "deidentify": "basic"}
    with scp, Daemon(tmp_path, destinations=[_dest(scp, settle="1h")], routes=[deid]) as d:
        (f,) = d.drop_files(1, study_uid=STUDY)
        d.wait_status(lambda s: s["pacs"]["awaiting_commitment"] == 1, what="stored, awaiting")
        assert d.kill() == -9
        with sqlite3.connect(d.queue) as db:  # as a job acked before schema 10 left it
            assert db.execute("UPDATE jobs SET sent_uids = NULL").rowcount == 1
        db.close()
        other = {
            "name": "named",
            "match": {"StudyInstanceUID": STUDY},
            "to": ["pacs"],
            "modify": {"set": {"InstitutionName": "X"}},
        }
        d.write_config(destinations=[_dest(scp)], routes=[deid, other])
        d.start()
        (failed,) = d.wait_failed(1, timeout=60)
        assert failed == f.rel_path
        assert "conflicting changes" in str(d.error_json(failed))
        assert d.status_json()["destinations"]["pacs"]["awaiting_commitment"] == 0
        assert d.stop() == 0
    assert scp.actions == []  # never asked by UIDs it was not sent with


def test_a_restart_without_deidentify_commits_by_the_uids_it_was_sent_with(
    tmp_path: Path,
) -> None:
    """Stored de-identified, then killed before the N-ACTION; the config the daemon restarts
    with no longer de-identifies. The PACS holds the object by the UIDs it was sent with,
    recorded at the ack: the N-ACTION names those (not the file's own, which the routes in
    force would send now), the PACS commits it, and it is not sent again."""
    scp = CommitmentSCP(mode="same")
    deid = {"name": "deid", "to": ["pacs"], "deidentify": "basic"}
    with scp, Daemon(tmp_path, destinations=[_dest(scp, settle="1h")], routes=[deid]) as d:
        (f,) = d.drop_files(1, study_uid=STUDY)
        d.wait_status(lambda s: s["pacs"]["awaiting_commitment"] == 1, what="stored, awaiting")
        assert d.kill() == -9
        d.write_config(destinations=[_dest(scp)], routes=[{"name": "deid", "to": ["pacs"]}])
        d.start()
        wait_until(lambda: d.done_files() or d.failed_files(), 30, what="committed or not")
        assert (d.done_files(), d.failed_files()) == ([f.rel_path], [])
        assert d.stop() == 0
    assert len(scp.stores) == 1, f"sent again: {scp.stores} (the file's own: {f.sop_instance_uid})"
    (sent,) = scp.held
    assert sent != f.sop_instance_uid
    asked = [str(r.ReferencedSOPInstanceUID) for a in scp.actions for r in a.ReferencedSOPSequence]
    assert asked == [sent]
