"""Workers: backoff bounds, and DestinationWorkers against real pynetdicom SCPs on loopback
with a real queue, spool and finisher (statuses, retries, give-up rules, a destination down)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_until
from dicomgen import make_dataset, write_file
from hostile import Behaviour, HostilePeer
from peers import Received, ScriptedSCP, free_port, storescp
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from forwarder.config import Destination, RetryPolicy
from forwarder.daemon.destination_state import DOWN_AFTER
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.ingest import Ingest
from forwarder.daemon.outcomes import LastOutcome, backoff
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool
from forwarder.daemon.watch_settle import ReadyFile
from forwarder.daemon.worker import TRICKLE_GATHER, TRICKLE_MAX, DestinationWorkers
from forwarder.dicom.part10 import read_meta
from forwarder.net.association import AssociationSettings
from forwarder.net.channel import Channel, StoreRequest
from forwarder.net.interrupt import StopEvent
from forwarder.queue import FileEntry, JobStatus, Queue

FAST = RetryPolicy(initial_delay=0.1, max_delay=0.4)

# -- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "maximum"), [(5.0, 600.0), (0.2, 1.0), (1.0, 1.0), (0.25, 7200.0)]
)
def test_backoff_is_exponential_capped_and_jittered_within_bounds(
    initial: float, maximum: float
) -> None:
    policy = RetryPolicy(initial_delay=initial, max_delay=maximum)
    for attempts in range(0, 40):
        base = min(maximum, initial * 2.0 ** max(attempts - 1, 0))
        samples = [backoff(policy, attempts) for _ in range(300)]
        assert all(base * 0.5 <= s <= base for s in samples), (attempts, min(samples))
        assert max(samples) <= maximum
        # real jitter: spread over the window, not one value
        assert max(samples) - min(samples) > base * 0.3
        assert base * 0.65 < statistics.mean(samples) < base * 0.85


def test_backoff_grows_until_the_cap() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=60.0)
    upper = [min(60.0, 1.0 * 2.0 ** (n - 1)) for n in range(1, 10)]
    assert upper == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for n, cap in enumerate(upper, start=1):
        assert cap / 2 <= backoff(policy, n) <= cap


def test_backoff_of_a_huge_attempt_count_does_not_overflow() -> None:
    policy = RetryPolicy(initial_delay=5.0, max_delay=600.0)
    assert 300.0 <= backoff(policy, 5000) <= 600.0


# -- DestinationWorkers against real peers ----------------------------------------------------


class Rig:
    """Spool + queue + finisher + one DestinationWorkers per destination, all real."""

    def __init__(self, root: Path, queue: Queue) -> None:
        self.root = root
        self.queue = queue
        self.spool = Spool(root / "incoming", root / "done", root / "failed")
        self.finished: list[str] = []
        self.outcomes: list[LastOutcome] = []
        self._lock = threading.Lock()
        self.finisher = Finisher(queue, self.spool, self._on_finished)
        self.workers: dict[str, DestinationWorkers] = {}
        self.names: list[str] = []

    def _on_finished(self, paths: object) -> None:
        with self._lock:
            self.finished.extend(paths)  # type: ignore[arg-type]

    def add_destination(
        self, name: str, port: int, *, retry: RetryPolicy = FAST, **fields: object
    ) -> DestinationWorkers:
        values: dict[str, object] = {
            "name": name,
            "ae_title": "SCP",
            "host": "127.0.0.1",
            "port": port,
            "connect_timeout": 2.0,
            "response_timeout": 5.0,
            "idle_timeout": 2.0,
        }
        values.update(fields)
        dest = Destination.model_validate(values)
        settings = AssociationSettings(
            calling_ae_title="FORWARDER",
            connect_timeout=dest.connect_timeout,
            response_timeout=dest.response_timeout,
            release_timeout=2.0,
        )
        workers = DestinationWorkers(
            dest,
            calling_ae_title="FORWARDER",
            retry=retry,
            queue=self.queue,
            finisher=self.finisher,
            settings=settings,
            on_outcome=self.outcomes.append,
        )
        self.workers[name] = workers
        self.names.append(name)
        return workers

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop(10.0)

    def enqueue(self, count: int, *, prefix: str = "f", to: list[str] | None = None) -> set[str]:
        """Write ``count`` files to incoming and queue them for ``to`` (default: all)."""
        ingest = Ingest(self.spool, self.queue, Router(None, to or self.names))
        batch = []
        uids = set()
        for i in range(count):
            path = self.spool.incoming / f"{prefix}{i:03d}.dcm"
            ds = write_file(path, rows=16, columns=16, seed=i)
            uids.add(str(ds.SOPInstanceUID))
            st = path.stat()
            batch.append(ReadyFile(path, path.name, st.st_size, st.st_mtime_ns))
        ingest(batch)
        for w in self.workers.values():
            w.wake()
        return uids

    def done(self) -> list[str]:
        return sorted(p.name for p in self.spool.done.iterdir())

    def failed(self) -> list[str]:
        return sorted(p.name for p in self.spool.failed.iterdir() if p.suffix == ".dcm")

    def error(self, name: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.spool.failed / f"{name}.error.json").read_text())
        return doc


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        r = Rig(tmp_path, queue)
        try:
            yield r
        finally:
            r.stop()


def test_files_are_stored_acked_and_moved_to_done(rig: Rig) -> None:
    with ScriptedSCP() as scp:
        rig.add_destination("a", scp.port, associations=2)
        rig.start()
        uids = rig.enqueue(12)
        wait_until(lambda: len(rig.done()) == 12, 20, what="12 files in done/")
        assert scp.uids() == uids
        assert rig.queue.stats()["a"].done == 12
        assert {o.outcome for o in rig.outcomes} == {"stored"}
        assert rig.workers["a"].healthy()
        assert {r.calling_ae for r in scp.received} == {"FORWARDER"}


def test_a_worker_survives_an_exception_of_its_own_and_acks_what_it_claimed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the worker's own bookkeeping (here: the outcome callback raising) must not kill
    the thread: its claimed jobs would stay CLAIMED until a restart. The stored file is acked
    DONE, the others are sent, the thread stays healthy, the traceback is logged."""
    calls = 0

    def crash_once(last: LastOutcome) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: outcome callback failed")

    with ScriptedSCP() as scp:
        workers = rig.add_destination("a", scp.port, associations=1)
        workers.on_outcome = crash_once
        rig.start()
        uids = rig.enqueue(5)
        wait_until(lambda: len(rig.done()) == 5, 20, what="5 files in done/")
        assert uids <= scp.uids()
        assert rig.queue.counts()["CLAIMED"] == 0
        assert workers.healthy(), workers.problems()
        assert any(
            "internal error" in r.getMessage()
            and r.exc_info is not None
            and "injected: outcome callback failed" in str(r.exc_info[1])
            for r in caplog.records
        )


