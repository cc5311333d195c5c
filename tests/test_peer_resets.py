"""A peer that resets (or closes) an established association under the storage commitment and
query SCUs, or under the report acceptor, in the middle of an exchange: one line of ours names
the peer and what happened, in the C-STORE engine's words; pynetdicom's ERROR lines and
tracebacks for that association are not let through (other associations' still are); nothing is
taken as committed or verified, and the round is asked again later."""

from __future__ import annotations

import gc
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from commitment_peer import CommitmentSCP, end_connection
from conftest import wait_until
from daemon import Daemon, destination
from peers import free_port, start_server
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
from test_commitment_keeper import _Finished
from test_proof_rounds import PROOFS, SOP, _prover, _stored

from forwarder.daemon import proof_thread
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentBook,
    CommitmentError,
    Reference,
    action_dataset,
)
from forwarder.net.commitment_scp import send_report
from forwarder.net.commitment_scu import ReportAcceptor, request_commitment
from forwarder.net.query_scu import InstanceKey, QueryError, held_instances
from forwarder.queue import Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
SETTINGS = AssociationSettings(calling_ae_title="FWD", response_timeout=10.0)
REF = Reference(CT, SOP)


def _said(peer: object, how: str, what: str) -> str:
    if how == "reset":
        return f"connection to {peer} lost waiting for {what}: connection reset by peer"
    return f"{peer} closed the connection (waiting for {what})"


def _ours(
    caplog: pytest.LogCaptureFixture, others: set[tuple[int | None, str]]
) -> list[logging.LogRecord]:
    """The records of every thread but ``others`` (the in-process peer's: ident and name, as
    an ident is used again once its thread ended)."""
    return [r for r in list(caplog.records) if (r.thread, r.threadName) not in others]


def _threads(assoc: Any) -> set[tuple[int | None, str]]:
    """A pynetdicom association's threads: its reactor and its connection's (DUL)."""
    return {(t.ident, t.name) for t in (assoc, assoc.dul)}


