"""One claimed batch of a destination's worker thread: sent on its channel, then acked.

:class:`BatchSending` is the part of :class:`~forwarder.daemon.worker.DestinationWorkers` that
handles a batch once claimed: each job becomes a C-STORE request (at its priority, with the
destination's changes, unless the file changed since it was queued or the destination was paused
meanwhile), each outcome becomes an :class:`~forwarder.daemon.outcomes.Ack` (stored, retry,
failed, or back to READY uncharged), and the acks are recorded in the queue: those it refuses
(its disk is full...) are kept for the thread to retry before it claims more. The batch then
tells the destination's state (or its spare associations) how the association fared. The
pending-syntaxes hint (which presentation contexts to propose) is kept here too; the claims
consult it as well.

The threads, the claims and the waits are :mod:`forwarder.daemon.worker`; what each outcome
becomes is :mod:`forwarder.daemon.outcomes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from forwarder.config import RetryPolicy
from forwarder.crashpoints import crash_point
from forwarder.daemon.channels import SendChannel as Channel
from forwarder.daemon.destination_state import DestinationState
from forwarder.daemon.edits import EditConflict, NoLongerRouted
from forwarder.daemon.finisher import FinishSink
from forwarder.daemon.flow import Decision, FlowGate
from forwarder.daemon.outcomes import Ack, LastOutcome, SendMetrics, log_outcome, retry_ack
from forwarder.daemon.spares import SpareAssociations
from forwarder.dicom.part10 import FileMeta
from forwarder.errors import ForwarderError, InvalidFileError, UnreadableFileError
from forwarder.net.channel import StoreRequest
from forwarder.net.command_set import PRIORITY
from forwarder.net.pacing import Pacer
from forwarder.net.status import Outcome
from forwarder.queue import Job, Queue

if TYPE_CHECKING:
    from forwarder.dicom.edit import Editor

logger = logging.getLogger(__name__)

#: A job's priority rank (0 urgent, 1 normal, 2 low) -> the C-STORE Priority (PS3.7 9.1.1.1.9).
DIMSE_PRIORITY = {0: PRIORITY["high"], 1: PRIORITY["medium"], 2: PRIORITY["low"]}
_HINT_TTL = 5.0  # seconds a destination's pending-syntaxes hint is reused


class BatchSending:
    """Sending and acking a claimed batch (a part of
    :class:`~forwarder.daemon.worker.DestinationWorkers`)."""

    # Set by DestinationWorkers.__init__.
    name: str
    retry: RetryPolicy
    queue: Queue
    finisher: FinishSink
    metrics: SendMetrics | None
    on_outcome: Callable[[LastOutcome], None]
    edits: Callable[[Job, str], tuple[Editor, ...]] | None
    needs_proof: bool
    _stop: threading.Event
    _beats: dict[int, float]
    _unapplied: dict[int, list[Ack]]
    _hint: list[tuple[str, str]]
    _hint_at: float
    _dest: DestinationState
    _gate: FlowGate
    _spares: SpareAssociations
    pacer: Pacer | None

    def _apply_flow(self, decision: Decision) -> None:
        """Show the gate's state and hold the writes to the decision's rate."""
        self._dest.set_gate(decision.state)
        if self.pacer is not None:
            self.pacer.set_rate(
                decision.rate,
                urgent_apart=decision.urgent_apart,
                urgent_rate=decision.urgent_rate,
            )

    def _may_send(self, priority: int) -> bool:
        """Whether a claimed job of ``priority`` may still go (a pause or a window closing
        takes effect between two files), and at which rate: a window that closes (or opens)
        during a batch changes the rate of its next file, not only of the next batch."""
        if self.pacer is None or not self._gate.windows:
            return self._gate.may_send(priority)
        decision = self._gate.decide(fresh=False)
        self._apply_flow(decision)
        return decision.claim and priority <= decision.max_rank

    def _dropped(self, job: Job) -> bool:
        """Whether the queue dropped ``job`` while it was claimed (a file gone since is then no
        failure); on a queue error, not known: the sender reports the file as it finds it."""
        try:
            return self.queue.is_dropped(job.id)
        except ForwarderError:
            return False

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
                if self._stop.is_set() or not self._may_send(job.priority):
                    return  # the rest go back to READY, uncharged
                sent.add(job.id)
                found = _as_queued(job)
                if found is Found.GONE and self._dropped(job):
                    # Replaced in incoming by a file that is not queued (not DICOM any more),
                    # which ingest moved out after ending this job: nothing to send, nothing
                    # failed (ingest's line says where the file went).
                    logger.info(
                        "%s -> %s: not sent: replaced in incoming meanwhile by a file that is "
                        "not queued",
                        job.rel_path,
                        self.name,
                    )
                    acks.append(Ack("release", (job.id,)))
                    continue
                if found is Found.CHANGED:
                    # Replaced in incoming and not yet re-registered by ingest: sending now
                    # would deliver content the queue does not know about (and the other
                    # destinations would keep the old one). Wait for ingest to catch up.
                    error = "the file changed since it was queued; waiting for it to settle"
                    wait = Ack("retry", (job.id,), None, error, time.time() + 1.0, charge=False)
                    acks.append(wait)
                    continue
                uids = (job.sop_class_uid, job.sop_instance_uid)
                edits: tuple[Editor, ...] = ()
                if self.edits is not None:
                    try:
                        edits = self.edits(job, self.name)
                    except EditConflict as exc:
                        acks.append(Ack("failed", (job.id,), None, f"conflicting changes: {exc}"))
                        continue
                    except NoLongerRouted as exc:
                        acks.append(Ack("failed", (job.id,), None, str(exc)))
                        continue
                    except (InvalidFileError, UnreadableFileError) as exc:
                        error = f"cannot read the header for its changes: {exc.reason}"
                        if found is Found.GONE and not isinstance(exc, UnreadableFileError):
                            # Removed since it was queued: failed at once, as the sender
                            # fails it for a destination that sends it unchanged.
                            acks.append(Ack("failed", (job.id,), None, error))
                        else:
                            acks.append(self._retry(job, None, error))
                        continue
                priority = DIMSE_PRIORITY.get(job.priority, PRIORITY["medium"])
                yield StoreRequest(
                    job.path,
                    job.id,
                    # Gone: the sender reads the file and reports it (failed, as before).
                    meta=_queued_meta(job) if found is Found.SAME else None,
                    dataset_uids=uids,
                    edits=edits,
                    priority=priority,
                )

        done: dict[int, list[int]] = {}  # DIMSE status -> stored job ids
        sent_as: dict[int, tuple[str, str, str]] = {}  # stored with other UIDs than its file's
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
                retry: Ack | None = None
                if outcome.outcome is Outcome.RETRY:
                    retry = self._retry(job, outcome.status, outcome.error)
                    acks.append(retry)  # settled: an error below does not retry it twice
                    if retry.kind == "failed":  # the policy gives up: logged as the failure
                        outcome = dataclasses.replace(
                            outcome, outcome=Outcome.FAILED, error=retry.error
                        )
                log_outcome(self.name, job, outcome)
                if self.metrics is not None:
                    self.metrics.file_sent(
                        self.name, outcome.outcome.value, outcome.nbytes, outcome.seconds
                    )
                if outcome.outcome.stored:
                    done.setdefault(outcome.status or 0, []).append(job.id)
                    if outcome.sent_uids is not None:
                        sent_as[job.id] = outcome.sent_uids
                elif retry is None:
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
        acks += [
            Ack("done", tuple(ids), status, sent_uids=_sent(ids, sent_as))
            for status, ids in done.items()
        ]
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
                        ack.ids,
                        status=ack.status,
                        commitment=self.needs_proof,
                        # What each was sent with, recorded with the ack: the proof asks the
                        # destination by these, not by what a reload since would send.
                        sent_uids=dict(ack.sent_uids),
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
                        charge=ack.charge,
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

    def _retry(self, job: Job, status: int | None, error: str | None) -> Ack:
        return retry_ack(
            job, status, error, policy=self.retry, destination=self.name, metrics=self.metrics
        )


def _sent(
    ids: Sequence[int], sent_as: dict[int, tuple[str, str, str]]
) -> tuple[tuple[int, tuple[str, str, str]], ...]:
    """The jobs of ``ids`` stored with other UIDs than their file's, and those UIDs."""
    if not sent_as:  # nothing edited a UID in this batch: the common case, nothing to do
        return ()
    return tuple((i, sent_as[i]) for i in ids if i in sent_as)


