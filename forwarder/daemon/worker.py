"""Workers: per destination, ``associations`` threads that claim jobs, send them and ack them.

Each thread owns one :class:`~forwarder.net.channel.Channel` (one pooled association, reused across
files, released when idle, replaced when broken). A destination that is down pauses only its own
threads (backoff per destination, on top of each job's own backoff), so it never slows the
others. Acks follow the sends: a crash between the peer's response and the ack means the file is
sent again after restart (at least once).

Attempts are charged per file actually tried: when the association for a batch cannot be opened,
the file that was tried is charged one attempt and the rest of the batch goes back to READY
untouched. Connection-level failures in a row (or one permanent association rejection) open the
destination's circuit breaker (:mod:`forwarder.daemon.destination_state`): it is "down", its
threads claim nothing (no file is charged) and one of them probes it with C-ECHO
(:mod:`forwarder.daemon.probe`) with backoff until it answers Success; the change is logged
once, recorded for ``forwarder status`` and exported as ``forwarder_destination_up``. Claims
take urgent jobs first, then normal, then low; every ``FAIR_EVERY``-th claim takes the oldest
due jobs whatever their priority, so low ones are never starved. Before each claim, and before
each file of a batch, the destination's :class:`~forwarder.daemon.flow.FlowGate` says whether
it is paused (``forwarder pause``) or outside its send window (nothing, or urgent files only,
or everything at ``outside_window_rate``); the rate cap is one
:class:`~forwarder.net.pacing.Pacer` shared by the threads' associations. A worker thread
survives anything: an unexpected exception in an attempt counts as an attempt (retried, "internal
error: ..."), and the thread carries on.

This module holds the threads, the loop and the batches: what is claimed, sent, acked. The
destination's state (up, down, paused, outside_window) is
:mod:`forwarder.daemon.destination_state`; what may be claimed now is
:mod:`forwarder.daemon.flow`; what each outcome
becomes (its log line, its ack, the retry and give-up rules) is :mod:`forwarder.daemon.outcomes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from forwarder.config import Destination, RetryPolicy
from forwarder.crashpoints import crash_point
from forwarder.daemon.channels import SendChannel as Channel
from forwarder.daemon.channels import destination_peer, open_channel
from forwarder.daemon.destination_state import DestinationState
from forwarder.daemon.edits import EditConflict
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.flow import PAUSE_POLL, FlowGate
from forwarder.daemon.outcomes import (
    Ack,
    LastOutcome,
    SendMetrics,
    log_outcome,
    retry_ack,
)
from forwarder.daemon.probe import probe
from forwarder.daemon.spares import SpareAssociations
from forwarder.errors import ForwarderError, InvalidFileError, UnreadableFileError
from forwarder.net.association import AssociationSettings
from forwarder.net.channel import StoreRequest
from forwarder.net.pacing import Pacer
from forwarder.net.pdu import PRIORITY
from forwarder.net.status import Outcome
from forwarder.queue import Job, Queue

if TYPE_CHECKING:
    from forwarder.dicom.edit import Editor

logger = logging.getLogger(__name__)

BATCH = 64  # jobs claimed (and acked) at a time per thread: one transaction each
#: After a claim that found fewer than TRICKLE jobs, the next claim waits TRICKLE_GATHER
#: seconds first. With objects arriving one at a time, claiming each alone cost a claim, an
#: ack, an empty claim and the finisher's transactions per object; the gateway's CPU per
#: object fell ~25% and its throughput rose 10-40% (bench gateway cases), for 2 ms more
#: latency on the first file after a pause.
TRICKLE = 8
TRICKLE_GATHER = 0.002
CLAIM_RETRY = 1.0  # seconds between claims while the queue refuses them
#: A job's priority rank (0 urgent, 1 normal, 2 low) -> the C-STORE Priority (PS3.7 9.1.1.1.9).
DIMSE_PRIORITY = {0: PRIORITY["high"], 1: PRIORITY["medium"], 2: PRIORITY["low"]}
_HINT_TTL = 5.0  # seconds a destination's pending-syntaxes hint is reused


class DestinationWorkers:
    """The threads sending to one destination."""

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae_title: str,
        retry: RetryPolicy,
        queue: Queue,
        finisher: Finisher,
        settings: AssociationSettings,
        metrics: SendMetrics | None = None,
        on_outcome: Callable[[LastOutcome], None] = lambda _: None,
        edits: Callable[[Job, str], tuple[Editor, ...]] | None = None,
    ) -> None:
        self.destination = destination
        self.edits = edits  # the changes to make to a file sent here (modify, deidentify)
        self.name = destination.name
        self.retry = retry
        self.queue = queue
        self.finisher = finisher
        self.metrics = metrics
        self.on_outcome = on_outcome
        self.peer = destination_peer(destination)
        self.settings = settings
        self.calling_ae_title = calling_ae_title
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._beats: dict[int, float] = {}
        self._channels: dict[int, Channel] = {}
        self._trickle: dict[int, bool] = {}  # per thread: its last claim found few jobs
        self._claim_error: dict[int, str] = {}  # per thread: why its last claim failed
        self._unapplied: dict[int, list[Ack]] = {}  # per thread: acks the queue refused
        self._hint: list[tuple[str, str]] = []
        self._hint_at = 0.0
        self._dest = DestinationState(self.name, retry, queue, metrics)
        self._gate = FlowGate(
            self.name,
            queue,
            windows=destination.windows,
            urgent_bypasses=destination.urgent_bypasses_window,
            max_rate=destination.max_rate,
            outside_rate=destination.outside_window_rate,
        )
        self.pacer: Pacer | None = None  # one token bucket for all associations
        if destination.max_rate is not None or destination.outside_window_rate is not None:
            self.pacer = Pacer(destination.max_rate)
            self.settings = dataclasses.replace(settings, pacer=self.pacer)
        #: Stored is not enough: the destination must commit (or hold, by query) what it stored.
        self.needs_proof = (
            destination.storage_commitment is not None or destination.verify_by_query is not None
        )
        self._spares = SpareAssociations(destination, retry, self._channels)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.destination.associations):
            t = threading.Thread(
                target=self._run, args=(i,), name=f"send-{self.name}-{i + 1}", daemon=True
            )
            self._beats[i] = time.monotonic()
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking new jobs; the file being sent is finished (or times out), claimed jobs not
        yet sent go back to READY; associations are released. Joins every thread."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            # A send stuck in the kernel: abort its association so the thread returns.
            for ch in list(self._channels.values()):
                ch.abort()
            for t in self._threads:
                t.join(2.0)
            logger.warning("%s: aborted associations of %s to stop", self.name, ", ".join(alive))

    def wake(self) -> None:
        """New work was queued: wake idle threads now."""
        with self._wake:
            self._wake.notify_all()

    def healthy(self, now: float | None = None) -> bool:
        """False when a thread died or made no progress for longer than any legitimate wait."""
        return not self.problems(now)

    def problems(self, now: float | None = None) -> list[str]:
        """What is wrong with these threads, one phrase each naming the thread (none: healthy)."""
        now = time.monotonic() if now is None else now
        limit = self.destination.connect_timeout + self.destination.response_timeout + 30.0
        found = []
        for i, t in enumerate(self._threads):
            if not t.is_alive():
                if not self._stop.is_set():
                    found.append(f"{t.name} died (its traceback is logged above)")
                continue
            beat = self._beats.get(i, now)
            ch = self._channels.get(i)
            progress = ch.last_progress if ch is not None else None
            idle = now - max(beat, progress or 0.0)
            if idle > limit:
                found.append(f"{t.name} made no progress for {idle:.0f}s (limit {limit:.0f}s)")
        return found

    # -- the loop -------------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        channel = open_channel(self.destination, self.settings, f"{self.name}#{index + 1}")
        self._channels[index] = channel
        was_open = False
        try:
            while not self._stop.is_set():
                try:
                    was_open = self._step(channel, index, was_open)
                except Exception:
                    # A bug of ours: the thread must not die of it (its jobs would stay
                    # CLAIMED until a restart). _process has acked what it claimed.
                    logger.exception(
                        "%s: unexpected error in %s; it carries on",
                        self.name,
                        threading.current_thread().name,
                    )
                    with contextlib.suppress(Exception):  # the socket may be as broken
                        channel.abort()
                    with contextlib.suppress(Exception):
                        was_open = self._assoc_delta(channel, was_open)
                    self._stop.wait(1.0)
        finally:
            channel.release()
            self._assoc_delta(channel, was_open)
            if self._unapplied.get(index):
                logger.warning(
                    "%s: %d outcomes could not be recorded before stopping; those files are "
                    "sent again after restart",
                    self.name,
                    len(self._unapplied[index]),
                )

    def _step(self, channel: Channel, index: int, was_open: bool) -> bool:
        """Claim a batch and send it, or wait; returns whether the association is open."""
        self._beats[index] = time.monotonic()
        pending = self._unapplied.get(index)
        if pending and not self._apply_acks(index, pending):
            self._stop.wait(2.0)  # the queue still refuses (disk full?): try again soon
            return was_open
        jobs: list[Job] = []
        refused = False  # the queue refused the claim
        decision = self._gate.decide()
        self._dest.set_gate(decision.state)
        if self.pacer is not None:
            self.pacer.set_rate(
                decision.rate,
                urgent_apart=decision.urgent_apart,
                urgent_rate=decision.urgent_rate,
            )
        if not decision.claim:
            # Paused (or outside the send window): nothing is claimed; a send under way in
            # another thread finishes.
            if channel.release_if_idle(0.0):
                was_open = self._assoc_delta(channel, was_open)
            self._idle_wait(gated=True)
            return was_open
        now = time.monotonic()
        if self._dest.is_down:
            # The breaker is open: nothing is claimed, one thread probes now and then.
            if self._dest.take_probe(now):
                self._probe()
            self._idle_wait()
            return was_open
        if (
            now >= self._dest.down_until
            and not self._spares.paused(index, now)
            and self._spares.may_claim(channel, index, self._work_due, self._hints)
        ):
            if self._trickle.get(index):
                # Files arriving one by one (a modality's push through `listen`): let a few
                # gather, so that one claim, ack and finish serve several, not one each.
                self._stop.wait(TRICKLE_GATHER)
            try:
                jobs = self.queue.claim(
                    self.name, BATCH, oldest=self._gate.fair_turn(), max_rank=decision.max_rank
                )
                self._trickle[index] = len(jobs) < TRICKLE
            except ForwarderError as exc:
                # The queue refuses (its disk is full...): one line per new reason, not one
                # per attempt, and a pause before the next attempt.
                refused = True
                if self._claim_error.get(index) != str(exc):
                    logger.error("%s: cannot claim jobs: %s; retrying", self.name, exc)
                    self._claim_error[index] = str(exc)
            else:
                if self._claim_error.pop(index, None) is not None:
                    logger.info("%s: claiming jobs works again", self.name)
        if not jobs:
            if channel.release_if_idle(self.destination.idle_timeout):
                self._assoc_delta(channel, was_open)
                was_open = False
            if refused:
                self._stop.wait(CLAIM_RETRY)
            else:
                self._idle_wait()
            return was_open
        self._process(channel, jobs, index)
        return self._assoc_delta(channel, was_open)

    def _assoc_delta(self, channel: Channel, was_open: bool) -> bool:
        now_open = channel.is_open
        if self.metrics is not None and now_open != was_open:
            self.metrics.associations_open(self.name, 1 if now_open else -1)
        return now_open

    def _idle_wait(self, *, gated: bool = False) -> None:
        if gated:  # paused or outside the window: look again soon (within a second)
            with self._wake:
                if not self._stop.is_set():
                    self._wake.wait(PAUSE_POLL)
            return
        now = time.time()
        due = None
        try:
            due = self.queue.next_due(self.name)
        except ForwarderError:
            pass
        wait = 1.0
        if due is not None:
            wait = min(wait, max(due - now, 0.05))
        down_left = self._dest.down_until - time.monotonic()
        if down_left > 0:
            wait = min(max(down_left, 0.05), 1.0)
        if self._dest.is_down:
            wait = min(max(self._dest.probe_wait(), 0.05), 1.0)
        with self._wake:
            if not self._stop.is_set():
                self._wake.wait(wait)

    def _probe(self) -> None:
        """C-ECHO (QIDO-RS for DICOMweb) the destination whose breaker is open."""
        try:
            error = probe(self.destination, self.settings)
        except Exception as exc:  # a bug of ours must not leave the breaker stuck probing
            logger.exception("%s: the probe failed unexpectedly", self.name)
            error = f"internal error: {type(exc).__name__}: {exc}"
        self._dest.probed(error)

    def _hints(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        if now - self._hint_at > _HINT_TTL:
            try:
                self._hint = [tuple(p) for p in self.queue.pending_syntaxes(self.name)]  # type: ignore[misc]
            except ForwarderError:
                self._hint = []
            self._hint_at = now
        return self._hint

    def _process(self, channel: Channel, jobs: Sequence[Job], index: int) -> None:
        by_id = {j.id: j for j in jobs}
        sent: set[int] = set()  # handed to the channel
        acks: list[Ack] = []

        def requests() -> Iterator[StoreRequest]:
            for job in jobs:
                if self._stop.is_set() or not self._gate.may_send(job.priority):
                    return  # the rest go back to READY, uncharged
                sent.add(job.id)
                if self._changed_since_queued(job):
                    # Replaced in incoming and not yet re-registered by ingest: sending now
                    # would deliver content the queue does not know about (and the other
                    # destinations would keep the old one). Wait for ingest to catch up.
                    error = "the file changed since it was queued; waiting for it to settle"
                    acks.append(Ack("retry", (job.id,), None, error, time.time() + 1.0))
                    continue
                uids = (job.sop_class_uid, job.sop_instance_uid)
                edits: tuple[Editor, ...] = ()
                if self.edits is not None:
                    try:
                        edits = self.edits(job, self.name)
                    except EditConflict as exc:
                        acks.append(Ack("failed", (job.id,), None, f"conflicting changes: {exc}"))
                        continue
                    except (InvalidFileError, UnreadableFileError) as exc:
                        error = f"cannot read the header for its changes: {exc.reason}"
                        acks.append(self._retry(job, None, error))
                        continue
                priority = DIMSE_PRIORITY.get(job.priority, PRIORITY["medium"])
                yield StoreRequest(
                    job.path, job.id, dataset_uids=uids, edits=edits, priority=priority
                )

        done: dict[int, list[int]] = {}  # DIMSE status -> stored job ids
        handed_back: list[int] = []  # back to READY, no attempt charged
        spare = False
        association_failed = False  # this batch tried to associate and failed
        broke = False  # the last association of this batch broke under a file
        try:
            for outcome in channel.send(requests(), hint=self._hints()):
                self._beats[index] = time.monotonic()
                job = by_id[outcome.request.key]
                # A connection-level failure: an association tried and refused (or rejected
                # for good); not a batch the channel refused without trying (Retry-After).
                if outcome.association_failed and (
                    outcome.attempted or outcome.outcome is Outcome.FAILED
                ):
                    association_failed = True
                if outcome.association_broke:
                    broke = True
                elif outcome.outcome.stored:
                    broke = False
                if self._spares.unavailable(outcome, index):
                    # This extra association was refused or timed out while a sibling's works
                    # (a peer serving fewer associations than configured): the jobs go back
                    # unharmed.
                    handed_back.append(job.id)
                    spare = True
                    continue
                if not outcome.attempted:
                    # Not tried (an earlier file's association failed), or the association was
                    # rejected for good (the destination is held): no attempt charged.
                    handed_back.append(job.id)
                    continue
                if outcome.outcome.stored:
                    crash_point("after-response")
                log_outcome(self.name, job, outcome)
                if self.metrics is not None:
                    self.metrics.file_sent(
                        self.name, outcome.outcome.value, outcome.nbytes, outcome.seconds
                    )
                if outcome.outcome.stored:
                    done.setdefault(outcome.status or 0, []).append(job.id)
                elif outcome.outcome is Outcome.RETRY:
                    acks.append(self._retry(job, outcome.status, outcome.error))
                else:
                    error = outcome.error or "failed"
                    acks.append(Ack("failed", (job.id,), outcome.status, error))
                self.on_outcome(LastOutcome(self.name, outcome.outcome.value, time.time()))
        except Exception as exc:
            # Not the channel (it answers RETRY for what goes wrong in an attempt): our own
            # bookkeeping. The file being handled counts as attempted; the rest go back.
            logger.error(
                "%s: internal error while sending a batch; the file in hand will be tried again",
                self.name,
                exc_info=True,
            )
            with contextlib.suppress(Exception):
                channel.abort()
            error = f"internal error: {type(exc).__name__}: {exc}"
            settled = {i for a in acks for i in a.ids} | set(handed_back)
            settled |= {i for ids in done.values() for i in ids}
            acks += [self._retry(by_id[j], None, error) for j in sorted(sent - settled)]
        # one transaction per status (almost always one)
        acks += [Ack("done", tuple(ids), status) for status, ids in done.items()]
        unsent = [j for j in by_id if j not in sent] + handed_back
        if unsent:
            acks.append(Ack("release", tuple(unsent)))
        self._apply_acks(index, acks)
        if spare:
            self._spares.missed(channel, index)
        else:
            self._dest.update(channel, association_failed, broke)

    def _apply_acks(self, index: int, acks: Sequence[Ack]) -> bool:
        """Record outcomes in the queue. Those it refuses (its disk is full...) are kept for
        this thread to retry before it claims more: the jobs do not sit CLAIMED until a
        restart. Returns True when everything was recorded."""
        finished: list[int] = []
        n = 0  # acks recorded so far
        try:
            for ack in acks:
                if ack.kind == "done":
                    finished += self.queue.ack_done(
                        ack.ids, status=ack.status, commitment=self.needs_proof
                    )
                elif ack.kind == "failed":
                    finished += self.queue.ack_failed(
                        ack.ids[0], error=ack.error, status=ack.status
                    )
                elif ack.kind == "retry":
                    self.queue.ack_retry(
                        ack.ids[0],
                        next_attempt_at=ack.next_attempt_at,
                        error=ack.error,
                        status=ack.status,
                    )
                else:
                    self.queue.release(ack.ids)
                n += 1
        except ForwarderError as exc:
            if self._unapplied.get(index) != list(acks[n:]):
                logger.error(
                    "%s: cannot record %d outcomes in the queue (%s); retrying",
                    self.name,
                    len(acks) - n,
                    exc,
                )
            self._unapplied[index] = list(acks[n:])
            self.finisher.submit(finished)
            return False
        if self._unapplied.pop(index, None):
            logger.info("%s: the queue accepts outcomes again", self.name)
        self.finisher.submit(finished)
        return True

    @staticmethod
    def _changed_since_queued(job: Job) -> bool:
        try:
            st = os.stat(job.path)
        except OSError:
            return False  # gone: the sender reports that
        return job.mtime_ns != 0 and (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns)

    def _work_due(self) -> bool:
        """Whether a job of this destination is due now (True when the queue cannot say: the
        claim reports the queue's trouble)."""
        try:
            due = self.queue.next_due(self.name)
        except ForwarderError:
            return True
        return due is not None and due <= time.time()

    def _retry(self, job: Job, status: int | None, error: str | None) -> Ack:
        return retry_ack(
            job, status, error, policy=self.retry, destination=self.name, metrics=self.metrics
        )

    @property
    def state(self) -> tuple[str | None, str | None, float]:
        """(state, why it is down, since when as Unix time); state None until known."""
        return self._dest.state
