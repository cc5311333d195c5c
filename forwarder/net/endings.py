"""How a peer ended a pynetdicom association under us, said in our words, not pynetdicom's.

A peer that resets (or closes) an established association while we wait for its answer (the
C-FIND of the query SCU, the N-ACTION of the storage commitment SCU, the N-EVENT-REPORT of
``forwarder receive``'s report sender) makes pynetdicom log "Connection closed before the entire
PDU was received" and the reset's traceback on the association's connection (DUL) thread, then
"Connection closed while waiting for DIMSE message" on the waiting thread; the waiter sees only
no answer. While :func:`watched` runs, those lines of that association are not let through and
what ended it is kept (:class:`Ending`): the caller says it in one line, in the words the
C-STORE engine uses (:func:`forwarder.net.transport.connection_lost`, ``connection_closed``).
So too pynetdicom's "DIMSE timeout" ERROR of a peer that keeps the association but does not
answer: the caller says it (``no_answer``: the peer, what was waited for, the timeout).

The watch lasts through our release (:func:`release`): a peer that resets or closes instead of
answering our A-RELEASE-RQ, everything asked being answered, loses nothing; :func:`release`
notes it in one INFO line, and pynetdicom's lines of it are not let through either.

So too, for as long as it lives, for every association a watched AE accepts
(:func:`watch_acceptor`: the storage commitment :class:`~forwarder.net.commitment_scu.
ReportAcceptor`, which says the ending itself from its EVT_FSM_TRANSITION handler, with
:func:`accepted_ending`).

Other associations' lines pass as they are: pynetdicom is never silenced as a whole.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from forwarder.net.cancel import end_association
from forwarder.net.transport import connection_closed, connection_lost, no_answer

logger = logging.getLogger(__name__)

_READ_FAILED = "Connection closed before the entire PDU was received"  # pynetdicom's DUL
_SHORT_PDU = "The received PDU is shorter than expected"  # DUL: the peer closed mid-PDU
_SENT_CLOSED = "Attempted to send data over closed connection"  # DUL, WARNING: our answer
_CLOSED_WAITING = "Connection closed while waiting for DIMSE message"  # the waiter's thread
_DIMSE_TIMEOUT = "DIMSE timeout reached while waiting for message response"  # the waiter's too
_SETTLE = 1.0  # seconds the waiter, woken by the connection's end, gives the DUL to note why
_PEER_ABORTED = "Evt16"  # PS3.8 state machine: A-ABORT PDU received
_CONNECTION_CLOSED = "Evt17"  # transport connection closed (a reset, or the peer's close)
_RELEASING = "Evt11"  # our A-RELEASE-RQ: the peer's answer (or its ending) is still to come
_OURS = frozenset({"Evt13", "Evt14", "Evt15"})  # the peer's A-RELEASE-RP, ours, our abort
_ENDED = "Sta13"  # awaiting the close of a connection that no longer carries an association
#: States in which no association stands: idle, a connection without an A-ASSOCIATE-RQ yet
#: (a TCP health check), one not answered yet, and one already ended. A peer leaving then is
#: not an association ended under us.
_NO_ASSOCIATION = frozenset({"Sta1", "Sta2", "Sta3", _ENDED})


class Ending:
    """What ended one association, as its connection thread saw it (any thread may ask)."""

    def __init__(self) -> None:
        self.error: OSError | None = None  # the reset (or other socket error) that closed it
        self.by: str | None = None  # "closed" or "aborted" by the peer, "us", None: not ended
        self.timeout: float | None = None  # the DIMSE timeout of the association (watched)
        self.timed_out = False  # the waiter had no answer within it (we then abort)
        self.releasing = False  # our A-RELEASE-RQ went out before the ending
        self._settled = threading.Event()

    def note(self, event: Any) -> bool:
        """An EVT_FSM_TRANSITION of the association: True when it is the peer ending it (the
        first ending only)."""
        if self._settled.is_set():
            return False
        fsm_event, state = event.fsm_event, event.current_state
        if fsm_event in (_PEER_ABORTED, _CONNECTION_CLOSED) and state in _NO_ASSOCIATION:
            return False
        if fsm_event == _RELEASING:
            self.releasing = True
            return False
        if fsm_event == _PEER_ABORTED:
            self.by = "aborted"
        elif fsm_event == _CONNECTION_CLOSED:
            self.by = "closed"
        elif fsm_event in _OURS:
            self.by = "us"
        else:
            return False
        self._settled.set()
        return self.by != "us"

    def words(self, peer: object, waiting_for: str, settle: float = _SETTLE) -> str | None:
        """The peer's ending of the association, in one line ("connection to PACS@host:104
        lost waiting for the N-ACTION-RSP: connection reset by peer", "PACS@host:104 closed the
        connection (waiting for …)", "PACS@host:104 aborted the association (waiting for …)");
        None when the peer did not end it (we did: a stop; or it stands). A DIMSE timeout is
        said as such ("PACS@host:104 did not send the C-FIND-RSP for … within 60s").
        Waits up to ``settle`` seconds for the connection thread to note what ended it (it
        wakes the waiter first)."""
        if self.timed_out and self.timeout is not None:
            return no_answer(peer, waiting_for, self.timeout)
        self._settled.wait(settle)
        return self._said(peer, waiting_for)

    def release_words(self, peer: object, settle: float = _SETTLE) -> str | None:
        """After our A-RELEASE-RQ went unanswered: how the peer ended the association instead
        (as :meth:`words` says it, waiting for "the A-RELEASE-RP"), None when it did not."""
        if not self.releasing:
            return None
        self._settled.wait(settle)
        return self._said(peer, "the A-RELEASE-RP")

    def _said(self, peer: object, waiting_for: str) -> str | None:
        if self.by == "aborted":
            return f"{peer} aborted the association (waiting for {waiting_for})"
        if self.by != "closed":
            return None
        if self.error is not None:
            return connection_lost(peer, waiting_for, self.error)
        return connection_closed(peer, waiting_for)


class _Endings(logging.Filter):
    """On pynetdicom's DUL and association loggers: the lines of a watched association's end
    are not let through (its socket error kept in its :class:`Ending`); others pass."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._by_assoc: weakref.WeakKeyDictionary[Any, Ending] = weakref.WeakKeyDictionary()
        self._waiters: dict[int, Ending] = {}  # thread ident -> the ending it waits on
        self._acceptors: weakref.WeakSet[Any] = weakref.WeakSet()  # AEs: all they accept

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.association":
            with self._lock:
                waiter = self._waiters.get(record.thread) if record.thread is not None else None
            if waiter is not None and record.msg == _DIMSE_TIMEOUT:
                waiter.timed_out = True
                return False
            return not (waiter is not None and record.msg == _CLOSED_WAITING)
        thread = threading.current_thread()
        assoc = getattr(thread, "assoc", None)  # DUL thread; the reactor is the association
        ending = self.ending(assoc if assoc is not None else thread)
        if ending is None:
            return True
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError):
            # Only what it says: the exception's traceback would hold the DUL, and through it
            # the association, for as long as the Ending lives (an acceptor's: for ever).
            ending.error = _bare(error)
            return False
        message = record.getMessage()
        return not (message == _READ_FAILED or message.startswith((_SHORT_PDU, _SENT_CLOSED)))

    def ending(self, assoc: Any) -> Ending | None:
        """``assoc``'s :class:`Ending`, if it is watched (one accepted by a watched AE always
        is: made on first need)."""
        if assoc is None:
            return None
        with self._lock:
            try:
                ending = self._by_assoc.get(assoc)
            except TypeError:  # not an association (not weakly referable): not watched
                return None
            if ending is None and getattr(assoc, "ae", None) in self._acceptors:
                if not getattr(assoc, "is_acceptor", False):
                    return None
                ending = self._by_assoc[assoc] = Ending()
            return ending

    def watch(self, assoc: Any, ending: Ending, waiter: int) -> None:
        with self._lock:
            self._by_assoc[assoc] = ending
            self._waiters[waiter] = ending

    def unwatch(self, assoc: Any, waiter: int) -> None:
        with self._lock:
            self._by_assoc.pop(assoc, None)
            self._waiters.pop(waiter, None)

    def watch_acceptor(self, ae: Any) -> None:
        with self._lock:
            self._acceptors.add(ae)


