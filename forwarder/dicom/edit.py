"""Changing what is sent: ``modify`` (set, remove) and de-identification, applied to the object
on its way to a destination, never to the file on disk.

A modified object is re-encoded in its own transfer syntax: its attributes (everything but the
top-level Pixel Data) are read with pydicom, changed by each :class:`Editor` in turn, and
written again; the Pixel Data element is not read at all but streamed from the file as it is
(:class:`EditedObject` is the re-encoded bytes around a :class:`FileRange`), so memory stays
flat whatever the size of the pixels. A deflated data set is the exception: it is inflated,
changed and deflated again in memory (bounded like every inflation, ``check.MAX_INFLATED``).

:func:`diff` lists the top-level changes (old -> new) between two data sets, for
``forwarder explain`` and the tests.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import string
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from forwarder.config.routing import Modify, parse_remove
from forwarder.dicom.check import inflate
from forwarder.dicom.layout import PIXEL_TAGS, pixel_data_span
from forwarder.dicom.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    read_meta,
)
from forwarder.errors import InvalidFileError, UnreadableFileError

logger = logging.getLogger(__name__)

_INTS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "IS"})
_FLOATS = frozenset({"FL", "FD"})
_SHOWN = 64  # characters of a value shown in a change
#: The VRs whose values are written in the Specific Character Set (PS3.5 6.1.2.3); the others
#: hold the default repertoire only, which :func:`validate_value` checks.
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
#: Text VRs with one value always: a backslash is part of the text (PS3.5 6.2).
_SINGLE_TEXT = frozenset({"ST", "LT", "UT"})
#: The control characters (C0 and DEL) a text VR may not hold (PS3.5 6.1.3, Table 6.2-1):
#: all but ESC (code extensions), and in the free-text VRs all but CR, LF, FF and ESC.
_C0 = "".join(map(chr, range(0x20))) + "\x7f"


def _refused(allowed: str) -> re.Pattern[str]:
    return re.compile("[" + re.escape("".join(c for c in _C0 if c not in allowed)) + "]")


_CONTROLS = {vr: _refused("\x1b") for vr in ("SH", "LO", "PN", "UC", "AE", "CS", "UR")}
_CONTROLS |= {vr: _refused("\x1b\r\n\f") for vr in ("ST", "LT", "UT")}


class EditError(Exception):
    """The object cannot be changed as configured; the message says why."""


class Editor(Protocol):
    """One step of changes (a route's deidentify, a route's or destination's modify)."""

    def apply(self, ds: Dataset) -> None: ...


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return str(value)


def _converted(vr: str, text: str) -> object:
    if text == "":
        return None
    parts = [text] if vr in _SINGLE_TEXT else text.split("\\")
    if vr in _INTS and vr != "IS":
        values: list[object] = [int(p) for p in parts]
    elif vr in _FLOATS:
        values = [float(p) for p in parts]
    else:
        values = list(parts)
    return values[0] if len(values) == 1 else values


def _fits_vm(vm: str, count: int) -> bool:
    """Whether ``count`` values fit the dictionary's multiplicity: ``1``, ``2``, ``1-3``,
    ``1-n``, ``2-2n``... (PS3.5 6.4); no value (an emptied attribute) always does."""
    low, _, high = vm.partition("-")
    if count == 0 or not low.isdigit():
        return True
    if not high:
        return count == int(low)
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= int(low) and count % step == 0
    return int(low) <= count <= int(high)


def _invalid(vr: str, value: object, vm: str = "1-n") -> str | None:
    """Why ``value`` is not a valid ``vr`` value (PS3.5 6.2: length, characters, format; 6.4:
    multiplicity ``vm``), or None. pydicom only warns when it writes such a value: the object
    would arrive with, say, a 20-character SH (``EXT-{AccessionNumber}``) that the PACS may
    truncate or reject, or two values where one is allowed."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not _fits_vm(vm, len(values)):
        return f"{len(values)} values, the attribute's multiplicity is {vm}"
    controls = _CONTROLS.get(vr)
    for v in values:
        if controls is not None and controls.search(str(v)):
            return f"{v!r} has a control character a {vr} value may not hold"
        try:
            validate_value(vr, v, config.RAISE)
        except ValueError as exc:
            return str(exc)
    return None


def literal_problem(keyword: str, template: str) -> str | None:
    """Why a ``set`` value without template fields can be held by no object (its VR's length,
    format, control characters, the attribute's multiplicity), or None; a template, and what
    depends on an object's Specific Character Set, are checked per object. For check-config."""
    if any(field for _, field, _, _ in string.Formatter().parse(template)):
        return None
    tag = int(tag_for_keyword(keyword) or 0)
    vr = str(dictionary_VR(tag)).split(" or ")[0]
    try:
        converted = _converted(vr, template.replace("{{", "{").replace("}}", "}"))
    except ValueError:
        return f"{template!r} is not a valid {vr} value"
    return _invalid(vr, converted, dictionary_VM(tag))


def _unencodable(text: str, charset: object) -> bool:
    """Whether ``text`` has a character the data set's Specific Character Set (none: the
    default repertoire, ASCII) cannot write. pydicom writes such a character as ``?`` (or, with
    no Specific Character Set, as undeclared Latin-1) with only a warning."""
    if charset in (None, ""):
        encodings = ["ascii"]
    else:
        names = charset if isinstance(charset, MultiValue | list) else [charset]
        encodings = convert_encodings([str(n) for n in names])

    def fits(ch: str) -> bool:  # with code extensions, each character in one of the sets
        for encoding in encodings:
            try:
                ch.encode(encoding)
                return True
            except (UnicodeError, LookupError):
                continue
        return False

    return not all(fits(ch) for ch in text)


@dataclass(frozen=True, slots=True)
class Modification:
    """A ``modify:`` block: ``set`` (keyword -> value or template) then ``remove``.

    Templates name attributes as ``{Keyword}``; they render the values the object has when
    this step runs (after a de-identification before it), a missing or empty attribute as
    an empty string. Setting an attribute the object does not have adds it; removing one it
    does not have is no change. ``private`` removes every private element, nested ones too.
    A rendered value that its VR or the object's Specific Character Set cannot hold is an
    :class:`EditError` (the file fails with the reason), never a value pydicom would write
    anyway, with a warning, as ``?`` or beyond its VR's length.
    """

    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]

    @classmethod
    def from_config(cls, modify: Modify) -> Modification:
        return cls(tuple(modify.set.items()), tuple(modify.remove))

    def apply(self, ds: Dataset) -> None:
        rendered = [(k, self._render(t, ds)) for k, t in self.set]
        for keyword, value in rendered:
            tag = int(tag_for_keyword(keyword) or 0)
            vr = str(dictionary_VR(tag)).split(" or ")[0]
            try:
                converted = _converted(vr, value)
            except ValueError:
                raise EditError(f"set {keyword}: {value!r} is not a valid {vr} value") from None
            problem = _invalid(vr, converted, dictionary_VM(tag))
            if problem is not None:
                raise EditError(f"set {keyword}: {problem}")
            if tag in ds:
                ds[tag].value = converted
            else:
                ds.add(DataElement(tag, vr, converted))
        charset = ds.get("SpecificCharacterSet")  # after the sets: one may have changed it
        for keyword, value in rendered:
            vr = str(dictionary_VR(int(tag_for_keyword(keyword) or 0))).split(" or ")[0]
            if vr in _CHARSET_VRS and _unencodable(value, charset):
                raise EditError(
                    f"set {keyword}: the value has characters the object's Specific Character "
                    f"Set ({_text(charset) or 'none: ASCII'}) cannot hold"
                )
        for item in self.remove:
            kind, number = parse_remove(item)
            if kind == "private":
                ds.remove_private_tags()
            elif kind == "group":
                for tag in [t for t in ds.keys() if t >> 16 == number]:  # noqa: SIM118
                    del ds[tag]
            elif number in ds:
                del ds[number]

    @staticmethod
    def _render(template: str, ds: Dataset) -> str:
        out = []
        for literal, field, _, _ in string.Formatter().parse(template):
            out.append(literal)
            if field:
                tag = tag_for_keyword(field)
                # read without decoding it in place: an attribute a template only reads is
                # sent as it was, byte for byte
                value = _value(ds, BaseTag(tag)) if tag is not None and tag in ds else None
                out.append(_text(value).strip())
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Change:
    """One top-level attribute that differs: ``old`` None when added, ``new`` None when
    removed."""

    tag: int
    keyword: str
    old: str | None
    new: str | None

    def to_json(self) -> dict[str, str | None]:
        return {
            "tag": f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})",
            "keyword": self.keyword,
            "old": self.old,
            "new": self.new,
        }


