"""The proof of delivery threads in process (storage commitment's keeper, verification by query)
when a round goes wrong: a round that cannot be asked, or that our own code fails in the middle
of, is closed at once (its instances await proof again, and are asked again after the
destination's rest), and said once, not once a round."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from commitment_peer import CommitmentSCP
from conftest import wait_until
from peers import free_port
from pydicom.dataset import Dataset
from test_commitment_keeper import CT, STUDY, _Finished

from forwarder.config import Destination
from forwarder.daemon import proof_thread
from forwarder.daemon.commitment import CommitmentKeeper, ProofTarget
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.spool import Spool
from forwarder.daemon.verify_query import QueryTarget, QueryVerifier
from forwarder.net import commitment_scu, query_scu
from forwarder.net.association import AssociationSettings
from forwarder.queue import FileEntry, Queue

SOP = "1.2.826.0.1.3680043.10.1284.59.1"
PROOFS = ["storage_commitment", "verify_by_query"]


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue


def _stored(q: Queue) -> list[int]:
    """One instance stored at "pacs", awaiting its proof; its job ids."""
    entry = FileEntry("/in/0", "0", 1, 1, CT, SOP, "1.2.840.10008.1.2.1", STUDY)
    q.enqueue_many([(entry, ["pacs"])])
    jobs = q.claim("pacs", 10)
    q.ack_done([j.id for j in jobs], commitment=True)
    return [j.id for j in jobs]


def _prover(proof: str, q: Queue, port: int, finished: _Finished, **kwargs: Any) -> Any:
    """The keeper or the verifier, proving "pacs" at ``port`` at once (no settle, no after);
    ``kwargs``: the constructor's others (``unreachable``...)."""
    policy = {"settle": 0} if proof == "storage_commitment" else {"after": 0}
    dest = Destination.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, proof: policy}
    )
    settings = AssociationSettings(calling_ae_title="FWD", connect_timeout=2.0)
    prover: Any
    if proof == "storage_commitment":
        prover = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: None, **kwargs)
        prover.configure([ProofTarget(dest, settings)])
    else:
        prover = QueryVerifier(q, cast(Any, finished), wake_workers=lambda: None, **kwargs)
        prover.configure([QueryTarget(dest, settings)])
    return prover


def _lines(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if words in r.getMessage()]