def test_warning_counts_as_stored(rig: Rig) -> None:
    with ScriptedSCP(status=0xB000) as scp:
        rig.add_destination("a", scp.port)
        rig.start()
        uids = rig.enqueue(3)
        wait_until(lambda: len(rig.done()) == 3, 20, what="3 files in done/")
        assert scp.uids() == uids
        assert rig.failed() == []
        assert {o.outcome for o in rig.outcomes} == {"warning"}


def test_a_transient_status_is_retried_until_stored(rig: Rig) -> None:
    answers: dict[str, int] = {}

    def status(rec: Received) -> int:
        n = answers.get(rec.sop_instance_uid, 0)
        answers[rec.sop_instance_uid] = n + 1
        return 0xA700 if n < 2 else 0x0000  # out of resources twice, then fine

    with ScriptedSCP(status=status) as scp:
        rig.add_destination("a", scp.port)
        rig.start()
        uids = rig.enqueue(3)
        wait_until(lambda: len(rig.done()) == 3, 20, what="3 files in done/ after retries")
        assert scp.uids() == uids
        assert all(n == 3 for n in answers.values()), answers
        stats = rig.queue.stats()["a"]
        assert (stats.done, stats.failed) == (3, 0)


def test_a_permanent_status_fails_at_once_with_the_status(rig: Rig) -> None:
    calls: list[str] = []

    def status(rec: Received) -> int:
        calls.append(rec.sop_instance_uid)
        return 0xC123

    with ScriptedSCP(status=status) as scp:
        rig.add_destination("a", scp.port)
        rig.start()
        rig.enqueue(2)
        wait_until(lambda: len(rig.failed()) == 2, 20, what="2 files in failed/")
        assert len(calls) == 2  # one attempt each, no retry
        doc = rig.error("f000.dcm")
        (result,) = doc["destinations"]  # type: ignore[misc]
        assert result["destination"] == "a"
        assert result["outcome"] == "failed"
        assert result["status"] == "0xC123"
        assert result["attempts"] == 1
        assert "0xC123" in str(doc["reason"]) or "C123" in str(result["error"])


