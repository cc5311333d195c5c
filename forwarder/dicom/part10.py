"""Part 10 files, read without pydicom: the meta header, and the one whole-file check.

The sender needs four things per file: SOP Class UID, SOP Instance UID, transfer syntax and the
offset where the data set starts, so it can stream the rest of the file unmodified. Reading those
from the (explicit VR little endian) group 0002 takes a few microseconds; a pydicom ``dcmread``
takes hundreds. :func:`check_file` (``read_meta`` + ``scan_file``) is the check every path uses
(``send``, the daemon's ingest, ``receive``) before it calls a file sendable or stored: every
element walked, deflated data sets inflated, the data set's own SOP Class and Instance UID
required. Everything here is bounded: no length read from the file is trusted to allocate.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import BinaryIO

from forwarder.errors import InvalidFileError, UnreadableFileError

#: The uncompressed transfer syntaxes (native pixel data). ``transcode`` converts between them,
#: swapping binary values when the source is big endian.
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

_MAX_META = 64 * 1024  # a real meta header is a few hundred bytes
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
_TAG_GROUP_LENGTH = 0x0000
_TAG_SOP_CLASS = 0x0002
_TAG_SOP_INSTANCE = 0x0003
_TAG_TRANSFER_SYNTAX = 0x0010


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the sender needs to know about one Part 10 file."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int  # first byte after the meta header
    size: int  # file size in bytes

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
        if end_of_meta is not None and pos >= end_of_meta:
            break
        if pos + 8 > len(head):
            if pos >= size:
                break
            raise InvalidFileError(path, "file meta information is truncated or larger than 64 KB")
        group, elem = unpack_tag(head, pos)
        if group != 0x0002:
            if end_of_meta is not None:
                raise InvalidFileError(path, "file meta group length disagrees with its elements")
            break
        vr = head[pos + 4 : pos + 6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise InvalidFileError(path, f"file meta element (0002,{elem:04X}) has no valid VR")
        if vr in _LONG_VRS:
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
        values[elem] = value
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
            if vr in _LONG_VRS:
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
            head = f.read(min(size, _MAX_META))
    except OSError as exc:
        raise read_error(p, exc, "cannot read") from None
    return parse_meta(head, size, p)


_NUMERIC = {b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d"}
_MAX_DEPTH = 32
#: Files up to this size are read whole; bigger ones through a window, so a CT image's pixel
#: data is skipped, not read (0.5 MB: 39 -> 32 us a check).
_IN_MEMORY = 128 * 1024
_WINDOW = 64 * 1024  # the window of a big file: element headers are read, values skipped
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
#: Data sets deflated (RFC 1951, no zlib header) after the meta header: PS3.5 A.5.
DEFLATED_SYNTAXES = frozenset({DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.95"})
#: Syntaxes whose Pixel Data is native (a defined length); every other standard syntax of
#: pixel data (JPEG family, RLE, video, encapsulated uncompressed) encapsulates it.
NATIVE_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)
_NO_PIXELS = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})  # JPIP referenced
#: An inflated data set is held in memory to be walked: bounded, so a deflate bomb is refused.
MAX_INFLATED = 256 * 1024 * 1024
_INTERNAL_KEYS = {_SOP_CLASS_UID: "\0SOPClassUID", _SOP_INSTANCE_UID: "\0SOPInstanceUID"}


@cache
def _dictionary_tags() -> tuple[frozenset[int], frozenset[int]]:
    """The data dictionary's tags whose VR is SQ, and all the tags it knows; built once, on the
    first implicit VR data set (pydicom is imported only then)."""
    from pydicom._dicom_dict import DicomDictionary

    sequences = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
    return sequences, frozenset(DicomDictionary)


def implicit_vr_sequence(tag: int) -> bool | None:
    """The one rule for an implicit VR element of defined length (``scan_file`` and
    ``transcode`` both follow it): True when the data dictionary's VR is SQ (its value must be
    items), False when the tag is known with another VR (Pixel Data, a group length, a private
    creator: its bytes are a value, whatever they start with), None when the dictionary does not
    know it (private data elements, unknown tags): a sequence only if its bytes parse as items."""
    sequences, known = _dictionary_tags()
    if tag in sequences:
        return True
    group, elem = tag >> 16, tag & 0xFFFF
    if elem == 0 or (group & 1 and 0x0010 <= elem <= 0x00FF):
        return False  # group lengths, private creators
    if group & 1:
        return None
    return False if tag in known else None


def _encapsulated_syntax(transfer_syntax: str) -> bool | None:
    """True when ``transfer_syntax`` requires encapsulated Pixel Data, False when it requires
    native Pixel Data, None when it is not a standard syntax of pixel data (not judged)."""
    if transfer_syntax in NATIVE_SYNTAXES:
        return False
    if transfer_syntax in _NO_PIXELS:
        return None
    if transfer_syntax.startswith("1.2.840.10008.1.2.4.") or transfer_syntax in (
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    ):
        return True
    return None


class _Scanner:
    """Walks every element of a data set without building it: checks that each length fits in
    the file and every undefined length is closed, and collects the values of ``want`` (top level
    only). Positions are file offsets (offsets in the inflated data set when deflated); ``buf``
    holds the bytes from ``base`` to ``limit``: the whole file when it is small, else a window
    read (``readv``) into one reused buffer, moved forward as the walk goes (element
    headers are read, values skipped by offset), so memory stays flat whatever the file's size
    and a file truncated meanwhile by another program is found truncated (an mmap would kill
    the process with SIGBUS). Each step consumes at least 8 bytes, so the walk is bounded by the
    file size."""

    def __init__(
        self,
        buf: bytes | bytearray,
        path: str,
        little: bool,
        want: Mapping[int, str],
        vrs: Mapping[int, str],
        *,
        fd: int | None = None,
        size: int | None = None,
    ) -> None:
        self.buf = buf
        self.base = 0
        self.limit = len(buf) if fd is None else 0
        self.size = len(buf) if size is None else size
        self.fd = fd  # a big file's descriptor; None when ``buf`` holds the whole data
        self.path = path
        self.fmt = "<" if little else ">"
        self.tag_len = struct.Struct(self.fmt + "HHI")
        self.tag_vr_len = struct.Struct(self.fmt + "HH2sH")
        self.long_len = struct.Struct(self.fmt + "I")
        self.item_tag = struct.pack(self.fmt + "HH", 0xFFFE, 0xE000)
        self.want = want
        self.vrs = vrs  # VRs of wanted tags, for implicit VR data sets
        self.found: dict[str, str] = {}
        self.pixel_data: str | None = None  # "native" or "encapsulated", at the top level
        self.sequences: frozenset[int] = frozenset()
        self.known: frozenset[int] = frozenset()

    def fail(self, message: str) -> InvalidFileError:
        return InvalidFileError(self.path, message)

    def shrunk(self) -> InvalidFileError:
        return self.fail(
            f"truncated while being checked: the file was {self.size} bytes when opened and "
            "is shorter now (another program is writing or cutting it)"
        )

    def fill(self, pos: int) -> None:
        """Move the window of a big file to start at ``pos``."""
        if self.fd is None:
            return
        window = self.buf
        assert isinstance(window, bytearray)
        wanted = min(len(window), self.size - pos)
        got = 0
        if wanted > 0:
            # lseek + readv, not preadv: tests tell the sender's reads (preadv) from ours.
            os.lseek(self.fd, pos, os.SEEK_SET)
            got = os.readv(self.fd, [window])
        if got < wanted:
            raise self.shrunk()
        self.base, self.limit = pos, pos + max(got, 0)

    def read(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos`` (fewer at the end of the data): for values and hints."""
        n = max(min(n, self.size - pos), 0)
        if self.base <= pos and pos + n <= self.limit:
            return bytes(self.buf[pos - self.base : pos - self.base + n])
        assert self.fd is not None  # a whole buffer holds every position
        data = os.pread(self.fd, n, pos)
        if len(data) < n:
            raise self.shrunk()
        return data

    def check_unchanged(self) -> None:
        """A big file whose size changed during the walk may have lost what the walk skipped."""
        if self.fd is not None and os.fstat(self.fd).st_size != self.size:
            raise self.shrunk()

    def truncated(self, tag: int, length: int, pos: int, implicit: bool) -> InvalidFileError:
        hint = ""
        if implicit and pos >= 4:
            vr = self.read(pos - 4, 2)
            if vr in _LONG_VRS or (vr[:1].isupper() and vr[1:].isupper()):
                hint = (
                    " (the data set looks explicit VR: its meta header names the wrong "
                    "transfer syntax)"
                )
        return self.fail(
            f"truncated: element {_tag(tag)} claims {length} bytes but only "
            f"{max(self.size - pos, 0)} remain in the file{hint}"
        )

    def invalid_vr(self, tag: int, vr: bytes, pos: int) -> InvalidFileError:
        hint = ""
        if self.fmt == "<" and pos + 4 <= self.size:
            (as_implicit,) = self.long_len.unpack(self.read(pos, 4))
            if as_implicit <= self.size - pos - 4:
                hint = (
                    " (the data set looks implicit VR: it does not match the transfer syntax "
                    "its meta header names)"
                )
        return self.fail(f"element {_tag(tag)} has an invalid VR {bytes(vr)!r}{hint}")

    def walk(self, pos: int, implicit: bool) -> None:
        """Walk the data set from ``pos`` to the end of the data."""
        self.fill(pos)
        self.elements(pos, implicit, 0, self.size, in_item=False)
        self.check_unchanged()

    def elements(self, pos: int, implicit: bool, depth: int, end: int, in_item: bool) -> int:
        """Read elements from ``pos`` until ``end`` or (``in_item``) an item delimiter;
        return the position after them."""
        if depth > _MAX_DEPTH:
            raise self.fail("sequences nested deeper than 32 levels")
        if implicit and not self.known:
            self.sequences, self.known = _dictionary_tags()
        want = self.want
        buf, base, limit, size = self.buf, self.base, self.limit, self.size
        tag_len, tag_vr_len, long_len = self.tag_len, self.tag_vr_len, self.long_len
        sequences, known = self.sequences, self.known
        while True:
            if pos >= end:
                if pos > end:
                    raise self.fail("an element runs past the end of its item")
                if in_item:
                    raise self.fail("truncated: an item has no item delimiter")
                return pos
            if pos + 12 > limit:
                if pos + 8 > size:
                    if depth == 0 and not self.read(pos, size - pos).strip(b"\x00"):
                        return size  # a few zero padding bytes at the very end
                    raise self.fail("truncated: the file ends inside an element header")
                if limit < size:
                    self.fill(pos)
                    buf, base, limit = self.buf, self.base, self.limit
            if implicit:
                group, elem, length = tag_len.unpack_from(buf, pos - base)
                vr = b""
                pos += 8
            else:
                group, elem, vr, length = tag_vr_len.unpack_from(buf, pos - base)
                pos += 8
                if group == 0xFFFE:
                    (length,) = long_len.unpack_from(buf, pos - 4 - base)
                elif vr in _LONG_VRS:
                    if pos + 4 > size:
                        raise self.fail("truncated: the file ends inside an element header")
                    (length,) = long_len.unpack_from(buf, pos - base)
                    pos += 4
                elif not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise self.invalid_vr((group << 16) | elem, vr, pos - 4)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and in_item:
                    return pos
                raise self.fail(f"unexpected {_tag(tag)} where a data element belongs")
            if length == 0xFFFFFFFF:
                # Undefined length: a sequence, encapsulated pixel data, or UN holding implicit VR.
                pixels = tag == _PIXEL_DATA
                if pixels and depth == 0:
                    self.pixel_data = "encapsulated"
                fragments = pixels or vr in (b"OB", b"OW")
                pos = self.items(pos, implicit or vr == b"UN", depth + 1, fragments)
                buf, base, limit = self.buf, self.base, self.limit
                continue
            if pos + length > end:
                raise self.truncated(tag, length, pos, implicit)
            if vr == b"SQ" or (implicit and tag in sequences):
                # A defined-length sequence: its items must fit it exactly.
                self.defined_items(pos, pos + length, implicit or vr == b"UN", depth + 1)
                buf, base, limit = self.buf, self.base, self.limit
            elif implicit and length >= 8 and (group & 1 or tag not in known):
                # A private or unknown tag: a sequence if its bytes parse as items, else a value.
                if not self.guess_items(tag, pos, length, depth + 1) and depth == 0:
                    self.value(tag, vr, pos, length)
                buf, base, limit = self.buf, self.base, self.limit
            elif depth == 0 and (tag in want or tag == _PIXEL_DATA):
                self.value(tag, vr, pos, length)
            pos += length

    def value(self, tag: int, vr: bytes, pos: int, length: int) -> None:
        """A top-level value: kept when wanted; Pixel Data noted."""
        if tag in self.want and length <= 4096:
            vr_used = vr or self.vrs.get(tag, "").encode()
            raw = self.read(pos, length)
            self.found[self.want[tag]] = _value(raw, vr_used, self.fmt)
        elif tag == _PIXEL_DATA:
            self.pixel_data = "native"

    def guess_items(self, tag: int, pos: int, length: int, depth: int) -> bool:
        """Whether the implicit VR value at ``pos`` of a tag the dictionary does not know (see
        :func:`implicit_vr_sequence`) is a sequence: its bytes start with an item and parse as
        items (walked, then). Otherwise it is an opaque value (private binary data may start
        with the bytes of an item tag), not a fault."""
        if implicit_vr_sequence(tag) is not None or self.read(pos, 4) != self.item_tag:
            return False
        try:
            self.defined_items(pos, pos + length, True, depth)
        except InvalidFileError:
            if self.base > pos:
                self.fill(pos)  # the window moved on during the attempt: back to the value
            return False
        return True

    def defined_items(self, pos: int, end: int, implicit: bool, depth: int) -> None:
        """Items of a sequence with a defined length: each must end inside ``end``."""
        if depth > _MAX_DEPTH:
            raise self.fail("sequences nested deeper than 32 levels")
        while pos < end:
            if pos + 8 > end:
                raise self.fail("a sequence ends inside an item header")
            if pos + 8 > self.limit:
                self.fill(pos)
            group, elem, length = self.tag_len.unpack_from(self.buf, pos - self.base)
            pos += 8
            if ((group << 16) | elem) != _ITEM:
                raise self.fail(
                    f"expected an item in a sequence, found {_tag((group << 16) | elem)}"
                )
            if length == 0xFFFFFFFF:
                pos = self.elements(pos, implicit, depth, end, in_item=True)
            else:
                if pos + length > end:
                    raise self.fail(
                        f"truncated: an item claims {length} bytes past the end of its sequence"
                    )
                pos = self.elements(pos, implicit, depth, pos + length, in_item=False)

    def items(self, pos: int, implicit: bool, depth: int, fragments: bool) -> int:
        size = self.size
        while True:
            if pos + 8 > size:
                raise self.fail(
                    "truncated: an undefined length has no sequence delimiter before the end"
                )
            if pos + 8 > self.limit:
                self.fill(pos)
            group, elem, length = self.tag_len.unpack_from(self.buf, pos - self.base)
            pos += 8
            tag = (group << 16) | elem
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise self.fail(
                    f"expected an item or sequence delimiter, found {_tag(tag)} "
                    "(an undefined length without its delimiter?)"
                )
            if length == 0xFFFFFFFF:
                if fragments:
                    raise self.fail("a pixel data fragment with undefined length")
                pos = self.elements(pos, implicit, depth, size, in_item=True)
            elif pos + length > size:
                raise self.fail(
                    f"truncated: an item claims {length} bytes past the end of the file"
                )
            elif fragments:
                pos += length
            else:
                pos = self.elements(pos, implicit, depth, pos + length, in_item=False)

    def finish(self, transfer_syntax: str) -> tuple[str, str]:
        """Checks of the whole data set once walked; returns its SOP Class and Instance UID."""
        uids: list[str] = []
        missing: list[str] = []
        names = ((_SOP_CLASS_UID, "SOP Class UID"), (_SOP_INSTANCE_UID, "SOP Instance UID"))
        for tag, name in names:
            key = self.want[tag]
            uid = self.found.pop(key, "") if key.startswith("\0") else self.found.get(key, "")
            uid = uid.rstrip("\0 ").strip()
            if not uid:
                missing.append(f"no {name} {_tag(tag)}")
            elif not is_valid_uid(uid):
                shown = uid if len(uid) <= 80 else uid[:77] + "..."
                raise self.fail(
                    f"invalid {name} {shown!r} in the data set "
                    "(PS3.5 9.1: at most 64 characters, digits and dots)"
                )
            uids.append(uid)
        if missing:
            raise self.fail(
                f"the data set has {' and '.join(missing)} at its top level (the meta header's "
                "are not enough: a peer stores what the data set says); refused, as DCMTK's "
                "dcmsend refuses it"
            )
        encapsulated = _encapsulated_syntax(transfer_syntax)
        if self.pixel_data == "encapsulated" and encapsulated is False:
            raise self.fail(
                "Pixel Data (7FE0,0010) is encapsulated (undefined length), but the transfer "
                f"syntax {transfer_syntax} requires native pixel data: the meta header names "
                "the wrong transfer syntax"
            )
        if self.pixel_data == "native" and encapsulated:
            raise self.fail(
                "Pixel Data (7FE0,0010) is native (a defined length), but the transfer syntax "
                f"{transfer_syntax} requires encapsulated (compressed) pixel data: the meta "
                "header names the wrong transfer syntax"
            )
        return uids[0], uids[1]


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _value(raw: bytes, vr: bytes, fmt: str) -> str:
    code = _NUMERIC.get(vr)
    if code is not None and raw and len(raw) % struct.calcsize(code) == 0:
        values = struct.unpack(f"{fmt}{len(raw) // struct.calcsize(code)}{code}", raw)
        return "\\".join(str(v) for v in values)
    return raw.rstrip(b"\x00 ").decode("utf-8", "replace").strip()


