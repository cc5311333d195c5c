"""Byte-level conversion between the uncompressed transfer syntaxes: no value decoded, none lost.

:func:`big_to_little_endian` rewrites an Explicit VR Big Endian data set element by element: tags,
lengths and every binary value swapped by its element size (US/SS/OW/AT 2, UL/SL/FL/OF/OL 4,
FD/OD/OV/SV/UV 8), inside sequences too; whatever cannot be swapped with certainty (UN, private
OB, OW pixel data whose Bits Allocated is not 8 or 16, bit-packed overlays) is refused
(:class:`UnconvertibleError`, with the reason), never guessed. pydicom's own writer does not swap
OB/OW/OF/OD/OL/OV/UN values, which is why it is not used for them.
:func:`reencode_little_endian` turns Explicit into Implicit VR Little Endian or back. Both take
and return a data set's bytes; reading the file, choosing the conversion and everything that goes
through pydicom (compressed sources, the lossy rules) is :mod:`forwarder.dicom.transcode`.

A little past 400 lines: the two converters share the element walk and the VR tables, which a
split would duplicate.
"""

from __future__ import annotations

import struct
from array import array
from functools import lru_cache

from pydicom.datadict import dictionary_VR

from forwarder.dicom.part10 import LONG_VRS
from forwarder.dicom.scanner import implicit_vr_sequence

# -- Explicit VR Big Endian to Explicit VR Little Endian ------------------------------------

#: Binary VRs and the size of the values whose bytes are swapped (AT: two 16-bit numbers).
_SWAP_SIZE = {
    b"AT": 2,
    b"OW": 2,
    b"SS": 2,
    b"US": 2,
    b"FL": 4,
    b"OF": 4,
    b"OL": 4,
    b"SL": 4,
    b"UL": 4,
    b"FD": 8,
    b"OD": 8,
    b"OV": 8,
    b"SV": 8,
    b"UV": 8,
}
_ARRAY_CODE = {
    size: code for code in ("H", "I", "L", "Q") if (size := array(code).itemsize) in (2, 4, 8)
}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA, _BITS_ALLOCATED = 0x7FE00010, 0x00280100
_WAVEFORM_DATA, _WAVEFORM_BITS_ALLOCATED = 0x54001010, 0x54001004
_MAX_DEPTH = 32