def _no_pynetdicom_noise(records: list[logging.LogRecord]) -> None:
    loud = [r for r in records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    assert not loud, [r.getMessage() for r in loud]
    assert not [r for r in records if r.exc_info], "a traceback was logged"


def _peer_threads(scp: CommitmentSCP) -> set[tuple[int | None, str]]:
    return {t for pair in scp.killed for t in pair}


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("what", ["C-FIND", "N-ACTION"])
def test_a_peer_ending_the_association_mid_exchange_is_said_in_our_words(
    how: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with CommitmentSCP(kill=how) as scp:
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        if what == "C-FIND":
            with pytest.raises(QueryError) as caught:
                held_instances(peer, SETTINGS, [InstanceKey("1.2.3", "1.2.3.4", SOP)])
            expected = _said(peer, how, f"the C-FIND-RSP for {SOP}")
        else:
            with pytest.raises(CommitmentError) as caught:
                request_commitment(
                    peer,
                    SETTINGS,
                    [Reference(CT, SOP)],
                    CommitmentBook(),
                    timeout=5,
                    release_at_once=False,
                )
            expected = _said(peer, how, "the N-ACTION-RSP")
            assert caught.value.status is None
    assert str(caught.value) == expected
    assert len(scp.killed) == 1
    _no_pynetdicom_noise(_ours(caplog, _peer_threads(scp)))


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_peer_ending_the_association_while_we_wait_for_its_report_is_said(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS answers the N-ACTION, then resets the association on which we wait for its
    report: one warning (the report may still come on another association), none of
    pynetdicom's lines; no report, so nothing committed."""
    caplog.set_level(logging.INFO)
    with CommitmentSCP(mode="none", kill_after_action=how) as scp:
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        uid, report = request_commitment(
            peer, SETTINGS, [REF], CommitmentBook(), timeout=2, release_at_once=False
        )
    assert report is None and len(scp.killed) == 1
    records = _ours(caplog, _peer_threads(scp))
    _no_pynetdicom_noise(records)
    said = _said(peer, how, "the N-EVENT-REPORT")
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings == [f"storage commitment (transaction {uid}): {said}"]


def test_other_associations_still_show_pynetdicoms_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the watched association's lines are kept back: a pynetdicom SCU of someone else's
    (here the test's own) that the peer resets still logs pynetdicom's lines."""
    caplog.set_level(logging.INFO)
    with CommitmentSCP(kill="reset") as scp:
        ae = AE(ae_title="OTHER")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            action_dataset("1.2.3.9", [Reference(CT, SOP)]),
            1,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        assert not status
        wait_until(lambda: not assoc.is_alive(), 10, what="the association's end")
    records = _ours(caplog, _peer_threads(scp))
    assert [r for r in records if r.name == "pynetdicom.dul" and r.exc_info]
    assert [r for r in records if r.getMessage().startswith("Connection closed while waiting")]


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("proof", PROOFS)
def test_the_daemons_round_says_the_reset_once_and_is_asked_again(
    proof: str,
    how: str,
    q: Queue,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The proof threads, round after round against a PACS that resets the N-ACTION / C-FIND:
    one warning naming the destination, the peer and the reset; nothing proven meanwhile;
    once the PACS answers, the instance is proven."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    caplog.set_level(logging.INFO, logger="pynetdicom")
    _stored(q)
    finished = _Finished()
    what = "the N-ACTION-RSP" if proof == "storage_commitment" else f"the C-FIND-RSP for {SOP}"
    with CommitmentSCP(kill=how) as scp:
        scp.held[SOP] = Dataset()
        said = _said(Peer("127.0.0.1", scp.port, scp.ae_title), how, what)
        prover = _prover(proof, q, scp.port, finished)
        prover.start()
        try:
            wait_until(lambda: len(scp.killed) >= 2, 15, what="two rounds ended by the peer")
            # Still awaiting proof (a round may be open meanwhile): not proven, not resent.
            counts = q.commitment_counts()["pacs"]
            assert (counts.awaiting, counts.committed, counts.uncommitted) == (1, 0, 0)
            assert not finished.ids and q.stats()["pacs"].pending == 0
            scp.kill = None
            wait_until(lambda: finished.ids, 10, what="the instance proven")
        finally:
            prover.stop()
        peer_threads = _peer_threads(scp)
    records = _ours(caplog, peer_threads)
    _no_pynetdicom_noise(records)
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    if proof == "storage_commitment":
        round_not = "storage commitment of 1 instance(s) not requested"
    else:
        round_not = "verification by query of 1 instance(s) not done"
    assert [r.getMessage() for r in warnings] == [f"pacs: {round_not}: {said}; asking again in 0s"]
    assert q.commitment_counts()["pacs"].committed == 1


def _sender(port: int, how: str) -> tuple[Any, threading.Event]:
    """A PACS's association to the acceptor that resets (or closes) its connection once the
    N-EVENT-REPORT's command has gone out, before its data set."""
    killed = threading.Event()

    def sent(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF) and not killed.is_set():
            killed.set()
            end_connection(event.assoc.dul.socket.socket, how)

    ae = AE(ae_title="PACS")
    ae.dimse_timeout = 5
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="FWD",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_PDU_SENT, sent)],
    )
    assert assoc.is_established
    return assoc, killed


def _report(uid: str, refs: list[Reference]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    ds.ReferencedSOPSequence = action_dataset(uid, refs).ReferencedSOPSequence
    return ds


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_report_sender_ending_the_association_mid_report_is_said_in_our_words(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS resets its association to our report acceptor in the middle of its
    N-EVENT-REPORT: one warning naming it and the reset, nothing of pynetdicom's for the
    acceptor's association, the transaction still awaited; the PACS's next try is taken."""
    caplog.set_level(logging.INFO)
    uid, refs = "1.2.826.0.1.3680043.10.1284.88.1", [Reference(CT, SOP)]
    book = CommitmentBook()
    book.expect(uid, refs)
    with ReportAcceptor(book, ae_title="FWD", port=free_port(), bind="127.0.0.1") as acceptor:
        assoc, killed = _sender(acceptor.port, how)
        sender_port = assoc.dul.socket.socket.getsockname()[1]
        me = threading.current_thread()
        sender_threads = {(me.ident, me.name), *_threads(assoc)}
        try:
            status, _ = assoc.send_n_event_report(
                _report(uid, refs), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            assert killed.is_set() and not status
        finally:
            if assoc.is_established:
                assoc.abort()
        line = "storage commitment reports: " + _said(
            f"PACS@127.0.0.1:{sender_port}", how, "the N-EVENT-REPORT"
        )
        wait_until(lambda: [r for r in caplog.records if r.getMessage().startswith(line)], 10)
        assert book.awaits(uid) and book.wait(uid, 0.0) is None  # nothing taken
        # The PACS tries again, and the report is taken.
        again = AE(ae_title="PACS")
        again.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        second = again.associate("127.0.0.1", acceptor.port, ae_title="FWD", ext_neg=[role])
        status, _ = second.send_n_event_report(
            _report(uid, refs), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        second.release()
        assert status is not None and status.Status == 0
        sender_threads |= _threads(second)
    report = book.wait(uid, 0.0)
    assert report is not None and list(report.committed) == refs
    records = _ours(caplog, sender_threads)
    _no_pynetdicom_noise(records)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings == [f"{line}; no report taken on it"]


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_requestor_ending_the_association_under_our_report_is_said_in_our_words(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``forwarder receive --stgcmt-peer``'s report, on a new association to the requestor,
    which resets (or closes) it instead of answering the N-EVENT-REPORT: not delivered, said
    in one line naming it and the reset, without pynetdicom's lines for our association."""
    caplog.set_level(logging.INFO)
    uid = "1.2.826.0.1.3680043.10.1284.88.2"
    killed: list[Any] = []

    def kill(event: Any) -> tuple[int, None]:
        killed.append(event.assoc)
        end_connection(event.assoc.dul.socket.socket, how)
        return 0x0000, None  # goes nowhere

    ae = AE(ae_title="FWD")
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES), scu_role=True, scp_role=True
    )
    server = start_server(
        ae, ("127.0.0.1", free_port()), evt_handlers=[(evt.EVT_N_EVENT_REPORT, kill)]
    )
    port = server.socket.getsockname()[1]
    try:
        delivered = send_report("127.0.0.1", port, "FWD", "RECEIVER", 1, _report(uid, [REF]))
        wait_until(lambda: killed and not killed[0].is_alive(), 10, what="the peer's end")
    finally:
        server.shutdown()
    assert not delivered
    peer_threads = _threads(killed[0])
    said = _said(f"FWD@127.0.0.1:{port}", how, "the N-EVENT-REPORT-RSP")
    records = _ours(caplog, peer_threads)
    _no_pynetdicom_noise(records)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings == [f"storage commitment report (transaction {uid}) not delivered: {said}"]


def test_a_report_sender_resetting_after_its_report_is_only_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PACS that resets the association instead of releasing it once its report was taken
    and answered: nothing is lost, so one info line, no warning, nothing of pynetdicom's."""
    caplog.set_level(logging.INFO)
    uid = "1.2.826.0.1.3680043.10.1284.88.3"
    book = CommitmentBook()
    book.expect(uid, [REF])
    with ReportAcceptor(book, ae_title="FWD", port=free_port(), bind="127.0.0.1") as acceptor:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="FWD", ext_neg=[role])
        assert assoc.is_established
        me = threading.current_thread()
        sender_threads = {(me.ident, me.name), *_threads(assoc)}
        sock = assoc.dul.socket.socket
        sender_port = sock.getsockname()[1]
        status, _ = assoc.send_n_event_report(
            _report(uid, [REF]), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assert status is not None and status.Status == 0
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_until(lambda: not assoc.is_alive(), 10, what="the sender's end")
        line = "storage commitment reports: " + _said(
            f"PACS@127.0.0.1:{sender_port}", "reset", "the A-RELEASE-RQ"
        )
        wait_until(lambda: [r for r in caplog.records if r.getMessage().startswith(line)], 10)
    report = book.wait(uid, 0.0)
    assert report is not None and list(report.committed) == [REF]
    records = _ours(caplog, sender_threads)
    _no_pynetdicom_noise(records)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    (noted,) = [r for r in records if r.getMessage().startswith(line)]
    assert noted.levelno == logging.INFO and noted.getMessage() == f"{line} (after its report)"


@pytest.mark.parametrize("proof", PROOFS)
def test_the_daemons_log_says_the_reset_once_without_a_traceback(
    proof: str, tmp_path: Path
) -> None:
    """The daemon as a subprocess, its journal as an operator reads it: the PACS resets every
    N-ACTION / C-FIND; the log says so once, naming the destination, the PACS and the reset,
    with no traceback and none of pynetdicom's lines; nothing is proven or failed."""
    policy: dict[str, Any] = (
        {"after": "300ms"} if proof == "verify_by_query" else {"settle": "300ms"}
    )
    with CommitmentSCP(kill="reset") as scp:
        dest = destination("pacs", scp.port, ae_title=scp.ae_title, **{proof: policy})
        with Daemon(tmp_path, destinations=[dest]) as d:
            d.drop_files(1, study_uid="1.2.826.0.1.3680043.10.1284.88.4")
            d.wait_log("connection reset by peer", timeout=30)
            status = d.status_json()["destinations"]["pacs"]
            assert status["awaiting_commitment"] == 1 and status["committed"] == 0
            assert d.done_files() == [] and d.failed_files() == []
            assert d.stop() == 0
        log = d.log_text()
    peer = Peer("127.0.0.1", scp.port, scp.ae_title)
    what = "the N-ACTION-RSP" if proof == "storage_commitment" else "the C-FIND-RSP for "
    said = [line for line in log.splitlines() if "reset by peer" in line]
    assert len(said) == 1, said
    assert "pacs: " in said[0] and f"connection to {peer} lost waiting for {what}" in said[0]
    for noise in ("Traceback", "Connection closed", "ConnectionResetError", "Errno"):
        assert noise not in log, log[-3000:]


def _acceptor_associations() -> list[Any]:
    """The report acceptor's associations still alive (in memory, running or not)."""
    from pynetdicom.association import Association

    gc.collect()
    return [
        a
        for a in gc.get_objects()
        if isinstance(a, Association) and a.is_acceptor and str(a.ae.ae_title).strip() == "FWD"
    ]


def test_an_association_reset_on_the_report_acceptor_is_not_kept_in_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What ended an association is kept as words, not as the reset's exception: its
    traceback held the association (a health check every 10 s, ~350 MB a day)."""
    caplog.set_level(logging.INFO)
    uid, refs = "1.2.826.0.1.3680043.10.1284.88.7", [Reference(CT, SOP)]
    book = CommitmentBook()
    book.expect(uid, refs)
    with ReportAcceptor(book, ae_title="FWD", port=free_port(), bind="127.0.0.1") as acceptor:
        for _ in range(3):
            assoc, killed = _sender(acceptor.port, "reset")
            try:
                assoc.send_n_event_report(
                    _report(uid, refs), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
                )
                assert killed.is_set()
            finally:
                if assoc.is_established:
                    assoc.abort()
        wait_until(
            lambda: len([r for r in caplog.records if "no report taken" in r.getMessage()]) == 3,
            10,
            what="the three resets said",
        )
        wait_until(lambda: not _acceptor_associations(), 10, what="the associations freed")


@pytest.mark.parametrize("fsm_event", ["Evt16", "Evt17"])
@pytest.mark.parametrize("state", ["Sta2", "Sta3", "Sta13"])
def test_a_connection_that_never_carried_an_association_is_no_ending(
    fsm_event: str, state: str
) -> None:
    """A TCP health check on the report acceptor's port (connect, then close, reset or
    A-ABORT before any A-ASSOCIATE-RQ is answered) is not an association ended under us: no
    warning line for it. (Driven through the state machine's own event: a real bare
    connection's pynetdicom thread outlives the acceptor's stop by its ACSE timeout, ~30 s,
    which the suite's thread check refuses.)"""
    from types import SimpleNamespace

    from forwarder.net.endings import Ending

    ending = Ending()
    assert not ending.note(SimpleNamespace(fsm_event=fsm_event, current_state=state))
    assert ending.by is None
    # Once an association stands, the same event is the peer ending it.
    assert ending.note(SimpleNamespace(fsm_event=fsm_event, current_state="Sta6"))
    assert ending.by == ("aborted" if fsm_event == "Evt16" else "closed")


@pytest.mark.parametrize("what", ["C-FIND", "N-ACTION"])
def test_a_peer_that_never_answers_is_said_in_our_words_alone(
    what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS accepts the association, then never answers the C-FIND / N-ACTION: the one
    line is ours, naming the PACS, what was waited for and the timeout; pynetdicom's "DIMSE
    timeout" ERROR for that association is not let through."""
    caplog.set_level(logging.INFO)
    settings = replace(SETTINGS, response_timeout=0.5)
    with CommitmentSCP(hang=True) as scp:
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        error: type[Exception] = QueryError if what == "C-FIND" else CommitmentError
        with pytest.raises(error) as caught:
            if what == "C-FIND":
                held_instances(peer, settings, [InstanceKey("1.2.3", "1.2.3.4", SOP)])
            else:
                request_commitment(
                    peer, settings, [REF], CommitmentBook(), timeout=5, release_at_once=False
                )
        scp.hang = False
    waited = f"the C-FIND-RSP for {SOP}" if what == "C-FIND" else "the N-ACTION-RSP"
    assert str(caught.value) == f"{peer} did not send {waited} within 0.5s"
    _no_pynetdicom_noise(_ours(caplog, scp.threads))


def _release_said(peer: object, how: str) -> str:
    return f"{_said(peer, how, 'the A-RELEASE-RP')} (everything asked was answered: nothing lost)"


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("what", ["C-FIND", "N-ACTION"])
def test_a_peer_ending_the_association_instead_of_answering_our_release_is_only_noted(
    what: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything answered, the PACS resets (or closes) the connection instead of answering
    our A-RELEASE-RQ: nothing is lost, so the round goes on as answered; one info line of ours
    says so, nothing of pynetdicom's (its ERROR lines, the reset's traceback)."""
    caplog.set_level(logging.INFO)
    with CommitmentSCP(mode="none", kill_release=how) as scp:
        scp.held[SOP] = Dataset()
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        if what == "C-FIND":
            answers = held_instances(peer, SETTINGS, [InstanceKey("1.2.3", "1.2.3.4", SOP)])
            assert answers.held == {SOP} and not answers.undecided
        else:
            _, report = request_commitment(
                peer, SETTINGS, [REF], CommitmentBook(), timeout=0.3, release_at_once=True
            )
            assert report is None and len(scp.actions) == 1
        wait_until(lambda: scp.killed, 10, what="the release reset")
    records = _ours(caplog, scp.threads)
    _no_pynetdicom_noise(records)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    said = _release_said(peer, how)
    assert [(r.levelno, r.getMessage()) for r in records if "A-RELEASE" in r.getMessage()] == [
        (logging.INFO, said)
    ]


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_requestor_ending_the_association_instead_of_answering_our_release_is_noted(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``forwarder receive --stgcmt-peer``'s report was answered; the requestor resets (or
    closes) instead of answering our A-RELEASE-RQ: delivered, one info line, no pynetdicom
    noise."""
    caplog.set_level(logging.INFO)
    killed: list[Any] = []

    def kill(event: Any) -> None:
        if isinstance(event.pdu, A_RELEASE_RQ) and not killed:
            killed.append(event.assoc)
            end_connection(event.assoc.dul.socket.socket, how)

    ae = AE(ae_title="FWD")
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES), scu_role=True, scp_role=True
    )
    server = start_server(
        ae,
        ("127.0.0.1", free_port()),
        evt_handlers=[(evt.EVT_PDU_RECV, kill), (evt.EVT_N_EVENT_REPORT, lambda e: (0, None))],
    )
    port = server.socket.getsockname()[1]
    uid = "1.2.826.0.1.3680043.10.1284.88.8"
    try:
        delivered = send_report("127.0.0.1", port, "FWD", "RECEIVER", 1, _report(uid, [REF]))
        wait_until(lambda: killed and not killed[0].is_alive(), 10, what="the peer's end")
    finally:
        server.shutdown()
    assert delivered
    records = _ours(caplog, _threads(killed[0]))
    _no_pynetdicom_noise(records)
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    said = _release_said(f"FWD@127.0.0.1:{port}", how)
    assert [(r.levelno, r.getMessage()) for r in records if "A-RELEASE" in r.getMessage()] == [
        (logging.INFO, said)
    ]


