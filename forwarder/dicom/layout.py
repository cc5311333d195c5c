"""Where a data set's top-level Pixel Data is in its file, found by walking element headers only.

A modified object (:mod:`forwarder.dicom.edit`) is sent as its re-encoded attributes around the
file's own Pixel Data bytes, streamed: :func:`pixel_data_span` says which bytes those are. Values
are skipped, not read; sequences of undefined length are walked item by item (their items may
hold an Icon Image Sequence with a Pixel Data of its own, which is not the one wanted). Only the
native little and big endian syntaxes and the encapsulated ones are walked here; a deflated
data set is the caller's to inflate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from forwarder.dicom.part10 import LONG_VRS
from forwarder.errors import InvalidFileError

_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Pixel Data, Float Pixel Data, Double Float Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes ``start`` (the element's tag) to ``end`` (after its value or delimiter)."""

    tag: int
    start: int
    end: int


class _Walker:
    def __init__(self, f: BinaryIO, path: str, size: int, implicit: bool, little: bool) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.implicit = implicit
        self.order = "<" if little else ">"

    def read(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:
            raise InvalidFileError(self.path, f"truncated at byte {pos}")
        self.f.seek(pos)
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidFileError(self.path, f"truncated at byte {pos}")
        return data

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, header length) of the element at ``pos``."""
        raw = self.read(pos, 8)
        group, elem = struct.unpack(self.order + "HH", raw[:4])
        tag = (group << 16) | elem
        if group == 0xFFFE or implicit:
            (length,) = struct.unpack(self.order + "I", raw[4:8])
            return tag, b"", length, 8
        vr = raw[4:6]
        if vr in LONG_VRS:
            (length,) = struct.unpack(self.order + "I", self.read(pos + 8, 4))
            return tag, vr, length, 12
        (length,) = struct.unpack(self.order + "H", raw[6:8])
        return tag, vr, length, 8

    def elements(self, pos: int, end: int, implicit: bool, depth: int, top: bool) -> int | Span:
        """Walk elements from ``pos`` until ``end`` (or an item delimiter, returning the
        position after it); at the top level return the Pixel Data's span when met."""
        if depth > _MAX_DEPTH:
            raise InvalidFileError(self.path, "sequences nested deeper than 32 levels")
        while pos < end:
            if pos + 8 > end:
                return end  # trailing padding
            tag, vr, length, hlen = self.header(pos, implicit)
            if tag == _ITEM_END and not top:
                return pos + 8
            if top and tag in PIXEL_TAGS:
                return Span(tag, pos, self.pixel_end(pos + hlen, length))
            pos += hlen
            if length == _UNDEFINED:
                # a sequence (or UN holding implicit VR items, CP-246)
                pos = self.items(pos, implicit or vr == b"UN", depth + 1)
            else:
                pos += length
        if pos > end:
            raise InvalidFileError(self.path, "an element runs past the end of the data set")
        return pos

    def items(self, pos: int, implicit: bool, depth: int) -> int:
        while True:
            tag, _, length, _ = self.header(pos, True)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise InvalidFileError(self.path, f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                found = self.elements(pos, self.size, implicit, depth, top=False)
                assert isinstance(found, int)
                pos = found
            else:
                pos += length

    def pixel_end(self, pos: int, length: int) -> int:
        if length != _UNDEFINED:
            if pos + length > self.size:
                raise InvalidFileError(self.path, "Pixel Data runs past the end of the file")
            return pos + length
        while True:  # encapsulated: fragments of defined length, then the delimiter
            tag, _, length, _ = self.header(pos, True)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise InvalidFileError(self.path, "malformed encapsulated Pixel Data")
            pos += length


def pixel_data_span(
    f: BinaryIO, path: str, offset: int, size: int, implicit: bool, little: bool
) -> Span | None:
    """The top-level Pixel Data (or Float/Double Float Pixel Data) element of the data set
    that starts at ``offset`` in ``f`` (``size`` bytes in all); None when it has none."""
    found = _Walker(f, path, size, implicit, little).elements(offset, size, implicit, 0, True)
    return found if isinstance(found, Span) else None
