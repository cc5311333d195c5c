"""The daemon's storage commitment keeper in process, through its seam for other listeners
(``CommitmentKeeper.deliver_report``, for the daemon's ``listen`` Storage SCP): a report for an
open transaction read back from the queue is recorded; one for an unknown transaction, or naming
an instance not asked about, changes nothing."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from commitment_peer import CommitmentSCP
from conftest import wait_until
from peers import free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from forwarder.config import Destination
from forwarder.daemon import proof_thread
from forwarder.daemon.commitment import CommitmentKeeper, ProofTarget
from forwarder.net.association import AssociationSettings
from forwarder.net.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    Reference,
    action_dataset,
)
from forwarder.queue import FileEntry, Job, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.10.1284.57.1"


class _Finished:
    """Collects the file ids the keeper hands to the finisher."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def submit(self, file_ids: Sequence[int]) -> None:
        self.ids += list(file_ids)


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue


def _report(uid: str, refs: list[Reference]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    ds.ReferencedSOPSequence = action_dataset(uid, refs).ReferencedSOPSequence
    return ds


def _open_transaction(q: Queue, uid: str, count: int) -> tuple[list[FileEntry], list[Job]]:
    """``count`` files stored at "pacs", awaiting its report for transaction ``uid``."""
    entries = [
        FileEntry(f"/in/{i}", f"{i}", 1, 1, CT, f"1.2.3.{i}", "1.2.840.10008.1.2.1", STUDY)
        for i in range(count)
    ]
    q.enqueue_many([(e, ["pacs"]) for e in entries])
    jobs = q.claim("pacs", 10)
    q.ack_done([j.id for j in jobs], commitment=True)
    q.begin_commitment(uid, "pacs", "stgcmt", [j.id for j in jobs], deadline=2e9)
    return entries, jobs


def test_a_report_through_the_seam_is_recorded(q: Queue) -> None:
    entries, jobs = _open_transaction(q, "9.9.1", 2)
    finished = _Finished()
    woken: list[bool] = []
    keeper = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: woken.append(True))
    keeper.start()  # reads the open transaction back from the queue
    try:
        refs = [Reference(CT, e.sop_instance_uid) for e in entries]
        assert keeper.deliver_report(1, _report("9.9.2", refs), "PACS") != 0  # unknown
        stranger = [*refs, Reference(CT, "1.2.3.99")]
        assert keeper.deliver_report(1, _report("9.9.1", stranger), "PACS") != 0
        assert finished.ids == [] and q.open_commitments() != []
        assert keeper.deliver_report(1, _report("9.9.1", refs), "PACS") == 0
    finally:
        keeper.stop()
    assert sorted(finished.ids) == sorted(j.file_id for j in jobs)
    assert q.open_commitments() == [] and q.commitment_counts()["pacs"].committed == 2
    assert woken == []


