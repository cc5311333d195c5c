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

This module holds the threads, the loop and the claims: what is claimed, and when. What a
claimed batch sends and how its outcomes are acked is :mod:`forwarder.daemon.worker_batch`. The
destination's state (up, down, paused, outside_window) is
:mod:`forwarder.daemon.destination_state`; what may be claimed now is
:mod:`forwarder.daemon.flow`; what each outcome
becomes (its log line, its ack, the retry and give-up rules) is :mod:`forwarder.daemon.outcomes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from forwarder.config import Destination, RetryPolicy
from forwarder.daemon.channels import SendChannel as Channel
from forwarder.daemon.channels import destination_peer, open_channel
from forwarder.daemon.destination_state import DestinationState
from forwarder.daemon.finisher import FinishSink
from forwarder.daemon.flow import ALL_RANKS, PAUSE_POLL, FlowGate
from forwarder.daemon.outcomes import Ack, LastOutcome, SendMetrics
from forwarder.daemon.probe import probe
from forwarder.daemon.spares import SpareAssociations
from forwarder.daemon.worker_batch import DIMSE_PRIORITY, BatchSending
from forwarder.errors import ForwarderError
from forwarder.net.association import AssociationSettings
from forwarder.net.interrupt import StopEvent
from forwarder.net.pacing import Pacer
from forwarder.queue import Job, Queue

if TYPE_CHECKING:
    from forwarder.dicom.edit import Editor

logger = logging.getLogger(__name__)

BATCH = 64  # jobs claimed (and acked) at a time per thread: one transaction each
#: After a claim that found fewer than TRICKLE jobs, the next claim waits TRICKLE_GATHER
#: seconds first, and again while more work keeps being queued meanwhile (a modality's push
#: through `listen`: one object every millisecond or so), up to TRICKLE_MAX in all or until
#: TRICKLE new arrivals (wake-ups: a watch-folder batch, or a receiving process's count).
#: With objects arriving one at a time, claiming each alone cost a claim, an ack, an empty
#: claim and the finisher's transactions per object; a fixed 2 ms gather cut the gateway's CPU
#: per object ~25%, gathering while objects keep coming another 20-25% of the daemon's and the
#: finishing process's. A lone object waits one TRICKLE_GATHER.
TRICKLE = 8
TRICKLE_GATHER = 0.002
TRICKLE_MAX = 0.010
CLAIM_RETRY = 1.0  # seconds between claims while the queue refuses them


__all__ = ["BATCH", "DIMSE_PRIORITY", "DestinationWorkers"]  # DIMSE_PRIORITY: worker_batch's


class DestinationWorkers(BatchSending):
    """The threads sending to one destination."""

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae_title: str,
        retry: RetryPolicy,
        queue: Queue,
        finisher: FinishSink,
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
        self.calling_ae_title = calling_ae_title
        # Its set() also interrupts a TCP connect under way (a peer dropping SYNs would hold
        # the stop for connect_timeout): every channel and probe connects under it.
        self._stop = StopEvent()
        self.settings = dataclasses.replace(settings, stop=self._stop)
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._beats: dict[int, float] = {}
        self._channels: dict[int, Channel] = {}
        self._trickle: dict[int, bool] = {}  # per thread: its last claim found few jobs
        self._arrivals = 0  # wake() calls so far (read without the lock)
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
            self.settings = dataclasses.replace(self.settings, pacer=self.pacer)
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
        yet sent go back to READY; associations are released; a connect under way is
        interrupted (its files go back to READY too). Joins every thread."""
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
            self._arrivals += 1
            self._wake.notify_all()

    def _gather(self) -> None:
        """Wait TRICKLE_GATHER, and again while work keeps arriving (see TRICKLE_MAX): until
        nothing came during the last two waits (the receiving process tells its counts every
        2 ms at most, so one quiet wait is not the end of a push)."""
        first = self._arrivals
        marks = (first, first)  # arrivals two waits ago, one wait ago
        deadline = time.monotonic() + TRICKLE_MAX
        while True:
            if self._stop.wait(TRICKLE_GATHER):
                return
            now = self._arrivals
            if now - first >= TRICKLE or time.monotonic() >= deadline:
                return
            if now == marks[0]:  # nothing came (a lone object: after one wait)
                return
            marks = (marks[1], now)

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
        self._apply_flow(decision)
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
                self._gather()
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
                # Urgent files only (a closed window): the other files due must not make it
                # claim again at once, 20 times a second, until the window opens.
                self._idle_wait(gated=decision.max_rank < ALL_RANKS)
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
        if self._stop.is_set():
            return  # interrupted by the stop: says nothing about the destination
        self._dest.probed(error)

    def _work_due(self) -> bool:
        """Whether a job of this destination is due now (True when the queue cannot say: the
        claim reports the queue's trouble)."""
        try:
            due = self.queue.next_due(self.name)
        except ForwarderError:
            return True
        return due is not None and due <= time.time()

    @property
    def state(self) -> tuple[str | None, str | None, float]:
        """(state, why it is down, since when as Unix time); state None until known."""
        return self._dest.state

    @property
    def unreachable(self) -> bool:
        """C-STORE finds the destination down now (:attr:`DestinationState.unreachable`)."""
        return self._dest.unreachable