def test_max_attempts_gives_up(rig: Rig) -> None:
    with ScriptedSCP(status=0xA700) as scp:
        rig.add_destination(
            "a", scp.port, retry=RetryPolicy(initial_delay=0.05, max_delay=0.1, max_attempts=3)
        )
        rig.start()
        rig.enqueue(1)
        wait_until(lambda: rig.failed() == ["f000.dcm"], 20, what="the file in failed/")
        (result,) = rig.error("f000.dcm")["destinations"]  # type: ignore[misc]
        assert result["attempts"] == 3
        assert result["status"] == "0xA700"
        assert "gave up after 3 attempts" in result["error"]


def test_give_up_after_sends_the_file_to_failed(rig: Rig) -> None:
    with ScriptedSCP(status=0xA702) as scp:
        rig.add_destination(
            "a", scp.port, retry=RetryPolicy(initial_delay=0.1, max_delay=0.2, give_up_after=2.5)
        )
        rig.start()
        # Queued without waking the senders: the first attempt may come at their next look,
        # up to a second later (give_up_after counts from the enqueue).
        rig.enqueue(1)
        wait_until(lambda: rig.failed() == ["f000.dcm"], 20, what="the file in failed/")
        (result,) = rig.error("f000.dcm")["destinations"]  # type: ignore[misc]
        assert "gave up after" in result["error"] and result["attempts"] >= 2


