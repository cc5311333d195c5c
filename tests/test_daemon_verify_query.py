"""The daemon with ``verify_by_query:`` against Orthanc (a C-FIND SCP): files reach done/ only
once a C-FIND at IMAGE level finds them; an instance deleted over Orthanc's REST API after it was
stored is sent again, exactly as an uncommitted one, and ends held; one Orthanc keeps losing ends
in failed/ with "stored but not committed"."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from commitment_peer import CommitmentSCP
from conftest import wait_until
from daemon import Daemon, destination
from dicomgen import write_file
from peers import OrthancPeer, orthanc
from pydicom import dcmread
from test_send_stgcmt import _LOSER_LUA

STUDY = "1.2.826.0.1.3680043.10.1284.56.1"
FIND = {"DicomAlwaysAllowFind": True}  # Orthanc answers C-FIND from modalities it does not know


def _held(pacs: OrthancPeer) -> dict[str, Any]:
    out = {}
    for iid in pacs.instances():
        ds = dcmread(io.BytesIO(pacs.instance_file(iid)))
        out[str(ds.SOPInstanceUID)] = (iid, ds)
    return out


def _dest(pacs: OrthancPeer, after: str, max_resends: int) -> dict[str, Any]:
    return destination(
        "pacs",
        pacs.port,
        ae_title=pacs.ae_title,
        verify_by_query={"after": after, "max_resends": max_resends},
    )


def test_an_instance_deleted_after_storing_is_resent_and_ends_held(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", extra=FIND) as pacs:
        with Daemon(tmp_path / "fwd", destinations=[_dest(pacs, "4s", 2)]) as d:
            dropped = d.drop_files(2, study_uid=STUDY)
            wait_until(lambda: pacs.instance_count() == 2, 20, what="both stored")
            victim = dropped[0].sop_instance_uid
            pacs.rest("DELETE", f"/instances/{_held(pacs)[victim][0]}")
            assert d.done_files() == []  # stored is not enough
            d.wait_done(2, timeout=60)
            status = d.status_json()["destinations"]["pacs"]
            assert status["awaiting_commitment"] == 0 and status["committed"] == 2
            assert status["commitment_failures"] == 1
            assert d.stop() == 0
        held = _held(pacs)
    assert set(held) == {f.sop_instance_uid for f in dropped}
    for rel in d.done_files():
        ds = dcmread(d.done / rel)
        assert held[str(ds.SOPInstanceUID)][1].PixelData == ds.PixelData
    assert "verification by query" in d.log_text() and "1 sent again" in d.log_text()


def test_an_instance_the_pacs_keeps_losing_ends_in_failed(tmp_path: Path) -> None:
    lua = tmp_path / "loser.lua"
    lua.write_text(_LOSER_LUA)
    with orthanc(tmp_path / "orthanc", extra={**FIND, "LuaScripts": [str(lua)]}) as pacs:
        with Daemon(tmp_path / "fwd", destinations=[_dest(pacs, "1s", 1)]) as d:
            kept = d.drop_files(2, study_uid=STUDY)
            lost = d.drop("lost.dcm", study_uid=STUDY, station="LOSER")
            d.wait_done(2, timeout=60)
            (failed,) = d.wait_failed(1, timeout=60)
            assert failed == lost.rel_path
            report = json.dumps(d.error_json(failed))
            assert "stored but not committed" in report and "not held" in report
            assert d.stop() == 0
        assert set(_held(pacs)) == {f.sop_instance_uid for f in kept}


def test_a_pacs_that_refuses_the_query_proves_nothing(tmp_path: Path) -> None:
    # Orthanc refuses C-FIND from AE titles it does not know: nothing can be proven.
    with (
        orthanc(tmp_path / "orthanc") as pacs,
        Daemon(tmp_path / "fwd", destinations=[_dest(pacs, "500ms", 1)]) as d,
    ):
        d.drop_files(1, study_uid=STUDY)
        d.wait_log("verification by query of 1 instance(s) not done", timeout=30)
        assert pacs.instance_count() == 1
        assert d.done_files() == [] and d.failed_files() == []
        assert d.status_json()["destinations"]["pacs"]["awaiting_commitment"] == 1
        assert d.stop() == 0


def test_kill_9_before_the_query_asks_again_after_restart(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", extra=FIND) as pacs:
        d = Daemon(
            tmp_path / "fwd",
            destinations=[_dest(pacs, "500ms", 1)],
            env={"FORWARDER_CRASH_AT": "query-before-find"},
        )
        with d:
            dropped = d.drop_files(2, study_uid=STUDY)
            assert d.wait_exit(30) == -9
            assert d.done_files() == []
            d.env.pop("FORWARDER_CRASH_AT")
            d.start()
            d.wait_done(2, timeout=60)
            assert d.stop() == 0
        assert set(_held(pacs)) == {f.sop_instance_uid for f in dropped}
    assert "0 sent again" in d.log_text()


def test_a_deidentified_instance_is_asked_about_by_the_uids_it_was_sent_with(
    tmp_path: Path,
) -> None:
    # deidentify replaces the Study, Series and SOP Instance UIDs of what is sent: the PACS
    # holds the new ones, and the query must ask for those, not for the file's own.
    with orthanc(tmp_path / "orthanc", extra=FIND) as pacs:
        with Daemon(
            tmp_path / "fwd",
            destinations=[_dest(pacs, "500ms", 0)],
            routes=[{"name": "deid", "to": ["pacs"], "deidentify": "basic"}],
        ) as d:
            dropped = d.drop_files(2, study_uid=STUDY)
            d.wait_done(2, timeout=60)
            assert d.failed_files() == []
            status = d.status_json()["destinations"]["pacs"]
            assert status["committed"] == 2 and status["commitment_failures"] == 0
            assert d.stop() == 0
        held = _held(pacs)
    assert len(held) == 2 and not set(held) & {f.sop_instance_uid for f in dropped}


def test_one_instance_the_query_fails_for_does_not_hold_up_the_others(tmp_path: Path) -> None:
    # The PACS answers the C-FIND of one instance Pending, then a failure (0xC000, unable to
    # process), every time: that instance is not proven, but what the PACS holds and answers
    # clearly for is, at once (the destination does not rest for the odd one); the odd one is
    # asked again each round and, after UNDECIDED_LIMIT rounds, taken as not held: with no
    # resends, failed/ with why (not awaiting for ever).
    with (
        CommitmentSCP() as scp,
        Daemon(
            tmp_path / "fwd",
            destinations=[
                destination(
                    "pacs",
                    scp.port,
                    ae_title=scp.ae_title,
                    verify_by_query={"after": "1s", "max_resends": 0},
                )
            ],
        ) as d,
    ):
        odd = d.drop("odd.dcm", study_uid=STUDY)
        wait_until(lambda: odd.sop_instance_uid in scp.held, 20, what="the odd one stored")
        scp.find_fails[odd.sop_instance_uid] = 0xC000
        wait_until(lambda: odd.sop_instance_uid in scp.finds, 20, what="the odd one asked")
        others = d.drop_files(2, study_uid=STUDY)
        d.wait_done(2, timeout=20)  # well within the 30 s a destination rests
        assert {dcmread(d.done / rel).SOPInstanceUID for rel in d.done_files()} == {
            f.sop_instance_uid for f in others
        }
        assert d.wait_failed(1, timeout=30) == ["odd.dcm"]
        why = d.error_json("odd.dcm")["destinations"][0]["error"]
        assert "not verified" in why and "0xC000" in why and "5 times" in why, why
        assert scp.finds.count(odd.sop_instance_uid) >= 5
        assert scp.stores.count(odd.sop_instance_uid) == 1
        assert d.stop() == 0


def test_an_instance_whose_query_cannot_be_encoded_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    # A Study Instance UID with a byte that is no character (0xFF): the file is stored, but a
    # C-FIND naming it cannot be encoded. That instance stays unproven; the one asked about
    # in the same round is proven and done.
    bad_study = "1.2.826.0.1.3680043.10.1284.58.9"
    staging = tmp_path / "bad.dcm"
    write_file(staging, study_uid=bad_study, seed=7)
    data = staging.read_bytes()
    assert data.count(bad_study.encode()) == 1
    data = data.replace(bad_study.encode(), bad_study[:-1].encode() + b"\xff")
    with CommitmentSCP() as scp:
        proof = {"after": "1s", "max_resends": 0}  # its UNDECIDED_LIMIT rounds: 1 s apart
        dest = destination("pacs", scp.port, ae_title=scp.ae_title, verify_by_query=proof)
        with Daemon(tmp_path / "fwd", destinations=[dest]) as d:
            good = d.drop("good.dcm", study_uid=STUDY)
            d.drop_bytes("bad.dcm", data)
            wait_until(lambda: len(scp.held) == 2, 20, what="both stored")
            assert d.wait_done(1, timeout=30) == ["good.dcm"]
            assert good.sop_instance_uid in scp.finds
            # never provable: after UNDECIDED_LIMIT rounds, not held (no resends: failed/)
            assert d.wait_failed(1, timeout=30) == ["bad.dcm"]
            why = d.error_json("bad.dcm")["destinations"][0]["error"]
            assert "not verified" in why and "cannot ask" in why, why
            assert d.stop() == 0


def test_a_paused_destination_is_neither_queried_nor_asked_to_commit(tmp_path: Path) -> None:
    """`forwarder pause` stops all traffic to the destination (a PACS in maintenance): the proof
    of what it already stored waits too, and goes on after `resume`."""
    for proof in ({"verify_by_query": {"after": "2s"}}, {"storage_commitment": {"settle": "2s"}}):
        with (
            CommitmentSCP() as scp,
            Daemon(
                tmp_path / next(iter(proof)),
                destinations=[destination("pacs", scp.port, ae_title=scp.ae_title, **proof)],
            ) as d,
        ):
            uid = d.drop("one.dcm", study_uid=STUDY).sop_instance_uid
            wait_until(lambda: uid in scp.held, 20, what="stored")  # noqa: B023 (waited here)
            assert d.cli("pause", "pacs").returncode == 0
            d.wait_log("pacs: paused:", timeout=20)  # the proof's turn came, and it waited
            assert (scp.finds, scp.actions) == ([], []), proof
            assert d.done_files() == []
            assert d.cli("resume", "pacs").returncode == 0
            d.wait_done(1, timeout=30)
            assert scp.finds or scp.actions
            assert d.stop() == 0


def test_a_reload_dropping_deidentify_after_the_send_still_asks_by_the_uids_sent(
    tmp_path: Path,
) -> None:
    # Sent de-identified (new Study, Series and SOP Instance UIDs), then a reload takes the
    # route's deidentify away before the query: the PACS holds the object by the UIDs it was
    # sent with, and must be asked by those (recorded at the ack), not by the file's own that
    # the routes in force now would send it with: else it is "not held", sent again (a second,
    # identifiable copy) or failed, although it was delivered.
    with CommitmentSCP() as scp:
        proof = {"after": "3s", "max_resends": 0}
        dest = destination("pacs", scp.port, ae_title=scp.ae_title, verify_by_query=proof)
        deid = {"name": "research", "to": ["pacs"], "deidentify": "basic"}
        with Daemon(tmp_path / "fwd", destinations=[dest], routes=[deid]) as d:
            f = d.drop("one.dcm", study_uid=STUDY)
            wait_until(lambda: len(scp.held) == 1, 20, what="stored")
            d.write_config(routes=[{"name": "research", "to": ["pacs"]}])
            d.reload()
            assert scp.finds == []  # the reload came before the query
            wait_until(lambda: d.done_files() or d.failed_files(), 30, what="proven or not")
            assert (d.done_files(), d.failed_files()) == (["one.dcm"], [])
            assert d.stop() == 0
    (sent,) = scp.held
    assert sent != f.sop_instance_uid
    assert scp.finds == [sent] and scp.stores == [sent]
