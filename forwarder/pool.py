"""Channels: one reusable association slot to one peer, and what a C-STORE outcome means.

A :class:`Channel` is driven by one thread. It opens an association on first use with contexts
planned from what it is asked to send (plus a hint of what else is queued), keeps it open across
batches, renegotiates when a file needs a context it never proposed, replaces it when it breaks,
and releases it when idle. Both the daemon's workers and ``forwarder send`` use it: one sender,
two front ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from forwarder.contexts import plan_contexts
from forwarder.dicomfile import UNCOMPRESSED, FileMeta, read_meta
from forwarder.errors import AssociationError, InvalidFileError, SendError
from forwarder.pdu import MAX_CONTEXTS, ProposedContext
from forwarder.sender import (
    AcceptedContext,
    Association,
    AssociationSettings,
    DimseResponse,
    Peer,
)

logger = logging.getLogger(__name__)

_association_numbers = itertools.count(1)
_numbers_lock = threading.Lock()


class Outcome(StrEnum):
    """What became of one C-STORE."""

    STORED = "stored"  # Success
    WARNING = "warning"  # Warning status: stored, with a remark
    RETRY = "retry"  # transient: try again later
    FAILED = "failed"  # permanent: do not retry

    @property
    def stored(self) -> bool:
        return self in (Outcome.STORED, Outcome.WARNING)


_FAILURE_CODES = frozenset(
    {0x0105, 0x0106, 0x0110, 0x0111, 0x0112, 0x0113, 0x0114, 0x0115, 0x0117, 0x0118, 0x0119}
    | {0x0120, 0x0121, 0x0122, 0x0123, 0x0124, 0x0210, 0x0211, 0x0212, 0x0213}
)


def code_to_category(code: int) -> str:
    """pynetdicom.status.code_to_category, restated so that sending does not import pynetdicom
    (and with it pydicom and numpy); tests/test_sender.py checks both agree on every code."""
    if code == 0x0000:
        return "Success"
    if code in (0xFF00, 0xFF01):
        return "Pending"
    if code == 0xFE00:
        return "Cancel"
    if code in _FAILURE_CODES or 0xA000 <= code <= 0xAFFF or 0xC000 <= code <= 0xCFFF:
        return "Failure"
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "Warning"
    return "Unknown"


def classify_status(status: int) -> Outcome:
    """Map a C-STORE-RSP status to an outcome.

    Success and Warning (0xB000, 0xB006, 0xB007, 0x0001) are stored. 0xA7xx (out of resources),
    0x0110 (processing failure, which PACS use for passing database trouble) and Cancel are
    transient. Everything else that is a failure (0xA9xx, 0xCxxx, 0x0122 SOP class not
    supported, 0x0124 not authorised, ...) is permanent.
    """
    category = code_to_category(status)
    if category == "Success":
        return Outcome.STORED
    if category == "Warning":
        return Outcome.WARNING
    if (status & 0xFF00) == 0xA700 or status in (0x0110, 0xFE00):
        return Outcome.RETRY
    return Outcome.FAILED


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """A file to store. ``key`` is the caller's handle (a job id, an index)."""

    path: str
    key: int = 0
    meta: FileMeta | None = None  # read from the file when not given


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """The result of one C-STORE attempt, for logs, the queue and ``--report``."""

    request: StoreRequest
    outcome: Outcome
    status: int | None  # the DIMSE status, when the peer answered
    error: str | None  # why it is not plainly stored
    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax: str | None  # the file's
    sent_transfer_syntax: str | None
    association: int | None  # association number, 1-based per process
    nbytes: int
    seconds: float