def _queued_meta(job: Job) -> FileMeta | None:
    """The file's meta header as ingest checked it, when the queue recorded where its data set
    starts and the file is as queued (size and mtime, looked at just before): the sender then
    need not open and parse it again (four system calls, and as many GIL hand-offs, a file).
    None for a file queued before the queue recorded it: the sender reads it."""
    if not job.dataset_offset or not job.mtime_ns:
        return None
    return FileMeta(
        sop_class_uid=job.sop_class_uid,
        sop_instance_uid=job.sop_instance_uid,
        transfer_syntax=job.transfer_syntax,
        dataset_offset=job.dataset_offset,
        size=job.size,
        mtime_ns=job.mtime_ns,
    )


class Found(enum.Enum):
    """A queued file as the worker finds it just before sending it."""

    SAME = "same"  # size and mtime as queued
    CHANGED = "changed"  # replaced since: wait for ingest to record the new version
    GONE = "gone"  # removed or unreadable: the sender reads it and reports why


def _as_queued(job: Job) -> Found:
    """Whether the file is as queued (size and mtime), changed since, or gone (or unreadable:
    the sender reports that, as it reports a file that vanished)."""
    try:
        st = os.stat(job.path)
    except OSError:
        return Found.GONE
    if job.mtime_ns != 0 and (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
        return Found.CHANGED
    return Found.SAME
