"""Storage commitment reports that come back on the daemon's ``listen:`` port (CONTRACT.md,
"Second stage": ``storage_commitment: {...}  # reports may come back on listen``).

A PACS sends its N-EVENT-REPORT on a new association to the address it has for our AE title,
proposing itself as SCP of the Storage Commitment Push Model (SCP/SCU Role Selection, PS3.4
J.3.3): the listener accepts that role, hands the report to the commitment keeper and answers its
status. A destination with ``storage_commitment`` and no ``port`` needs no acceptor of its own.
Peers: the scripted pynetdicom PACS (tests/commitment_peer.py) and Orthanc (its DicomModalities
naming the listen port, a Lua script deleting the LOSER instance so that it is never committed).
A modality may also ask the gateway to commit what it pushed: the listener answers N-ACTION for
what the daemon holds (in incoming, done/ or failed/, per the queue).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from commitment_peer import SC, SC_INSTANCE, SYNTAXES, CommitmentSCP
from conftest import wait_until
from daemon import Daemon, destination
from peers import orthanc
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from test_listen import listen_daemon, listen_port

STUDY = "1.2.826.0.1.3680043.10.1284.58.1"
WE = "FORWARDER"  # the daemon's AE title (config default), also its listen AE title here


def _policy(**extra: Any) -> dict[str, Any]:
    # No ``port``: the report comes on the listener; the requesting association is not kept
    # open long, so the report cannot come on it.
    return {"timeout": "30s", "settle": "300ms", "wait_on_association": "0s", **extra}


def _same_as_held(d: Daemon, held: dict[str, Dataset]) -> None:
    assert d.done_files()
    for rel in d.done_files():
        ds = dcmread(d.done / rel)
        assert held[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_reports_on_the_listen_port_commit_and_resend(tmp_path: Path) -> None:
    scp = CommitmentSCP(mode="new")
    with scp:
        dest = destination(
            "pacs", scp.port, ae_title=scp.ae_title, storage_commitment=_policy(max_resends=1)
        )
        d = listen_daemon(tmp_path, [dest], ae_title=WE)
        scp.report_to = ("127.0.0.1", listen_port(d), WE)
        with d:
            dropped = d.drop_files(3, study_uid=STUDY)
            lost = dropped[2].sop_instance_uid
            scp.forget.add(lost)  # held, but reported failed: sent again, then failed/
            d.wait_done(2, timeout=60)
            (failed,) = d.wait_failed(1, timeout=60)
            assert failed == dropped[2].rel_path
            assert "0x0110" in str(d.error_json(failed))
            status = d.status_json()["destinations"]["pacs"]
            assert (status["committed"], status["awaiting_commitment"]) == (2, 0)
            assert d.stop() == 0
    assert scp.stores.count(lost) == 2
    assert scp.report_statuses and set(scp.report_statuses) == {0x0000}
    _same_as_held(d, scp.held)
    assert "1 sent again" in d.log_text()


def test_a_modality_gets_commitment_for_what_the_gateway_holds(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """``forwarder send --stgcmt`` as the modality, the daemon's listener as Storage Commitment
    SCP (the report on the same association): what it received is committed while it is
    forwarded, and again once it is in done/; a file removed from done/ and sent again is stored
    and committed anew."""
    from dicomgen import write_files
    from test_send_stgcmt import _by_uid, _report, send

    with CommitmentSCP(mode="same") as pacs:
        dest = destination("pacs", pacs.port, ae_title=pacs.ae_title)
        with listen_daemon(tmp_path / "gw", [dest], ae_title=WE) as d:
            port = listen_port(d)
            first = write_files(tmp_path / "first", 3, prefix="a")
            report = tmp_path / "first.json"
            r = send("--stgcmt", "--report", report, f"{WE}@127.0.0.1:{port}", first[0].parent,
                     env=forwarder_env)  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert {f["commitment"] for f in _report(report)["files"]} == {"committed"}
            d.wait_done(3, timeout=60)
            # Once delivered: held in done/. One removed from done/ by someone is sent again.
            gone = dcmread(first[2])
            (removed,) = [
                p for p in d.done.rglob("*.dcm") if dcmread(p).SOPInstanceUID == gone.SOPInstanceUID
            ]
            removed.unlink()
            again = tmp_path / "again.json"
            r = send("--stgcmt", "--report", again, f"{WE}@127.0.0.1:{port}", first[0].parent,
                     env=forwarder_env)  # fmt: skip
            # The resend stores it again (queued anew): committed too, from incoming or done/.
            assert r.returncode == 0, r.stderr
            files = _by_uid(_report(again))
            assert {f["commitment"] for f in files.values()} == {"committed"}
            assert d.stop() == 0
    # What the PACS holds is what the modality sent.
    for path in first:
        ds = dcmread(path)
        assert pacs.held[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def _ask_gateway(port: int, refs: list[tuple[str, str]]) -> tuple[int, Dataset]:
    """One N-ACTION to the listener (pynetdicom, the report on the same association): the
    report's Event Type ID and Event Information."""
    from pynetdicom import evt

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SC, SYNTAXES)
    got: list[tuple[int, Dataset]] = []

    def handle(event: Any) -> tuple[int, None]:
        got.append((event.event_type, event.event_information))
        return 0x0000, None

    assoc = ae.associate(
        "127.0.0.1", port, ae_title=WE, evt_handlers=[(evt.EVT_N_EVENT_REPORT, handle)]
    )
    assert assoc.is_established
    try:
        action = Dataset()
        action.TransactionUID = "1.2.826.0.1.3680043.10.1284.78"
        items = []
        for sop_class, sop_instance in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            items.append(ref)
        action.ReferencedSOPSequence = items
        status, _ = assoc.send_n_action(action, 1, SC, SC_INSTANCE)
        assert status.Status == 0x0000
        wait_until(lambda: bool(got), 10, what="the report on the same association")
    finally:
        assoc.release()
    return got[0]