class Channel:
    """One association slot to ``peer``; not thread-safe (one thread drives it)."""

    def __init__(
        self,
        peer: Peer,
        settings: AssociationSettings,
        *,
        allow_lossy_decompress: bool = False,
        name: str = "",
    ) -> None:
        self.peer = peer
        self.settings = settings
        self.allow_lossy_decompress = allow_lossy_decompress
        self.name = name or str(peer)
        self._assoc: Association | None = None
        self._assoc_number: int | None = None
        self._proposed: set[tuple[str, str]] = set()
        self._proposed_order: list[tuple[str, str]] = []
        self.associations_opened = 0
        self.down: AssociationError | None = None  # the last failure to associate, until one works

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and not self._assoc.closed

    # -- association management ---------------------------------------------------------------

    def _open(self, needs: Sequence[tuple[str, str]]) -> Association:
        plans, covered = plan_contexts(needs, MAX_CONTEXTS)
        contexts = [ProposedContext(p.abstract_syntax, p.transfer_syntaxes) for p in plans]
        try:
            assoc = Association.request(self.peer, self.settings, contexts)
        except AssociationError as exc:
            self.down = exc
            raise
        self.down = None
        with _numbers_lock:
            self._assoc_number = next(_association_numbers)
        self._assoc = assoc
        self._proposed = set(covered)
        self._proposed_order = [n for n in needs if n in covered]
        self.associations_opened += 1
        logger.debug(
            "%s: association #%d open, %d contexts proposed, %d accepted",
            self.name,
            self._assoc_number,
            len(contexts),
            len(assoc.accepted_contexts),
        )
        return assoc

    def _ensure(self, need: tuple[str, str], hint: Sequence[tuple[str, str]]) -> Association:
        assoc = self._assoc
        if assoc is not None and assoc.peer_gone():
            # Closed, released or aborted by the peer while idle (peer_gone closed our end):
            # open a new one now, so the next file pays no failed attempt and no backoff.
            logger.debug(
                "%s: association #%s is gone; opening another", self.name, self._assoc_number
            )
            self._assoc = assoc = None
        if assoc is not None and not assoc.closed and need in self._proposed:
            return assoc
        if assoc is not None and not assoc.closed:
            # A syntax we never proposed: renegotiate, keeping what we proposed before.
            logger.debug("%s: renegotiating for %s in %s", self.name, need[0], need[1])
            assoc.release()
            needs = [need, *hint, *self._proposed_order]
        else:
            needs = [need, *hint, *self._proposed_order]
        return self._open(list(dict.fromkeys(needs)))

    @property
    def last_progress(self) -> float | None:
        """When the open association last moved a byte (monotonic), for health checks."""
        return self._assoc.last_progress if self._assoc is not None else None

    def release(self) -> None:
        """Release the association (if any), politely."""
        if self._assoc is not None:
            self._assoc.release()
            self._assoc = None

    def abort(self) -> None:
        if self._assoc is not None:
            self._assoc.abort()
            self._assoc = None

    def release_if_idle(self, idle_timeout: float) -> bool:
        """Release an association unused for ``idle_timeout`` seconds; True if it did."""
        assoc = self._assoc
        if assoc is not None and time.monotonic() - assoc.last_used >= idle_timeout:
            logger.debug("%s: releasing idle association #%s", self.name, self._assoc_number)
            self.release()
            return True
        return False

    # -- sending ------------------------------------------------------------------------------

    def send(
        self,
        requests: Iterable[StoreRequest],
        *,
        hint: Sequence[tuple[str, str]] = (),
    ) -> Iterator[SendOutcome]:
        """Store each request in turn and yield its outcome.

        ``hint`` lists other (SOP class, transfer syntax) pairs likely to follow, so one
        negotiation can cover them. When the peer cannot be reached, every remaining request
        is answered RETRY at once with that reason: a down peer costs one connect attempt per
        batch, not one per file.
        """
        down: AssociationError | None = None
        for request in requests:
            if down is not None:
                verdict = Outcome.RETRY if down.retryable else Outcome.FAILED
                yield self._outcome(request, request.meta, verdict, None, str(down), 0.0)
                continue
            started = time.monotonic()
            try:
                meta = request.meta or read_meta(request.path)
            except InvalidFileError as exc:
                yield self._outcome(request, None, Outcome.FAILED, None, exc.reason, 0.0)
                continue
            try:
                assoc = self._ensure((meta.sop_class_uid, meta.transfer_syntax), hint)
            except AssociationError as exc:
                outcome = Outcome.RETRY if exc.retryable else Outcome.FAILED
                self._assoc = None
                down = exc  # refused or unreachable: the rest of this batch fares the same
                yield self._outcome(request, meta, outcome, None, str(exc), 0.0)
                continue
            yield self._store_one(assoc, request, meta, started)

    def _store_one(
        self, assoc: Association, request: StoreRequest, meta: FileMeta, started: float
    ) -> SendOutcome:
        exact = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
        sent_syntax: str
        try:
            if exact is not None:
                sent_syntax = exact.transfer_syntax
                response = assoc.store_file(request.path, meta, exact)
                nbytes = meta.dataset_length
            else:
                fallback = self._fallback(assoc, meta)
                if isinstance(fallback, str):
                    return self._outcome(request, meta, Outcome.FAILED, None, fallback, started)
                sent_syntax = fallback.transfer_syntax
                from forwarder.transcode import transcode  # pydicom: only on this slow path

                data = transcode(
                    request.path,
                    sent_syntax,
                    allow_lossy=self.allow_lossy_decompress,
                    context=self._accepted_note(assoc, meta),
                )
                response = assoc.store_bytes(
                    meta.sop_class_uid, meta.sop_instance_uid, data, fallback
                )
                nbytes = len(data)
        except SendError as exc:
            outcome = Outcome.RETRY if exc.retryable else Outcome.FAILED
            return self._outcome(request, meta, outcome, exc.status, str(exc), started)
        except InvalidFileError as exc:
            # The file changed or vanished under us; it may be being rewritten: try again later.
            if assoc.closed:
                self._assoc = None
            return self._outcome(request, meta, Outcome.RETRY, None, exc.reason, started)
        except AssociationError as exc:
            number = self._assoc_number  # the association the file was on when it broke
            self._assoc = None
            outcome = Outcome.RETRY if exc.retryable else Outcome.FAILED
            return self._outcome(
                request, meta, outcome, None, str(exc), started, association=number
            )
        return self._from_response(request, meta, response, sent_syntax, nbytes, started)

    def _accepted_note(self, assoc: Association, meta: FileMeta) -> str:
        from forwarder.transcode import syntax_name

        accepted = [syntax_name(c.transfer_syntax) for c in assoc.contexts_for(meta.sop_class_uid)]
        return (
            f"{syntax_name(meta.sop_class_uid)}: {self.peer} accepted only "
            f"{', '.join(accepted) or 'nothing'} for this SOP class"
        )

    def _fallback(self, assoc: Association, meta: FileMeta) -> AcceptedContext | str:
        from forwarder.transcode import syntax_name

        for ctx in assoc.contexts_for(meta.sop_class_uid):
            if ctx.transfer_syntax in UNCOMPRESSED:
                return ctx
        accepted = [syntax_name(c.transfer_syntax) for c in assoc.contexts_for(meta.sop_class_uid)]
        offer = ", ".join(accepted) if accepted else "nothing"
        return (
            f"no acceptable presentation context: {syntax_name(meta.sop_class_uid)} in "
            f"{syntax_name(meta.transfer_syntax)}; {self.peer} accepted {offer} for this SOP class"
        )

    def _from_response(
        self,
        request: StoreRequest,
        meta: FileMeta,
        response: DimseResponse,
        sent_syntax: str,
        nbytes: int,
        started: float,
    ) -> SendOutcome:
        outcome = classify_status(response.status)
        error = None
        if outcome is not Outcome.STORED:
            error = f"status 0x{response.status:04X}"
            if response.error_comment:
                error += f": {response.error_comment}"
            if response.offending:
                error += f" (offending element {response.offending})"
        return SendOutcome(
            request=request,
            outcome=outcome,
            status=response.status,
            error=error,
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax=meta.transfer_syntax,
            sent_transfer_syntax=sent_syntax,
            association=self._assoc_number,
            nbytes=nbytes,
            seconds=time.monotonic() - started,
        )

    def _outcome(
        self,
        request: StoreRequest,
        meta: FileMeta | None,
        outcome: Outcome,
        status: int | None,
        error: str,
        started: float,
        *,
        association: int | None = None,
    ) -> SendOutcome:
        if association is None and self.is_open:
            association = self._assoc_number
        return SendOutcome(
            request=request,
            outcome=outcome,
            status=status,
            error=error,
            sop_class_uid=meta.sop_class_uid if meta else None,
            sop_instance_uid=meta.sop_instance_uid if meta else None,
            transfer_syntax=meta.transfer_syntax if meta else None,
            sent_transfer_syntax=None,
            association=association,
            nbytes=0,
            seconds=time.monotonic() - started if started else 0.0,
        )