def inflate(f: BinaryIO, path: str, offset: int, limit: int = MAX_INFLATED) -> bytearray:
    """The data set of a deflated file (raw deflate from ``offset``), read in chunks, at most
    ``limit`` bytes. After the deflate stream only zero padding or a gzip trailer that matches
    the inflated data (CRC-32 and size, written by some tools; DCMTK ignores it) may follow."""
    f.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not inflater.eof:
            chunk = f.read(1 << 20)
            if not chunk:
                raise InvalidFileError(
                    path, "truncated: the deflated data set ends before its deflate stream does"
                )
            while chunk and not inflater.eof:
                out += inflater.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit:
                    raise InvalidFileError(
                        path,
                        f"the deflated data set inflates to more than {limit // (1024 * 1024)} "
                        "MiB; refused (a deflate bomb, or far larger than any deflated object)",
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidFileError(path, f"the deflated data set is corrupt (zlib: {exc})") from None
    rest = inflater.unused_data + f.read(64)
    if rest.strip(b"\x00"):
        trailer = struct.pack("<II", zlib.crc32(out), len(out) & 0xFFFFFFFF)
        if rest[:8] != trailer or rest[8:].strip(b"\x00"):
            raise InvalidFileError(
                path, "unexpected bytes after the end of the deflated data set's deflate stream"
            )
    if f.read(1):
        raise InvalidFileError(path, "unexpected bytes after the end of the deflated data set")
    return out


def _scan(
    p: str, meta: FileMeta | None, want: Mapping[int, str], vrs: Mapping[int, str]
) -> tuple[FileMeta, dict[str, str], str, str]:
    """Walk the data set of ``p`` (its meta header read first when ``meta`` is None, from the
    same open file); return the meta header, the wanted values and the data set's own UIDs."""
    wanted = dict(want)
    for tag, key in _INTERNAL_KEYS.items():
        wanted.setdefault(tag, key)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size <= _IN_MEMORY else None
            if meta is None:
                head = f.read(_MAX_META) if data is None else data
                head = head[:_MAX_META] if len(head) > _MAX_META else head
                meta = parse_meta(head, size, p, peek_uids=False)
            ts = meta.transfer_syntax
            implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
            little = ts != EXPLICIT_VR_BIG_ENDIAN
            if ts in DEFLATED_SYNTAXES:
                scanner = _Scanner(inflate(f, p, meta.dataset_offset), p, True, wanted, vrs)
                scanner.walk(0, False)
            elif data is not None:
                scanner = _Scanner(data, p, little, wanted, vrs)
                scanner.walk(meta.dataset_offset, implicit)
            else:
                # Never mmap: a file cut by another program meanwhile would kill us (SIGBUS).
                window = bytearray(_WINDOW)
                scanner = _Scanner(window, p, little, wanted, vrs, fd=f.fileno(), size=size)
                scanner.walk(meta.dataset_offset, implicit)
    except OSError as exc:
        raise read_error(p, exc, "cannot read") from None
    sop_class, sop_instance = scanner.finish(ts)
    return meta, scanner.found, sop_class, sop_instance


def scan_file(
    path: str | os.PathLike[str],
    meta: FileMeta,
    want: Mapping[int, str] | None = None,
    vrs: Mapping[int, str] | None = None,
) -> dict[str, str]:
    """Check the whole data set of a Part 10 file is well formed and complete, and return the
    top-level values of ``want`` (tag -> keyword) as text (multiple values joined by ``\\``).
    ``vrs`` (tag -> VR) tells how to read wanted values of implicit VR data sets.

    Raises :class:`InvalidFileError` naming what is wrong: truncated, a length past the end, an
    undefined length without its delimiter, an invalid VR, bytes that do not match the transfer
    syntax (pixel data encapsulated under a native syntax or the reverse), a corrupt or
    oversized deflate stream, or no valid SOP Class / Instance UID in the data set itself.
    Deflated data sets are inflated (at most :data:`MAX_INFLATED` bytes) and walked.
    """
    p = os.fspath(path)
    if meta.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN and want and vrs is None:
        # Implicit VR values need the data dictionary to be read (US Rows is binary).
        from pydicom.datadict import dictionary_VR

        vrs = {tag: dictionary_VR(tag).split(" or ")[0] for tag in want}
    _, found, _, _ = _scan(p, meta, want or {}, vrs or {})
    return found


def check_file(path: str | os.PathLike[str]) -> FileMeta:
    """The one check every path uses: :func:`read_meta` and the whole-data-set scan of
    :func:`scan_file`. The returned SOP Class and Instance UID are the data set's own (they win
    over the meta header's, as DCMTK's dcmsend sends them), deflated files included.

    Raises :class:`InvalidFileError` (:class:`UnreadableFileError` when it cannot be read).
    """
    return check_file_values(path)[0]


def check_file_values(
    path: str | os.PathLike[str],
    want: Mapping[int, str] | None = None,
    vrs: Mapping[int, str] | None = None,
) -> tuple[FileMeta, dict[str, str]]:
    """:func:`check_file`, also returning the top-level values of ``want`` as
    :func:`scan_file` does (``vrs`` as there): one open and one walk (the daemon's ingest)."""
    p = os.fspath(path)
    meta, found, sop_class, sop_instance = _scan(p, None, want or {}, vrs or {})
    checked = FileMeta(
        sop_class, sop_instance, meta.transfer_syntax, meta.dataset_offset, meta.size
    )
    return checked, found
