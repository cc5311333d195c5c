"""A STOW-RS channel: :class:`forwarder.net.channel.Channel`'s interface over DICOMweb.

:class:`StowChannel` takes the same :class:`~forwarder.net.channel.StoreRequest` values and
yields the same :class:`~forwarder.net.channel.SendOutcome`/``Outcome`` per file, so the
daemon's queue states, ``failed/`` reasons, status, metrics and journal fields and ``forwarder
send``'s report are those of C-STORE. Several files go in one request (up to
``max_instances`` and ``max_bytes``), streamed from disk as they are.

What an answer means (docs/guarantees.md):

- 200, 202, 409 with a response data set: per instance. Referenced SOP Sequence: stored (with
  its Warning Reason: a warning); Failed SOP Sequence: its Failure Reason classified as a
  C-STORE status is (``net.channel.classify_status``: 0xA7xx, 0x0110... retried; 0xA9xx,
  0xCxxx, 0x0122... permanent); an instance in neither: retried, with an error saying so.
  400 likewise when its response data set names instances of the request: Orthanc answers
  400 when any instance failed, with the others stored (the standard says 400 stores none).
- 401, 403 (auth), 404, 405 (not a STOW-RS URL), 3xx (a redirect is never followed): the
  destination is misconfigured, no file is at fault: answered like a permanent association
  rejection (``down`` not retryable, ``attempted=False``): the daemon *holds* the destination.
- 429 and 503: retried, and the destination pauses (``down``) for at least ``Retry-After``.
- 408, other 5xx, no response (timeout, dropped connection): retried.
- Other 4xx: permanent for every file of the request (413 with several files: retried, and
  later requests carry one file each).
- The server cannot be reached (refused, DNS, connect timeout, TLS): like an association that
  cannot be opened: the first file is charged an attempt, the rest are not.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from forwarder.dicom.part10 import FileMeta, read_meta
from forwarder.dicomweb.auth import SecretError
from forwarder.dicomweb.http import HttpFailure, Reply, WebClient, WebSettings
from forwarder.dicomweb.multipart import BodyError, MultipartBody, Part
from forwarder.dicomweb.response import ResponseError, StowResponse, parse_response
from forwarder.errors import (
    AssociationError,
    ConnectInterrupted,
    InvalidFileError,
    UnreadableFileError,
)
from forwarder.net.channel import SendOutcome, StoreRequest
from forwarder.net.command_set import PRIORITY
from forwarder.net.interrupt import STOPPING
from forwarder.net.status import Outcome, classify_status, code_to_category

if TYPE_CHECKING:
    from forwarder.dicom.edit import EditedObject

logger = logging.getLogger(__name__)

_connection_numbers = itertools.count(1)
_numbers_lock = threading.Lock()
_HELD = frozenset({401, 403, 404, 405})  # the destination is misconfigured, not the files
_PAUSE = frozenset({429, 503})  # the server asks us to come back later


@dataclass(frozen=True, slots=True)
class _Item:
    request: StoreRequest
    meta: FileMeta
    size: int
    edited: EditedObject | None = None


class StowChannel:
    """One keep-alive HTTP connection to a STOW-RS service; one thread drives it."""

    def __init__(self, settings: WebSettings, *, name: str = "") -> None:
        if settings.tls is None and settings.url.startswith("https:"):
            from forwarder.net.tls import client_context

            settings = replace(settings, tls=client_context(None))  # built once, not per connection
        self.settings = settings
        self.name = name or settings.url
        if settings.auth is not None and settings.url.startswith("http:"):
            logger.warning(
                "%s: credentials go over plain HTTP (%s): use an https:// url outside a "
                "trusted network",
                self.name,
                settings.auth.describe(),
            )
        self.max_instances = settings.max_instances
        self._client: WebClient | None = None
        self._number: int | None = None
        self._last_used = 0.0
        self._progress: float | None = None
        self._not_before = 0.0  # Retry-After
        self.associations_opened = 0  # requests the server answered (its door is open)
        self.down: AssociationError | None = None

    # -- the Channel interface the worker and `send` use -----------------------------------------

    @property
    def is_open(self) -> bool:
        return self._client is not None

    @property
    def last_progress(self) -> float | None:
        return self._progress

    def release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def abort(self) -> None:
        self.release()

    def release_if_idle(self, idle_timeout: float) -> bool:
        if self._client is not None and time.monotonic() - self._last_used >= idle_timeout:
            logger.debug("%s: closing idle connection #%s", self.name, self._number)
            self.release()
            return True
        return False

    def open(self, needs: Sequence[tuple[str, str]]) -> bool:
        """Ready to send (HTTP has no association to negotiate: a connection is made with the
        first request, and a server's limit on parallel requests shows as 429/503)."""
        return True

    def send(
        self, requests: Iterable[StoreRequest], *, hint: Sequence[tuple[str, str]] = ()
    ) -> Iterator[SendOutcome]:
        """Store the requests, several per HTTP request, and yield one outcome per file.

        ``hint`` is accepted for the Channel interface and unused: STOW-RS has no presentation
        contexts. Nothing escapes as an exception (see net.channel.Channel.send).
        """
        source = iter(requests)
        down: AssociationError | None = None
        carry: _Item | None = None  # a file whose SOP Instance UID the last request held
        while True:
            batch: list[_Item] = []
            uids: set[str] = set()
            nbytes = 0
            if carry is not None:
                if down is not None:
                    yield self._not_tried(carry.request, carry.meta, down)
                else:
                    batch.append(carry)
                    uids.add(carry.meta.sop_instance_uid)
                    nbytes = carry.size
                carry = None
            for request in source:
                started = time.monotonic()
                if down is not None:
                    yield self._not_tried(request, request.meta, down)
                    continue
                try:
                    item = self._prepare(request)
                except UnreadableFileError as exc:
                    yield self._outcome(request, None, Outcome.RETRY, None, exc.reason, started)
                    continue
                except InvalidFileError as exc:
                    yield self._outcome(request, None, Outcome.FAILED, None, exc.reason, started)
                    continue
                except Exception as exc:  # the safety net, as in net.channel.Channel.send
                    logger.error(
                        "%s: internal error while reading %s (%s: %s); it will be tried again",
                        self.name,
                        request.path,
                        type(exc).__name__,
                        exc,
                        exc_info=exc,
                    )
                    error = f"internal error: {type(exc).__name__}: {exc}"
                    yield self._outcome(request, request.meta, Outcome.RETRY, None, error, started)
                    continue
                if batch and request.priority != batch[0].request.priority:
                    # Urgent files go in requests of their own: paced as urgent (a closed
                    # window's tighter rate may not hold them), not with ordinary ones.
                    carry = item
                    break
                if item.meta.sop_instance_uid in uids:
                    # The same instance twice (exported again, a resend): the response names
                    # a UID, not a file, so one Referenced item would answer for both while
                    # the server kept only one of them. Each goes in a request of its own.
                    carry = item
                    break
                batch.append(item)
                uids.add(item.meta.sop_instance_uid)
                nbytes += item.size
                if len(batch) >= self.max_instances or nbytes >= self.settings.max_bytes:
                    break
            if not batch:
                return
            try:
                outcomes = self._send_batch(batch)
            except Exception as exc:  # the safety net: a bug of ours must not lose the files
                logger.error(
                    "%s: internal error while sending %d files (%s: %s); they will be tried again",
                    self.name,
                    len(batch),
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                self.abort()
                error = f"internal error: {type(exc).__name__}: {exc}"
                outcomes = [self._outcome(i.request, i.meta, Outcome.RETRY, None, error, 0.0)
                            for i in batch]  # fmt: skip
            yield from outcomes
            if any(o.association_failed for o in outcomes):
                down = self.down

    # -- one request ------------------------------------------------------------------------------

    def _prepare(self, request: StoreRequest) -> _Item:
        meta = request.meta
        if meta is None:
            meta = read_meta(request.path)
            if request.dataset_uids is not None and request.dataset_uids[1]:
                sop_class, sop_instance = request.dataset_uids
                meta = replace(meta, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        if request.edits:
            from forwarder.dicom.edit import EditError, edit_file  # pydicom: only for changes

            try:
                obj = edit_file(request.path, request.edits)
            except EditError as exc:
                reason = f"cannot apply the configured changes: {exc}"
                raise InvalidFileError(request.path, reason) from None
            meta = replace(meta, sop_instance_uid=obj.sop_instance_uid)
            return _Item(request, meta, len(obj.file_meta) + obj.length, obj)
        try:
            size = os.stat(request.path).st_size
        except OSError as exc:
            raise UnreadableFileError(request.path, f"cannot read it: {exc.strerror}") from None
        return _Item(request, meta, size)

    def _send_batch(self, batch: list[_Item]) -> list[SendOutcome]:
        started = time.monotonic()
        wait = self._not_before - time.monotonic()
        if wait > 0 and self.down is not None:
            return self._refused(batch, self.down, charge_first=False)
        body: MultipartBody | None = None
        try:
            client = self._connection()
            body = MultipartBody(
                [Part(i.request.path, i.size, i.edited) for i in batch], on_progress=self._moved
            )
            urgent = all(i.request.priority == PRIORITY["high"] for i in batch)
            reply = client.post_stow(body, urgent=urgent)
        except SecretError as exc:
            self.release()
            down = AssociationError(f"{self.settings.url}: {exc}", retryable=False)
            return self._refused(batch, down, charge_first=False)
        except BodyError as exc:
            self.release()  # the request was cut short: the connection is useless
            # The file that could not be read is charged an attempt; the others are handed
            # back uncharged (no fault of theirs): charged, a file that keeps failing to read
            # would take its batch-mates to their attempt limit, to failed/, with it.
            abandoned = f"not stored: the request was abandoned ({exc.path}: {exc.reason})"
            return [
                self._outcome(i.request, i.meta, Outcome.RETRY, None, exc.reason, started)
                if i.request.path == exc.path
                else replace(
                    self._outcome(i.request, i.meta, Outcome.RETRY, None, abandoned, started),
                    attempted=False,
                )
                for i in batch
            ]
        except ConnectInterrupted:
            # Stopping while the connect waited: nothing was sent, nothing charged, and the
            # server's state does not change.
            self.release()
            error = f"{self.settings.url}: cannot connect: {STOPPING}"
            logger.info("%s: %s", self.name, error)
            return [
                replace(
                    self._outcome(i.request, i.meta, Outcome.RETRY, None, error, 0.0),
                    attempted=False,
                    association=None,
                )
                for i in batch
            ]
        except HttpFailure as exc:
            number = self._number
            self.release()
            if not exc.connected:
                down = AssociationError(str(exc), retryable=True)
                return self._refused(batch, down, charge_first=True)
            return [
                self._outcome(i.request, i.meta, Outcome.RETRY, None, str(exc), started, number)
                for i in batch
            ]
        self._last_used = time.monotonic()
        return self._judge(batch, reply, started, body.sent_whole if body else len(batch))

    def _connection(self) -> WebClient:
        if self._client is None:
            self._client = WebClient(self.settings)
            with _numbers_lock:
                self._number = next(_connection_numbers)
        return self._client

    def _moved(self, nbytes: int) -> None:
        self._progress = time.monotonic()

    def _judge(
        self, batch: list[_Item], reply: Reply, started: float, sent_whole: int
    ) -> list[SendOutcome]:
        """What ``reply`` means for each file of ``batch``, of which the first ``sent_whole``
        went out whole (the server may answer before it read the rest)."""
        self._progress = time.monotonic()
        status = reply.status
        what = f"HTTP {status} {reply.reason}".rstrip()
        if status in _HELD or 300 <= status < 400:
            down = AssociationError(self._held_reason(reply, what), retryable=False)
            self.release()
            return self._refused(batch, down, charge_first=False)
        if status in _PAUSE:
            pause = reply.retry_after()
            self._not_before = time.monotonic() + (pause or 0.0)
            after = f"; retry after {pause:g}s" if pause is not None else ""
            self.down = AssociationError(
                f"{self.settings.url}: {what}{after}", retryable=True, not_before=self._not_before
            )
            error = f"{what}{after}: {reply.excerpt()}".rstrip(": ")
            return [
                replace(self._outcome(i.request, i.meta, Outcome.RETRY, None, error, started),
                        association_failed=True)
                for i in batch
            ]  # fmt: skip
        self.down = None
        self.associations_opened += 1
        parsed: StowResponse | None = None
        problem = ""
        readable = status in (200, 202, 409) or 200 <= status < 300
        if readable or status == 400:
            try:
                parsed = parse_response(reply.body, reply.content_type)
            except ResponseError as exc:
                problem = str(exc) if readable else ""
        if status == 400 and parsed is not None:
            # Orthanc answers 400 when any instance failed, listing the others as stored: a
            # response that names instances of this request is read per instance; otherwise
            # 400 is the request's own fault (bad syntax), permanent for all.
            sent = {i.meta.sop_instance_uid for i in batch}
            if not sent & (parsed.stored.keys() | parsed.failed.keys()):
                parsed = None
        if parsed is not None:
            out = [self._per_instance(i, parsed, what, status, batch, started) for i in batch]
            if sent_whole < len(batch):
                # Whatever the answer says of them, these never left whole: not stored.
                self.release()  # the request was cut short: the connection is useless
                cut = (
                    f"{what}: not stored: the server answered before this instance was sent "
                    "whole (the connection closed mid-request); it will be sent again"
                )
                out[sent_whole:] = [
                    self._outcome(i.request, i.meta, Outcome.RETRY, None, cut, started)
                    for i in batch[sent_whole:]
                ]
            return out
        detail = f"{what}: {problem or reply.excerpt()}".rstrip(": ")
        if status == 413 and len(batch) > 1:
            self.max_instances = 1
            logger.warning("%s: %s; sending one file per request from now on", self.name, what)
            verdict = Outcome.RETRY
        elif 400 <= status < 500 and status != 408:
            verdict = Outcome.FAILED
        else:  # 2xx without a readable response, 408, 5xx, anything else: try again
            verdict = Outcome.RETRY
        return [self._outcome(i.request, i.meta, verdict, None, detail, started) for i in batch]

    def _held_reason(self, reply: Reply, what: str) -> str:
        url = self.settings.url
        if reply.status in (401, 403):
            fix = "check auth: (the token or password, and the account's rights)"
        elif 300 <= reply.status < 400:
            to = reply.headers.get("location", "elsewhere")
            fix = f"the server redirects to {to}: put the right url in the configuration"
        else:
            fix = "is url the DICOMweb service root (STOW-RS POST {url}/studies)?"
        return f"{url}: {what}: {fix}"

    def _per_instance(
        self,
        item: _Item,
        parsed: StowResponse,
        what: str,
        status: int,
        batch: list[_Item],
        started: float,
    ) -> SendOutcome:
        uid = item.meta.sop_instance_uid
        total = sum(i.size for i in batch) or 1
        share = item.size / total
        if uid in parsed.failed:
            reason = parsed.failed[uid]
            if reason is None:
                verdict, error = Outcome.RETRY, f"{what}: failed, no Failure Reason given"
            else:
                # Pending is no outcome (classify_status refuses it): like a success code as
                # Failure Reason, not trusted, and it must not cost the batch its answer.
                pending = code_to_category(reason) == "Pending"
                verdict = Outcome.RETRY if pending else classify_status(reason)
                if verdict.stored:
                    verdict = Outcome.RETRY  # a success code as Failure Reason: not trusted
                error = f"status 0x{reason:04X} (Failure Reason, {what})"
            out = self._outcome(item.request, item.meta, verdict, reason, error, started)
            return replace(out, seconds=out.seconds * share)
        named = parsed.classes.get(uid)
        if uid in parsed.stored and named is not None and named != item.meta.sop_class_uid:
            # C-STORE takes a response of another Affected SOP Class UID as a protocol error
            # (command_set.check_response); here too the server speaks of another object.
            error = (
                f"{what}: the STOW-RS response names this instance with Referenced SOP Class "
                f"UID {named}, not {item.meta.sop_class_uid}: not taken as stored; it will be "
                "sent again"
            )
            out = self._outcome(item.request, item.meta, Outcome.RETRY, None, error, started)
            return replace(out, seconds=out.seconds * share)
        if uid in parsed.stored:
            warning = parsed.stored[uid]
            if warning is None and status == 202:
                warning = parsed.warning
            verdict = Outcome.WARNING if warning is not None else Outcome.STORED
            remark = f"status 0x{warning:04X} (Warning Reason, {what})" if warning else None
            return SendOutcome(
                request=item.request,
                outcome=verdict,
                status=warning if warning is not None else 0x0000,
                error=remark,
                sop_class_uid=item.meta.sop_class_uid,
                sop_instance_uid=uid,
                transfer_syntax=item.meta.transfer_syntax,
                sent_transfer_syntax=item.meta.transfer_syntax,
                association=self._number,
                nbytes=item.size,
                seconds=(time.monotonic() - started) * share,
                sent_uids=item.edited.sent_uids if item.edited is not None else None,
            )
        error = (
            f"{what}: the STOW-RS response does not account for this instance (neither stored "
            "nor failed); it will be sent again"
        )
        out = self._outcome(item.request, item.meta, Outcome.RETRY, None, error, started)
        return replace(out, seconds=out.seconds * share)

    # -- outcomes ---------------------------------------------------------------------------------

    def _refused(
        self, batch: list[_Item], down: AssociationError, *, charge_first: bool
    ) -> list[SendOutcome]:
        """The server could not be used at all: like an association that cannot be opened."""
        self.down = down
        if not down.retryable:
            self._not_before = 0.0
        out = []
        for n, item in enumerate(batch):
            if n == 0 and charge_first:
                first = self._outcome(item.request, item.meta, Outcome.RETRY, None, str(down), 0.0)
                out.append(replace(first, association_failed=True))
            else:
                out.append(self._not_tried(item.request, item.meta, down))
        return out

    def _not_tried(
        self, request: StoreRequest, meta: FileMeta | None, down: AssociationError
    ) -> SendOutcome:
        verdict = Outcome.RETRY if down.retryable else Outcome.FAILED
        out = self._outcome(request, meta, verdict, None, str(down), 0.0)
        return replace(out, attempted=False, association_failed=True, association=None)

    def _outcome(
        self,
        request: StoreRequest,
        meta: FileMeta | None,
        outcome: Outcome,
        status: int | None,
        error: str,
        started: float,
        number: int | None = None,
    ) -> SendOutcome:
        association = number if number is not None else self._number
        return SendOutcome.without_data(request, meta, outcome, status, error, started, association)
