"""Part 10 files, read without pydicom: the transfer syntaxes, the meta header, read errors.

The sender needs four things per file: SOP Class UID, SOP Instance UID, transfer syntax and the
offset where the data set starts, so it can stream the rest of the file unmodified. Reading those
from the (explicit VR little endian) group 0002 takes a few microseconds; a pydicom ``dcmread``
takes hundreds. :func:`read_meta` reads them (the data set's own UIDs taken from its first
elements where they are plainly there). The whole-file check every path uses before it calls a
file sendable or stored is :func:`forwarder.dicom.check.check_file`; nothing here walks the data
set past its first elements. No length read from the file is trusted to allocate.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass

from forwarder.errors import InvalidFileError, UnreadableFileError

#: The standard transfer syntaxes without compression. ``UNCOMPRESSED`` are the two that
#: ``transcode`` converts to, from any source: big endian values swapped, deflated data sets
#: inflated, compressed pixel data decompressed.
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

MAX_META = 64 * 1024  # a real meta header is a few hundred bytes
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
LONG_VRS |= {b"UV"}
_TAG_GROUP_LENGTH = 0x0000
_TAG_SOP_CLASS = 0x0002
_TAG_SOP_INSTANCE = 0x0003
_TAG_TRANSFER_SYNTAX = 0x0010

#: Data sets deflated (RFC 1951, no zlib header) after the meta header: PS3.5 A.5.
DEFLATED_SYNTAXES = frozenset({DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.95"})


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the sender needs to know about one Part 10 file."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int  # first byte after the meta header
    size: int  # file size in bytes
    # The file's mtime when it was checked (the queue's record), 0 when not known: the
    # sender then refuses a file whose size OR mtime is not that.
    mtime_ns: int = 0

    @property
    def dataset_length(self) -> int:
        return self.size - self.dataset_offset


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def parse_meta(
    head: bytes, size: int, path: str = "<bytes>", *, peek_uids: bool = True
) -> FileMeta:
    """Parse the preamble and group 0002 at the start of a file (``head`` is its first bytes).

    With ``peek_uids`` (the fast path, no whole-file check) the SOP Class and Instance UID are
    taken from the data set's first elements where they are plainly there, and checked; without
    it (:func:`check_file`, whose scan finds and checks the data set's own) they are the meta
    header's, unchecked, and only the transfer syntax is checked."""
    if size == 0:
        raise InvalidFileError(path, "empty file")
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidFileError(
            path, "not a DICOM Part 10 file: the 'DICM' prefix at byte 128 is missing"
        )
    pos = 132
    end_of_meta: int | None = None
    values: dict[int, bytes] = {}
    unpack_tag = struct.Struct("<HH").unpack_from
    while True:
        if pos + 8 > len(head):
            if pos >= size or (end_of_meta is not None and pos >= end_of_meta):
                break
            raise InvalidFileError(path, "file meta information is truncated or larger than 64 KB")
        group, elem = unpack_tag(head, pos)
        if group != 0x0002:
            if end_of_meta is not None and pos < end_of_meta:
                raise InvalidFileError(path, "file meta group length disagrees with its elements")
            break
        # Past the end its group length (0002,0000) gives, group 0002 goes on: a writer that
        # left its last elements out of the count. Read as file meta, as pydicom reads it (a
        # copy of an element already read must then say the same, below), so that no reader
        # takes it for the data set's.
        vr = head[pos + 4 : pos + 6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise InvalidFileError(path, f"file meta element (0002,{elem:04X}) has no valid VR")
        if vr in LONG_VRS:
            if pos + 12 > len(head):
                raise InvalidFileError(path, "file meta information is truncated")
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_pos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_pos = pos + 8
        if length == 0xFFFFFFFF or value_pos + length > len(head):
            raise InvalidFileError(
                path, f"file meta element (0002,{elem:04X}) has a length past the end of the header"
            )
        value = head[value_pos : value_pos + length]
        if values.setdefault(elem, value) != value:
            raise InvalidFileError(
                path,
                f"file meta element (0002,{elem:04X}) appears twice with different values: "
                "readers disagree on which is the file's",
            )
        if elem == _TAG_GROUP_LENGTH and length == 4:
            end_of_meta = value_pos + 4 + struct.unpack("<I", value)[0]
        pos = value_pos + length
    missing = [
        name
        for tag, name in (
            (_TAG_SOP_CLASS, "MediaStorageSOPClassUID"),
            (_TAG_SOP_INSTANCE, "MediaStorageSOPInstanceUID"),
            (_TAG_TRANSFER_SYNTAX, "TransferSyntaxUID"),
        )
        if not _uid(values.get(tag, b""))
    ]
    if missing:
        raise InvalidFileError(path, "file meta information lacks " + ", ".join(missing))
    if pos >= size:
        raise InvalidFileError(path, "no data set after the file meta information")
    transfer_syntax = _uid(values[_TAG_TRANSFER_SYNTAX])
    sop_class, sop_instance = _dataset_uids(head, pos, transfer_syntax) if peek_uids else ("", "")
    meta = FileMeta(
        sop_class_uid=sop_class or _uid(values[_TAG_SOP_CLASS]),
        sop_instance_uid=sop_instance or _uid(values[_TAG_SOP_INSTANCE]),
        transfer_syntax=transfer_syntax,
        dataset_offset=pos,
        size=size,
    )
    checked = (
        (
            ("SOP Class UID", meta.sop_class_uid),
            ("SOP Instance UID", meta.sop_instance_uid),
            ("Transfer Syntax UID", meta.transfer_syntax),
        )
        if peek_uids
        else (("Transfer Syntax UID", meta.transfer_syntax),)
    )
    for name, uid in checked:
        if not is_valid_uid(uid):
            # Proposed to a peer, an invalid UID makes it refuse the whole association.
            shown = uid if len(uid) <= 80 else uid[:77] + "..."
            raise InvalidFileError(
                path,
                f"invalid {name} {shown!r} (PS3.5 9.1: at most 64 characters, digits and dots)",
            )
    return meta


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    """At most 64 characters of digit groups separated by dots (PS3.5 9.1). Leading zeros in
    a component are tolerated: non-conformant, but common, and accepted by PACS."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def _dataset_uids(head: bytes, pos: int, transfer_syntax: str) -> tuple[str, str]:
    """SOP Class and Instance UID from the data set's first elements, when they are plainly
    there; the data set is authoritative (some files carry a stale meta header, and peers such as
    DCMTK's storescp reject a command whose UIDs differ from the data set's). Gives up (returns
    empty strings) at anything unusual: a sequence, an undefined length, a deflated data set."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        implicit, fmt = True, "<"
    elif transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        implicit, fmt = False, ">"
    elif transfer_syntax in DEFLATED_SYNTAXES:
        return "", ""  # check_file inflates the data set and finds them
    else:
        implicit, fmt = False, "<"
    tag_struct = struct.Struct(fmt + "HH")
    sop_class = sop_instance = ""
    end = len(head)
    while pos + 8 <= end:
        group, elem = tag_struct.unpack_from(head, pos)
        tag = (group << 16) | elem
        if tag > 0x00080018:
            break
        if implicit:
            (length,) = struct.unpack_from(fmt + "I", head, pos + 4)
            value_pos = pos + 8
        else:
            vr = head[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > end:
                    break
                (length,) = struct.unpack_from(fmt + "I", head, pos + 8)
                value_pos = pos + 12
            else:
                (length,) = struct.unpack_from(fmt + "H", head, pos + 6)
                value_pos = pos + 8
        if length == 0xFFFFFFFF or value_pos + length > end:
            break
        if tag == 0x00080016:
            sop_class = _uid(head[value_pos : value_pos + length])
        elif tag == 0x00080018:
            sop_instance = _uid(head[value_pos : value_pos + length])
        pos = value_pos + length
    return sop_class, sop_instance


def read_error(path: str, exc: OSError, doing: str) -> InvalidFileError:
    """The error for an OSError met reading ``path``: a file that is not there (removed, or a
    folder in its path gone) is :class:`InvalidFileError`, since trying again cannot help; any
    other (EIO, EACCES...) is :class:`UnreadableFileError`, tried again later: nothing is known
    against the file."""
    reason = f"{doing}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return InvalidFileError(path, reason)
    return UnreadableFileError(path, reason)


def read_meta(path: str | os.PathLike[str]) -> FileMeta:
    """Read the file meta information of the Part 10 file at ``path``.

    Raises :class:`InvalidFileError` for empty, non-Part-10 or broken headers and for files
    that cannot be opened (the reason names the OS error).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(min(size, MAX_META))
    except OSError as exc:
        raise read_error(p, exc, "cannot read") from None
    return parse_meta(head, size, p)