def test_the_gateway_answers_for_instances_it_does_not_hold(tmp_path: Path) -> None:
    """Asked straight (pynetdicom, the report on the same association): an instance never
    received is 0x0112; the N-ACTION itself is answered Success."""
    stranger = ("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.10.1284.404")
    with listen_daemon(tmp_path, [destination("a", 1)], ae_title=WE) as d:
        event_type, info = _ask_gateway(listen_port(d), [stranger])
        assert event_type == 2  # failures
        (failed,) = info.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == stranger[1]
        assert failed.FailureReason == 0x0112
        assert d.stop() == 0


def test_orthanc_reports_on_the_listen_port(tmp_path: Path) -> None:
    from test_send_stgcmt import _orthanc_extra

    d = listen_daemon(tmp_path / "fwd", [destination("pacs", 1)], ae_title=WE)
    port = listen_port(d)
    with orthanc(tmp_path / "orthanc", extra=_orthanc_extra(tmp_path, port, WE)) as pacs:
        policy = _policy(max_resends=1)
        d.write_config(
            destinations=[
                destination("pacs", pacs.port, ae_title=pacs.ae_title, storage_commitment=policy)
            ]
        )
        with d:
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
    _same_as_held(d, held)
    log = d.log_text()
    assert "1 sent again" in log and "storage commitment report from" in log
    assert "accepting storage commitment reports" not in log  # no acceptor of its own


def test_the_gateway_does_not_commit_a_copy_that_is_no_longer_whole(tmp_path: Path) -> None:
    """The gateway commits an instance only when the file it holds is whole (README: "the file
    is where the queue says, whole"): a copy in done/ cut short afterwards (a full disk during
    an operator's restore, a damaged block) still has its meta header, but is not the object
    the gateway received; a modality told it is committed may delete its own copy."""
    with CommitmentSCP(mode="same") as pacs:
        dest = destination("pacs", pacs.port, ae_title=pacs.ae_title)
        with listen_daemon(tmp_path, [dest], ae_title=WE) as d:
            whole, cut = d.drop_files(2, study_uid=STUDY)
            d.wait_done(2, timeout=60)
            sop_class = str(dcmread(d.done / cut.rel_path).SOPClassUID)
            path = d.done / cut.rel_path
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # the meta header and half the data set
            event_type, info = _ask_gateway(
                listen_port(d),
                [(sop_class, whole.sop_instance_uid), (sop_class, cut.sop_instance_uid)],
            )
            assert d.stop() == 0
    committed = [str(r.ReferencedSOPInstanceUID) for r in info.get("ReferencedSOPSequence", [])]
    failed = [str(r.ReferencedSOPInstanceUID) for r in info.get("FailedSOPSequence", [])]
    assert committed == [whole.sop_instance_uid]
    assert failed == [cut.sop_instance_uid] and event_type == 2