def test_a_report_arriving_before_the_keeper_runs_is_matched(q: Queue) -> None:
    """The report acceptor listens from ``configure``, before ``start``: a PACS delivering,
    right as the daemon starts again, the report of a transaction the previous run left open
    must find it awaited, not be answered "unknown transaction" (0x0110)."""
    _, jobs = _open_transaction(q, "9.9.3", 1)
    port = free_port()
    dest = Destination.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
         "storage_commitment": {"port": port, "bind": "127.0.0.1", "ae_title": "FWDSCU"}}
    )  # fmt: skip
    finished = _Finished()
    keeper = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: None)
    keeper.configure([ProofTarget(dest, AssociationSettings(calling_ae_title="FWD"))])
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(COMMITMENT_SYNTAXES))
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate("127.0.0.1", port, ae_title="FWDSCU", ext_neg=[role])
        assert assoc.is_established
        try:
            report = _report("9.9.3", [Reference(CT, "1.2.3.0")])
            status, _ = assoc.send_n_event_report(
                report, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
        finally:
            assoc.release()
        assert status is not None and status.Status == 0
    finally:
        keeper.stop()
    assert finished.ids == [jobs[0].file_id]
    assert q.open_commitments() == [] and q.commitment_counts()["pacs"].committed == 1


def test_a_report_that_cannot_be_recorded_is_refused_and_taken_when_sent_again(
    tmp_path: Path,
) -> None:
    """The queue cannot record the report (another writer holds it past the busy timeout; a
    full disk acts alike): the PACS is answered 0x0110, not Success, and the same report sent
    again is taken, not ignored as "a second report" while the transaction waits out its
    deadline to be sent again."""
    path = tmp_path / "queue.sqlite"
    with Queue(path, busy_timeout=0.3) as q:
        _, jobs = _open_transaction(q, "9.9.4", 1)
        finished = _Finished()
        keeper = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: None)
        keeper.start()
        report = _report("9.9.4", [Reference(CT, "1.2.3.0")])
        try:
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                assert keeper.deliver_report(1, report, "PACS") == 0x0110
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            assert finished.ids == [] and len(q.open_commitments()) == 1
            assert keeper.deliver_report(1, report, "PACS") == 0
        finally:
            keeper.stop()
        assert finished.ids == [jobs[0].file_id]
        assert q.open_commitments() == [] and q.commitment_counts()["pacs"].committed == 1


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Another connection holds the queue database's write lock (a long write, a full disk
    alike): every write of the keeper's fails past its busy timeout."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_an_expiry_the_queue_refuses_is_said_once_naming_the_transaction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction past its deadline that the queue cannot record as not committed (its
    write lock held by another writer): the keeper tries again every second, and says so once,
    naming the destination and the transaction, then only at debug level; once the queue
    takes writes again the transaction is recorded (its instance sent again)."""
    caplog.set_level(logging.DEBUG, logger="forwarder")
    path = tmp_path / "queue.sqlite"
    with Queue(path, busy_timeout=0.2) as q:
        _open_transaction(q, "9.9.5", 1)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE commitments SET deadline = 0 WHERE uid = '9.9.5'")
        keeper = CommitmentKeeper(q, cast(Any, _Finished()), wake_workers=lambda: None)
        dest = Destination.model_validate(
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
             "storage_commitment": {"timeout": "1s"}}
        )  # fmt: skip
        keeper.configure([ProofTarget(dest, AssociationSettings(calling_ae_title="FWD"))])
        try:
            with _locked(path):
                keeper.start()
                wait_until(
                    lambda: len([r for r in caplog.records if "locked" in r.getMessage()]) >= 3,
                    15,
                    what="three tries",
                )
            wait_until(lambda: q.stats()["pacs"].pending == 1, 10, what="sent again")
        finally:
            keeper.stop()
    tries = [r for r in caplog.records if "locked" in r.getMessage()]
    assert [r.levelno for r in tries][:3] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == tries[:1]
    said = tries[0].getMessage()
    assert said.startswith("pacs: ") and "9.9.5" in said


def test_a_transaction_whose_cancel_the_queue_refuses_is_not_expired_into_a_resend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS refuses the N-ACTION (nothing requested) while another writer holds the
    queue's write lock: the transaction cannot be cancelled then. It is cancelled once the
    queue takes writes again, never left open to expire as "not committed" past its deadline
    and sent again for no fault of the PACS; asked again, it is committed."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    path = tmp_path / "queue.sqlite"
    sop = "1.2.826.0.1.3680043.10.1284.57.9"
    with Queue(path, busy_timeout=0.2) as q:
        entry = FileEntry("/in/0", "0", 1, 1, CT, sop, "1.2.840.10008.1.2.1", STUDY)
        q.enqueue_many([(entry, ["pacs"])])
        (job,) = q.claim("pacs", 10)
        q.ack_done([job.id], commitment=True)
        finished = _Finished()
        with CommitmentSCP(hang=True, refuse_instances={sop}) as scp:
            scp.held[sop] = Dataset()
            dest = Destination.model_validate(
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port,
                 "storage_commitment": {"settle": 0, "timeout": "1s"}}
            )  # fmt: skip
            keeper = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: None)
            keeper.configure([ProofTarget(dest, AssociationSettings(calling_ae_title="FWD"))])
            keeper.start()
            try:
                wait_until(lambda: scp.actions, 10, what="the N-ACTION")
                (txn,) = q.open_commitments()
                with _locked(path):
                    scp.hang = False  # answered 0x0110 now: the keeper cancels, and cannot
                    wait_until(lambda: "while cancelling" in caplog.text, 10, what="the refusal")
                    wait_until(lambda: time.time() > txn.deadline + 1.5, 5, what="the deadline")
                    scp.refuse_instances.clear()
                wait_until(lambda: finished.ids, 10, what="committed when asked again")
            finally:
                keeper.stop()
        assert q.stats()["pacs"].pending == 0 and len(scp.stores) == 0
        assert q.commitment_counts()["pacs"].committed == 1
        assert q.commitment_counts()["pacs"].uncommitted == 0
        assert "no storage commitment report" not in caplog.text
        assert len(scp.actions) == 2
