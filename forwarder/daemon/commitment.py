"""Proof of delivery in the daemon: storage commitment per destination, with reconciliation.

For each destination with ``storage_commitment:``, the workers ack stored files as awaiting
commitment (the file stays in incoming). One thread, the :class:`CommitmentKeeper`, then:

1. groups what awaits by study and requests commitment for a study once nothing was stored for
   it for ``settle``, or as soon as ``max_instances`` of it are stored: the transaction (its
   Transaction UID, instances and deadline) is committed to the queue *before* the N-ACTION
   goes out (:meth:`forwarder.queue.Queue.begin_commitment`); a peer that cannot be reached
   cancels it, and it is asked again later, as does an error of ours while requesting (not
   left open to expire as not committed, and be sent again, for no fault of the peer; a
   cancel the queue refuses is tried again every tick until it works, and such a transaction
   is never expired meanwhile);
2. takes the report, on the requesting association (kept open ``wait_on_association``), on its
   own report acceptor (``storage_commitment.port``: a pynetdicom AE the peer opens an
   association to), or from anyone who calls :meth:`CommitmentKeeper.deliver_report` (the seam
   for the daemon's ``listen`` Storage SCP): the :class:`~forwarder.net.commitment.
   CommitmentBook` trusts only reports for a transaction it awaits that name only instances
   asked for;
3. records the outcome in one queue transaction: committed instances let their files finish
   (done/ once every destination requiring proof has committed them); failed ones (with the
   peer's Failure Reason) and those not reported by ``timeout`` are sent again, only those, up
   to ``max_resends``, then failed/ with "stored but not committed" and the reason.

An N-ACTION the PACS refuses (a failure status; a Warning is an acceptance) may be refused for
the study (a SOP Class it does not commit, an instance it will not name) or for the PACS (its
commitment service down or busy), and the status does not tell which: PACSs answer 0x0110
processing failure, 0x0213 resource limitation or 0x0122 for either. The rule:

- every refusal rests the destination, as a PACS that cannot be asked does (nothing is sent
  again for it), and the refused studies are asked after every other one next time;
- a transient refusal (0x0213 resource limitation, 0xA7xx out of resources: the PACS cannot
  take the request *now*, whether it is short of resources for the study or for everything)
  never counts: retried, as the others, it loses nothing, and counted, a PACS short of
  resources half the time would fail a study it happened to refuse six times in a row;
- another refusal counts against the instances it named only when the destination accepted
  another N-ACTION between it and their previous refusal: then the PACS's commitment service
  works, and it is the request it refuses. After :data:`~forwarder.daemon.proof_thread.
  UNDECIDED_LIMIT` counted refusals the instances count as not committed (as verify_by_query's
  undecided ones do): sent again, up to ``max_resends``, then failed/ with "storage commitment
  refused by DESTINATION: ... answered the N-ACTION with status 0x...";
- a PACS that refuses everything accepts nothing in between: its studies await, for a
  weekend if need be, as for an unreachable PACS; nothing is resent, nothing goes to failed/.

The counts live in memory: after a restart they begin again; an instance that leaves otherwise
(a reload that removes the destination's ``storage_commitment``, its file replaced) takes its
count with it.

One log line (journal) per transaction outcome. After a restart the open transactions are read
back from the queue and awaited again, so a report hours late is still taken, and one that never
comes expires at its deadline: nothing is marked committed that the peer did not commit, and
nothing is forgotten. The C-FIND variant (``verify_by_query``) is
:mod:`forwarder.daemon.verify_query`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forwarder.config import StorageCommitment
from forwarder.crashpoints import crash_point
from forwarder.daemon.channels import destination_peer
from forwarder.daemon.proof_thread import UNDECIDED_LIMIT, ProofThread, Target
from forwarder.errors import ForwarderError
from forwarder.net.commitment import (
    CommitmentBook,
    CommitmentError,
    CommitmentReport,
    Reference,
    failure_text,
    new_transaction_uid,
)
from forwarder.queue import CommitItem, Resolution

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from forwarder.daemon.finisher import FinishSink

logger = logging.getLogger(__name__)

#: The instances awaiting commitment listed per round and destination (the queue's default).
_AWAITING_LIMIT = 10000


def _transient(status: int) -> bool:
    """Whether an N-ACTION refused with ``status`` says only that the PACS cannot take the
    request now: 0x0213 resource limitation (PS3.4 J.3.2's N-ACTION status; PS3.3 C.14.1.1:
    the SCP "does not currently have enough resources") and 0xA7xx out of resources (no
    N-ACTION status, but a PACS busy may answer it as it does a C-STORE). Such a refusal is
    retried and never counted: a PACS short of resources half the time must not fail a study
    (:mod:`forwarder.net.status` retries both for C-STORE too)."""
    return status == 0x0213 or status & 0xFF00 == 0xA700


@dataclass(frozen=True, slots=True)
class _Refused:
    """An instance whose latest N-ACTION the PACS refused."""

    destination: str  # that PACS
    at: float  # when
    accepted: int  # the destination's accepted N-ACTIONs then
    counted: int  # its refusals counted so far (each after another request was accepted)


@dataclass(frozen=True, slots=True)
class ProofTarget(Target):
    """A destination requiring storage commitment, as the keeper needs it."""

    @property
    def policy(self) -> StorageCommitment:
        assert self.destination.storage_commitment is not None
        return self.destination.storage_commitment


class CommitmentKeeper(ProofThread[ProofTarget]):
    """Requests, awaits and records storage commitment for every destination that wants it.

    On stop (:meth:`request_stop`), a request under way is aborted and its transaction
    cancelled (asked again after the restart); a report being awaited stays awaited.
    """

    thread_name = "stgcmt"
    not_stopped = "storage commitment: the keeper did not stop within %gs"
    what = "storage commitment"
    log = logger

    def _setup(self) -> None:
        self.book = CommitmentBook(on_report=self._on_report)
        self._jobs: dict[str, dict[str, int]] = {}  # transaction -> SOP Instance -> job id
        self._acceptors: dict[tuple[str, int], Any] = {}
        self._restored = False  # the transactions a previous run left open are awaited
        # Transactions given up (not requested) whose cancel the queue refused -> destination:
        # cancelled again every tick until it works, never expired meanwhile (sent again).
        self._uncancelled: dict[str, str] = {}
        self._told: dict[str, str] = {}  # what the keeper's own failures were said for -> why
        self._refused: dict[int, _Refused] = {}  # job id -> its N-ACTIONs the PACS refused
        self._accepted: dict[str, int] = {}  # destination -> N-ACTIONs it accepted (this run)

    # -- lifecycle -------------------------------------------------------------------------------

    def configure(self, targets: Sequence[ProofTarget]) -> None:
        """The destinations requiring commitment now (at start and on reload)."""
        from forwarder.net.commitment_scu import ReportAcceptor

        super().configure(targets)
        for txn in self.queue.open_commitments():
            if txn.kind == "stgcmt" and txn.destination not in self._targets:
                # No longer asked of that destination: its instances await proof again (by
                # query, if that is configured now; see Service._settle_proof).
                self._cancel(txn.uid, txn.destination)
        wanted = {
            (t.policy.bind, t.policy.port): t.policy.ae_title or t.settings.calling_ae_title
            for t in targets
            if t.policy.port is not None
        }
        for key in list(self._acceptors):
            if key not in wanted:
                self._acceptors.pop(key).stop()
        # Before the first acceptor listens: a report for a transaction a previous run left
        # open, arriving between this and start(), would be answered "unknown transaction".
        self._restore()
        for (bind, port), ae_title in wanted.items():
            if (bind, port) not in self._acceptors and port is not None:
                acceptor = ReportAcceptor(self.book, ae_title=ae_title, port=port, bind=bind)
                self._acceptors[(bind, port)] = acceptor.start()

    def start(self) -> None:
        """Await again every transaction a previous run left open (if :meth:`configure` has
        not), then run the thread."""
        self._restore()
        super().start()

    def _restore(self) -> None:
        """Await again every transaction a previous run left open; once."""
        if self._restored:
            return
        self._restored = True
        for txn in self.queue.open_commitments():
            if txn.kind == "stgcmt":
                self._expect(txn.uid, self._references(txn.destination, txn.items))
        if self._jobs:
            logger.info(
                "storage commitment: %d transaction(s) still awaiting their report", len(self._jobs)
            )

    def stop(self) -> None:
        """Stop the thread, then the report acceptors; returns within a few seconds whatever
        the peers do (every network wait of the thread is cancelled by the stop)."""
        super().stop()
        self._cancel_again()  # one last try: else awaited after the restart, and expired
        for acceptor in self._acceptors.values():
            acceptor.stop()
        self._acceptors.clear()

    def deliver_report(self, event_type: int, dataset: Dataset, calling_ae: str) -> int:
        """The seam for any listener that receives an N-EVENT-REPORT (Storage Commitment Push
        Model): the report is checked and recorded; returns the status to answer it with."""
        return self.book.deliver(event_type, dataset, calling_ae)

    # -- the loop --------------------------------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._cancel_again()
            self._expire()
        except Exception as exc:
            why = f"internal error ({type(exc).__name__}: {exc})"
            self._tell(
                "expiring",
                why,
                logging.ERROR,
                "storage commitment: %s while cancelling or expiring transactions; "
                "trying again every second",
                why,
                exc_info=exc,
            )
        else:
            self._untell("expiring")
        self._let_go_refused(None)
        for target in self._current_targets():
            if self._stop.is_set():
                return
            try:
                self._request_due(target)
            except Exception as exc:
                self._failed(target, exc)  # the transaction it began is cancelled (_request)

    def _request_due(self, target: ProofTarget) -> None:
        now = time.time()
        if self._resting(target, now):
            return
        policy = target.policy
        by_study: dict[str, list[CommitItem]] = defaultdict(list)
        awaiting = self.queue.awaiting_commitment(target.name, limit=_AWAITING_LIMIT)
        if len(awaiting) < _AWAITING_LIMIT:  # all of them: the others left
            self._let_go_refused(target.name, {i.job_id for i in awaiting})
        for item in awaiting:
            if self._retry_at.get(item.job_id, 0.0) <= now:  # else: its UIDs untold, waiting
                by_study[item.study_instance_uid].append(item)
        # The studies the PACS refused an N-ACTION for go last, the latest refused last: a
        # refusal ends the round (the destination rests), and the next asks every other study
        # before it, so that none waits for ever behind two or three refused ones.
        studies = sorted(
            by_study.values(),
            key=lambda items: max(self._last_refused(i.job_id) for i in items),
        )
        for items in studies:
            quiet = max(i.stored_at for i in items) <= now - policy.settle
            # Each SOP Instance once per transaction: a PACS names an instance asked twice twice
            # in its report, which is then not trusted (parse_report), and the whole study would
            # be sent again and failed. A second file of the same instance (a modality that
            # exported it twice) waits for a transaction of its own, asked at the next tick.
            first: dict[str, CommitItem] = {}
            for item in items:
                first.setdefault(item.sop_instance_uid, item)
            items = list(first.values())
            for start in range(0, len(items), policy.max_instances):
                chunk = items[start : start + policy.max_instances]
                if len(chunk) < policy.max_instances and not quiet:
                    continue
                if not self._request(target, chunk):
                    return

    def _request(self, target: ProofTarget, items: list[CommitItem]) -> bool:
        from forwarder.net.commitment_scu import request_commitment

        policy = target.policy
        pairs = self._references(target.name, items)
        named = {i.job_id for i, _ in pairs}
        for job_id in named:
            self._undecided.pop(job_id, None)
            self._retry_at.pop(job_id, None)
        self._untold_tries(target, [i.job_id for i in items if i.job_id not in named])
        if not pairs:
            return True  # none can be named now: they await (said once each)
        uid = new_transaction_uid()
        self.queue.begin_commitment(
            uid,
            target.name,
            "stgcmt",
            [i.job_id for i, _ in pairs],
            deadline=time.time() + policy.timeout,
        )
        refs = self._expect(uid, pairs)
        crash_point("stgcmt-before-action")
        try:
            request_commitment(
                destination_peer(target.destination),
                target.settings,
                refs,
                self.book,
                # With a report port, nothing is awaited here: the acceptor records the report.
                timeout=0.0 if policy.port is not None else policy.wait_on_association,
                release_at_once=policy.port is not None,
                transaction_uid=uid,
                manage_book=False,
                cancel=self._stop,
            )
        except CommitmentError as exc:
            self._cancel(uid, target.name)
            self._not_done(
                target, "storage commitment", len(items), "not requested", "not requested", exc
            )
            if exc.status is not None and not self._stop.is_set():
                self._refusal(target, [i.job_id for i, _ in pairs], exc)
            return False
        except Exception:
            # Ours, not the peer's: whether the N-ACTION went out or not, asked again (after
            # the rest; a report that comes meanwhile is for a transaction no longer awaited).
            self._cancel(uid, target.name)
            raise
        self._accepted[target.name] = self._accepted.get(target.name, 0) + 1
        for job_id in named:
            self._refused.pop(job_id, None)
        self._works(target)
        return True

    def _last_refused(self, job_id: int) -> float:
        """When the PACS last refused an N-ACTION naming ``job_id`` (0.0: never)."""
        refused = self._refused.get(job_id)
        return 0.0 if refused is None else refused.at

    def _let_go_refused(self, destination: str | None, awaiting: set[int] | None = None) -> None:
        """Forget the refusals counted for instances that left the keeper otherwise than by
        an accepted request or a give-up: with ``destination`` None, those of destinations no
        longer requiring commitment (a reload); else those of ``destination`` neither
        ``awaiting`` nor in an open transaction (one whose cancel the queue refused keeps its
        count): their proof dropped, the file replaced or sent again."""
        if destination is None:
            with self._lock:
                targets = set(self._targets)
            gone = [j for j, r in self._refused.items() if r.destination not in targets]
        else:
            gone = [
                j
                for j, r in self._refused.items()
                if r.destination == destination and j not in (awaiting or set())
            ]
            if gone:
                opened = {
                    i.job_id
                    for t in self.queue.open_commitments(destination)
                    if t.kind == "stgcmt"
                    for i in t.items
                }
                gone = [j for j in gone if j not in opened]
        for job_id in gone:
            del self._refused[job_id]

    def _refusal(self, target: ProofTarget, job_ids: list[int], exc: CommitmentError) -> None:
        """The PACS refused the N-ACTION naming ``job_ids`` (the destination rests, and asks
        its other studies first next time). Counted against each only when the status is not
        transient and the destination accepted another N-ACTION since its previous refusal
        (the rule in the module's docstring); after :data:`UNDECIDED_LIMIT` counted refusals
        it is not committed."""
        now, accepted = time.time(), self._accepted.get(target.name, 0)
        transient = exc.status is not None and _transient(exc.status)
        given_up = []
        for job_id in job_ids:
            before = self._refused.get(job_id)
            counted = 0 if before is None else before.counted + (before.accepted != accepted)
            if transient:  # retried (after the others), never counted
                counted = 0 if before is None else before.counted
            if counted >= UNDECIDED_LIMIT:
                given_up.append(job_id)  # its count is let go once the give-up is recorded
            else:
                self._refused[job_id] = _Refused(target.name, now, accepted, counted)
        why = (
            f"storage commitment refused by {target.name}: {exc} ({UNDECIDED_LIMIT} times, "
            "each after it had accepted another request)"
        )
        self._give_up(target, given_up, why)
        for job_id in given_up:  # not before: a give-up the queue refused is counted again
            self._refused.pop(job_id, None)

    def _cancel(self, uid: str, destination: str) -> None:
        """Transaction ``uid`` was not requested: its instances await again. When the queue
        refuses the cancel (locked, disk full), it is tried again every tick until it works
        (:meth:`_cancel_again`); meanwhile it is not expired (its instances are not sent again
        for a request that never went out)."""
        self.book.forget(uid)
        with self._lock:
            self._jobs.pop(uid, None)
            self._uncancelled[uid] = destination
        self._cancel_again([uid])

    def _cancel_again(self, uids: Sequence[str] | None = None) -> None:
        """Cancel in the queue the transactions given up (``uids``, or every one whose cancel
        the queue refused so far); a refusal is said once per transaction and reason."""
        with self._lock:
            todo = (
                dict(self._uncancelled)
                if uids is None
                # .get: the keeper's own tick may have cancelled one since (a reload's configure)
                else {u: d for u in uids if (d := self._uncancelled.get(u)) is not None}
            )
        for uid, destination in todo.items():
            key = f"cancel {uid}"
            try:
                self.queue.cancel_commitment(uid)
            except ForwarderError as exc:
                self._tell(
                    key,
                    str(exc),
                    logging.ERROR,
                    "%s: storage commitment transaction %s was not requested, and cannot be "
                    "cancelled: %s; trying again every second (its instances are not sent again)",
                    destination,
                    uid,
                    exc,
                )
                continue
            with self._lock:
                self._uncancelled.pop(uid, None)
            if self._untell(key):
                logger.info(
                    "%s: storage commitment transaction %s cancelled: its instances await a "
                    "new request",
                    destination,
                    uid,
                )

    def _tell(
        self,
        key: str,
        why: str,
        level: int,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """A failure of the keeper's own work (``key``: what failed), said at ``level`` when
        ``why`` is new for it, the same again only at debug level (as :meth:`_say` does for a
        destination's rounds): not one line a second while the queue refuses."""
        with self._lock:
            if self._told.get(key) == why:
                level, exc_info = logging.DEBUG, None
            self._told[key] = why
        logger.log(level, message, *args, exc_info=exc_info)

    def _untell(self, key: str) -> bool:
        """``key`` works again: whether a failure of it had been said."""
        with self._lock:
            return self._told.pop(key, None) is not None

    def _untold_tries(self, target: ProofTarget, job_ids: list[int]) -> None:
        """Instances that cannot be named now (the UIDs they were sent with cannot be told) are
        tried again ``settle`` later, but not for ever: after :data:`UNDECIDED_LIMIT` tries
        they count as not committed (sent again, which fails with the cause, or failed/)."""
        now, given_up = time.time(), []
        for job_id in job_ids:
            count = self._undecided.get(job_id, 0) + 1
            if count < UNDECIDED_LIMIT:
                self._undecided[job_id] = count
                self._retry_at[job_id] = now + max(target.policy.settle, 1.0)
            else:
                self._undecided.pop(job_id, None)
                self._retry_at.pop(job_id, None)
                given_up.append(job_id)
        why = f"not requested: cannot tell the UIDs it was sent with ({UNDECIDED_LIMIT} times)"
        self._give_up(target, given_up, why)

    def _give_up(self, target: ProofTarget, job_ids: list[int], why: str) -> None:
        """``job_ids`` count as not committed, for ``why``: sent again, or failed/."""
        if not job_ids:
            return
        # Recorded as a transaction asked of no one (a crash before its outcome: it expires at
        # once after the restart, resent), then resolved: nothing committed.
        uid = new_transaction_uid()
        self.queue.begin_commitment(uid, target.name, "stgcmt", job_ids, deadline=time.time())
        self._record(uid, target.name, [], [(j, why) for j in job_ids], why)

    def _references(
        self, destination: str, items: Sequence[CommitItem]
    ) -> list[tuple[CommitItem, str]]:
        """Each item with the SOP Instance UID it was sent with (the PACS knows a de-identified
        object by its new one); an item whose UIDs cannot be told now is left out (it awaits,
        or, in a transaction already asked, is not named in the report: sent again)."""
        out = []
        for item in items:
            sent = self._as_sent(destination, item)
            if sent is not None:
                out.append((item, sent[2]))
        return out

    def _expect(self, uid: str, pairs: Sequence[tuple[CommitItem, str]]) -> list[Reference]:
        """The references of transaction ``uid``, awaited in the book."""
        refs = [Reference(i.sop_class_uid, sent) for i, sent in pairs]
        with self._lock:
            self._jobs[uid] = {sent: i.job_id for i, sent in pairs}
        self.book.expect(uid, refs)
        return refs

    def _expire(self) -> None:
        """Record the transactions past their deadline as not reported (sent again); not one
        given up whose cancel the queue refused (:meth:`_cancel`). What the queue refuses is
        said once per transaction and reason, and tried again at the next tick."""
        try:
            due = self.queue.open_commitments(due_by=time.time())
        except ForwarderError as exc:
            self._tell(
                "listing",
                str(exc),
                logging.ERROR,
                "storage commitment: cannot list the transactions past their deadline: %s; "
                "trying again every second",
                exc,
            )
            return
        if self._untell("listing"):
            logger.info("storage commitment: the transactions past their deadline are listed again")
        keys = {f"expire {t.uid}" for t in due}
        with self._lock:
            uncancelled = set(self._uncancelled)
            # Forgotten once no longer due (a report came after all, or a cancel).
            for key in [k for k in self._told if k.startswith("expire ") and k not in keys]:
                del self._told[key]
        for txn in due:
            if txn.kind != "stgcmt" or txn.uid in uncancelled:
                continue
            target = self._targets.get(txn.destination)
            timeout = target.policy.timeout if target else txn.deadline - txn.created_at
            why = f"no storage commitment report within {timeout:g}s"
            key = f"expire {txn.uid}"
            try:
                self._record(txn.uid, txn.destination, [], [], why)
            except ForwarderError as exc:
                self._tell(
                    key,
                    str(exc),
                    logging.ERROR,
                    "%s: storage commitment transaction %s is past its deadline (%s), and cannot "
                    "be recorded as not committed: %s; trying again every second",
                    txn.destination,
                    txn.uid,
                    why,
                    exc,
                )
                continue
            self._untell(key)

    # -- outcomes ----------------------------------------------------------------------------------

    def _on_report(self, report: CommitmentReport) -> None:
        """A trusted report (any thread): record it. Raises :class:`ForwarderError` when it
        cannot be (the book then answers 0x0110 and takes the report if sent again; if it
        is not, the transaction stays open and expires at its deadline: resent)."""
        crash_point("stgcmt-before-record")
        with self._lock:
            jobs = self._jobs.get(report.transaction_uid, {})
        committed = [jobs[r.sop_instance] for r in report.committed if r.sop_instance in jobs]
        failed = [
            (jobs[f.reference.sop_instance], failure_text(f.reason))
            for f in report.failed
            if f.reference.sop_instance in jobs
        ]
        self._record(report.transaction_uid, None, committed, failed, "not named in the report")

    def _record(
        self,
        uid: str,
        destination: str | None,
        committed: list[int],
        failed: list[tuple[int, str]],
        unreported: str,
    ) -> None:
        with self._lock:
            jobs = self._jobs.get(uid, {})
        # Jobs neither committed nor failed by the report are "not reported": say why.
        named = set(committed) | {j for j, _ in failed}
        failed = failed + [(j, unreported) for j in jobs.values() if j not in named]
        name = destination or self.queue.commitment_destination(uid)
        target = self._targets.get(name or "")
        max_resends = target.policy.max_resends if target else 0
        res = self.queue.resolve_commitment(
            uid, committed, failed, max_resends=max_resends, outcome=unreported
        )
        self.book.forget(uid)
        with self._lock:
            self._jobs.pop(uid, None)
        if res is None:
            return
        apply_outcome(
            res,
            name or "?",
            f"storage commitment transaction {uid}",
            sorted({why for _, why in failed}),
            finisher=self.finisher,
            wake_workers=self.wake_workers,
            metrics=self.metrics,
        )


def apply_outcome(
    res: Resolution,
    destination: str,
    what: str,
    reasons: Sequence[str],
    *,
    finisher: FinishSink,
    wake_workers: Callable[[], None],
    metrics: Any,
) -> None:
    """After the queue recorded an outcome: its one journal line, the metrics, the files it
    finished to the finisher, and the workers woken for what is sent again."""
    level = logging.INFO if not (res.resent or res.failed) else logging.WARNING
    logger.log(
        level,
        "%s: %s: %d committed, %d sent again, %d failed%s",
        destination,
        what,
        res.committed,
        res.resent,
        res.failed,
        f" ({'; '.join(reasons[:3])})" if reasons else "",
        extra={"DESTINATION": destination},
    )
    if metrics is not None:
        metrics.commitment_outcome(destination, res.committed, res.resent, res.failed)
    if res.finished_files:
        finisher.submit(list(res.finished_files))
    if res.resent:
        wake_workers()