def test_giving_up_is_logged_as_a_failure_not_a_retry(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The attempt the policy gives up after says so, instead of "will retry"."""
    with ScriptedSCP(status=0xA702) as scp:
        rig.add_destination("a", scp.port, retry=RetryPolicy(max_attempts=1))
        rig.start()
        with caplog.at_level(logging.INFO, logger="forwarder"):
            rig.enqueue(1)
            wait_until(lambda: rig.failed() == ["f000.dcm"], 20, what="the file in failed/")
        sent = [r.getMessage() for r in caplog.records if r.name == "forwarder.daemon.outcomes"]
        assert len(sent) == 1 and "will retry" not in sent[0], sent
        assert "f000.dcm -> a: failed" in sent[0] and "gave up after 1 attempts" in sent[0]
        assert "status 0xA702" in sent[0]


def test_a_destination_that_is_down_receives_everything_once_it_comes_up(rig: Rig) -> None:
    port = free_port()
    rig.add_destination("a", port)
    rig.start()
    uids = rig.enqueue(5)
    wait_until(
        lambda: rig.queue.stats()["a"].last_error is not None, 15, what="a failed association"
    )
    assert rig.done() == []
    with ScriptedSCP(port=port) as scp:
        wait_until(lambda: len(rig.done()) == 5, 30, what="5 files in done/ once up")
        assert scp.uids() == uids
    assert rig.failed() == []


def test_a_destination_that_is_down_does_not_slow_another(rig: Rig) -> None:
    down_port = free_port()
    with ScriptedSCP() as up:
        rig.add_destination("down", down_port, associations=2)
        rig.add_destination("up", up.port)
        rig.start()
        uids = rig.enqueue(30)
        # everything reaches the healthy peer while the other stays down
        wait_until(lambda: up.uids() == uids, 30, what="all files at the healthy peer")
        wait_until(lambda: rig.queue.stats()["up"].done == 30, 10, what="the acks")
        stats = rig.queue.stats()
        assert stats["down"].done == 0 and stats["down"].pending + stats["down"].in_flight == 30
        assert rig.done() == []  # not done until every destination has them
        with ScriptedSCP(port=down_port) as late:
            wait_until(lambda: len(rig.done()) == 30, 30, what="30 files in done/")
            assert late.uids() == uids


def test_a_stalled_peer_is_dropped_and_the_file_retried(rig: Rig) -> None:
    scp = ScriptedSCP(delay=2.0)
    with scp:
        rig.add_destination("a", scp.port, response_timeout=0.5)
        rig.start()
        uids = rig.enqueue(1)
        wait_until(lambda: (rig.queue.stats()["a"].last_error or "") != "", 15, what="a timeout")
        scp.delay = 0.0
        wait_until(lambda: len(rig.done()) == 1, 30, what="the file in done/ after the stall")
        assert uids <= scp.uids()


def test_stop_puts_claimed_unsent_jobs_back(rig: Rig) -> None:
    with ScriptedSCP(delay=0.3) as scp:
        workers = rig.add_destination("a", scp.port)
        rig.start()
        rig.enqueue(20)
        wait_until(lambda: len(scp.received) >= 1, 15, what="the first store")
        workers.stop(10.0)
        counts = rig.queue.counts()
        assert counts[JobStatus.CLAIMED] == 0
        assert counts[JobStatus.READY] + counts[JobStatus.DONE] == 20
        assert counts[JobStatus.READY] > 0
        assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("send-a"))


# -- attempts: per file tried; statuses; peers that break the protocol ------------------------


def _attempts(queue: Queue) -> list[tuple[str, int]]:
    with sqlite3.connect(queue.path) as conn:
        rows = conn.execute("SELECT status, attempts FROM jobs ORDER BY id").fetchall()
    return [(str(s), int(a)) for s, a in rows]


@pytest.mark.parametrize("status", [0x0213, 0x0999, 0xA702], ids=lambda v: f"0x{v:04X}")
def test_resource_and_unknown_statuses_are_retried_with_backoff(rig: Rig, status: int) -> None:
    """0x0213 (resource limitation) and statuses outside PS3.4's categories used to be
    permanent: the file went to failed/ at the first answer."""
    answers: dict[str, int] = {}

    def script(rec: Received) -> int:
        n = answers.get(rec.sop_instance_uid, 0)
        answers[rec.sop_instance_uid] = n + 1
        return status if n < 2 else 0x0000

    with ScriptedSCP(status=script) as scp:
        rig.add_destination("a", scp.port)
        rig.start()
        uids = rig.enqueue(2)
        wait_until(lambda: len(rig.done()) == 2, 20, what="2 files in done/ after retries")
        assert scp.uids() == uids
        assert rig.failed() == []
        assert all(n == 3 for n in answers.values()), answers


def test_a_failed_connect_charges_only_the_file_tried(rig: Rig) -> None:
    """One refused connection used to charge an attempt to every job of the 64-job batch, so
    max_attempts gave up on files never tried."""
    retry = RetryPolicy(initial_delay=2.0, max_delay=2.0, max_attempts=2)
    workers = rig.add_destination("a", free_port(), retry=retry)
    rig.enqueue(10)
    rig.start()
    wait_until(
        lambda: sum(a for _, a in _attempts(rig.queue)) >= 1, 20, what="a first connect failure"
    )
    rows = _attempts(rig.queue)
    assert sorted(a for _, a in rows) == [0] * 9 + [1], rows
    assert {s for s, _ in rows} == {"READY"}, rows
    assert workers.state[0] == "down" and workers.state[1] and "refused" in workers.state[1]
    assert rig.queue.destination_states()["a"].state == "down"


def test_a_permanent_rejection_holds_the_destination_and_charges_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that no longer knows our AE title: no file is at fault. They used to go to
    failed/ at the first rejection, every one of them."""
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.3, max_attempts=1)
    with HostilePeer(Behaviour.REJECT) as peer:
        workers = rig.add_destination("a", peer.port, retry=retry)
        rig.enqueue(4)
        rig.start()
        wait_until(lambda: peer.connections >= 4, 20, what="4 rejected associations (held)")
        assert rig.failed() == []
        rows = _attempts(rig.queue)
        assert rows == [("READY", 0)] * 4, rows
        state, error, _ = workers.state
        assert state == "down" and error is not None
        assert "rejected-permanent" in error and "held" in error
        downs = [r for r in caplog.records if "DOWN" in r.getMessage()]
        assert len(downs) == 1, [r.getMessage() for r in downs]  # once per change
        assert downs[0].levelname == "ERROR"
    assert workers.healthy(), workers.problems()


