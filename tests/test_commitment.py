"""Storage commitment requests and reports (forwarder.net.commitment, commitment_scu), against
a scripted pynetdicom commitment SCP: a report on the same association, on a new one, with
failures, none at all, for an unknown transaction, naming instances nobody asked about."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from commitment_peer import CommitmentSCP
from conftest import wait_until
from dicomgen import make_dataset
from peers import free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentBook,
    CommitmentError,
    Reference,
    ReportRejected,
    action_dataset,
    failure_text,
    parse_action,
    parse_report,
)
from forwarder.net.commitment_scu import ReportAcceptor, request_commitment

CT = "1.2.840.10008.5.1.4.1.1.2"
SETTINGS = AssociationSettings(calling_ae_title="FWDSCU", response_timeout=10.0)


def _refs(n: int, prefix: str = "1.2.826.0.1.3680043.10.1284.77") -> list[Reference]:
    return [Reference(CT, f"{prefix}.{i + 1}") for i in range(n)]


def _hold(scp: CommitmentSCP, refs: list[Reference]) -> None:
    """Put instances into the scripted PACS as if they had been stored."""
    for r in refs:
        scp.held[r.sop_instance] = make_dataset(sop_instance_uid=r.sop_instance)


def _report(uid: str, ok: list[Reference], bad: list[tuple[Reference, int]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    if ok:
        ds.ReferencedSOPSequence = action_dataset(uid, ok).ReferencedSOPSequence
    if bad:
        items = action_dataset(uid, [r for r, _ in bad]).ReferencedSOPSequence
        for item, (_, reason) in zip(items, bad, strict=True):
            item.FailureReason = reason
        ds.FailedSOPSequence = items
    return ds


# -- parsing, strictly --------------------------------------------------------------------------


def test_action_dataset_round_trips() -> None:
    refs = _refs(3)
    uid, back = parse_action(action_dataset("1.2.3", refs))
    assert (uid, back) == ("1.2.3", refs)


def test_report_with_failures_is_read_with_reasons() -> None:
    refs = _refs(3)
    report = parse_report(2, _report("1.2.3", refs[:2], [(refs[2], 0x0112)]), refs, "PACS")
    assert report.committed == tuple(refs[:2])
    assert [(f.reference, f.reason) for f in report.failed] == [(refs[2], 0x0112)]
    assert failure_text(0x0112) == "0x0112 (no such object instance)"
    assert report.not_reported(refs) == []
    partial = parse_report(1, _report("1.2.3", refs[:1], []), refs, "PACS")
    assert partial.not_reported(refs) == refs[1:]


@pytest.mark.parametrize(
    ("event_type", "ok", "bad", "why"),
    [
        (1, [0], [(1, 0x0110)], "Event Type 1"),
        (2, [0, 1], [], "without a Failed SOP"),
        (3, [0], [], "Event Type ID 3"),
        (1, [0, 0], [], "twice"),
        (2, [0], [(0, 0x0110)], "twice"),
    ],
)
def test_inconsistent_reports_are_rejected(
    event_type: int, ok: list[int], bad: list[tuple[int, int]], why: str
) -> None:
    refs = _refs(2)
    ds = _report("1.2.3", [refs[i] for i in ok], [(refs[i], r) for i, r in bad])
    with pytest.raises(ReportRejected, match=why):
        parse_report(event_type, ds, refs, "PACS")


def test_a_report_naming_an_instance_not_asked_is_not_trusted() -> None:
    refs = _refs(2)
    stranger = Reference(CT, "1.2.3.4.5")
    with pytest.raises(ReportRejected, match="not asked"):
        parse_report(1, _report("1.2.3", [*refs, stranger], []), refs, "PACS")
    other_class = Reference("1.2.840.10008.5.1.4.1.1.4", refs[0].sop_instance)
    with pytest.raises(ReportRejected, match="SOP Class"):
        parse_report(1, _report("1.2.3", [other_class], []), refs, "PACS")


def test_the_book_ignores_unknown_transactions_and_untrusted_reports(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = CommitmentBook()
    refs = _refs(2)
    book.expect("1.2.3", refs)
    with caplog.at_level(logging.WARNING):
        assert book.deliver(1, _report("9.9.9", refs, []), "PACS") != 0
        assert book.deliver(1, _report("1.2.3", [*refs, Reference(CT, "7.7")], []), "PACS") != 0
    assert "unknown transaction" in caplog.text and "not asked" in caplog.text
    assert book.pending() == ["1.2.3"]
    assert book.deliver(1, _report("1.2.3", refs, []), "PACS") == 0
    assert book.pending() == []


# -- over the network ---------------------------------------------------------------------------


def _peer(scp: CommitmentSCP) -> Peer:
    return Peer("127.0.0.1", scp.port, scp.ae_title)


def test_report_on_the_same_association() -> None:
    refs = _refs(4)
    with CommitmentSCP(mode="same") as scp:
        _hold(scp, refs[:3])
        book = CommitmentBook()
        uid, report = request_commitment(
            _peer(scp), SETTINGS, refs, book, timeout=10, release_at_once=False
        )
    assert report is not None and report.transaction_uid == uid
    assert set(report.committed) == set(refs[:3])
    assert [(f.reference, f.reason) for f in report.failed] == [(refs[3], 0x0112)]
    assert str(scp.actions[0].TransactionUID) == uid
    assert scp.report_statuses == [0]


def test_report_on_a_new_association_to_the_acceptor() -> None:
    refs = _refs(3)
    book = CommitmentBook()
    port = free_port()
    with (
        ReportAcceptor(book, ae_title="FWDSCU", port=port, bind="127.0.0.1"),
        CommitmentSCP(mode="new", report_to=("127.0.0.1", port, "FWDSCU"), delay=0.3) as scp,
    ):
        _hold(scp, refs)
        scp.forget.add(refs[1].sop_instance)
        _, report = request_commitment(
            _peer(scp), SETTINGS, refs, book, timeout=10, release_at_once=True
        )
    assert report is not None
    assert set(report.committed) == {refs[0], refs[2]}
    assert [(f.reference, f.reason) for f in report.failed] == [(refs[1], 0x0110)]
    assert scp.report_statuses == [0]


class _SlowBook(CommitmentBook):
    """A book slow to take a report (a busy disk under its database): it has already woken the
    waiter, who ends the association, when pynetdicom gets the answer to send."""

    def deliver(self, event_type: int, ds: Dataset, calling_ae: str) -> int:
        status = super().deliver(event_type, ds, calling_ae)
        time.sleep(0.5)
        return status


def test_the_peer_gets_its_answer_before_the_release_on_the_same_association() -> None:
    refs = _refs(2)
    with CommitmentSCP(mode="same") as scp:
        _hold(scp, refs)
        _, report = request_commitment(
            _peer(scp), SETTINGS, refs, _SlowBook(), timeout=10, release_at_once=False
        )
    assert report is not None and set(report.committed) == set(refs)
    assert scp.report_statuses == [0]  # -1: our A-RELEASE-RQ came instead of the answer


def test_the_acceptor_lets_the_peer_get_its_answer_and_release_before_stopping() -> None:
    refs = _refs(2)
    book = _SlowBook()
    port = free_port()
    with (
        CommitmentSCP(mode="new", report_to=("127.0.0.1", port, "FWDSCU")) as scp,
        ReportAcceptor(book, ae_title="FWDSCU", port=port, bind="127.0.0.1"),
    ):
        _hold(scp, refs)
        _, report = request_commitment(
            _peer(scp), SETTINGS, refs, book, timeout=10, release_at_once=True
        )
        assert report is not None
    # The acceptor has stopped (the sender's exit) while the answer was held back.
    assert wait_until(lambda: scp.report_endings, 10)
    assert (scp.report_statuses, scp.report_endings) == ([0], ["released"])


def test_the_acceptor_still_stops_promptly_when_the_peer_keeps_its_association() -> None:
    """The grace is bounded: a peer that neither answers nor releases is aborted."""
    book = CommitmentBook()
    port = free_port()
    acceptor = ReportAcceptor(book, ae_title="FWDSCU", port=port, bind="127.0.0.1").start()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="FWDSCU", ext_neg=[role])
    try:
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(
            _report("1.2.3", _refs(1), []), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assert status is not None and status.Status != 0  # unknown transaction
        started = time.monotonic()
        acceptor.stop()
        assert time.monotonic() - started < 5
        assert wait_until(lambda: not assoc.is_established, 10)
        assert assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.abort()


@pytest.mark.parametrize("script", ["none", "wrong_transaction", "extra_instance"])
def test_no_trustworthy_report_means_not_committed(script: str) -> None:
    refs = _refs(2)
    book = CommitmentBook()
    port = free_port()
    scp = CommitmentSCP(mode="none" if script == "none" else "new")
    scp.report_to = ("127.0.0.1", port, "FWDSCU")
    scp.wrong_transaction = script == "wrong_transaction"
    scp.extra_instance = script == "extra_instance"
    with ReportAcceptor(book, ae_title="FWDSCU", port=port, bind="127.0.0.1"), scp:
        _hold(scp, refs)
        _, report = request_commitment(
            _peer(scp), SETTINGS, refs, book, timeout=2.0, release_at_once=True
        )
    assert report is None
    if script != "none":
        assert scp.report_statuses and scp.report_statuses[0] != 0  # told it was not taken


def test_a_refused_n_action_raises() -> None:
    with (
        CommitmentSCP(action_status=0x0110) as scp,
        pytest.raises(CommitmentError, match="0x0110") as info,
    ):
        request_commitment(
            _peer(scp), SETTINGS, _refs(1), CommitmentBook(), timeout=2, release_at_once=True
        )
    assert info.value.status == 0x0110


@pytest.mark.parametrize("status", [0x0001, 0x0107, 0x0116, 0xB000, 0xBFFF])
def test_an_n_action_accepted_with_a_warning_is_awaited_and_said_once(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A Warning status (PS3.7 C.3: 0x0001, 0x0107, 0x0116, 0xBxxx) means the PACS accepted
    the request: the report is awaited and taken, not the request given up as refused (and
    asked again later); one WARNING line names the peer, the transaction and the status."""
    refs = _refs(2)
    caplog.set_level(logging.INFO, logger="forwarder")
    with CommitmentSCP(action_status=status) as scp:
        _hold(scp, refs)
        uid, report = request_commitment(
            _peer(scp), SETTINGS, refs, CommitmentBook(), timeout=5, release_at_once=False
        )
    assert report is not None and set(report.committed) == set(refs)
    (line,) = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("forwarder")
    ]
    text = line.getMessage()
    assert f"0x{status:04X}" in text and uid in text and f"127.0.0.1:{scp.port}" in text


