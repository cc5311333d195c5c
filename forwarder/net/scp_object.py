"""One object arriving in a C-STORE: written as it comes, checked, then handed to a sink.

The Storage SCP engine writes a Part 10 file per C-STORE-RQ: a meta header made from the request
and its presentation context, then the data set's PDV fragments as they arrive, never assembled
in memory nor decoded. The file is a dot-file in the sink's spool folder (the destination's
filesystem, so placing it is a rename). Once the last fragment is in, the whole data set is
walked by the shared check (:func:`forwarder.dicom.check.scan_file`) and its own SOP Class and
Instance UIDs must be the request's; the file is fsynced, and only then does the sink decide
(:class:`ObjectSink`: the receiver's folder writer, later the daemon's listener). Whatever the
sink does not take is deleted; an object refused, too large or cut short by an abort leaves
nothing behind.

The ``STATUS_*`` constants are what the engine answers (the conformance statement lists them
with the comment on each line).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol

from forwarder.dicom.check import IN_MEMORY, scan_file
from forwarder.dicom.part10 import FileMeta
from forwarder.errors import InvalidFileError, UnreadableFileError
from forwarder.net.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # the C-STORE names a SOP Class its context is not for
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, write failed, object too big: the sender may retry
STATUS_DATA_SET_MISMATCH = 0xA900  # the data set's own SOP Class/Instance UID is not the request's
STATUS_CANNOT_UNDERSTAND = 0xC000  # the data set cannot be parsed to its end, or holds group 0002

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_UID = 0x0020000D
# What the one walk over a received data set collects (top level, all UI).
_WANTED = {_SOP_CLASS_UID: "SOPClassUID", _SOP_INSTANCE_UID: "SOPInstanceUID"}
_WANTED[_STUDY_UID] = "StudyInstanceUID"
_WANTED_VRS = dict.fromkeys(_WANTED, "UI")
#: What every sink's :attr:`ObjectSink.wanted` must include (tag -> keyword, tag -> VR).
BASE_WANTED: tuple[dict[int, str], dict[int, str]] = (_WANTED, _WANTED_VRS)
_TOKEN = secrets.token_hex(4)  # this process's partial files (a stale one never clashes)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Answer:
    """The status of a C-STORE-RSP, and the Error Comment that says why it is not Success.

    ``then``: the sink's work that need not keep the modality waiting (telling another
    process, the log line), run on the association's thread once the response is sent (or
    could not be), while the modality prepares its next object."""

    status: int
    comment: str | None = None
    then: Callable[[], None] | None = field(default=None, compare=False, repr=False)


SUCCESS = Answer(STATUS_SUCCESS)
FAILED_SINK = Answer(STATUS_OUT_OF_RESOURCES, "cannot store the object")
_names = itertools.count(1)  # partial file names: unique in this process, no random bytes


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an object came from: for logs, routing and the journal."""

    calling_ae: str
    called_ae: str
    host: str
    port: int
    association: str  # an id unique to the association


@dataclass(frozen=True, slots=True)
class ReceivedObject:
    """A received object that passed the check, as its file holds it."""

    sop_class_uid: str  # as the request (and the data set) name it, unpadded
    sop_instance_uid: str
    transfer_syntax: str
    study_instance_uid: str  # "" when the data set has none
    size: int  # bytes of the Part 10 file
    dataset_offset: int
    values: dict[str, str]  # keyword -> value of what the sink wanted (top level, as found)


class ObjectSink(Protocol):
    """Takes checked, fsynced objects; the engine answers the status it returns.

    ``spool`` is the folder the engine writes partial files into (dot-files, on the
    destination's filesystem). :meth:`accept` runs on the association's thread, after the file
    is durable and before the C-STORE-RSP; it moves ``path`` away to keep the object (what it
    leaves behind is deleted) and returns Success, or a failure status with a comment. It
    returns Success only once ``path`` has been moved away (the engine then leaves it alone).
    """

    @property
    def spool(self) -> Path: ...

    @property
    def wanted(self) -> tuple[dict[int, str], dict[int, str]]:
        """What the one walk over each data set collects for the sink (tag -> keyword, tag ->
        VR; a superset of :data:`BASE_WANTED`), handed back in :attr:`ReceivedObject.values`."""
        ...

    def accept(self, path: str, obj: ReceivedObject, origin: Origin) -> Answer: ...


def shown(uid: str) -> str:
    """A peer's UID fit for a log line: as is when well-formed, else quoted and escaped."""
    text = uid.strip(" \x00")
    return text if _UID_RE.fullmatch(text) else repr(uid)


