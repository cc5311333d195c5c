"""The daemon with ``verify_by_query:`` against Orthanc (a C-FIND SCP): files reach done/ only
once a C-FIND at IMAGE level finds them; an instance deleted over Orthanc's REST API after it was
stored is sent again, exactly as an uncommitted one, and ends held; one Orthanc keeps losing ends
in failed/ with "stored but not committed"."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from conftest import wait_until
from daemon import Daemon, destination
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
