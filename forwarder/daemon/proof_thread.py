"""The thread shape both proofs of delivery share: storage commitment
(:mod:`forwarder.daemon.commitment`) and verification by query
(:mod:`forwarder.daemon.verify_query`).

A :class:`ProofThread` holds the destinations it proves (:class:`Target`s, replaced on
reload), wakes once a second to do what is due (:meth:`ProofThread._tick`), and stops in two
steps: :meth:`~ProofThread.request_stop` sets the stop event, which every network wait of the
thread is given as its cancel (:mod:`forwarder.net.cancel`), so an exchange under way is aborted
at once; :meth:`~ProofThread.stop` then joins the thread within a bound. An exchange that did not
happen (:meth:`~ProofThread._not_done`), or a round that failed otherwise (the queue refusing, a
bug of ours: :meth:`~ProofThread._failed`; the subclass first closes what the round recorded),
makes its destination rest before it is asked again, and is said once: round after round with
the same reason, only at debug level (as C-STORE says a destination DOWN once), until the reason
changes or a round works again (said once too).

A destination C-STORE finds down (:attr:`forwarder.daemon.destination_state.DestinationState.
unreachable`: its breaker open, or its workers waiting out a failed association) is not asked
at all, and nothing is said: a proof association every rest on top of C-STORE's probes would
only fail, and say so. What awaits proof there waits, and is asked at the next tick after
C-STORE finds the peer up again, whatever rest a round that failed before left it. The service
gives the threads that view (:data:`Unreachable`), read-only, not the workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from forwarder.config import Destination
from forwarder.errors import ForwarderError
from forwarder.net.association import AssociationSettings
from forwarder.queue import Queue

if TYPE_CHECKING:
    from forwarder.daemon.finisher import FinishSink
    from forwarder.queue import CommitItem

#: ``sent_uids(path, rel_path, calling_ae, destination)``: the (Study, Series, SOP Instance)
#: UIDs a destination's changes (``deidentify``, ``modify``) send a file with now, None when
#: sent unchanged (:meth:`forwarder.daemon.edits.EditResolver.sent_uids`); only for an item
#: the queue has not recorded them for (stored before schema 10).
SentUids = Callable[[str, str, str, str], "tuple[str, str, str] | None"]
#: ``unreachable(destination)``: True while C-STORE finds the destination down (see the module
#: docstring); the proofs wait meanwhile.
Unreachable = Callable[[str], bool]

_TICK = 1.0  # how often the thread looks for what is due
_RETRY = 30.0  # after the peer could not be asked, ask again this much later
_STOP_JOIN = 5.0  # the thread's network waits end at once on stop; this is only a bound
#: Tries an instance may stay undecided (its UIDs as sent cannot be told; for verify_by_query
#: also a C-FIND the peer answers with a failure) before it counts as not committed: sent
#: again, then failed/ with why. It alone waits between tries; the others go on.
UNDECIDED_LIMIT = 5


@dataclass(frozen=True, slots=True)
class Target:
    """A destination requiring proof of delivery, as the proving thread needs it."""

    destination: Destination
    settings: AssociationSettings

    @property
    def name(self) -> str:
        return self.destination.name


TargetT = TypeVar("TargetT", bound=Target)


class ProofThread(Generic[TargetT]):
    """One thread proving what its destinations stored; subclasses say what a tick does."""

    #: The thread's name (``ps -L``, thread dumps, the tests' leak check).
    thread_name: ClassVar[str]
    #: The warning when the thread outlives its join, with ``%g`` for the bound.
    not_stopped: ClassVar[str]
    #: The subclass module's logger, so that every line keeps its logger name.
    log: ClassVar[logging.Logger]
    #: What it does, in the log's words ("storage commitment", "verification by query").
    what: ClassVar[str]

    def __init__(
        self,
        queue: Queue,
        finisher: FinishSink,
        *,
        wake_workers: Callable[[], None],
        metrics: Any = None,
        sent_uids: SentUids | None = None,
        unreachable: Unreachable | None = None,
    ) -> None:
        self.queue = queue
        self.finisher = finisher
        self.wake_workers = wake_workers
        self.metrics = metrics
        self.sent_uids = sent_uids
        self.unreachable: Unreachable = unreachable or (lambda _: False)
        self._targets: dict[str, TargetT] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_before: dict[str, float] = {}
        self._paused: set[str] = set()  # the paused destinations it said it waits for
        self._held: set[str] = set()  # the destinations it waits for while C-STORE finds down
        self._undecided: dict[int, int] = {}  # job id -> rounds it stayed undecided
        self._retry_at: dict[int, float] = {}  # job id -> not asked about again before
        self._untold: set[int] = set()  # job ids whose sent UIDs could not be told (logged)
        self._said: dict[str, str] = {}  # destination -> the failure of its rounds last said
        self._setup()

    def _setup(self) -> None:
        """The subclass's own state, set last in the constructor (so that a subclass need not
        repeat the constructor's parameters to add an attribute)."""

    def configure(self, targets: Sequence[TargetT]) -> None:
        """The destinations to prove now (at start and on reload). A failure said for a
        destination that is gone or changed is forgotten: the next one is said again (a
        destination added back, or the operator's fix that did not help)."""
        with self._lock:
            new = {t.name: t for t in targets}
            for name in [n for n in self._said if self._targets.get(n) != new.get(n)]:
                del self._said[name]
            self._targets = new

    def start(self) -> None:
        """Run the thread (subclasses first take back what a previous run left open)."""
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Begin stopping (returns at once): an exchange under way is aborted, and asked again
        after the restart."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the thread; returns within a few seconds whatever the peers do (every network
        wait of the thread is cancelled by the stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_STOP_JOIN)
            if self._thread.is_alive():
                self.log.warning(self.not_stopped, _STOP_JOIN)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(_TICK):
            self._tick()

    def _tick(self) -> None:
        """What is due now; returns early once the stop is set."""
        raise NotImplementedError

    def _current_targets(self) -> list[TargetT]:
        """The destinations to prove now: not a paused one (``forwarder pause`` stops all its
        traffic, a C-FIND or N-ACTION too; its proofs wait, and go on after ``resume``), nor
        one C-STORE finds down (its proofs wait, unsaid, and go on as soon as it is up: a rest
        a round that failed before left it is over then)."""
        with self._lock:
            targets = list(self._targets.values())
        try:
            paused = set(self.queue.paused()) if targets else set()
        except ForwarderError as exc:
            self.log.warning("%s: cannot read the paused destinations: %s", self.what, exc)
            paused = self._paused
        for name in sorted({t.name for t in targets} & paused - self._paused):
            self.log.info("%s: paused: %s waits until it is resumed", name, self.what)
        self._paused = paused
        targets = [t for t in targets if t.name not in paused]
        held = {t.name for t in targets if self.unreachable(t.name)}
        for name in self._held - held:
            self._not_before.pop(name, None)
        self._held = held
        return [t for t in targets if t.name not in held]

    def _as_sent(self, destination: str, item: CommitItem) -> tuple[str, str, str] | None:
        """The (Study, Series, SOP Instance) UIDs ``destination`` holds ``item`` by: those its
        changes sent it with (a de-identified object's are new), else the file's own.

        As the queue recorded them when it was stored (:attr:`CommitItem.sent_uids`): what
        was sent, whatever a reload or restart since changed in the routes. Only an item
        stored before the queue recorded them has them worked out from the routes in force.
        None when they cannot be worked out now: never asked by its own UIDs then, which
        may name another object the peer holds (the same study sent unchanged elsewhere)."""
        own = (item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
        if item.sent_uids is not None:
            return item.sent_uids if all(item.sent_uids) else own
        if self.sent_uids is None or not item.path:
            return own
        try:
            sent = self.sent_uids(item.path, item.rel_path, item.calling_ae, destination)
        except Exception as exc:
            if item.job_id not in self._untold:
                self._untold.add(item.job_id)
                self.log.warning(
                    "%s: %s: cannot tell the UIDs %s was sent with: %s; it awaits",
                    destination,
                    self.what,
                    item.path,
                    exc,
                )
            return None
        self._untold.discard(item.job_id)
        return sent if sent is not None and all(sent) else own

    def _resting(self, target: TargetT, now: float) -> bool:
        """True while the destination rests after an exchange that did not happen."""
        return now < self._not_before.get(target.name, 0.0)

    def _not_done(
        self, target: TargetT, what: str, count: int, stopped: str, failed: str, exc: Exception
    ) -> None:
        """An exchange about ``count`` instances that did not happen: aborted by the stop (asked
        again after the restart), or the peer could not be asked (the destination rests)."""
        if self._stop.is_set():
            self.log.info(
                "%s: %s of %d instance(s) %s (%s); asked again after the restart",
                target.name,
                what,
                count,
                stopped,
                exc,
            )
            return
        self._not_before[target.name] = time.time() + _RETRY
        self._say(
            target,
            f"{failed}: {exc}",
            logging.WARNING,
            "%s: %s of %d instance(s) %s: %s; asking again in %.0fs",
            target.name,
            what,
            count,
            failed,
            exc,
            _RETRY,
        )

    @staticmethod
    def _rest() -> float:
        """Seconds a destination, or an instance the peer refused, rests before it is asked
        again."""
        return _RETRY

    def _failed(self, target: TargetT, exc: Exception) -> None:
        """A round that failed otherwise than by the peer (the queue refusing, or a bug of ours,
        said with its traceback), after the subclass closed what the round recorded: the
        destination rests as when the peer cannot be asked, then is asked again."""
        self._not_before[target.name] = time.time() + _RETRY
        if isinstance(exc, ForwarderError):
            why, error = str(exc), None
        else:
            why, error = f"internal error ({type(exc).__name__}: {exc})", exc
        self._say(
            target,
            why,
            logging.ERROR,
            "%s: %s: %s; trying again in %.0fs",
            target.name,
            self.what,
            why if error is None else "internal error",
            _RETRY,
            exc_info=error,
        )

    def _say(
        self,
        target: TargetT,
        why: str,
        level: int,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """A round's failure, said at ``level`` when ``why`` is new for the destination; the
        same again only at debug level, without a traceback (a peer down for a weekend, one
        line, not one a round)."""
        with self._lock:
            if self._said.get(target.name) == why:
                level, exc_info = logging.DEBUG, None
            self._said[target.name] = why
        self.log.log(level, message, *args, exc_info=exc_info)

    def _works(self, target: TargetT) -> None:
        """A round went through: said once, when a failure of the destination's was said."""
        with self._lock:
            said = self._said.pop(target.name, None)
        if said is not None:
            self.log.info("%s: %s works again", target.name, self.what)