@cache
def syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    return str(UID(uid).name)


def _ui(elem: int, value: str, pad: bytes = b"\x00", vr: bytes = b"UI") -> bytes:
    raw = value.encode("ascii", "replace")[:0xFFFE]
    if len(raw) % 2:
        raw += pad
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(raw)) + raw


_META_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
_IMPLEMENTATION = _ui(0x0012, IMPLEMENTATION_CLASS_UID) + _ui(
    0x0013, IMPLEMENTATION_VERSION, b" ", b"SH"
)
_PREAMBLE = bytes(128) + b"DICM"


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, calling: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (explicit VR little endian, PS3.10 7.1)."""
    body = b"".join(
        (
            _META_VERSION,
            _ui(0x0002, sop_class),
            _ui(0x0003, sop_instance),
            _ui(0x0010, transfer_syntax),
            _IMPLEMENTATION,
            _ui(0x0016, calling, b" ", b"AE") if calling else b"",
        )
    )
    return _PREAMBLE + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


#: Received bytes held before they are written (a write per fragment costs a system call).
STAGED = 256 * 1024


class IncomingObject:
    """The file of one C-STORE in progress: :meth:`write` each data set fragment, then
    :meth:`finish` (check, fsync, hand to the sink) or :meth:`discard`."""

    def __init__(
        self,
        sink: ObjectSink,
        origin: Origin,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        max_size: int | None,
    ) -> None:
        self.sink, self.origin = sink, origin
        self.sop_class, self.sop_instance = sop_class, sop_instance
        self.transfer_syntax = transfer_syntax
        self.max_size = max_size
        self.path = os.path.join(sink.spool, f".receiving.{_TOKEN}.{next(_names)}.part")
        header = part10_header(sop_class, sop_instance, transfer_syntax, origin.calling_ae)
        self.size = self.header = len(header)  # bytes of the file as received
        # A small object is also kept in memory as it is written, so the check walks these
        # bytes instead of reading the file back (a big one is read back through a window).
        self.copy: bytearray | None = bytearray(header)
        # Fragments not yet written: small ones go to the file in writes of STAGED bytes or
        # more (a sender with 16 KB PDUs sends a CT image in 32 fragments: 2 writes, not 32),
        # and a small object (``copy``) in one write once it is whole.
        self.staged = bytearray()
        self.failure: Answer | None = None
        self.fd = -1
        try:
            self.fd = os.open(self.path, _CREATE, 0o666)
        except OSError as exc:
            self._fail_write(exc)

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _fail_write(self, exc: OSError) -> None:
        logger.error(
            "cannot buffer SOP Instance %s from %s in %s: %s; answering 0x%04X",
            shown(self.sop_instance),
            self.origin.calling_ae,
            self.sink.spool,
            exc.strerror or exc,
            STATUS_OUT_OF_RESOURCES,
        )
        self.failure = Answer(STATUS_OUT_OF_RESOURCES, "cannot buffer the object")
        self.discard()

    def write(self, fragment: memoryview) -> None:
        """Append one data set fragment (or only count it, once the object is refused)."""
        self.size += len(fragment)
        if self.failure is not None:
            return
        if self.max_size is not None and self.size > self.max_size:
            self.failure = Answer(
                STATUS_OUT_OF_RESOURCES, f"larger than the {self.max_size}-byte limit"
            )
            self.discard()
            return
        copy = self.copy
        if copy is not None:
            if self.size <= IN_MEMORY:
                copy += fragment
                return  # written whole by _flush()
            self.copy = None
            self.staged = copy  # the header and the fragments so far
        staged = self.staged
        if len(staged) + len(fragment) < STAGED:
            staged += fragment  # a small fragment: written with the next ones
            return
        # Written from where it was received, with what is held before it: one system call,
        # and a big fragment is never copied.
        try:
            n = os.writev(self.fd, (staged, fragment))
            if n < len(staged) + len(fragment):
                self._write_all((bytes(staged) + bytes(fragment))[n:])
        except OSError as exc:
            self._fail_write(exc)
            return
        self.staged = bytearray()

    def _flush(self) -> None:
        """Write what is held in memory to the file, once, when the last fragment is in (on a
        failure: refused and discarded). A small object's ``copy`` stays whole for the check."""
        if self.failure is not None:
            return
        held = self.copy if self.copy is not None else self.staged
        try:
            if held:
                self._write_all(held)
        except OSError as exc:
            self._fail_write(exc)

    def discard(self) -> None:
        """Close and delete the partial file (nothing stays behind)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def finish(self) -> Answer:
        """The last fragment is in: check, fsync and offer the object to the sink."""
        try:
            return self._finish()
        finally:
            self.discard()

    def _finish(self) -> Answer:
        if self.failure is not None:
            if self.max_size is not None and self.size > self.max_size:
                logger.warning(
                    "refused SOP Instance %s from %s: %d bytes exceed the %d-byte limit; "
                    "answering 0x%04X",
                    shown(self.sop_instance),
                    self.origin.calling_ae,
                    self.size,
                    self.max_size,
                    STATUS_OUT_OF_RESOURCES,
                )
            return self.failure
        self._flush()
        if self.failure is not None:
            return self.failure
        found, values, refusal = self._check()
        if refusal is not None:
            return refusal
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._fail_write(exc)  # closes and deletes the partial file
            assert self.failure is not None
            return self.failure
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._fail_write(exc)
            assert self.failure is not None
            return self.failure
        obj = ReceivedObject(
            sop_class_uid=self.sop_class,
            sop_instance_uid=self.sop_instance,
            transfer_syntax=self.transfer_syntax,
            study_instance_uid=found,
            size=self.size,
            dataset_offset=self.header,
            values=values,
        )
        answer = FAILED_SINK
        try:
            answer = self.sink.accept(self.path, obj, self.origin)
            return answer
        finally:
            if answer.status != STATUS_SUCCESS:  # on Success the sink has moved the file away
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def refuse(self, status: int, comment: str, detail: str) -> Answer:
        logger.warning(
            "refused SOP Instance %s from %s (%s): %s; answering 0x%04X",
            shown(self.sop_instance),
            self.origin.calling_ae,
            syntax_name(self.transfer_syntax),
            detail,
            status,
        )
        return Answer(status, comment)

    def _check(self) -> tuple[str, dict[str, str], Answer | None]:
        """Walk the whole data set once: the Study Instance UID it holds ("" when none), the
        values the sink wants, and the refusal to answer when it is broken or is not what the
        request says."""
        none: dict[str, str] = {}
        meta = FileMeta(
            sop_class_uid=self.sop_class,
            sop_instance_uid=self.sop_instance,
            transfer_syntax=self.transfer_syntax,
            dataset_offset=self.header,
            size=self.size,
        )
        if meta.dataset_length <= 0:
            comment = "the C-STORE request carries an empty data set"
            return "", none, self.refuse(STATUS_CANNOT_UNDERSTAND, comment, comment)
        try:
            want, vrs = self.sink.wanted
            found = scan_file(self.path, meta, want, vrs, data=self.copy)
        except UnreadableFileError as exc:  # our own file: not the sender's fault
            logger.error(
                "cannot read back SOP Instance %s from %s: %s; answering 0x%04X",
                shown(self.sop_instance),
                self.origin.calling_ae,
                exc.reason,
                STATUS_OUT_OF_RESOURCES,
            )
            return "", none, Answer(STATUS_OUT_OF_RESOURCES, "cannot read back the object")
        except InvalidFileError as exc:
            return (
                "",
                none,
                self.refuse(STATUS_CANNOT_UNDERSTAND, exc.reason, f"cannot parse: {exc.reason}"),
            )
        sop_class = found.get("SOPClassUID", "").strip(" \x00")
        sop_instance = found.get("SOPInstanceUID", "").strip(" \x00")
        for value, keyword, tag in (
            (sop_class, "SOPClassUID", "(0008,0016)"),
            (sop_instance, "SOPInstanceUID", "(0008,0018)"),
        ):
            if not value:
                comment = f"the data set has no {keyword} {tag}"
                return "", none, self.refuse(STATUS_CANNOT_UNDERSTAND, comment, comment)
        if sop_class != self.sop_class:
            return (
                "",
                none,
                self.refuse(
                    STATUS_DATA_SET_MISMATCH,
                    "SOP Class UID of the data set differs from the request's",
                    f"the data set's SOP Class UID {shown(sop_class)} is not the request's "
                    f"{shown(self.sop_class)}",
                ),
            )
        if sop_instance != self.sop_instance:
            return (
                "",
                none,
                self.refuse(
                    STATUS_DATA_SET_MISMATCH,
                    "SOP Instance UID of the data set differs from the request's",
                    f"the data set's SOP Instance UID {shown(sop_instance)} is not the request's",
                ),
            )
        return found.get("StudyInstanceUID", "").strip(" \x00"), found, None


def write_error_reason(exc: OSError) -> str:
    """A short reason for a failed write or placement, for an Error Comment."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if exc.errno == errno.ELOOP:
        return "refusing to follow a symlink"
    return "write failed"