@pytest.mark.parametrize("proof", PROOFS)
def test_an_internal_error_in_a_round_closes_it_says_it_once_and_asks_again(
    proof: str, q: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug of ours in the middle of a round (the association open: one of our functions made
    to raise): the round recorded in the queue is closed at once, not left open with its
    instances (a query round until a restart; a commitment transaction until its timeout, then
    sent again as not committed); the error is said once, with its traceback, naming the
    destination, which rests as after a peer that could not be asked; then it is asked again
    and the instance proven."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.5)
    module: Any = commitment_scu if proof == "storage_commitment" else query_scu
    real_ask = module._ask
    broken = threading.Event()
    broken.set()

    def ask(*args: Any, **kwargs: Any) -> Any:
        if broken.is_set():
            raise RuntimeError("a bug")
        return real_ask(*args, **kwargs)

    monkeypatch.setattr(module, "_ask", ask)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    job_ids = _stored(q)
    finished = _Finished()
    with CommitmentSCP() as scp:
        scp.held[SOP] = Dataset()
        prover = _prover(proof, q, scp.port, finished)
        prover.start()
        try:
            wait_until(lambda: _lines(caplog, "internal error"), 10, what="the error")
            assert q.open_commitments() == []
            assert [i.job_id for i in q.awaiting_commitment("pacs")] == job_ids
            broken.clear()
            wait_until(lambda: finished.ids, 10, what="the instance proven")
        finally:
            prover.stop()
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage().startswith("pacs: ") and "internal error" in error.getMessage()
    assert error.exc_info is not None and "a bug" in caplog.text
    assert _lines(caplog, "works again")
    assert q.open_commitments() == [] and q.commitment_counts()["pacs"].committed == 1


@pytest.mark.parametrize("proof", PROOFS)
def test_a_peer_that_cannot_be_asked_is_said_once_until_it_can(
    proof: str, q: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Round after round against a peer that is down, the same reason: one warning (as C-STORE
    says DOWN once), the other rounds only at debug level; once the peer can be asked again,
    one line says so."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    _stored(q)
    port = free_port()
    finished = _Finished()
    prover = _prover(proof, q, port, finished)
    prover.start()
    try:
        wait_until(lambda: len(_lines(caplog, "Connection refused")) >= 2, 15, what="2 rounds")
        with CommitmentSCP(port=port) as scp:
            scp.held[SOP] = Dataset()
            wait_until(lambda: finished.ids, 10, what="the instance proven")
    finally:
        prover.stop()
    refused = _lines(caplog, "Connection refused")
    assert [r.levelno for r in refused][:2] == [logging.WARNING, logging.DEBUG]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == refused[:1]
    (again,) = _lines(caplog, "works again")
    assert again.levelno == logging.INFO and again.getMessage().startswith("pacs: ")


@pytest.mark.parametrize("proof", PROOFS)
def test_a_destination_c_store_finds_down_waits_unsaid_and_is_asked_at_once_when_up(
    proof: str, q: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A round the peer refuses (not listening) rests the destination 30 s, as before. Then
    C-STORE finds it down: tick after tick, no round is tried and nothing more is said. The
    peer comes back and C-STORE's probe finds it up: the instance is asked and proven at the
    next tick, not when the 30 s rest ends (the rest was for a peer C-STORE now knows is up)."""
    monkeypatch.setattr(proof_thread, "_TICK", 0.1)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    _stored(q)
    port = free_port()
    finished = _Finished()
    down = threading.Event()
    looked: list[str] = []

    def unreachable(name: str) -> bool:
        looked.append(name)
        return down.is_set()

    prover = _prover(proof, q, port, finished, unreachable=unreachable)
    prover.start()
    try:
        wait_until(lambda: _lines(caplog, "Connection refused"), 10, what="a round refused")
        down.set()  # C-STORE finds it down
        seen = len(looked)
        wait_until(lambda: len(looked) >= seen + 10, 10, what="ten ticks while down")
        said = len(caplog.records)
        with CommitmentSCP(port=port) as scp:
            scp.held[SOP] = Dataset()
            down.clear()  # C-STORE's probe finds it up
            wait_until(lambda: finished.ids, 5, what="the instance proven at once")
    finally:
        prover.stop()
    assert looked and set(looked) == {"pacs"}
    (refused,) = _lines(caplog, "Connection refused")  # one round while up, none while down
    assert refused.levelno == logging.WARNING
    # Until the peer came back, the proof thread said that, and nothing else.
    assert [r for r in caplog.records[:said] if r.name.startswith("forwarder.daemon")] == [refused]
    assert _lines(caplog, "works again")


@pytest.mark.parametrize("reload", ["removed_and_added_back", "changed"])
@pytest.mark.parametrize("proof", PROOFS)
def test_a_failure_is_said_again_after_a_reload_that_removed_or_changed_the_destination(
    proof: str,
    reload: str,
    q: Queue,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The failure said once is said once per configuration of the destination: one removed
    by a reload and added back later, or changed by a reload (the operator's fix, a new
    certificate, that did not help), says its failure again at WARNING, not only at debug
    level as if the operator had seen it for this configuration."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    _stored(q)
    port = free_port()
    prover = _prover(proof, q, port, _Finished())
    (target,) = prover._targets.values()
    prover.start()
    try:
        wait_until(lambda: len(_lines(caplog, "Connection refused")) >= 2, 15, what="2 rounds")
        said = len(_lines(caplog, "Connection refused"))
        if reload == "removed_and_added_back":
            prover.configure([])
            prover.configure([target])
        else:
            settings = dataclasses.replace(target.settings, connect_timeout=3.0)
            prover.configure([type(target)(target.destination, settings)])
        # Two rounds more: at least one begun after the reload (one under way may end after it).
        wait_until(
            lambda: len(_lines(caplog, "Connection refused")) > said + 1, 15, what="2 rounds after"
        )
    finally:
        prover.stop()
    levels = [r.levelno for r in _lines(caplog, "Connection refused")]
    assert levels[:2] == [logging.WARNING, logging.DEBUG]
    assert logging.WARNING in levels[said:], levels


def test_a_refused_transaction_holds_up_no_other_study(
    q: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS answers the N-ACTION for one study with a failure status (0x0110), every time
    (a SOP Class it does not commit, say). The destination's other study, stored after it, is
    asked at the next round and committed (it used to wait behind the refused one for ever);
    the refused one is asked again later, still awaiting (nothing resent for a refusal),
    said once."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    monkeypatch.setattr(proof_thread, "_TICK", 0.1)
    caplog.set_level(logging.DEBUG, logger="forwarder")
    refused_sop, other_sop = f"{SOP}.1", f"{SOP}.2"
    for n, sop in enumerate((refused_sop, other_sop)):
        study = f"{STUDY}.{n}"
        entry = FileEntry(f"/in/{n}", f"{n}", 1, 1, CT, sop, "1.2.840.10008.1.2.1", study)
        q.enqueue_many([(entry, ["pacs"])])
        (job,) = q.claim("pacs", 10)
        q.ack_done([job.id], commitment=True)
    finished = _Finished()
    said = "answered the N-ACTION with status 0x0110; asking again"

    def asked() -> list[set[str]]:
        return [
            {str(r.ReferencedSOPInstanceUID) for r in a.ReferencedSOPSequence} for a in scp.actions
        ]

    with CommitmentSCP(refuse_instances={refused_sop}) as scp:
        scp.held[refused_sop] = scp.held[other_sop] = Dataset()
        keeper = _prover("storage_commitment", q, scp.port, finished)
        keeper.start()
        try:
            wait_until(lambda: finished.ids, 10, what="the other study committed")
            wait_until(lambda: len(_lines(caplog, said)) >= 3, 10, what="refused 3 times")
        finally:
            keeper.stop()
    assert asked().count({other_sop}) == 1
    (awaiting,) = q.awaiting_commitment("pacs")
    assert awaiting.sop_instance_uid == refused_sop and q.stats()["pacs"].pending == 0
    assert asked().count({refused_sop}) >= 3
    refusals = _lines(caplog, said)
    levels = [r.levelno for r in refusals]
    # said once, and once more after the other study's "works again"; then at debug level
    assert levels[0] == logging.WARNING and levels[-1] == logging.DEBUG, levels
    assert levels.count(logging.WARNING) <= 2, levels


@pytest.mark.parametrize("departure", ["reload_removes_commitment", "proof_dropped_in_queue"])
def test_a_refused_study_that_leaves_otherwise_leaves_no_refusal_count_behind(
    departure: str, q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper counts the N-ACTIONs the PACS refused per instance. An instance that leaves
    the keeper otherwise than by a request accepted or a give-up (a reload that removes
    ``storage_commitment`` from the destination, or its proof dropped in the queue: the
    instance no longer awaits) leaves no count behind: the counts used to stay for the life
    of the process, one per instance ever refused."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    monkeypatch.setattr(proof_thread, "_TICK", 0.1)
    _stored(q)
    with CommitmentSCP(refuse_instances={SOP}) as scp:
        keeper = _prover("storage_commitment", q, scp.port, _Finished())
        keeper.start()
        try:
            wait_until(lambda: keeper._refused, 10, what="a refusal counted")
            if departure == "reload_removes_commitment":
                keeper.configure([])
            q.drop_proof("pacs")  # what the service does on such a reload, too
            wait_until(lambda: not keeper._refused, 5, what="the refusal counts let go")
        finally:
            keeper.stop()
    assert q.awaiting_commitment("pacs") == []


def test_an_n_action_accepted_with_a_warning_is_not_asked_again(
    q: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """The PACS answers the N-ACTION with a Warning status (0xB000): it accepted the request.
    The keeper awaits the report and records it (the instance committed), and does not cancel
    the transaction and ask again as after a refusal; one WARNING line names the peer, the
    transaction and the status."""
    caplog.set_level(logging.DEBUG, logger="forwarder")
    _stored(q)
    finished = _Finished()
    with CommitmentSCP(action_status=0xB000) as scp:
        scp.held[SOP] = Dataset()
        keeper = _prover("storage_commitment", q, scp.port, finished)
        keeper.start()
        try:
            wait_until(lambda: finished.ids, 10, what="the instance committed")
        finally:
            keeper.stop()
    assert len(scp.actions) == 1
    assert q.commitment_counts()["pacs"].committed == 1 and q.open_commitments() == []
    (warned,) = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("forwarder")
    ]
    text = warned.getMessage()
    assert "0xB000" in text and str(scp.actions[0].TransactionUID) in text
    assert f"PACS@127.0.0.1:{scp.port}" in text


def _keeper_with_folders(
    q: Queue, tmp_path: Path, port: int
) -> tuple[CommitmentKeeper, Finisher, Spool]:
    """The keeper for "pacs" at ``port`` (no settle, one resend), finishing into real folders."""
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    for folder in (spool.incoming, spool.done, spool.failed):
        folder.mkdir(exist_ok=True)
    finisher = Finisher(q, spool, lambda _paths: None)
    dest = Destination.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
         "storage_commitment": {"settle": 0, "max_resends": 1}}
    )  # fmt: skip
    keeper = CommitmentKeeper(q, finisher, wake_workers=lambda: None)
    keeper.configure([ProofTarget(dest, AssociationSettings(calling_ae_title="FWD"))])
    return keeper, finisher, spool


def _dropped(q: Queue, spool: Spool, n: int) -> str:
    """File ``n`` (a study of its own) in incoming, queued for "pacs"; its SOP Instance UID."""
    sop, name = f"{SOP}.{n}", f"{n}.dcm"
    path = spool.incoming / name
    path.write_bytes(b"file %d" % n)
    st = path.stat()
    entry = FileEntry(
        str(path), name, st.st_size, st.st_mtime_ns, CT, sop, "1.2.840.10008.1.2.1", f"{STUDY}.{n}"
    )
    q.enqueue_many([(entry, ["pacs"])])
    return sop


def _store_ready(q: Queue) -> None:
    """What a worker does with what is queued (or sent again): stored, awaiting commitment."""
    jobs = q.claim("pacs", 100)
    if jobs:
        q.ack_done([j.id for j in jobs], commitment=True)


def _asked(scp: CommitmentSCP) -> list[set[str]]:
    return [{str(r.ReferencedSOPInstanceUID) for r in a.ReferencedSOPSequence} for a in scp.actions]


def test_a_study_the_pacs_refuses_for_good_while_it_accepts_others_ends_in_failed(
    q: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS answers every N-ACTION for one study with a failure status (0x0110: a SOP
    Class it does not commit, say) and accepts the others, which keep coming. The refused
    study does not await commitment for ever: once refused UNDECIDED_LIMIT times with another
    request accepted in between each time, it counts as not committed, is sent again
    (max_resends: 1), refused as often again, then goes to failed/, its reason naming the
    destination and the status. The other studies are committed (done/)."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.2)
    monkeypatch.setattr(proof_thread, "_TICK", 0.1)
    with CommitmentSCP() as scp:
        keeper, finisher, spool = _keeper_with_folders(q, tmp_path, scp.port)
        refused = _dropped(q, spool, 0)
        scp.refuse_instances.add(refused)
        n = 0

        def step() -> bool:
            nonlocal n
            # Another study as soon as none awaits: a PACS site's steady traffic.
            if not any(i.sop_instance_uid != refused for i in q.awaiting_commitment("pacs")):
                n += 1
                scp.held[_dropped(q, spool, n)] = Dataset()
            _store_ready(q)
            return (spool.failed / "0.dcm").exists()

        finisher.start()
        keeper.start()
        try:
            wait_until(step, 60, what="the refused study in failed/")
        finally:
            keeper.stop()
            finisher.stop()
    error = json.loads((spool.failed / "0.dcm.error.json").read_text())
    text = json.dumps(error)
    assert "pacs" in text and "0x0110" in text and "refused" in text, text
    # Refused once uncounted, then UNDECIDED_LIMIT times counted; twice (sent once again).
    assert _asked(scp).count({refused}) == 2 * (proof_thread.UNDECIDED_LIMIT + 1)
    others = [f"{SOP}.{i}" for i in range(1, n + 1)]
    assert all(_asked(scp).count({sop}) <= 1 for sop in others)
    assert sorted(p.name for p in spool.failed.iterdir()) == ["0.dcm", "0.dcm.error.json"]
    assert len(list(spool.done.iterdir())) >= proof_thread.UNDECIDED_LIMIT
    assert q.commitment_counts()["pacs"].committed == len(list(spool.done.iterdir()))


@pytest.mark.parametrize("status", [0x0213, 0xA700], ids=["0x0213", "0xA700"])
def test_a_study_the_pacs_refuses_for_lack_of_resources_is_never_given_up(
    status: int, q: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS answers the N-ACTIONs for one study with a transient status (0x0213 resource
    limitation, PS3.4/PS3.3 C.14.1.1: it "does not currently have enough resources"; or 0xA7xx
    out of resources) far more often than the UNDECIDED_LIMIT counted refusals that give a
    study up, while it accepts the others, which keep coming. Those refusals are retried, not
    counted: the study is never sent again nor failed (it used to go to failed/ as a study
    refused for good), and is committed once the PACS accepts it."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.1)
    monkeypatch.setattr(proof_thread, "_TICK", 0.05)
    with CommitmentSCP(refuse_status=status) as scp:
        keeper, finisher, spool = _keeper_with_folders(q, tmp_path, scp.port)
        refused = _dropped(q, spool, 0)
        scp.held[refused] = Dataset()
        scp.refuse_instances.add(refused)
        n = 0

        def step(until: Any) -> bool:
            nonlocal n
            # Another study as soon as none awaits: a PACS site's steady traffic.
            if not any(i.sop_instance_uid != refused for i in q.awaiting_commitment("pacs")):
                n += 1
                scp.held[_dropped(q, spool, n)] = Dataset()
            _store_ready(q)
            return until() or (spool.failed / "0.dcm").exists()

        finisher.start()
        keeper.start()
        try:
            # More refusals than the give-up and the resend after it took (0x0110's test).
            limit = 2 * (proof_thread.UNDECIDED_LIMIT + 1) + 2
            wait_until(
                lambda: step(lambda: _asked(scp).count({refused}) > limit),
                60,
                what=f"the study refused more than {limit} times",
            )
            assert list(spool.failed.iterdir()) == []
            assert (spool.incoming / "0.dcm").exists()
            scp.refuse_instances.clear()
            wait_until(lambda: step(lambda: (spool.done / "0.dcm").exists()), 20, what="committed")
        finally:
            keeper.stop()
            finisher.stop()
    assert list(spool.failed.iterdir()) == []
    # Never sent again: no outcome "not committed" was recorded for it, nor for any other.
    assert q.commitment_counts()["pacs"].uncommitted == 0
    assert keeper._refused == {}


@pytest.mark.parametrize("status", [0x0213, 0x0110])
def test_a_pacs_refusing_every_n_action_for_long_resends_and_fails_nothing(
    status: int, q: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS refuses every N-ACTION (0x0213 resource limitation, 0x0110 processing
    failure: its commitment service down) far longer than UNDECIDED_LIMIT rounds: that is the
    PACS's, not the studies': nothing is sent again, nothing goes to failed/, the studies
    await, as for a PACS that cannot be reached; once it accepts, all are committed."""
    monkeypatch.setattr(proof_thread, "_RETRY", 0.1)
    monkeypatch.setattr(proof_thread, "_TICK", 0.05)
    with CommitmentSCP(action_status=status) as scp:
        keeper, finisher, spool = _keeper_with_folders(q, tmp_path, scp.port)
        for n in range(3):
            scp.held[_dropped(q, spool, n)] = Dataset()
        _store_ready(q)
        finisher.start()
        keeper.start()
        try:
            limit = proof_thread.UNDECIDED_LIMIT
            wait_until(
                lambda: all(_asked(scp).count({f"{SOP}.{n}"}) > 2 * limit for n in range(3)),
                60,
                what="every study refused more than twice the limit",
            )
            assert q.stats()["pacs"].pending == 0 and q.claim("pacs", 10) == []
            assert len(q.awaiting_commitment("pacs")) + len(q.open_commitments()) == 3
            assert list(spool.failed.iterdir()) == []
            scp.action_status = 0x0000
            wait_until(lambda: len(list(spool.done.iterdir())) == 3, 20, what="all committed")
        finally:
            keeper.stop()
            finisher.stop()
    assert list(spool.failed.iterdir()) == []
    assert q.commitment_counts()["pacs"].committed == 3
