"""The DIMSE messages of the sender's association: C-STORE and C-ECHO requests out, their
responses in.

:class:`DimseExchange` is the part of :class:`~forwarder.net.association.Association` that sends
one request and reads its one response. The command set is packed by
:mod:`forwarder.net.command_set`; the data set is streamed from its file in PDU-sized fragments,
several PDUs per ``sendall``, through one reused buffer, so memory stays flat whatever the file
size (an odd data set goes out with one 0x00 pad byte). The response is gathered, decoded and
checked by :mod:`forwarder.net.command_set`'s strict decoders; anything but that response aborts
the association. Establishment, the negotiated contexts, release and abort are
:mod:`forwarder.net.association`'s, the socket :mod:`forwarder.net.transport`'s.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.crashpoints import crash_point
from forwarder.dicom.part10 import FileMeta, read_error
from forwarder.errors import (
    AssociationError,
    InvalidFileError,
    ProtocolError,
    UnreadableFileError,
)
from forwarder.net.command_set import (
    C_ECHO_RSP,
    C_STORE_RSP,
    PRIORITY,
    check_response,
    collect_command,
    command_text,
    decode_command,
    encode_echo_rq,
    encode_store_rq,
    offending_text,
)
from forwarder.net.pdu import (
    PDATA_HEADER,
    PDU_ABORT,
    PDU_P_DATA,
    PDU_RELEASE_RQ,
    RELEASE_RP,
    VERIFICATION_SOP_CLASS,
)
from forwarder.net.transport import pdu_name

if TYPE_CHECKING:
    from forwarder.dicom.edit import EditedObject
    from forwarder.net.acse import AcceptedContext
    from forwarder.net.association import AssociationSettings, Peer
    from forwarder.net.transport import Transport

# The association's log lines keep the association's name, as before this part had a module of
# its own: log filters (and the tests) select them by it.
logger = logging.getLogger("forwarder.net.association")

_VERIFICATION = VERIFICATION_SOP_CLASS.encode("ascii")


@dataclass(frozen=True, slots=True)
class DimseResponse:
    """A C-STORE-RSP or C-ECHO-RSP."""

    status: int
    error_comment: str | None
    message_id: int
    offending: str | None = None


class DimseExchange:
    """The DIMSE part of :class:`~forwarder.net.association.Association`, its only subclass: the
    attributes declared here are set by the association's constructor, and the methods under
    ``TYPE_CHECKING`` are the association's own."""

    peer: Peer
    settings: AssociationSettings
    last_used: float
    _transport: Transport
    _message_id: int
    _frag: int
    _context_ids: frozenset[int]
    _layout_noted: bool

    if TYPE_CHECKING:

        def accepted_for(self, sop_class: str) -> list[AcceptedContext]: ...

        def abort(self) -> None: ...

    # -- DIMSE --------------------------------------------------------------------------------

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def echo(self) -> DimseResponse:
        ctx = self.accepted_for(VERIFICATION_SOP_CLASS)
        if not ctx:
            raise AssociationError(f"{self.peer} did not accept Verification", retryable=False)
        msg_id = self._next_message_id()
        self._send_fragments(ctx[0].context_id, True, encode_echo_rq(msg_id))
        return self._read_response(msg_id, C_ECHO_RSP, _VERIFICATION, None)

    def store_file(
        self,
        path: str,
        meta: FileMeta,
        context: AcceptedContext,
        *,
        priority: int | None = None,
    ) -> DimseResponse:
        """Send the data set of ``path`` (as it is on disk) and return the peer's response.

        A data set of odd length (a deflated one: PS3.5 A.5 pads the deflated bytes, not every
        writer does) goes out with one trailing 0x00, as DCMTK sends it: PS3.5 7.1 wants even
        lengths, and DCMTK's SCP aborts on an odd fragment.
        """
        # os.open + one fstat + preadv: the builtin open() adds an fstat and a seek per file.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise read_error(path, exc, "cannot open") from None
        try:
            # Size, and mtime when the header came from the queue: a file replaced by one of
            # the same size between the worker's look and this open is not sent as the old.
            st = os.fstat(fd)
            if st.st_size != meta.size or (meta.mtime_ns and st.st_mtime_ns != meta.mtime_ns):
                raise InvalidFileError(path, "the file changed since its header was read")
            msg_id = self._next_message_id()
            prio = self.settings.priority if priority is None else priority
            command = encode_store_rq(msg_id, meta.sop_class_uid, meta.sop_instance_uid, prio)
            base = meta.dataset_offset

            def read_at(views: list[memoryview], pos: int) -> int:
                return os.preadv(fd, views, base + pos)

            urgent = prio == PRIORITY["high"]
            self._stream(context.context_id, command, read_at, meta.dataset_length, path, urgent)
        finally:
            os.close(fd)
        return self._read_response(
            msg_id, C_STORE_RSP, meta.sop_class_uid.encode(), meta.sop_instance_uid.encode()
        )

    def store_edited(
        self, obj: EditedObject, context: AcceptedContext, *, priority: int | None = None
    ) -> DimseResponse:
        """Send a changed object (:mod:`forwarder.dicom.edit`): its re-encoded attributes and
        its Pixel Data streamed from the file, as :meth:`store_file` streams a whole file."""
        msg_id = self._next_message_id()
        prio = self.settings.priority if priority is None else priority
        command = encode_store_rq(msg_id, obj.sop_class_uid, obj.sop_instance_uid, prio)
        urgent = prio == PRIORITY["high"]
        with obj.open() as reader:

            def read_at(views: list[memoryview], pos: int) -> int:
                got = 0
                for v in views:
                    n = reader.read_at(v, pos + got)
                    got += n
                    if n < len(v):
                        break
                return got

            self._stream(context.context_id, command, read_at, obj.length, obj.path, urgent)
        return self._read_response(
            msg_id, C_STORE_RSP, obj.sop_class_uid.encode(), obj.sop_instance_uid.encode()
        )

    def store_bytes(
        self,
        sop_class: str,
        sop_instance: str,
        dataset: bytes,
        context: AcceptedContext,
        *,
        priority: int | None = None,
    ) -> DimseResponse:
        """Send an already encoded data set (used after transcoding); padded to even length.
        ``priority`` overrides the settings' C-STORE Priority for this request."""
        msg_id = self._next_message_id()
        prio = self.settings.priority if priority is None else priority
        command = encode_store_rq(msg_id, sop_class, sop_instance, prio)
        urgent = prio == PRIORITY["high"]
        self._send_fragments(context.context_id, True, command, urgent)
        if len(dataset) % 2:
            dataset += b"\x00"
        self._send_fragments(context.context_id, False, dataset, urgent)
        return self._read_response(msg_id, C_STORE_RSP, sop_class.encode(), sop_instance.encode())

    def _send_fragments(
        self, context_id: int, command: bool, data: bytes, urgent: bool = False
    ) -> None:
        frag = self._frag
        total = len(data)
        parts = []
        pos = 0
        while True:
            chunk = data[pos : pos + frag]
            pos += len(chunk)
            last = pos >= total
            control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
            parts.append(
                PDATA_HEADER.pack(PDU_P_DATA, len(chunk) + 6, len(chunk) + 2, context_id, control)
            )
            parts.append(chunk)
            if last:
                break
        self._transport.send(b"".join(parts), what="P-DATA", urgent=urgent)

    def _stream(
        self,
        context_id: int,
        command: bytes,
        read_at: Callable[[list[memoryview], int], int],
        length: int,
        path: str,
        urgent: bool = False,
    ) -> None:
        """Command PDU(s) and the data set's PDUs, batched into ~1 MB ``sendall`` calls; an odd
        ``length`` is sent with one 0x00 pad byte (fragments are even: pdu.send_pdu_limit).
        ``read_at(views, pos)`` fills ``views`` in turn from data set position ``pos`` (as
        preadv does; fewer bytes only at the end of the data); one call per batch, not one per
        fragment (a CT image is 32 fragments at DCMTK's 16 KB). ``urgent``: an urgent file's
        bytes (a rate cap may treat them apart, :class:`~forwarder.net.pacing.Pacer`)."""
        transport = self._transport
        frag = self._frag
        if len(command) > frag:
            self._send_fragments(context_id, True, command, urgent)
            prefix = b""
        else:
            prefix = (
                PDATA_HEADER.pack(PDU_P_DATA, len(command) + 6, len(command) + 2, context_id, 0x03)
                + command
            )
        padded = length + (length & 1)
        fragments = max(1, -(-padded // frag))
        per_batch = min(fragments, max(1, self.settings.batch_bytes // (frag + 12)), _MAX_IOV)
        batch_len = len(prefix) + per_batch * (frag + 12)
        buf = bytearray(batch_len)
        view = memoryview(buf)
        offset = 0  # data set position of the next byte to read
        remaining = padded
        in_file = length
        pos = len(prefix)
        view[:pos] = prefix
        views: list[memoryview] = []  # this batch's fragment values still to read
        wanted = 0
        pad_at = -1
        while True:
            n = min(frag, remaining)
            if pos + 12 + n > batch_len:
                self._fill(read_at, views, wanted, offset, path)
                offset += wanted
                views, wanted = [], 0
                transport.send(view[:pos], what="P-DATA", urgent=urgent)
                crash_point("mid-store")
                pos = 0
            remaining -= n
            control = 0x02 if remaining == 0 else 0x00
            PDATA_HEADER.pack_into(buf, pos, PDU_P_DATA, n + 6, n + 2, context_id, control)
            want = min(n, in_file)
            if want:
                views.append(view[pos + 12 : pos + 12 + want])
                wanted += want
            in_file -= want
            if want < n:
                pad_at = pos + 12 + want
            pos += 12 + n
            if remaining == 0:
                break
        self._fill(read_at, views, wanted, offset, path)
        if pad_at >= 0:
            buf[pad_at] = 0  # the pad byte (set after the read: the buffer is reused)
        transport.send(view[:pos], what="P-DATA", urgent=urgent)

    def _fill(
        self,
        read_at: Callable[[list[memoryview], int], int],
        views: list[memoryview],
        wanted: int,
        offset: int,
        path: str,
    ) -> None:
        """Fill ``views`` (``wanted`` bytes in all) from data set position ``offset``; a short
        read is continued where it stopped, and a read that returns nothing means the file
        shrank under us."""
        got = 0
        while got < wanted:
            try:
                r = read_at(views, offset + got)
            except OSError as exc:
                # EIO and the like: part of the message may be out, so the association
                # cannot carry on; nothing is known against the file: tried again later.
                self.abort()
                raise UnreadableFileError(
                    path, f"read error while sending: {exc.strerror or exc}"
                ) from None
            if not r:
                # The file shrank under us: the message cannot be completed on this association.
                self.abort()
                raise InvalidFileError(path, "the file was truncated while being sent")
            got += r
            if got < wanted:
                views = _after(views, r)

    def _read_response(
        self, message_id: int, command_field: int, sop_class: bytes, sop_instance: bytes | None
    ) -> DimseResponse:
        """Wait for the response to our one outstanding request and check it (command_set.py's
        :func:`collect_command`, :func:`decode_command`, :func:`check_response`): a few
        comparisons, no pydicom. Anything but that response aborts the association."""
        transport = self._transport
        timeout = self.settings.response_timeout
        command = bytearray()
        while True:
            pdu_type, body = transport.read_pdu(timeout, waiting_for="a DIMSE response")
            if pdu_type == PDU_P_DATA:
                try:
                    if not collect_command(body, self._context_ids, command):
                        continue
                    notes: list[str] = []
                    values = decode_command(bytes(command), notes)
                    status = check_response(
                        values, command_field, message_id, sop_class, sop_instance
                    )
                except ProtocolError as exc:
                    self.abort()
                    raise ProtocolError(f"{self.peer} sent a bad DIMSE response: {exc}") from None
                self.last_used = time.monotonic()
                if notes:
                    self._note_layout(notes)
                return DimseResponse(
                    status=status,
                    error_comment=command_text(values.get(0x0902)),
                    message_id=message_id,
                    offending=offending_text(values.get(0x0901)),
                )
            if pdu_type == PDU_ABORT:
                transport.close()
                raise AssociationError(f"{self.peer} aborted the association", retryable=True)
            if pdu_type == PDU_RELEASE_RQ:
                # PS3.8 Sta6 + A-RELEASE-RQ: answer it; the request is lost with the association.
                transport.send(RELEASE_RP, what="A-RELEASE-RP")
                transport.close()
                raise AssociationError(
                    f"{self.peer} released the association before answering", retryable=True
                )
            self.abort()
            raise ProtocolError(
                f"{self.peer} sent {pdu_name(pdu_type)} while we waited for a DIMSE response"
            )

    def _note_layout(self, notes: list[str]) -> None:
        """A response decoded in spite of layout faults that change nothing
        (command_set.decode_command): a warning the first time on this association, a debug line
        after that."""
        level = logging.DEBUG if self._layout_noted else logging.WARNING
        self._layout_noted = True
        logger.log(
            level,
            "%s: DIMSE response accepted in spite of %s (PS3.7 E.1; tolerated as pynetdicom and "
            "DCMTK do)%s",
            self.peer,
            "; ".join(notes),
            "" if level == logging.DEBUG else "; further ones on this association at debug level",
        )


#: Fragments read by one vectored read at most (Linux's IOV_MAX is 1024; a peer's tiny maximum
#: PDU length could otherwise make a batch of more).
_MAX_IOV = 512


def _after(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (what a short vectored read left to fill)."""
    rest = list(views)
    while rest and n >= len(rest[0]):
        n -= len(rest.pop(0))
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
