"""Re-encoding a file for a peer that does not accept its transfer syntax.

This is the slow path, to Explicit or Implicit VR Little Endian only. Explicit VR Big Endian
sources are rewritten here, element by element: tags, lengths and every binary value swapped by
its element size (US/SS/OW/AT 2, UL/SL/FL/OF/OL 4, FD/OD/OV/SV/UV 8), inside sequences too;
whatever cannot be swapped with certainty (UN, private OB, OW pixel data whose Bits Allocated
is not 8 or 16, bit-packed overlays) is refused with the reason, never guessed. pydicom's own
writer does not swap OB/OW/OF/OD/OL/OV/UN values, which is why it is not used for them. Little
endian sources (deflated included) are decoded with pydicom and re-encoded; compressed ones have
their pixel data decompressed (pydicom's RLE decoder, the pylibjpeg plugins). Lossy sources are
refused unless explicitly allowed, since decompressing them to a lossless syntax would hide that
the pixels were already degraded.
"""

from __future__ import annotations

import io
import logging
import struct
from array import array

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from forwarder.dicomfile import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    read_meta,
)
from forwarder.errors import InvalidFileError, SendError

logger = logging.getLogger(__name__)

#: Transfer syntaxes whose pixel data may have been compressed lossily.
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossless or lossy)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossless or lossy)
        "1.2.840.10008.1.2.4.100",  # MPEG2 and the video syntaxes after it
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
        "1.2.840.10008.1.2.4.107",
        "1.2.840.10008.1.2.4.108",
    }
)


def syntax_name(uid: str) -> str:
    """``JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)`` or the bare UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def transcode(path: str, target_syntax: str, *, allow_lossy: bool, context: str = "") -> bytes:
    """Return the data set of ``path`` encoded in ``target_syntax`` (an uncompressed syntax).

    Raises :class:`SendError` (not retryable) when the file cannot be converted; ``context``
    (the SOP class and what the peer accepted) leads its message.
    """
    lead = f"{context}; " if context else ""
    if target_syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        raise ValueError(f"can only transcode to an uncompressed syntax, not {target_syntax}")
    try:
        meta = read_meta(path)
    except InvalidFileError as exc:
        raise SendError(
            f"cannot decode {path} for transcoding: {exc.reason}", retryable=False
        ) from None
    if meta.transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return _from_big_endian(path, meta.dataset_offset, target_syntax, lead)
    try:
        ds = dcmread(path)
    except Exception as exc:
        raise SendError(f"cannot decode {path} for transcoding: {exc}", retryable=False) from None
    source = str(ds.file_meta.TransferSyntaxUID)
    if source in LOSSY_SYNTAXES and not allow_lossy:
        lossless_flag = str(ds.get("LossyImageCompression", "")) == "00"
        if not lossless_flag:
            raise SendError(
                f"{lead}the file is {syntax_name(source)}, possibly lossy; decompressing it "
                "needs --allow-lossy-decompress (allow_lossy_decompress: true)",
                retryable=False,
            )
    try:
        if UID(source).is_compressed and "PixelData" in ds:
            # Keep the SOP Instance UID: a router forwards the same object, not a new one.
            ds.decompress(generate_instance_uid=False)
        data = _write_little_endian(ds, target_syntax)
    except Exception as exc:
        raise SendError(
            f"{lead}cannot convert {syntax_name(source)} to {syntax_name(target_syntax)}: {exc} "
            "(is a decoder plugin for this syntax installed?)",
            retryable=False,
        ) from None
    logger.debug("transcoded %s from %s to %s (%d bytes)", path, source, target_syntax, len(data))
    return data


def _write_little_endian(ds: Dataset, target_syntax: str) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = target_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(out, ds)
    return bytes(out.getvalue())


def _from_big_endian(path: str, offset: int, target_syntax: str, lead: str) -> bytes:
    what = f"{syntax_name(EXPLICIT_VR_BIG_ENDIAN)} to {syntax_name(target_syntax)}"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            source = f.read()
    except OSError as exc:
        raise SendError(f"cannot read {path}: {exc.strerror or exc}", retryable=True) from None
    try:
        data = big_to_little_endian(source)
    except UnconvertibleError as exc:
        raise SendError(f"{lead}cannot convert {what}: {exc}", retryable=False) from None
    if target_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        # Little endian to little endian: values keep their bytes; pydicom drops the VRs.
        try:
            ds = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
            data = _write_little_endian(ds, target_syntax)
        except Exception as exc:
            raise SendError(f"{lead}cannot convert {what}: {exc}", retryable=False) from None
    logger.debug("transcoded %s from big endian to %s (%d bytes)", path, target_syntax, len(data))
    return data


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
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
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
            if vr in _LONG_VRS:
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
        if length % size:
            raise UnconvertibleError(
                f"element {_tag(tag)} ({vr.decode()}) has {length} bytes, not a multiple of "
                f"its value size {size}"
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