class UnconvertibleError(Exception):
    """The data set cannot be converted with proven correctness; the message says why."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _BigToLittle:
    """Rewrites an Explicit VR Big Endian data set as Explicit VR Little Endian, in place:
    tags, lengths and every binary value swapped by its element size, inside sequences too.
    Sizes do not change, so defined lengths of sequences and items stay right. Refuses
    (:class:`UnconvertibleError`) whatever it cannot swap with certainty."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.size = len(buf)

    def need(self, pos: int, n: int, end: int) -> None:
        if pos + n > end:
            raise UnconvertibleError(f"the data set is truncated or malformed at byte {pos}")

    def elements(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        if depth > _MAX_DEPTH:
            raise UnconvertibleError("sequences nested deeper than 32 levels")
        buf = self.buf
        bits: dict[int, int] = {}  # Bits Allocated and Waveform Bits Allocated of this level
        while pos < end:
            if pos + 8 > end and depth == 0 and not buf[pos:end].strip(b"\x00"):
                return pos  # a few zero padding bytes at the very end: dropped
            self.need(pos, 8, end)
            group, elem = struct.unpack_from(">HH", buf, pos)
            tag = (group << 16) | elem
            struct.pack_into("<HH", buf, pos, group, elem)
            if group == 0xFFFE:
                (length,) = struct.unpack_from(">I", buf, pos + 4)
                struct.pack_into("<I", buf, pos + 4, length)
                if tag == _ITEM_END and in_item:
                    return pos + 8
                raise UnconvertibleError(f"unexpected {_tag(tag)} where a data element belongs")
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in LONG_VRS:
                self.need(pos, 12, end)
                (length,) = struct.unpack_from(">I", buf, pos + 8)
                struct.pack_into("<I", buf, pos + 8, length)
                pos += 12
            elif len(vr) == 2 and vr.isalpha() and vr.isupper():
                (length,) = struct.unpack_from(">H", buf, pos + 6)
                struct.pack_into("<H", buf, pos + 6, length)
                pos += 8
            else:
                raise UnconvertibleError(f"element {_tag(tag)} has an invalid VR {vr!r}")
            if length == 0xFFFFFFFF:
                if vr != b"SQ":
                    raise UnconvertibleError(
                        f"element {_tag(tag)} ({vr.decode()}) has an undefined length, which "
                        "only a sequence may have in big endian"
                    )
                pos = self.items(pos, end, depth + 1)
                continue
            self.need(pos, length, end)
            if vr == b"SQ":
                self.defined_items(pos, pos + length, depth + 1)
            elif length:
                self.value(tag, vr, pos, length, bits)
            pos += length
        if in_item:
            raise UnconvertibleError("an item has no item delimiter")
        return pos

    def value(self, tag: int, vr: bytes, pos: int, length: int, bits: dict[int, int]) -> None:
        group = tag >> 16
        if vr == b"UN":
            raise UnconvertibleError(
                f"element {_tag(tag)} is UN (unknown VR): the size of its values is unknown, "
                "so its bytes cannot be swapped with certainty"
            )
        if vr == b"OB" and group & 1:
            raise UnconvertibleError(
                f"private element {_tag(tag)} is OB of unknown structure: it may hold big "
                "endian numbers that cannot be found and swapped"
            )
        size = _SWAP_SIZE.get(vr)
        if size is None:
            return  # text and OB: byte order does not apply
        value_size = 4 if vr == b"AT" else size  # AT: a group and an element number
        if length % value_size:
            raise UnconvertibleError(
                f"element {_tag(tag)} ({vr.decode()}) has {length} bytes, not a multiple of "
                f"its value size {value_size}"
            )
        if tag in (_BITS_ALLOCATED, _WAVEFORM_BITS_ALLOCATED) and length == 2:
            bits[tag] = struct.unpack_from(">H", self.buf, pos)[0]
        elif vr == b"OW":
            self.check_words(tag, bits)
        values = array(_ARRAY_CODE[size], self.buf[pos : pos + length])
        values.byteswap()
        self.buf[pos : pos + length] = values.tobytes()

    @staticmethod
    def check_words(tag: int, bits: dict[int, int]) -> None:
        """OW is swapped per 16-bit word. Where its samples are not 8 or 16 bits, implementations
        disagree on the big endian layout (DCMTK swaps 16-bit words, pydicom whole 32-bit
        pixels), so it is refused rather than guessed."""
        if tag == _PIXEL_DATA:
            allocated = bits.get(_BITS_ALLOCATED)
            if allocated not in (8, 16):
                raise UnconvertibleError(
                    f"Pixel Data (7FE0,0010) is OW with Bits Allocated {allocated} in big "
                    "endian: PS3.5 swaps OW per 16-bit word, but readers disagree on the layout "
                    "of other pixel sizes (DCMTK swaps words, pydicom whole pixels), so it is not "
                    "converted (only Bits Allocated 8 and 16 are)"
                )
        elif tag == _WAVEFORM_DATA:
            allocated = bits.get(_WAVEFORM_BITS_ALLOCATED)
            if allocated != 16:
                raise UnconvertibleError(
                    f"Waveform Data (5400,1010) is OW with Waveform Bits Allocated {allocated} "
                    "in big endian: its layout is ambiguous, so it is not converted"
                )
        elif (tag >> 16) & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000:
            raise UnconvertibleError(
                f"Overlay Data {_tag(tag)} is OW (bit-packed) in big endian: its layout is "
                "ambiguous, so it is not converted"
            )

    def defined_items(self, pos: int, end: int, depth: int) -> None:
        while pos < end:
            self.need(pos, 8, end)
            group, elem, length = struct.unpack_from(">HHI", self.buf, pos)
            struct.pack_into("<HHI", self.buf, pos, group, elem, length)
            if (group << 16) | elem != _ITEM:
                raise UnconvertibleError(f"expected an item, found {_tag((group << 16) | elem)}")
            pos += 8
            if length == 0xFFFFFFFF:
                pos = self.elements(pos, end, depth, in_item=True)
            else:
                self.need(pos, length, end)
                self.elements(pos, pos + length, depth, in_item=False)
                pos += length

    def items(self, pos: int, end: int, depth: int) -> int:
        while True:
            self.need(pos, 8, end)
            group, elem, length = struct.unpack_from(">HHI", self.buf, pos)
            struct.pack_into("<HHI", self.buf, pos, group, elem, length)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise UnconvertibleError(f"expected an item or delimiter, found {_tag(tag)}")
            if length == 0xFFFFFFFF:
                pos = self.elements(pos, end, depth, in_item=True)
            else:
                self.need(pos, length, end)
                self.elements(pos, pos + length, depth, in_item=False)
                pos += length


def big_to_little_endian(dataset: bytes) -> bytes:
    """An Explicit VR Big Endian data set (no meta header) as Explicit VR Little Endian.

    Raises :class:`UnconvertibleError` for what cannot be converted with certainty: UN values,
    private OB values, OW pixel data whose Bits Allocated is not 8 or 16, bit-packed overlays,
    binary values whose length is not a multiple of their size, a malformed structure.
    """
    buf = bytearray(dataset)
    end = _BigToLittle(buf).elements(0, len(buf), 0, in_item=False)
    return bytes(buf[:end])


# -- Explicit and Implicit VR Little Endian, one into the other --------------------------------

_PIXEL_REPRESENTATION = 0x00280103
_UNDEFINED = 0xFFFFFFFF


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The data dictionary's VR of ``tag`` ('' when unknown: private and unknown tags)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if elem == 0:
        return "UL"
    if group & 1:
        return "LO" if 0x0010 <= elem <= 0x00FF else ""  # private creators; private data
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


class _LittleEndianReencoder:
    """Rewrites a little endian data set from explicit to implicit VR or the reverse. Values
    keep their bytes (both are little endian); headers change size, so every sequence and item
    is written with an undefined length and its delimiter, and group lengths are dropped
    (retired, PS3.5 7.2). Implicit VR elements take the data dictionary's VR (ambiguous ones
    resolved by Pixel Representation and Bits Allocated, as pydicom and DCMTK do); private and
    unknown ones become UN, which keeps their bytes."""

    def __init__(self, buf: bytes, source_implicit: bool, target_implicit: bool) -> None:
        self.buf = buf
        self.src_implicit = source_implicit
        self.dst_implicit = target_implicit
        self.out = bytearray()

    def need(self, pos: int, n: int, end: int) -> None:
        if pos + n > end:
            raise UnconvertibleError(f"the data set is truncated or malformed at byte {pos}")

    def header(self, tag: int, vr: str, length: int) -> None:
        out = self.out
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if self.dst_implicit:
            out += struct.pack("<I", length)
        elif vr.encode() in LONG_VRS:
            out += vr.encode() + b"\0\0" + struct.pack("<I", length)
        elif length > 0xFFFF:
            raise UnconvertibleError(
                f"element {_tag(tag)} holds {length} bytes, more than a {vr} can in explicit VR"
            )
        else:
            out += vr.encode() + struct.pack("<H", length)

    def resolve(self, tag: int, length: int, level: dict[int, int]) -> str:
        vr = _dictionary_vr(tag)
        if " or " not in vr:
            return vr or "UN"
        if vr == "US or SS":
            return "SS" if level.get(_PIXEL_REPRESENTATION) == 1 else "US"
        if tag == _PIXEL_DATA:
            return "OW" if level.get(_BITS_ALLOCATED, 16) > 8 and not length & 1 else "OB"
        if tag == _WAVEFORM_DATA:
            wide = level.get(_WAVEFORM_BITS_ALLOCATED, 16) > 8
            return "OW" if wide and not length & 1 else "OB"
        return "OB" if length & 1 else "OW"

    def elements(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Re-encode elements from ``pos`` until ``end`` or an item delimiter; return the
        position after them. ``implicit``: how the source encodes this level (UN values of
        undefined length hold implicit VR, CP-246)."""
        if depth > _MAX_DEPTH:
            raise UnconvertibleError("sequences nested deeper than 32 levels")
        buf = self.buf
        level: dict[int, int] = {}
        while pos < end:
            if pos + 8 > end and depth == 0 and not buf[pos:end].strip(b"\x00"):
                return end  # zero padding at the very end: dropped
            self.need(pos, 8, end)
            group, elem = struct.unpack_from("<HH", buf, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and in_item:
                    return pos + 8
                raise UnconvertibleError(f"unexpected {_tag(tag)} where a data element belongs")
            if implicit:
                (length,) = struct.unpack_from("<I", buf, pos + 4)
                pos += 8
                vr = self.resolve(tag, length, level)
                if length == _UNDEFINED and vr not in ("OB", "OW"):
                    vr = "SQ"  # only a sequence has an undefined length in implicit VR
            else:
                raw_vr = buf[pos + 4 : pos + 6]
                vr = raw_vr.decode("ascii", "replace")
                if raw_vr in LONG_VRS:
                    self.need(pos, 12, end)
                    (length,) = struct.unpack_from("<I", buf, pos + 8)
                    pos += 12
                elif raw_vr.isalpha() and raw_vr.isupper():
                    (length,) = struct.unpack_from("<H", buf, pos + 6)
                    pos += 8
                else:
                    raise UnconvertibleError(f"element {_tag(tag)} has an invalid VR {raw_vr!r}")
            if length == _UNDEFINED:
                pos = self.undefined(tag, vr, pos, end, implicit, depth)
                continue
            self.need(pos, length, end)
            if elem == 0 and length == 4:
                pass  # a group length: wrong once headers change size; dropped
            elif implicit_vr_sequence(tag) is True if implicit else vr == "SQ":
                # Implicit VR: a sequence only where the dictionary says SQ (the rule the
                # check follows); private and unknown values keep their bytes, as UN.
                self.sequence(tag, pos, pos + length, implicit, depth)
            else:
                if (
                    vr in ("US", "SS")
                    and length == 2
                    and tag
                    in (
                        _BITS_ALLOCATED,
                        _PIXEL_REPRESENTATION,
                        _WAVEFORM_BITS_ALLOCATED,
                    )
                ):
                    level[tag] = struct.unpack_from("<H", buf, pos)[0]
                self.header(tag, vr, length)
                self.out += buf[pos : pos + length]
            pos += length
        if in_item:
            raise UnconvertibleError("an item has no item delimiter")
        return pos

    def undefined(self, tag: int, vr: str, pos: int, end: int, implicit: bool, depth: int) -> int:
        """An element of undefined length: a sequence, or UN holding implicit VR (CP-246).
        This converter sees only native syntaxes, where encapsulated (undefined length) OB, OW
        or Pixel Data is malformed at any depth (PS3.5 A.4): refused, not copied."""
        if vr in ("OB", "OW") or tag == _PIXEL_DATA:
            raise UnconvertibleError(
                f"element {_tag(tag)} ({vr}) has an undefined length (encapsulated data), "
                "which a native transfer syntax does not allow (PS3.5 A.4)"
            )
        self.header(tag, "SQ" if vr != "UN" or self.dst_implicit else "UN", _UNDEFINED)
        if vr == "UN":
            # CP-246: its items are implicit VR; kept so in both targets.
            saved, self.dst_implicit = self.dst_implicit, True
            try:
                pos = self.items(pos, end, True, depth + 1)
            finally:
                self.dst_implicit = saved
            return pos
        return self.items(pos, end, implicit, depth + 1)

    def items(self, pos: int, end: int, implicit: bool, depth: int) -> int:
        """Items up to a sequence delimiter, each written with an undefined length."""
        while True:
            self.need(pos, 8, end)
            group, elem, length = struct.unpack_from("<HHI", self.buf, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQ_END:
                self.out += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
                return pos
            pos = self.item(tag, length, pos, end, implicit, depth)

    def sequence(self, tag: int, pos: int, end: int, implicit: bool, depth: int) -> None:
        """A sequence of defined length: written with an undefined length and a delimiter."""
        self.header(tag, "SQ", _UNDEFINED)
        while pos < end:
            self.need(pos, 8, end)
            group, elem, length = struct.unpack_from("<HHI", self.buf, pos)
            pos = self.item((group << 16) | elem, length, pos + 8, end, implicit, depth + 1)
        self.out += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    def item(self, tag: int, length: int, pos: int, end: int, implicit: bool, depth: int) -> int:
        if tag != _ITEM:
            raise UnconvertibleError(f"expected an item in a sequence, found {_tag(tag)}")
        self.out += struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
        if length == _UNDEFINED:
            pos = self.elements(pos, end, implicit, depth, in_item=True)
        else:
            self.need(pos, length, end)
            self.elements(pos, pos + length, implicit, depth, in_item=False)
            pos += length
        self.out += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        return pos


def reencode_little_endian(dataset: bytes, source_implicit: bool, target_implicit: bool) -> bytes:
    """A little endian data set (no meta header) re-encoded from explicit VR to implicit VR or
    the reverse; values keep their bytes. Raises :class:`UnconvertibleError` when malformed."""
    encoder = _LittleEndianReencoder(dataset, source_implicit, target_implicit)
    encoder.elements(0, len(dataset), source_implicit, 0, in_item=False)
    return bytes(encoder.out)