@pytest.mark.parametrize("behaviour", [Behaviour.EMPTY_STATUS, Behaviour.PENDING])
def test_a_response_that_breaks_ps37_costs_an_attempt_and_the_worker_goes_on(
    rig: Rig, behaviour: Behaviour
) -> None:
    """A zero-length Status used to raise out of the engine and kill the worker thread; its
    claimed jobs stayed CLAIMED and the file was resent forever after each restart."""
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.2, max_attempts=2)
    with HostilePeer(behaviour) as peer:
        workers = rig.add_destination("a", peer.port, retry=retry)
        rig.enqueue(2)
        rig.start()
        wait_until(lambda: len(rig.failed()) == 2, 20, what="2 files given up in failed/")
        for name in rig.failed():
            error = str(rig.error(name))
            assert "gave up after 2 attempts" in error, error
        assert rig.queue.counts()["CLAIMED"] == 0
        assert workers.healthy(), workers.problems()


@pytest.mark.parametrize("behaviour", [Behaviour.SHORT_RJ, Behaviour.BAD_AC])
def test_an_association_that_breaks_ps37_opens_the_breaker_and_the_worker_goes_on(
    rig: Rig, behaviour: Behaviour
) -> None:
    """A malformed association answer is a connection-level failure: a few attempts are
    charged, then the breaker opens (issue 16) and the files wait, charged nothing, while
    C-ECHO probes the peer; no job stays CLAIMED, the thread lives."""
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.2, max_attempts=5)
    with HostilePeer(behaviour) as peer:
        workers = rig.add_destination("a", peer.port, retry=retry)
        rig.enqueue(2)
        rig.start()
        wait_until(lambda: peer.connections >= DOWN_AFTER + 2, 20, what="probes after the trip")
        assert workers.state[0] == "down"
        charged = sum(a for _, a in _attempts(rig.queue))
        assert 1 <= charged <= DOWN_AFTER
        wait_until(lambda: peer.connections >= DOWN_AFTER + 4, 20, what="more probes")
        assert sum(a for _, a in _attempts(rig.queue)) == charged
        assert rig.failed() == [] and rig.queue.counts()["CLAIMED"] == 0
        assert workers.healthy(), workers.problems()


def test_the_data_set_s_own_uids_are_sent_not_a_stale_meta_header_s(rig: Rig) -> None:
    """A deflated data set (read_meta cannot see inside it) whose meta header names another
    instance: the peer is told the data set's own SOP Instance UID, which ingest's whole-file
    check found, as dcmsend does."""
    ds = make_dataset(seed=7)
    own = str(ds.SOPInstanceUID)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = rig.spool.incoming / "deflated.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    # pydicom keeps the meta header in step: make it stale by hand (same length; the deflated
    # data set does not contain the UID's bytes, so the first occurrence is the header's).
    stale = own[:-1] + ("1" if own[-1] != "1" else "2")
    path.write_bytes(path.read_bytes().replace(own.encode(), stale.encode(), 1))
    assert read_meta(path).sop_instance_uid == stale  # all the meta header can tell
    with ScriptedSCP() as scp:
        rig.add_destination("a", scp.port)
        st = path.stat()
        Ingest(rig.spool, rig.queue, Router(None, ["a"]))(
            [ReadyFile(path, path.name, st.st_size, st.st_mtime_ns)]
        )
        rig.start()
        wait_until(lambda: len(rig.done()) == 1, 20, what="the deflated file in done/")
        assert scp.uids() == {own}