# pynetdicom 3.0 shuts down but does not close the socket of a refused connection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_peer_raises(tmp_path: Path) -> None:
    peer = Peer("127.0.0.1", free_port(), "NOBODY")
    settings = AssociationSettings(calling_ae_title="FWDSCU", connect_timeout=2.0)
    with pytest.raises(CommitmentError, match="no association"):
        request_commitment(
            peer, settings, _refs(1), CommitmentBook(), timeout=2, release_at_once=True
        )


def _acceptor_threads(acceptor: ReportAcceptor) -> list[threading.Thread]:
    """The acceptor's pynetdicom association threads (reactor and DUL) still running."""
    server = acceptor._server
    assocs = list(server.active_associations)
    return [t for a in assocs for t in (a, a.dul) if t.is_alive()]


def test_the_acceptor_ends_connections_that_never_became_associations_on_stop() -> None:
    """Peers that only opened a TCP connection (no A-ASSOCIATE-RQ: a port scan, a PACS that
    hung before negotiating) have no association to abort. stop() still ends them at once:
    their pynetdicom threads used to run on for the ACSE timeout (30 s) after stop()
    returned, left behind by every reload that stopped an acceptor."""
    acceptor = ReportAcceptor(
        CommitmentBook(), ae_title="FWDSCU", port=free_port(), bind="127.0.0.1"
    )
    acceptor.start()
    server = acceptor._server
    socks = []
    try:
        for _ in range(3):
            socks.append(socket.create_connection(("127.0.0.1", acceptor.port), timeout=5))
        wait_until(lambda: len(server.active_associations) == 3, 5, what="3 connections taken")
        threads = _acceptor_threads(acceptor)
        started = time.monotonic()
        acceptor.stop()
        assert time.monotonic() - started < 5
        wait_until(
            lambda: not any(t.is_alive() for t in threads),
            2,
            what="the association threads of the bare connections ended",
        )
        assert not server.active_associations
        for sock in socks:  # our end of each connection was closed
            sock.settimeout(2)
            assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
        if acceptor._server is not None:
            acceptor.stop()
