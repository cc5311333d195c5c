"""The element walker of the whole-file check: every element of a data set, without building it.

:class:`Scanner` walks a data set's bytes (a whole small file, a window over a big one, or an
inflated data set) checking that every length fits and every undefined length is closed, that
Pixel Data is native or encapsulated as the transfer syntax requires, and that the data set has
a valid SOP Class and Instance UID of its own; it collects the top-level values asked for. The
rule for implicit VR elements of defined length (:func:`implicit_vr_sequence`) is shared with
``transcode``. Opening the file, choosing buffer or window, inflating, and the entry points are
:mod:`forwarder.dicom.check`; the meta header is :mod:`forwarder.dicom.part10`.

About 400 lines: one class and the dictionary helpers only it uses.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from functools import cache

from forwarder.dicom.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    LONG_VRS,
    is_valid_uid,
)
from forwarder.errors import InvalidFileError

_NUMERIC = {
    **{b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d"},
    **{b"SV": "q", b"UV": "Q"},  # 64-bit (PS3.5 2019): routes may range over them too
}
_MAX_DEPTH = 32
#: The longest wanted value read (longer ones count as absent): a whole LT (10240
#: characters, up to 4 bytes each in UTF-8) or a long UC/UT, never a huge one in memory.
_MAX_VALUE = 65536
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
_CHARSET = 0x00080005  # Specific Character Set: how the text values after it are encoded
#: VRs whose values are in the Specific Character Set (the others are ASCII: PS3.5 6.1.2.3).
_CHARSET_VRS = frozenset({b"SH", b"LO", b"ST", b"LT", b"UC", b"UT", b"PN"})
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
#: Keys under which the walker collects the data set's own UIDs when the caller did not ask
#: for them (not returned).
INTERNAL_KEYS = {_SOP_CLASS_UID: "\0SOPClassUID", _SOP_INSTANCE_UID: "\0SOPInstanceUID"}


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


class Scanner:
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
        self.charset = b""  # the data set's Specific Character Set (0008,0005), as written
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
            if vr in LONG_VRS or (vr[:1].isupper() and vr[1:].isupper()):
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
                elif vr in LONG_VRS:
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
            if group == 0x0002 and depth == 0:
                # PS3.10 7.1: group 0002 is the File Meta Information's only. After the meta
                # header a reader that takes group 0002 until the group changes (pydicom, which
                # transcoding and editing use) would take this element for the file's own: its
                # Transfer Syntax or SOP UIDs, another object than the one checked here.
                raise self.fail(
                    f"File Meta element {_tag(tag)} in the data set: group 0002 belongs in the "
                    "file meta information only (a reader may take it for the file's own)"
                )
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
            elif depth == 0 and (tag in want or tag in (_PIXEL_DATA, _CHARSET)):
                self.value(tag, vr, pos, length)
            pos += length

    def value(self, tag: int, vr: bytes, pos: int, length: int) -> None:
        """A top-level value: kept when wanted; Pixel Data and the character set noted."""
        if tag == _CHARSET and length <= 1024:
            self.charset = bytes(self.read(pos, length))
        if tag in self.want and length <= _MAX_VALUE:
            key = self.want[tag]
            if key in self.found:
                # PS3.5 7.1: one element per tag. Readers disagree on which copy counts (dcmdump
                # keeps the first, pydicom the last), so a PACS could file it under another UID.
                raise self.fail(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) appears twice in the data set"
                )
            vr_used = vr or self.vrs.get(tag, "").encode()
            raw = self.read(pos, length)
            self.found[key] = _value(raw, vr_used, self.fmt, self.charset)
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


def _value(raw: bytes, vr: bytes, fmt: str, charset: bytes = b"") -> str:
    code = _NUMERIC.get(vr)
    if code is not None and raw and len(raw) % struct.calcsize(code) == 0:
        values = struct.unpack(f"{fmt}{len(raw) // struct.calcsize(code)}{code}", raw)
        return "\\".join(str(v) for v in values)
    raw = bytes(raw.rstrip(b"\x00 "))
    text = None
    if charset.strip(b"\x00 ") and vr in _CHARSET_VRS and (b"\x1b" in raw or not raw.isascii()):
        text = _decode(raw, vr, charset)
    if text is None:
        # The other VRs (UI, CS, DA...) hold the default repertoire only: bytes outside it
        # are no character (U+FFFD), and a query naming such a UID cannot be encoded.
        text = _undeclared(raw) if vr in _CHARSET_VRS else raw.decode("utf-8", "replace")
    text = text.strip()
    return person_name(text) if vr == b"PN" else text


def _undeclared(raw: bytes) -> str:
    """Text in no character set the data set names (none, or one pydicom does not know even
    corrected): UTF-8 when it is valid UTF-8, else ISO 8859-1, as pydicom reads it (its
    default encoding). A modality that never set (0008,0005) and writes "Süd" in Latin-1
    matches a route on "Süd"; one that writes UTF-8 undeclared does too."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def person_name(text: str) -> str:
    """A PN value without its trailing empty components and component groups, which PS3.5
    6.2.1 lets a writer leave out: ``Wang^XiaoDong=王^小東=`` is ``Wang^XiaoDong=王^小東``,
    ``^^^^`` is empty."""
    return "\\".join(
        "=".join(g.rstrip("^ ") for g in v.split("=")).rstrip("=") for v in text.split("\\")
    )


def _python_encoding(term: str) -> str | None:
    """The Python codec of a Specific Character Set term, with the misspellings pydicom
    corrects (``ISO-IR 100``, ``ISO 2022-IR 87``); None when unknown."""
    from pydicom.charset import python_encoding

    found = python_encoding.get(term)
    if found is None and re.match("^ISO[^_]IR", term):
        found = python_encoding.get("ISO_IR" + term[6:])
    elif found is None and re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term):
        found = python_encoding.get("ISO 2022 IR " + term[12:])
    return found


def _decode(raw: bytes, vr: bytes, charset: bytes) -> str | None:
    """A text value in the data set's Specific Character Set (PS3.5 6.1; ISO 2022 code
    extensions by pydicom); None when the character set is not one pydicom knows, even
    corrected (then read as when there is none: :func:`_undeclared`)."""
    from pydicom.charset import decode_bytes

    terms = charset.decode("ascii", "replace").split("\\")
    encodings = [_python_encoding(t.strip(" \x00")) for t in terms]
    if not all(encodings):
        return None
    codecs = [e for e in encodings if e is not None]
    # what resets the code extension: ^ and = between name parts, \ between values (not in
    # ST, LT and UT: one value each, a \ is text there), and control characters of text
    # (pydicom's PN_DELIMS and TEXT_VR_DELIMS)
    if vr == b"PN":
        delimiters = {0x5E, 0x3D, 0x5C}
    elif vr in (b"ST", b"LT", b"UT"):
        delimiters = {0x0D, 0x0A, 0x09, 0x0C}
    else:
        delimiters = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}
    try:
        # Whole, as pydicom reads it: a 0x5C byte may be part of a character (GB18030, GBK,
        # and JIS X 0208 after its escape: 山本), a value separator only once decoded.
        return decode_bytes(raw, codecs, delimiters)
    except (UnicodeError, LookupError, UserWarning):
        return raw.decode(codecs[0], "replace")