def test_a_file_unreadable_on_a_spare_channel_whose_last_association_failed_is_charged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Channel.down stays set until an association works. A file that failed before any
    association was tried (unreadable at send time) on a spare channel whose last association
    attempt had failed used to be taken for "this association is not available": handed back
    uncharged, again and again, while the sibling's association was open (and, with none open,
    the destination was marked DOWN with that old error). It is the file's failure: charged,
    and failed/ after max_attempts.

    The raw-socket peer serves one association at a time: the first channel's association is
    open, the spare's attempt times out. Driven batch by batch (the worker's own _process), as
    the worker's threads now ask for a spare association before they claim files."""
    caplog.set_level("INFO", logger="forwarder.daemon")
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.3, max_attempts=3)
    with HostilePeer(Behaviour.NEVER_ANSWER, then=Behaviour.ACCEPT) as peer:
        workers = rig.add_destination(
            "a", peer.port, retry=retry, associations=2, connect_timeout=1.0, response_timeout=10.0
        )
        ds = make_dataset(rows=8, columns=8, seed=5)
        need = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
        first = Channel(workers.peer, workers.settings, name="a#1")
        spare = Channel(workers.peer, workers.settings, name="a#2")
        workers._channels.update({0: first, 1: spare})
        assert first.open(need)  # the peer's one association
        assert not spare.open(need) and spare.down is not None  # busy: not accepted in 1s
        rig.queue.enqueue(_unreadable_entry(rig.spool.incoming / "spare.dcm"), ["a"])
        for attempt in (1, 2, 3):
            jobs = rig.queue.claim("a", 64, now=time.time() + 3600)
            assert len(jobs) == 1, (attempt, jobs)
            workers._process(spare, jobs, 1)
            assert first.is_open  # all while the sibling's association was open
        assert rig.failed() == ["spare.dcm"]
        (result,) = rig.error("spare.dcm")["destinations"]  # type: ignore[misc]
        assert "gave up after 3 attempts" in result["error"], result
        assert "cannot read" in result["error"], result
        first.release()
    assert not [r for r in caplog.records if "DOWN" in r.getMessage()]
    assert workers.state[0] != "down"


