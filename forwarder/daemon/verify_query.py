"""Proof of delivery by query, for peers without storage commitment (``verify_by_query:``).

The workers ack what such a destination stored as awaiting proof, exactly as for storage
commitment (:mod:`forwarder.daemon.commitment`). ``after`` seconds later the
:class:`QueryVerifier` asks the peer, by C-FIND at IMAGE level with each instance's Study,
Series and SOP Instance UID (:mod:`forwarder.net.query_scu`), whether it holds it. What it holds
counts as committed; what it does not is sent again, only that, up to ``max_resends``, then
failed/ with "stored but not committed: not held by the destination": the same queue states,
reasons, ``status`` fields and metrics as storage commitment.

A round is recorded in the queue before the queries go out (kind ``query``); one left open by a
crash is simply asked again after the restart (a query changes nothing at the peer), and one an
error of the round left open (the queue refusing, a bug of ours) is closed at once, its
instances asked again after the destination's rest. A peer that cannot be asked leaves
everything awaiting, and is asked again later; so does an instance whose query the peer answers
with a failure status, without holding up the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from forwarder.config import VerifyByQuery
from forwarder.crashpoints import crash_point
from forwarder.daemon.channels import destination_peer
from forwarder.daemon.commitment import apply_outcome
from forwarder.daemon.proof_thread import UNDECIDED_LIMIT, ProofThread, Target
from forwarder.errors import ForwarderError
from forwarder.net.commitment import new_transaction_uid
from forwarder.net.query_scu import InstanceKey
from forwarder.queue import CommitItem

logger = logging.getLogger(__name__)

_ROUND = 500  # instances asked about per round (one association)
NOT_HELD = "not held by the destination (C-FIND at IMAGE level found no such instance)"
CANNOT_TELL = "cannot tell the UIDs it was sent with"
# An instance undecided (the peer answers its C-FIND with a failure, or the UIDs it was sent
# with cannot be told) is asked again ``verify_by_query.after`` later, UNDECIDED_LIMIT times
# at most, then taken as not held (it alone waits: the others are asked as due).


@dataclass(frozen=True, slots=True)
class QueryTarget(Target):
    """A destination verified by query, as the verifier needs it."""

    @property
    def policy(self) -> VerifyByQuery:
        assert self.destination.verify_by_query is not None
        return self.destination.verify_by_query


class QueryVerifier(ProofThread[QueryTarget]):
    """Asks destinations with ``verify_by_query`` whether they hold what they stored.

    On stop (:meth:`request_stop`), a round under way is aborted (its association with it) and
    asked again after the restart.
    """

    thread_name = "verify-query"
    not_stopped = "verification by query did not stop within %gs"
    what = "verification by query"
    log = logger

    def _setup(self) -> None:
        self._open: set[str] = set()  # rounds recorded in the queue, not yet resolved

    def start(self) -> None:
        """Rounds a crash left open are asked again (their instances await once more)."""
        for txn in self.queue.open_commitments():
            if txn.kind == "query":
                self.queue.cancel_commitment(txn.uid)
        super().start()

    def _tick(self) -> None:
        self._close_rounds()
        for target in self._current_targets():
            if self._stop.is_set():
                return
            try:
                self._verify_due(target)
            except Exception as exc:
                self._close_rounds()
                self._failed(target, exc)

    def _begin(self, uid: str, destination: str, job_ids: list[int]) -> None:
        self.queue.begin_commitment(uid, destination, "query", job_ids, deadline=time.time())
        self._open.add(uid)

    def _cancel(self, uid: str) -> None:
        self.queue.cancel_commitment(uid)
        self._open.discard(uid)

    def _close_rounds(self) -> None:
        """Rounds an error left open are closed: their instances await again, and are asked
        after the destination's rest, not kept in a round nobody resolves until a restart.
        One the queue does not close now is tried again at the next tick."""
        for uid in sorted(self._open):
            try:
                self._cancel(uid)
            except ForwarderError as exc:
                logger.debug("verification by query: round %s not closed yet: %s", uid, exc)

    def _verify_due(self, target: QueryTarget) -> None:
        now = time.time()
        if self._resting(target, now):
            return
        due = [
            i
            for i in self.queue.awaiting_commitment(target.name)
            if i.stored_at <= now - target.policy.after and self._retry_at.get(i.job_id, 0) <= now
        ]
        for start in range(0, len(due), _ROUND):
            if self._stop.is_set() or not self._verify(target, due[start : start + _ROUND]):
                return

    def _verify(self, target: QueryTarget, items: list[CommitItem]) -> bool:
        """One round: False when the peer could not be asked (the destination then rests)."""
        from forwarder.net.query_scu import QueryError, held_instances

        keyed = [(i, self._key(target, i)) for i in items]
        asked = [(i, k) for i, k in keyed if k is not None]
        undecided = {i.job_id: CANNOT_TELL for i, k in keyed if k is None}
        committed: list[int] = []
        missing: list[tuple[int, str]] = []
        uid, recorded = new_transaction_uid(), [i.job_id for i, _ in asked]
        if asked:
            self._begin(uid, target.name, recorded)
            crash_point("query-before-find")
            try:
                answers = held_instances(
                    destination_peer(target.destination),
                    target.settings,
                    [k for _, k in asked],
                    self._stop,
                )
            except QueryError as exc:
                self._cancel(uid)
                self._not_done(
                    target, "verification by query", len(items), "interrupted", "not done", exc
                )
                return False
            for i, k in asked:
                if k.sop_instance_uid in answers.undecided:
                    undecided[i.job_id] = answers.undecided[k.sop_instance_uid]
                elif k.sop_instance_uid in answers.held:
                    committed.append(i.job_id)
                else:
                    missing.append((i.job_id, NOT_HELD))
        for job_id in committed + [j for j, _ in missing]:
            self._undecided.pop(job_id, None)
            self._retry_at.pop(job_id, None)
        for job_id, why in list(undecided.items()):
            # Asked again later (the others are not held up), but not for ever: an instance
            # the peer never answers for is taken as not held (sent again, then failed/ with
            # why), not left awaiting.
            count = self._undecided.get(job_id, 0) + 1
            self._undecided[job_id] = count
            self._retry_at[job_id] = time.time() + max(target.policy.after, 1.0)
            if count >= UNDECIDED_LIMIT:
                missing.append((job_id, f"not verified: {why} ({count} times)"))
                del undecided[job_id], self._undecided[job_id], self._retry_at[job_id]
        decided = committed + [j for j, _ in missing]
        if set(decided) != set(recorded):
            # The round is recorded anew with what was decided (the undecided await again).
            if asked:
                self._cancel(uid)
            uid = new_transaction_uid()
            if decided:
                self._begin(uid, target.name, decided)
        res = (
            self.queue.resolve_commitment(
                uid, committed, missing, max_resends=target.policy.max_resends, outcome="query"
            )
            if decided
            else None
        )
        self._open.discard(uid)
        if res is not None:
            apply_outcome(
                res,
                target.name,
                f"verification by query {uid}",
                sorted({why for _, why in missing}),
                finisher=self.finisher,
                wake_workers=self.wake_workers,
                metrics=self.metrics,
            )
        if undecided:
            logger.warning(
                "%s: verification by query of %d instance(s) not decided: %s; asking them "
                "again in %.0fs",
                target.name,
                len(undecided),
                "; ".join(sorted(set(undecided.values()))[:3]),
                max(target.policy.after, 1.0),
            )
        self._works(target)
        return True

    def _key(self, target: QueryTarget, item: CommitItem) -> InstanceKey | None:
        """What the peer holds ``item`` by: its UIDs as they were sent (None: cannot tell)."""
        sent = self._as_sent(target.name, item)
        return InstanceKey(*sent) if sent is not None else None
