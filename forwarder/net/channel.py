"""Channels: one reusable association slot to one peer, and the outcome of each file sent on it.

A :class:`Channel` is driven by one thread. It opens an association on first use with contexts
planned from what it is asked to send (plus a hint of what else is queued), keeps it open across
batches, renegotiates when a file needs a context it never proposed, replaces it when it breaks,
and releases it when idle. Both the daemon's workers and ``forwarder send`` use it: one sender,
two front ends. Each file's :class:`SendOutcome` carries the :class:`~forwarder.net.status.Outcome`
its response status maps to (:mod:`forwarder.net.status` holds that classification).

Association management and the per-file outcome rules stay together here, since each outcome
depends on the association state the file met. Not here: the records (:class:`StoreRequest`,
:class:`SendOutcome`: :mod:`forwarder.net.send_outcome`, importable from here too), and the
paths of a file that cannot go byte for byte, transcoded or changed
(:mod:`forwarder.net.channel_convert`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from forwarder.dicom.part10 import FileMeta, read_meta
from forwarder.errors import (
    AssociationError,
    ConnectInterrupted,
    InvalidFileError,
    SendError,
    UnreadableFileError,
)
from forwarder.net.association import (
    Association,
    AssociationSettings,
    Peer,
)
from forwarder.net.association_dimse import DimseResponse
from forwarder.net.channel_convert import accepted_note, fallback_context, store_edited
from forwarder.net.contexts import plan_contexts
from forwarder.net.pdu import MAX_CONTEXTS
from forwarder.net.send_outcome import SendOutcome, StoreRequest
from forwarder.net.status import Outcome, classify_status

if TYPE_CHECKING:  # pydicom is imported only when an object is changed
    from forwarder.dicom.edit import EditedObject

__all__ = ["Channel", "SendOutcome", "StoreRequest"]

logger = logging.getLogger(__name__)

_association_numbers = itertools.count(1)
_numbers_lock = threading.Lock()
_tracebacks_logged: set[tuple[str, str]] = set()  # (exception type, where): traceback once


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
        # The error of the last association attempt, None once one works. Not reset by a batch
        # that never tries to associate (every file unreadable): for what happened in a batch,
        # see SendOutcome.association_failed.
        self.down: AssociationError | None = None

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and not self._assoc.closed

    # -- association management ---------------------------------------------------------------

    def _open(self, needs: Sequence[tuple[str, str]]) -> Association:
        contexts, covered = plan_contexts(needs, MAX_CONTEXTS)
        try:
            assoc = Association.request(self.peer, self.settings, contexts)
        except ConnectInterrupted:
            raise  # stopping: says nothing about the peer
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
        # peer_gone() is True for a closed association: one still here is open.
        if assoc is not None and need in self._proposed:
            return assoc
        if assoc is not None:
            # A syntax we never proposed: renegotiate, keeping what we proposed before.
            logger.debug("%s: renegotiating for %s in %s", self.name, need[0], need[1])
            assoc.release()
        needs = [need, *hint, *self._proposed_order]
        return self._open(list(dict.fromkeys(needs)))

    def open(self, needs: Sequence[tuple[str, str]]) -> bool:
        """Open an association for ``needs`` (SOP class, transfer syntax pairs) before any file
        is handed over: a spare association asking whether the peer takes one more without
        holding files while it waits. True when one is open; False when the peer did not take
        it (:attr:`down` says why)."""
        if self.is_open:
            return True
        if not needs:
            return False
        try:
            self._open(list(dict.fromkeys(needs)))
        except AssociationError:
            return False
        return True

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
        is answered at once with that reason and ``attempted=False``: a down peer costs one
        connect attempt per batch, not one per file, and only the file actually tried is
        charged an attempt (none at all when the association was rejected permanently). A
        connect interrupted by ``settings.stop`` charges nothing: every request from there on
        is answered ``attempted=False``, and :attr:`down` is left as it was.

        Nothing a peer sends and no fault of ours escapes as an exception: an unexpected one
        aborts the association, is logged with its traceback, and answers that request RETRY
        ("internal error: ..."), so the caller counts it as an attempt and goes on.
        """
        down: AssociationError | None = None
        stopped: ConnectInterrupted | None = None
        for request in requests:
            if stopped is not None:
                yield self._outcome(
                    request, request.meta, Outcome.RETRY, None, str(stopped), 0.0, attempted=False
                )
                continue
            if down is not None:
                verdict = Outcome.RETRY if down.retryable else Outcome.FAILED
                yield self._outcome(
                    request,
                    request.meta,
                    verdict,
                    None,
                    str(down),
                    0.0,
                    attempted=False,
                    association_failed=True,
                )
                continue
            started = time.monotonic()
            meta = request.meta
            try:
                if meta is None:
                    meta = read_meta(request.path)
                    if request.dataset_uids is not None and request.dataset_uids[1]:
                        sop_class, sop_instance = request.dataset_uids
                        meta = replace(meta, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
                assoc = self._ensure((meta.sop_class_uid, meta.transfer_syntax), hint)
            except UnreadableFileError as exc:
                # EIO, EACCES...: nothing is known against the file; tried again later, as
                # ingest does.
                yield self._outcome(request, None, Outcome.RETRY, None, exc.reason, 0.0)
                continue
            except InvalidFileError as exc:
                yield self._outcome(request, None, Outcome.FAILED, None, exc.reason, 0.0)
                continue
            except ConnectInterrupted as exc:
                # Stopping while the connect waited: this file and the rest go back untried,
                # and the destination's state does not change.
                logger.info("%s: %s", self.name, exc)
                self._assoc = None
                stopped = exc
                yield self._outcome(
                    request, meta, Outcome.RETRY, None, str(exc), 0.0, attempted=False
                )
                continue
            except AssociationError as exc:
                outcome = Outcome.RETRY if exc.retryable else Outcome.FAILED
                self._assoc = None
                down = exc  # refused or unreachable: the rest of this batch fares the same
                yield self._outcome(
                    request,
                    meta,
                    outcome,
                    None,
                    str(exc),
                    0.0,
                    attempted=exc.retryable,
                    association_failed=True,
                )
                continue
            except Exception as exc:  # the safety net: see the docstring
                yield self._internal_error(request, meta, exc, started)
                continue
            try:
                result = self._store_one(assoc, request, meta, started)
            except Exception as exc:
                result = self._internal_error(request, meta, exc, started)
            yield result

    def _internal_error(
        self, request: StoreRequest, meta: FileMeta | None, exc: Exception, started: float
    ) -> SendOutcome:
        """An exception nobody expected (a bug, or an OS error the engine does not translate):
        the association is in an unknown state, so it is aborted; the file is tried again."""
        number = self._assoc_number if self.is_open else None
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        first = (type(exc).__name__, where) not in _tracebacks_logged
        _tracebacks_logged.add((type(exc).__name__, where))
        logger.error(
            "%s: internal error while sending %s (%s: %s); the association is aborted and the "
            "file will be tried again%s",
            self.name,
            request.path,
            type(exc).__name__,
            exc,
            "" if first else " (traceback logged before)",
            exc_info=exc if first else None,
        )
        try:
            self.abort()
        except Exception:  # the socket may be as broken as the rest
            self._assoc = None
        error = f"internal error: {type(exc).__name__}: {exc}"
        return self._outcome(request, meta, Outcome.RETRY, None, error, started, association=number)

    def _store_one(
        self, assoc: Association, request: StoreRequest, meta: FileMeta, started: float
    ) -> SendOutcome:
        exact = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
        sent_syntax: str
        try:
            if request.edits:
                return store_edited(self, assoc, request, meta, exact, started)
            if exact is not None:
                sent_syntax = exact.transfer_syntax
                response = assoc.store_file(request.path, meta, exact, priority=request.priority)
                nbytes = meta.dataset_length
            else:
                fallback = fallback_context(assoc, meta, self.peer)
                if isinstance(fallback, str):
                    return self._outcome(request, meta, Outcome.FAILED, None, fallback, started)
                sent_syntax = fallback.transfer_syntax
                from forwarder.dicom.transcode import transcode  # pydicom: only on this slow path

                data = transcode(
                    request.path,
                    sent_syntax,
                    allow_lossy=self.allow_lossy_decompress,
                    context=accepted_note(assoc, meta, self.peer),
                )
                response = assoc.store_bytes(
                    meta.sop_class_uid,
                    meta.sop_instance_uid,
                    data,
                    fallback,
                    priority=request.priority,
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
                request,
                meta,
                outcome,
                None,
                str(exc),
                started,
                association=number,
                association_broke=True,
            )
        return self._from_response(request, meta, response, sent_syntax, nbytes, started)

    def _from_response(
        self,
        request: StoreRequest,
        meta: FileMeta,
        response: DimseResponse,
        sent_syntax: str,
        nbytes: int,
        started: float,
        edited: EditedObject | None = None,
        sent_uids: tuple[str, str, str] | None = None,
    ) -> SendOutcome:
        """The outcome of a file the peer answered; ``edited`` (or ``sent_uids``, its
        transcoded path's): what its changes sent (:attr:`SendOutcome.sent_uids`)."""
        if edited is not None:
            meta = replace(meta, sop_instance_uid=edited.sop_instance_uid)
            sent_uids = edited.sent_uids
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
            sent_uids=sent_uids,
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
        attempted: bool = True,
        association_failed: bool = False,
        association_broke: bool = False,
    ) -> SendOutcome:
        if association is None and self.is_open:
            association = self._assoc_number
        return SendOutcome.without_data(
            request,
            meta,
            outcome,
            status,
            error,
            started,
            association,
            attempted=attempted,
            association_failed=association_failed,
            association_broke=association_broke,
        )