def test_a_peer_serving_one_association_costs_no_held_files(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DCMTK storescp without --fork serves one association at a time: a second association's
    A-ASSOCIATE-RQ waits until the first ends. The spare thread asks for its association
    before it claims files, so no batch waits with it (it used to hold 64 files for the whole
    timeout, again and again), and the limit is logged once, with the setting to use (issue
    17, item 4)."""
    stored_at_warning: list[int] = []

    class AtWarning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "associations configured" in record.getMessage():
                stored_at_warning.append(len(scp.files()))

    caplog.set_level("INFO", logger="forwarder.daemon")
    spy = AtWarning()
    logging.getLogger("forwarder.daemon.spares").addHandler(spy)
    try:
        with storescp(tmp_path / "pacs", ae_title="SCP") as scp:
            workers = rig.add_destination(
                "a",
                scp.port,
                associations=2,
                connect_timeout=5.0,  # how long the spare's request waits for its answer
                idle_timeout=30.0,  # the first association stays open throughout
            )
            rig.start()
            uids = rig.enqueue(200)
            wait_until(lambda: len(rig.done()) == 200, 60, what="200 files in done/")
            wait_until(lambda: stored_at_warning, 30, what="the spare's limit warning")
            rig.stop()
    finally:
        logging.getLogger("forwarder.daemon.spares").removeHandler(spy)
    # Every file was stored while the spare's request waited: none was held with it.
    assert stored_at_warning == [200]
    assert {str(dcmread(f).SOPInstanceUID) for f in scp.files()} == uids
    warnings = [
        r.getMessage() for r in caplog.records if "associations configured" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "took only 1 of the 2" in warnings[0] and "Set associations: 1" in warnings[0]
    assert workers.state[0] == "up"
    assert all(attempts <= 1 for _, attempts in _attempts(rig.queue))


def _unreadable_entry(path: Path) -> FileEntry:
    """Queue a real file, then put a directory in its place (EISDIR at read_meta): unreadable
    at send time. No mtime, so the worker's "changed since queued" check leaves it alone."""
    ds = write_file(path, rows=8, columns=8, seed=98)
    entry = FileEntry(
        str(path),
        path.name,
        path.stat().st_size,
        0,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
    )
    path.unlink()
    path.mkdir()
    return entry


def test_an_unreadable_file_on_a_channel_whose_old_association_failed_is_not_the_destination_down(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, with no sibling association open: the file was charged, but the batch ended
    with the channel's old association error still in Channel.down, and the destination that
    had come up since was paused and marked DOWN with that error. Driven batch by batch (the
    worker's own _process on its two channels) so that each channel's history is exact."""
    caplog.set_level("INFO", logger="forwarder.daemon.worker")
    port = free_port()
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.3, max_attempts=2)
    workers = rig.add_destination("a", port, retry=retry, associations=2)
    spare = Channel(workers.peer, workers.settings, name="a#2")
    write_file(rig.root / "early.dcm", rows=8, columns=8, seed=97)
    (refused,) = spare.send([StoreRequest(str(rig.root / "early.dcm"), 1)])
    assert refused.association_failed and spare.down is not None  # the peer was down then
    with ScriptedSCP(port=port) as scp:
        first = Channel(workers.peer, workers.settings, name="a#1")
        workers._channels.update({0: first, 1: spare})
        rig.enqueue(1)
        workers._process(first, rig.queue.claim("a", 64), 0)  # stored: the destination is up
        assert workers.state[0] == "up" and len(scp.received) == 1
        first.release()  # idle, released: no sibling association open
        rig.queue.enqueue(_unreadable_entry(rig.spool.incoming / "gone.dcm"), ["a"])
        for attempt in (1, 2):
            jobs = rig.queue.claim("a", 64, now=time.time() + 3600)
            assert len(jobs) == 1 and jobs[0].path.endswith("gone.dcm"), jobs
            workers._process(spare, jobs, 1)
            assert workers.state[0] == "up", (attempt, workers.state)
            assert workers._dest.down_until == 0.0  # not paused
    assert rig.failed() == ["gone.dcm"]
    (result,) = rig.error("gone.dcm")["destinations"]  # type: ignore[misc]
    assert "gave up after 2 attempts" in result["error"] and "cannot read" in result["error"]
    assert not [r for r in caplog.records if "DOWN" in r.getMessage()]
    assert rig.queue.destination_states()["a"].state == "up"


# -- what the worker sends from the queue ------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as q:
        yield q


def test_a_file_as_queued_is_sent_from_the_recorded_header_else_read_again(
    tmp_path: Path, queue: Queue
) -> None:
    """The meta header comes from the queue only for a file as queued; a changed file waits,
    a gone one is read by the sender (which fails it), and a row of an older version (offset 0)
    is read too. The recorded header is the one read_meta finds."""
    from forwarder.daemon.worker_batch import Found, _as_queued, _queued_meta

    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    ingest = Ingest(spool, queue, Router(None, ["pacs"]))
    path = spool.incoming / "a.dcm"
    write_file(path)
    st = path.stat()
    ingest([ReadyFile(path, "a.dcm", st.st_size, st.st_mtime_ns)])
    (job,) = queue.claim("pacs", 1)
    assert _as_queued(job) is Found.SAME
    meta = _queued_meta(job)
    assert meta is not None
    read = read_meta(path)
    assert (meta.dataset_offset, meta.size, meta.transfer_syntax) == (
        read.dataset_offset,
        read.size,
        read.transfer_syntax,
    )
    assert _queued_meta(replace(job, dataset_offset=0)) is None  # queued by an older version
    assert _queued_meta(replace(job, mtime_ns=0)) is None
    with path.open("ab") as f:
        f.write(b"\0\0")
    assert _as_queued(job) is Found.CHANGED
    path.unlink()
    assert _as_queued(job) is Found.GONE


def test_a_long_list_of_finished_files_is_finished_whole(tmp_path: Path, queue: Queue) -> None:
    """One submitted list may hold every file a commitment settled; the queue's to_finish
    reads 1000 a call, so the finisher takes it in slices (before, the rest waited for the
    sweep)."""
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    entries = []
    for n in range(1200):
        p = spool.incoming / f"f{n}.dcm"
        p.write_bytes(b"x")
        st = p.stat()  # as ingest records it: the finisher moves only the version queued
        entries.append(
            (
                FileEntry(
                    str(p),
                    p.name,
                    st.st_size,
                    st.st_mtime_ns,
                    "1.2.3",
                    f"1.2.3.{n}",
                    "1.2.840.10008.1.2.1",
                ),
                ["pacs"],
            )
        )
    ids = [i for i in queue.enqueue_many(entries) if i is not None]
    jobs = queue.claim("pacs", 2000)
    assert len(ids) == len(jobs) == 1200
    queue.ack_done([j.id for j in jobs])
    finished: list[str] = []
    finisher = Finisher(queue, spool, finished.extend)
    finisher.start()
    try:
        finisher.submit(ids)
        wait_until(lambda: len(finished) == 1200, timeout=30, what="every file finished")
    finally:
        finisher.stop()
    assert len(list(spool.done.iterdir())) == 1200
    assert list(spool.incoming.iterdir()) == []


class _Gathering:
    """What DestinationWorkers._gather reads: the arrivals count and the stop event."""

    def __init__(self) -> None:
        self._arrivals = 0
        self._stop = StopEvent()


def _gather_seconds(g: _Gathering) -> float:
    started = time.monotonic()
    DestinationWorkers._gather(g)  # type: ignore[arg-type]
    return time.monotonic() - started


def test_the_gather_before_a_claim_waits_while_objects_keep_coming_and_no_longer() -> None:
    """A lone object waits one gather (its latency), a push of objects every millisecond is
    gathered up to TRICKLE_MAX, and a stop ends the wait at once."""
    g = _Gathering()
    assert _gather_seconds(g) < TRICKLE_MAX  # nothing came: one wait
    done = threading.Event()

    def arrive() -> None:  # a push: a wake-up each millisecond, until the gather ended
        while not done.is_set():
            g._arrivals += 1
            time.sleep(0.001)

    pusher = threading.Thread(target=arrive)
    pusher.start()
    try:
        assert _gather_seconds(g) >= 2 * TRICKLE_GATHER  # gathered more than one wait
    finally:
        done.set()
        pusher.join()
    g._stop.set()
    assert _gather_seconds(g) < TRICKLE_GATHER


def test_a_file_changed_since_queued_is_not_charged_attempts_while_it_waits_for_ingest(
    rig: Rig,
) -> None:
    """A queued file replaced in incoming waits (about a second a claim) for ingest to record the
    new version. Those waits are no attempts: they used to count one each, so that the first
    real transient failure after them gave up at once under `max_attempts` (here 2)."""
    codes = [0xA700]
    retry = RetryPolicy(initial_delay=0.1, max_delay=0.3, max_attempts=2)
    with ScriptedSCP(status=lambda rec: codes.pop(0) if codes else 0x0000) as scp:
        workers = rig.add_destination("a", scp.port, retry=retry)
        channel = Channel(workers.peer, workers.settings, name="a#1")
        workers._channels.update({0: channel})
        rig.enqueue(1)
        path = rig.spool.incoming / "f000.dcm"
        data, st = path.read_bytes(), path.stat()
        path.write_bytes(data + b"\0\0")  # being replaced: not as queued
        for _ in range(3):
            workers._process(channel, rig.queue.claim("a", 64, now=time.time() + 3600), 0)
        path.write_bytes(data)  # the same again, as ingest recorded it
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        for _ in range(2):  # 0xA700 (transient: the first attempt), then Success
            workers._process(channel, rig.queue.claim("a", 64, now=time.time() + 3600), 0)
        channel.release()
        assert rig.failed() == []
        assert rig.done() == ["f000.dcm"]
        assert len(scp.received) == 1


def test_a_claimed_file_rewritten_and_moved_out_before_its_turn_is_neither_sent_nor_failed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch is claimed; before a.dcm's turn it is appended to (not DICOM any more) and
    ingest moves it to failed/, ending its queued version's row. At its turn there is nothing
    to send and nothing failed: no "cannot read" ERROR, the job dropped, the rest of the
    batch stored."""
    caplog.set_level("INFO", logger="forwarder")
    with ScriptedSCP() as scp:
        workers = rig.add_destination("a", scp.port)
        ingest = Ingest(rig.spool, rig.queue, Router(None, ["a"]))

        def offer(name: str) -> None:
            path = rig.spool.incoming / name
            st = path.stat()
            ingest([ReadyFile(path, name, st.st_size, st.st_mtime_ns)])

        for n, name in enumerate(["a.dcm", "b.dcm"]):
            write_file(rig.spool.incoming / name, seed=n)
            offer(name)
        jobs = rig.queue.claim("a", 64)
        assert len(jobs) == 2
        with (rig.spool.incoming / "a.dcm").open("ab") as f:
            f.write(b"appended: not DICOM any more")
        offer("a.dcm")
        assert rig.failed() == ["a.dcm"]
        channel = Channel(workers.peer, workers.settings, name="a#1")
        workers._channels[0] = channel
        try:
            workers._process(channel, jobs, 0)
        finally:
            channel.release()
        rig.finisher.finish_ids([j.file_id for j in jobs])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.sop_instance_uid for r in scp.received] == [jobs[1].sop_instance_uid]
    assert (rig.done(), rig.failed()) == (["b.dcm"], ["a.dcm"])
    assert rig.queue.counts() == {"READY": 0, "CLAIMED": 0, "DONE": 1, "FAILED": 0}
