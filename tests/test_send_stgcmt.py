"""``forwarder send --stgcmt`` as a user runs it (a subprocess): Orthanc as the storage
commitment SCP (it reports on a new association to the address it has for our AE title), with
instances it keeps and instances deleted over its REST API right after they were stored; and a
scripted pynetdicom PACS reporting on the same association, failing, or never reporting."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from commitment_peer import CommitmentSCP
from conftest import FORWARDER
from dicomgen import write_files
from peers import free_port, orthanc
from pydicom import dcmread

CALLING = "FWDSCU"


def send(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, "send", "--calling-aet", CALLING, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _by_uid(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["sop_instance_uid"]: f for f in report["files"]}


# Orthanc's Lua runs after an instance is stored; this one deletes, over Orthanc's own REST API,
# every instance whose station name is LOSER: the C-STORE was answered Success, then it is gone.
_LOSER_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['StationName'] == 'LOSER' then
    RestApiDelete('/instances/' .. instanceId)
  end
end
"""


def _orthanc_extra(tmp_path: Path, port: int, calling: str = CALLING) -> dict[str, Any]:
    """Orthanc reports commitment to ``calling`` at 127.0.0.1:``port`` and loses LOSER."""
    lua = tmp_path / "loser.lua"
    lua.write_text(_LOSER_LUA)
    return {
        "DicomModalities": {"fwd": [calling, "127.0.0.1", port]},
        "LuaScripts": [str(lua)],
    }