def _shown(elem: DataElement) -> str:
    if elem.VR == "SQ":
        return f"(sequence of {len(elem.value)} items)"
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return f"({len(value)} bytes)"
    text = _text(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _untouched(before: Dataset, after: Dataset, tag: BaseTag) -> bool:
    """Both still as read (raw) and byte-equal. Compared so, nothing is decoded: a decoded
    element is written re-encoded, and pydicom's encoding of a value it decoded may differ from
    the original's bytes (text padding, trailing empty PN groups, ISO 2022 escapes)."""
    old, new = before.get_item(tag), after.get_item(tag)
    return old.is_raw and new.is_raw and old.value == new.value


def _value(ds: Dataset, tag: BaseTag) -> object:
    """``ds``'s value of ``tag``, decoded without storing the decoded element in ``ds``."""
    elem = ds.get_item(tag)
    if not elem.is_raw:
        return elem.value
    charset = ds.original_character_set or ds._character_set
    return convert_raw_data_element(cast(RawDataElement, elem), encoding=charset, ds=ds).value


def diff(before: Dataset, after: Dataset) -> list[Change]:
    """The top-level attributes that differ between ``before`` and ``after``, in tag order.
    Elements neither side decoded are compared as bytes and stay undecoded."""
    changes = []
    for tag in sorted(set(before.keys()) | set(after.keys())):
        if tag in before and tag in after and _untouched(before, after, tag):
            continue
        old = before[tag] if tag in before else None  # noqa: SIM401 (a Dataset)
        new = after[tag] if tag in after else None  # noqa: SIM401
        if (
            old is not None
            and new is not None
            and (old.value == new.value or (old.value in (None, "") and new.value in (None, "")))
        ):
            continue
        keyword = keyword_for_tag(tag) or ("(private)" if tag >> 16 & 1 else "(unknown)")
        changes.append(
            Change(
                int(tag),
                keyword,
                _shown(old) if old is not None else None,
                _shown(new) if new is not None else None,
            )
        )
    return changes


@dataclass(frozen=True, slots=True)
class FileRange:
    """Bytes of the source file sent as they are (the Pixel Data element)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class EditedObject:
    """A changed data set: re-encoded bytes and file ranges, in order; its length and its
    (possibly changed) SOP Instance UID are what the C-STORE request or STOW-RS part carries."""

    path: str
    size: int  # the source file's size when it was read
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    segments: tuple[bytes | FileRange, ...]
    changes: tuple[Change, ...]
    file_meta: bytes  # preamble, DICM and the meta group, for a Part 10 file (STOW-RS)
    mtime_ns: int = 0  # the source file's mtime when it was read (0: not known)
    #: Its Study, Series and SOP Instance UID when the changes made any differ from the file's
    #: own (de-identification), None when they did not: what the destination holds it by.
    sent_uids: tuple[str, str, str] | None = None

    @property
    def length(self) -> int:
        """The data set's length (without the meta header)."""
        return sum(len(s) if isinstance(s, bytes) else s.length for s in self.segments)

    def open(self) -> SegmentReader:
        return SegmentReader(self)

    def chunks(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The data set's bytes in pieces of at most ``chunk``."""
        with self.open() as reader:
            buf = bytearray(chunk)
            view = memoryview(buf)
            pos, total = 0, self.length
            while pos < total:
                n = reader.read_at(view[: min(chunk, total - pos)], pos)
                yield bytes(view[:n])
                pos += n


class SegmentReader:
    """Reads an :class:`EditedObject` by position (what the C-STORE streamer needs)."""

    def __init__(self, obj: EditedObject) -> None:
        self.obj = obj
        self.fd = -1
        self._starts: list[int] = []
        pos = 0
        for s in obj.segments:
            self._starts.append(pos)
            pos += len(s) if isinstance(s, bytes) else s.length

    def __enter__(self) -> SegmentReader:
        try:
            self.fd = os.open(self.obj.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidFileError(self.obj.path, f"cannot open: {exc.strerror}") from None
        st = os.fstat(self.fd)
        # Size and mtime, as the unchanged path checks them: a file replaced by one of the same
        # size since it was edited would send its bytes under the old one's attributes.
        if st.st_size != self.obj.size or (
            self.obj.mtime_ns and st.st_mtime_ns != self.obj.mtime_ns
        ):
            os.close(self.fd)
            raise InvalidFileError(self.obj.path, "the file changed since it was read")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_at(self, view: memoryview, pos: int) -> int:
        """Fill ``view`` from data set position ``pos`` (up to one segment's end); returns the
        number of bytes read (0 at the end)."""
        for start, seg in zip(reversed(self._starts), reversed(self.obj.segments), strict=True):
            if pos < start:
                continue
            inner = pos - start
            if isinstance(seg, bytes):
                n = min(len(view), len(seg) - inner)
                if n <= 0:
                    return 0
                view[:n] = seg[inner : inner + n]
                return n
            n = min(len(view), seg.length - inner)
            if n <= 0:
                return 0
            got = os.preadv(self.fd, [view[:n]], seg.offset + inner)
            if got == 0:
                raise InvalidFileError(self.obj.path, "the file was truncated while being sent")
            return got
        return 0


def _encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = little
    out.is_implicit_VR = implicit
    write_dataset(out, ds)
    return bytes(out.getvalue())


#: The meta header elements an edited object's Part 10 head keeps (PS3.10 Table 7.1-1): what
#: identifies the object and its encoding, and the implementation.
_META_KEPT = frozenset({0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013})


def _part10_head(file_meta: FileMetaDataset, sop_instance_uid: str) -> bytes:
    """The preamble and meta header of the edited object (for STOW-RS). Only
    :data:`_META_KEPT` is kept: the others describe the original file's writer (its AE titles,
    network addresses, Private Information), not what forwarder wrote, and they are outside the
    data set that ``modify`` and ``deidentify`` change, so a modality's identity or a vendor's
    private data would reach a destination meant to get de-identified objects."""
    meta = FileMetaDataset()
    for elem in file_meta:
        if elem.tag in _META_KEPT:
            meta.add(copy.deepcopy(elem))
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    write_file_meta_info(out, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + bytes(out.getvalue())


def _read(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise InvalidFileError(str(getattr(f, "name", "")), "the file shrank while being read")
    return data


#: Study, Series and SOP Instance UID: what a destination holds an object by.
_UID_TAGS = (0x0020000D, 0x0020000E, 0x00080018)


def changed_uids(ds: Dataset, changes: Sequence[Change]) -> tuple[str, str, str] | None:
    """The Study, Series and SOP Instance UID of the changed ``ds`` when ``changes`` (its
    :func:`diff` from the file) altered any of them; None: they are the file's own."""
    if not any(c.tag in _UID_TAGS for c in changes):
        return None
    # read without decoding in place: an element left as it was is sent byte for byte
    study, series, sop = (
        _text(_value(ds, BaseTag(t))).strip("\x00 ") if t in ds else "" for t in _UID_TAGS
    )
    return study, series, sop


def apply_editors(ds: Dataset, editors: Sequence[Editor]) -> list[Change]:
    """Apply ``editors`` in order to ``ds`` (in place); return what changed."""
    before = copy.deepcopy(ds)
    for editor in editors:
        editor.apply(ds)
    return diff(before, ds)


def edit_file(path: str, editors: Sequence[Editor]) -> EditedObject:
    """``path``'s object with ``editors`` applied, its Pixel Data left in the file (see the
    module docstring). Raises :class:`EditError` or :class:`InvalidFileError`."""
    meta = read_meta(path)
    ts = meta.transfer_syntax
    try:
        file_meta = read_file_meta_info(path)
    except Exception as exc:
        raise InvalidFileError(path, f"cannot read the meta header: {exc}") from None
    implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
    little = ts != EXPLICIT_VR_BIG_ENDIAN
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size != meta.size:
                # Being rewritten (a resend): nothing is judged of it; tried again later, on
                # the STOW-RS path as on the DIMSE one (InvalidFileError fails it there).
                raise UnreadableFileError(path, "the file changed since it was read")
            if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                inflated = bytes(inflate(f, path, meta.dataset_offset))
                ds = read_dataset(io.BytesIO(inflated), False, True)
                pixels_before = [t for t in PIXEL_TAGS if t in ds]
                changes = apply_editors(ds, editors)
                sent_uids = changed_uids(ds, changes)
                # Here the pixels are in the data set changed, not streamed: an edit must not
                # drop them (check-config refuses a modify that would; this is the backstop).
                if any(t not in ds for t in pixels_before):
                    raise EditError("an edit may not remove Pixel Data")
                raw = _encode(ds, False, True)
                packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
                data = packer.compress(raw) + packer.flush()
                segments: tuple[bytes | FileRange, ...] = (data + b"\x00" * (len(data) & 1),)
            else:
                span = pixel_data_span(f, path, meta.dataset_offset, meta.size, implicit, little)
                head_end = span.start if span is not None else meta.size
                ds = read_dataset(
                    io.BytesIO(_read(f, meta.dataset_offset, head_end)), implicit, little
                )
                if span is not None and span.end < meta.size:
                    tail = read_dataset(io.BytesIO(_read(f, span.end, meta.size)), implicit, little)
                    for elem in tail:
                        ds.add(elem)
                changes = apply_editors(ds, editors)
                sent_uids = changed_uids(ds, changes)
                if span is None:
                    segments = (_encode(ds, implicit, little),)
                else:
                    after = Dataset()
                    after.set_original_encoding(implicit, little)
                    for tag in [t for t in ds.keys() if t > span.tag]:  # noqa: SIM118
                        after.add(ds[tag])
                        del ds[tag]
                    if any(t in ds for t in PIXEL_TAGS):
                        raise EditError("an edit may not add Pixel Data")
                    pixels = FileRange(span.start, span.end - span.start)
                    head, rest = _encode(ds, implicit, little), _encode(after, implicit, little)
                    segments = tuple(s for s in (head, pixels, rest) if s)
    except OSError as exc:
        raise InvalidFileError(path, f"cannot read: {exc.strerror or exc}") from None
    except (EditError, InvalidFileError):
        raise
    except Exception as exc:  # pydicom: a value it cannot read or write
        raise EditError(f"cannot re-encode the object: {type(exc).__name__}: {exc}") from None
    sop_instance = str(ds.get("SOPInstanceUID", "") and ds.SOPInstanceUID) or meta.sop_instance_uid
    return EditedObject(
        path=path,
        size=meta.size,
        sop_class_uid=meta.sop_class_uid,
        sop_instance_uid=sop_instance,
        transfer_syntax=ts,
        segments=segments,
        changes=tuple(changes),
        file_meta=_part10_head(file_meta, sop_instance),
        mtime_ns=st.st_mtime_ns,
        sent_uids=sent_uids,
    )


def edited_uids(path: str, editors: Sequence[Editor]) -> tuple[str, str, str]:
    """The Study, Series and SOP Instance UID ``path``'s object has once ``editors`` changed it
    (what a destination that was sent it holds it by: ``verify_by_query`` asks by these).
    Raises :class:`EditError` or :class:`InvalidFileError`."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True)
        for editor in editors:
            editor.apply(ds)
    except OSError as exc:
        raise InvalidFileError(path, f"cannot read: {exc.strerror or exc}") from None
    except (EditError, InvalidFileError):
        raise
    except Exception as exc:  # pydicom: a value it cannot read
        raise EditError(f"cannot read the object: {type(exc).__name__}: {exc}") from None
    return (
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("SOPInstanceUID", "")),
    )


def edit_dataset_bytes(
    data: bytes, implicit: bool, editors: Sequence[Editor]
) -> tuple[bytes, str, tuple[str, str, str] | None]:
    """A little endian data set already in memory (after transcoding) with ``editors``
    applied; returns the bytes, its SOP Instance UID, and its Study, Series and SOP Instance
    UID when the changes made any differ from the file's own (:func:`changed_uids`)."""
    try:
        ds = read_dataset(io.BytesIO(data), implicit, True)
        changes = apply_editors(ds, editors)
        sent_uids = changed_uids(ds, changes)
        return _encode(ds, implicit, True), str(ds.SOPInstanceUID), sent_uids
    except EditError:
        raise
    except Exception as exc:
        raise EditError(f"cannot re-encode the object: {type(exc).__name__}: {exc}") from None