def _asking(thread: int) -> bool:
    """Whether ``thread`` is in :meth:`Ending.words` (asking what ended its association)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_name == "words" and frame.f_code.co_filename.endswith("endings.py"):
            return True
        frame = frame.f_back
    return False


def test_an_ending_noted_after_the_requestor_gave_up_is_still_said_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom hands the reset to the association (which the requesting thread, waiting
    for the report, sees gone) before its connection thread tells the handlers what happened:
    under load the requestor gives up first. Held there until it asks, the connection thread's
    note must still reach it: the line is said as soon as noted, not lost after a 1 s wait."""
    from pynetdicom import fsm

    caplog.set_level(logging.INFO)
    me = threading.get_ident()
    noted: list[float] = []
    about, action, after = fsm.ACTIONS["AA-4"]  # Evt17 in Sta6: issue the A-P-ABORT indication

    def late(dul: Any) -> str:
        state: str = action(dul)
        if dul.assoc.is_requestor and not noted:
            wait_until(lambda: _asking(me), 10, what="the requestor asking what ended it")
            noted.append(time.time())  # the FSM transition's handlers run next
        return state

    monkeypatch.setitem(fsm.ACTIONS, "AA-4", (about, late, after))
    with CommitmentSCP(mode="none", kill_after_action="reset") as scp:
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        uid, report = request_commitment(
            peer, SETTINGS, [REF], CommitmentBook(), timeout=2, release_at_once=False
        )
    assert report is None and len(scp.killed) == 1 and noted
    records = _ours(caplog, scp.threads)
    _no_pynetdicom_noise(records)
    said = _said(peer, "reset", "the N-EVENT-REPORT")
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"storage commitment (transaction {uid}): {said}"]
    assert warnings[0].created - noted[0] < 0.5  # said once noted, no settling wait