def test_orthanc_commits_what_it_keeps_and_fails_what_it_lost(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    kept = write_files(tmp_path / "in", 3, prefix="kept")
    lost = write_files(tmp_path / "in", 2, prefix="lost", station="LOSER")
    port = free_port()
    report = tmp_path / "report.json"
    with orthanc(tmp_path / "orthanc", extra=_orthanc_extra(tmp_path, port)) as pacs:
        r = send(
            "--stgcmt", "--stgcmt-port", port, "--stgcmt-timeout", "30s", "--report", report,
            f"{pacs.ae_title}@127.0.0.1:{pacs.port}", tmp_path / "in",
            env=forwarder_env,
        )  # fmt: skip
        held = {}
        for iid in pacs.instances():
            theirs = dcmread(io.BytesIO(pacs.instance_file(iid)))
            held[str(theirs.SOPInstanceUID)] = theirs
    assert r.returncode == 1, r.stderr
    data = _report(report)
    files = _by_uid(data)
    assert data["stored"] == 5 and data["failed"] == 0
    for path in kept:
        ds = dcmread(path)
        rec = files[str(ds.SOPInstanceUID)]
        assert (rec["commitment"], rec["commitment_error"]) == ("committed", None)
        # What Orthanc holds is what was sent.
        theirs = held[str(ds.SOPInstanceUID)]
        assert theirs.PixelData == ds.PixelData and theirs.PatientName == ds.PatientName
    for path in lost:
        uid = str(dcmread(path).SOPInstanceUID)
        assert uid not in held
        assert files[uid]["commitment"] == "failed"
        assert "0x0112" in files[uid]["commitment_error"]
        assert "stored but not committed" in files[uid]["commitment_error"]
        assert f"NOT COMMITTED {path}" in r.stderr
    summary = data["storage_commitment"]
    assert (summary["committed"], summary["not_committed"]) == (3, 2)
    assert "3 committed, 2 not committed" in r.stderr


def test_orthanc_all_committed_exits_0(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    write_files(tmp_path / "in", 4)
    port = free_port()
    report = tmp_path / "report.json"
    with orthanc(tmp_path / "orthanc", extra=_orthanc_extra(tmp_path, port)) as pacs:
        r = send(
            "--stgcmt", "--stgcmt-port", port, "--report", report,
            f"{pacs.ae_title}@127.0.0.1:{pacs.port}", tmp_path / "in",
            env=forwarder_env,
        )  # fmt: skip
        assert pacs.instance_count() == 4
    assert r.returncode == 0, r.stderr
    assert {f["commitment"] for f in _report(report)["files"]} == {"committed"}


def test_orthanc_without_a_report_port_times_out_not_committed(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    # Orthanc reports only on a new association; without --stgcmt-port nobody takes it.
    write_files(tmp_path / "in", 1)
    report = tmp_path / "report.json"
    with orthanc(tmp_path / "orthanc", extra=_orthanc_extra(tmp_path, free_port())) as pacs:
        r = send(
            "--stgcmt", "--stgcmt-timeout", "2s", "--report", report,
            f"{pacs.ae_title}@127.0.0.1:{pacs.port}", tmp_path / "in",
            env=forwarder_env,
        )  # fmt: skip
    assert r.returncode == 1
    (rec,) = _report(report)["files"]
    assert rec["outcome"] == "stored" and rec["commitment"] == "not reported"
    assert "no storage commitment report within 2s" in rec["commitment_error"]


@pytest.mark.parametrize("mode", ["same", "forget", "none", "warning", "refused"])
def test_scripted_pacs(mode: str, tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    """``warning``: the N-ACTION is answered 0xB000, a Warning: accepted, the report taken
    (exit 0), the status said in one line. ``refused``: answered 0x0110, a failure: nothing
    committed (exit 1), each file's reason naming the status."""
    paths = write_files(tmp_path / "in", 3)
    uids = [str(dcmread(p).SOPInstanceUID) for p in paths]
    scp = CommitmentSCP(mode="none" if mode == "none" else "same")
    if mode in ("warning", "refused"):
        scp.action_status = 0xB000 if mode == "warning" else 0x0110
    if mode == "forget":
        scp.forget.add(uids[1])
    report = tmp_path / "report.json"
    with scp:
        r = send(
            "--stgcmt", "--stgcmt-timeout", "3s", "--report", report,
            f"PACS@127.0.0.1:{scp.port}", tmp_path / "in",
            env=forwarder_env,
        )  # fmt: skip
    files = _by_uid(_report(report))
    assert set(scp.held) == set(uids)
    if mode in ("same", "warning"):
        assert r.returncode == 0, r.stderr
        assert {f["commitment"] for f in files.values()} == {"committed"}
        warned = [line for line in r.stderr.splitlines() if "0xB000" in line]
        assert len(warned) == (mode == "warning"), r.stderr
    elif mode == "forget":
        assert r.returncode == 1
        assert files[uids[1]]["commitment"] == "failed"
        assert "0x0110 (processing failure)" in files[uids[1]]["commitment_error"]
        assert {files[u]["commitment"] for u in (uids[0], uids[2])} == {"committed"}
    else:
        assert r.returncode == 1
        assert {f["commitment"] for f in files.values()} == {"not reported"}
        if mode == "refused":
            errors = {f["commitment_error"] for f in files.values()}
            assert len(errors) == 1 and "answered the N-ACTION with status 0x0110" in errors.pop()


def test_files_not_stored_are_not_requested(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    write_files(tmp_path / "in", 2)
    (tmp_path / "in" / "junk.dcm").write_bytes(b"not dicom")
    report = tmp_path / "report.json"
    with CommitmentSCP(mode="same") as scp:
        r = send(
            "--stgcmt", "--report", report, f"PACS@127.0.0.1:{scp.port}", tmp_path / "in",
            env=forwarder_env,
        )  # fmt: skip
    assert r.returncode == 1
    states = sorted(f["commitment"] for f in _report(report)["files"])
    assert states == ["committed", "committed", "not requested"]
    assert len(scp.actions[0].ReferencedSOPSequence) == 2


def test_usage_errors(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    (f,) = write_files(tmp_path / "in", 1)
    r = send("--stgcmt-port", "1234", "PACS@127.0.0.1:9", f, env=forwarder_env)
    assert r.returncode == 2 and "need --stgcmt" in r.stderr
    r = send("--stgcmt", "http://127.0.0.1:9/dicom-web", f, env=forwarder_env)
    assert r.returncode == 2 and "DIMSE" in r.stderr
