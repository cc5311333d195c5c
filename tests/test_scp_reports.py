"""The SCP engine taking storage commitment reports (``ReceiverSettings.reports``, the daemon's
listener): a pynetdicom PACS proposes the Storage Commitment Push Model with itself as SCP
(SCP/SCU Role Selection), the role is accepted, its N-EVENT-REPORT-RQ reaches the report sink
with its Event Type and data set, and the status the sink returns is the N-EVENT-REPORT-RSP's.
Without ``reports`` the engine takes none (the association is aborted), and a receiver that
answers commitment but takes no reports grants no SCP role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from commitment_peer import SC, SC_INSTANCE, SYNTAXES
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from forwarder.net.receiver import Receiver, ReceiverSettings


def _report() -> Dataset:
    ds = Dataset()
    ds.TransactionUID = "1.2.826.0.1.3680043.10.1284.99.1"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1284.99.2"
    ds.ReferencedSOPSequence = [ref]
    return ds


@pytest.fixture
def taken() -> list[tuple[int, Dataset, str]]:
    return []


def _receiver(tmp_path: Path, taken: list[Any], *, reports: bool, status: int) -> Receiver:
    def sink(event_type: int, ds: Dataset, calling: str) -> int:
        taken.append((event_type, ds, calling))
        return status

    settings = ReceiverSettings(
        output=tmp_path / "out", port=0, bind="127.0.0.1", commitment=False, reports=reports
    )
    return Receiver(settings, reports=sink)


@pytest.fixture
def pacs() -> Iterator[AE]:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(SC, SYNTAXES)
    yield ae
    ae.shutdown()


@pytest.mark.parametrize("status", [0x0000, 0x0110])
def test_a_report_reaches_the_sink_and_its_status_is_answered(
    tmp_path: Path, taken: list[Any], pacs: AE, status: int
) -> None:
    r = _receiver(tmp_path, taken, reports=True, status=status)
    r.start()
    try:
        role = build_role(SC, scu_role=False, scp_role=True)
        assoc = pacs.associate("127.0.0.1", r.port, ae_title="FORWARDER", ext_neg=[role])
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        assert cx.as_scp and not cx.as_scu  # the PACS is SCP on this context: it may report
        rsp, _ = assoc.send_n_event_report(_report(), 2, SC, SC_INSTANCE)
        assert int(rsp.Status) == status
        assoc.release()
    finally:
        r.stop()
    ((event_type, ds, calling),) = taken
    assert (event_type, calling) == (2, "PACS")
    assert ds.TransactionUID == _report().TransactionUID
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        _report().ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    )


def test_without_reports_an_n_event_report_aborts(tmp_path: Path, taken: list[Any]) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(SC, SYNTAXES)
    r = Receiver(ReceiverSettings(output=tmp_path / "out", port=0, bind="127.0.0.1"))
    r.start()  # `forwarder receive`: answers commitment, takes no reports
    try:
        role = build_role(SC, scu_role=True, scp_role=True)
        assoc = ae.associate("127.0.0.1", r.port, ae_title="FORWARDER", ext_neg=[role])
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        assert cx.as_scu and not cx.as_scp  # SCU role granted, SCP role refused
        rsp, _ = assoc.send_n_event_report(_report(), 1, SC, SC_INSTANCE)
        assert "Status" not in rsp  # no answer: aborted
        assoc.abort()
    finally:
        r.stop()
        ae.shutdown()
    assert taken == []