def _bare(error: OSError) -> OSError:
    """A copy of ``error`` without its traceback or the exceptions chained to it."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # a subclass whose constructor takes other arguments
        copy = OSError(error.errno, error.strerror) if error.errno else OSError(str(error))
    return copy


_endings = _Endings()
for _name in ("pynetdicom.dul", "pynetdicom.association"):
    logging.getLogger(_name).addFilter(_endings)


@contextmanager
def watched(assoc: Any) -> Iterator[Ending]:
    """While the block runs (on the thread that waits for the peer's answers), ``assoc``'s
    ending by the peer is kept, not logged by pynetdicom; after a missing answer, ask
    :func:`lost` (or the yielded :class:`Ending`) for the words."""
    from pynetdicom import evt

    ending = Ending()
    ending.timeout = assoc.dimse_timeout
    waiter = threading.get_ident()
    _endings.watch(assoc, ending, waiter)
    assoc.bind(evt.EVT_FSM_TRANSITION, ending.note)
    try:
        yield ending
    finally:
        assoc.unbind(evt.EVT_FSM_TRANSITION, ending.note)
        _endings.unwatch(assoc, waiter)


def release(
    assoc: Any, ending: Ending, peer: object, cancel: threading.Event | None = None
) -> None:
    """Under :func:`watched` (``ending`` its yield), once everything asked was answered (or
    given up): :func:`~forwarder.net.cancel.end_association`. A peer that resets or closes
    the connection (or aborts) instead of answering our A-RELEASE-RQ is noted in one INFO
    line, not an error: nothing it owed us is missing."""
    if ending.by in ("closed", "aborted") and not (cancel is not None and cancel.is_set()):
        # The peer ended it (said by the caller): nothing to release. pynetdicom may not have
        # marked it ended yet, and its release would then spin on a reactor already gone.
        return
    end_association(assoc, cancel)
    said = None if assoc.is_released else ending.release_words(peer)
    if said is not None:
        logger.info("%s (everything asked was answered: nothing lost)", said)


def lost(assoc: Any, peer: object, waiting_for: str) -> str | None:
    """Under :func:`watched`: how the peer ended ``assoc`` while we waited for
    ``waiting_for`` (see :meth:`Ending.words`), None when it did not (or it is not watched)."""
    ending = _endings.ending(assoc)
    return ending.words(peer, waiting_for) if ending is not None else None


def watch_acceptor(ae: Any) -> None:
    """Every association ``ae`` accepts is watched for as long as it lives; bind an
    EVT_FSM_TRANSITION handler that calls :func:`accepted_ending` to say how it ended."""
    _endings.watch_acceptor(ae)


def accepted_ending(event: Any) -> Ending | None:
    """For the EVT_FSM_TRANSITION handler of a watched AE: the association's :class:`Ending`
    when this transition is the peer ending it (once), else None."""
    ending = _endings.ending(event.assoc)
    return ending if ending is not None and ending.note(event) else None


def requestor(assoc: Any) -> str:
    """The peer of an accepted association, as ``Peer`` prints one: ``AET@host:port``."""
    who = assoc.requestor
    return f"{str(who.ae_title).strip()}@{who.address}:{who.port}"
