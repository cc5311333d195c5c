"""A corpus of broken DICOM files, built from valid ones by an independent structure walker.

:func:`walk` lists every node of a Part 10 file (meta elements, data elements, items and
delimiters, at their nesting depth) without using ``forwarder.dicom``, so the corpus does not
share the parser's blind spots. :func:`corpus` derives broken variants from valid seed files:
truncations at and inside every structural boundary, missing delimiters, lengths past the end of
the file, huge lengths, bit flips, a wrong preamble, no meta header, a wrong transfer syntax, and
hostile UIDs. Each :class:`Broken` says whether the parser *must* reject it (``must_reject``) or
whether it may look valid (a file cut exactly between two top-level elements is a shorter, valid
data set: no parser can tell).
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomgen import make_dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

#: Broken files shipped with pydicom (bundled, never downloaded): name -> must the parser reject?
BUNDLED_BROKEN = {
    "MR_truncated.dcm": True,
    "rtplan_truncated.dcm": True,
    "no_meta.dcm": True,
    "ExplVR_LitEndNoMeta.dcm": True,
    "ExplVR_BigEndNoMeta.dcm": True,
    "meta_missing_tsyntax.dcm": True,
    "badVR.dcm": False,
    "UN_sequence.dcm": False,
    "JPEG2000-embedded-sequence-delimiter.dcm": False,
    "MR_small_padded.dcm": False,
}


@dataclass(frozen=True, slots=True)
class Node:
    """One structural piece of a Part 10 file."""

    offset: int  # first byte of its header
    header: int  # header length in bytes
    length: int  # value length (UNDEFINED for undefined length; 0 for delimiters)
    tag: int
    depth: int  # -1: file meta; 0: top level of the data set; n: inside n sequences
    kind: str  # "meta", "element", "item", "item-end", "seq-end"
    opaque: bool = False  # inside a sequence of defined length


@dataclass(frozen=True, slots=True)
class Broken:
    """A broken (or suspicious) file of the corpus."""

    name: str  # unique, usable as a file name
    data: bytes
    what: str  # what was done to it, for failure messages
    must_reject: bool  # the parser must raise InvalidFileError for it


@dataclass(frozen=True, slots=True)
class Layout:
    data: bytes
    transfer_syntax: str
    dataset_offset: int
    nodes: tuple[Node, ...]


# -- seed files ----------------------------------------------------------------------------


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fixed(ds: Dataset, n: int) -> Dataset:
    """Fixed UIDs, so the corpus (offsets, names) is the same in every run."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.6.{n}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.6.{n}.1"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.6.{n}.2"
    return ds


def _with_sequences(ds: Dataset, undefined: bool) -> Dataset:
    """Add nested sequences, of undefined length (with delimiters) or defined length."""
    inner = Dataset()
    inner.CodeValue = "T-D1100"
    inner.CodingSchemeDesignator = "SRT"
    inner.CodeMeaning = "Head"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.6.99"
    ref.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [ref, Dataset()]
    ds.AnatomicRegionSequence = [inner]
    if undefined:
        for elem in (ds["ReferencedImageSequence"], ds["AnatomicRegionSequence"]):
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
        ref["PurposeOfReferenceCodeSequence"].is_undefined_length = True
        inner.is_undefined_length_sequence_item = True
    return ds


def seed_files() -> dict[str, bytes]:
    """Small valid files in explicit, implicit and encapsulated (RLE) syntaxes, with sequences,
    plus two bundled pydicom files (an implicit VR RT Plan full of sequences, a CT)."""
    small = {"rows": 8, "columns": 8}
    implicit = make_dataset(transfer_syntax=ImplicitVRLittleEndian, seed=2, **small)
    seeds = {
        "explicit-undef": _encode(_with_sequences(_fixed(make_dataset(seed=1, **small), 1), True)),
        "explicit-defined": _encode(
            _with_sequences(_fixed(make_dataset(seed=4, **small), 4), False)
        ),
        "implicit-undef": _encode(_with_sequences(_fixed(implicit, 2), True)),
        "rle": _encode(_fixed(make_dataset(transfer_syntax=RLELossless, seed=3, **small), 3)),
    }
    for name in ("rtplan.dcm", "CT_small.dcm"):
        path = get_testdata_file(name)
        assert path is not None, f"pydicom's bundled {name} is missing"
        seeds[name.removesuffix(".dcm")] = Path(str(path)).read_bytes()
    return seeds


def bundled_broken() -> list[Broken]:
    out = []
    for name, must in BUNDLED_BROKEN.items():
        path = get_testdata_file(name)
        assert path is not None, f"pydicom's bundled {name} is missing"
        out.append(Broken(f"bundled-{name}", Path(str(path)).read_bytes(), name, must))
    return out


# -- the walker ----------------------------------------------------------------------------


def walk(data: bytes) -> Layout:
    """The structure of a valid little endian Part 10 file (explicit or implicit VR)."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    nodes: list[Node] = []
    pos = 132
    syntax = ""
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            header = 8
        if elem == 0x0010:
            syntax = data[pos + header : pos + header + length].rstrip(b"\0 ").decode()
        nodes.append(Node(pos, header, length, (group << 16) | elem, -1, "meta"))
        pos += header + length
    dataset_offset = pos
    if syntax not in (EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.5"):
        raise ValueError(f"walk() handles little endian files only, not {syntax}")
    implicit = syntax == IMPLICIT
    end = _elements(data, pos, len(data), implicit, 0, nodes, in_item=False)
    assert end == len(data), f"walk stopped at {end} of {len(data)}"
    return Layout(data, syntax, dataset_offset, tuple(nodes))


def _header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    group, elem = struct.unpack_from("<HH", data, pos)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, b"", struct.unpack_from("<I", data, pos + 4)[0], 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        return tag, vr, struct.unpack_from("<I", data, pos + 8)[0], 12
    return tag, vr, struct.unpack_from("<H", data, pos + 6)[0], 8


def _elements(
    data: bytes,
    pos: int,
    end: int,
    implicit: bool,
    depth: int,
    out: list[Node],
    in_item: bool,
    opaque: bool = False,
) -> int:
    while pos < end:
        tag, vr, length, header = _header(data, pos, implicit)
        if tag == _ITEM_END and in_item:
            out.append(Node(pos, 8, 0, tag, depth, "item-end", opaque))
            return pos + 8
        out.append(Node(pos, header, length, tag, depth, "element", opaque))
        pos += header
        if length == UNDEFINED:
            un = implicit or vr == b"UN"
            pos = _items(data, pos, un, depth + 1, out, vr in (b"OB", b"OW"), opaque)
        elif vr == b"SQ":
            _items_defined(data, pos, pos + length, implicit, depth + 1, out)
            pos += length
        else:
            pos += length
    return pos


def _items(
    data: bytes,
    pos: int,
    implicit: bool,
    depth: int,
    out: list[Node],
    fragments: bool,
    opaque: bool,
) -> int:
    while True:
        tag, _, length, _ = _header(data, pos, True)
        if tag == _SEQ_END:
            out.append(Node(pos, 8, 0, tag, depth, "seq-end", opaque))
            return pos + 8
        out.append(Node(pos, 8, length, tag, depth, "item", opaque))
        pos += 8
        if length == UNDEFINED:
            pos = _elements(data, pos, len(data), implicit, depth, out, True, opaque)
        elif fragments:
            pos += length
        else:
            _elements(data, pos, pos + length, implicit, depth, out, False, opaque)
            pos += length


def _items_defined(
    data: bytes, pos: int, end: int, implicit: bool, depth: int, out: list[Node]
) -> None:
    while pos < end:
        _, _, length, _ = _header(data, pos, True)
        out.append(Node(pos, 8, length, _ITEM, depth, "item", True))
        pos += 8
        if length == UNDEFINED:
            pos = _elements(data, pos, end, implicit, depth, out, True, True)
        else:
            _elements(data, pos, pos + length, implicit, depth, out, False, True)
            pos += length


# -- the corpus ----------------------------------------------------------------------------


def cut_may_pass(layout: Layout, cut: int) -> bool:
    """Whether a file cut to ``cut`` bytes can still be a valid (shorter) data set: only when
    the cut falls exactly between two top-level data elements, after the first one."""
    if cut <= layout.dataset_offset:
        return False
    if cut >= len(layout.data):
        return True
    for node in layout.nodes:
        if node.depth != 0 or node.kind != "element":
            continue
        if node.offset == cut:
            return True
        # A few zero bytes at the very end are taken as padding (scan_file allows that).
        if node.offset < cut < node.offset + 8 and not layout.data[node.offset : cut].strip(b"\0"):
            return True
    return False


def truncations(name: str, layout: Layout) -> Iterator[Broken]:
    """Cuts at every node boundary and inside every header and value."""
    data = layout.data
    cuts: dict[int, str] = {0: "empty", 64: "inside the preamble", 130: "inside DICM"}
    for n in layout.nodes:
        where = f"{n.kind} ({n.tag >> 16:04X},{n.tag & 0xFFFF:04X}) depth {n.depth}"
        cuts.setdefault(n.offset, f"at the start of {where}")
        cuts.setdefault(n.offset + 2, f"inside the tag of {where}")
        cuts.setdefault(n.offset + n.header - 1, f"inside the header of {where}")
        cuts.setdefault(n.offset + n.header, f"after the header of {where}")
        if n.length not in (0, UNDEFINED) and n.length > 1:
            cuts.setdefault(n.offset + n.header + n.length // 2, f"inside the value of {where}")
            cuts.setdefault(n.offset + n.header + n.length - 1, f"before the end of {where}")
    cuts.setdefault(len(data) - 1, "one byte short")
    for cut, what in sorted(cuts.items()):
        if 0 <= cut < len(data):
            yield Broken(
                f"{name}-cut{cut}",
                data[:cut],
                f"cut at {cut}: {what}",
                not cut_may_pass(layout, cut),
            )


def _set_length(data: bytes, node: Node, length: int) -> bytes:
    out = bytearray(data)
    if node.header == 12:
        struct.pack_into("<I", out, node.offset + 8, length)
    elif node.kind != "element" or (node.header == 8 and _implicit(data, node)):
        struct.pack_into("<I", out, node.offset + 4, length)
    else:
        struct.pack_into("<H", out, node.offset + 6, min(length, 0xFFFF))
    return bytes(out)


def _implicit(data: bytes, node: Node) -> bool:
    vr = data[node.offset + 4 : node.offset + 6]
    return not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90) if len(vr) == 2 else True


def structural(name: str, layout: Layout) -> Iterator[Broken]:
    """Missing delimiters, lengths past the end, huge lengths."""
    data = layout.data
    size = len(data)
    for i, n in enumerate(layout.nodes):
        label = f"{n.kind} ({n.tag >> 16:04X},{n.tag & 0xFFFF:04X}) depth {n.depth} at {n.offset}"
        if n.kind in ("item-end", "seq-end"):
            removed = data[: n.offset] + data[n.offset + 8 :]
            yield Broken(f"{name}-nodelim{i}", removed, f"{label} removed", True)
            continue
        if n.kind == "meta":
            yield Broken(
                f"{name}-metalen{i}",
                _set_length(data, n, 0xFFFF if n.header == 8 else 0xFFFFFFF0),
                f"{label}: length past the end of the header",
                True,
            )
            continue
        if n.length == UNDEFINED:
            # an undefined length whose delimiters are all gone
            kept = bytearray()
            pos = 0
            for m in layout.nodes:
                if m.kind in ("item-end", "seq-end") and m.offset > n.offset:
                    kept += data[pos : m.offset]
                    pos = m.offset + 8
            kept += data[pos:]
            what = f"{label}: every delimiter after it removed"
            yield Broken(f"{name}-nodelims{i}", bytes(kept), what, True)
            continue
        if n.header == 12 or n.kind == "item" or _implicit(data, n):
            yield Broken(
                f"{name}-pasteof{i}",
                _set_length(data, n, size - n.offset - n.header + 2),
                f"{label}: length 2 bytes past the end of the file",
                True,
            )
            yield Broken(
                f"{name}-huge{i}",
                _set_length(data, n, 0xFFFFFFF0),
                f"{label}: length 0xFFFFFFF0",
                True,
            )
        elif n.depth == 0 and i == len(layout.nodes) - 1:
            yield Broken(
                f"{name}-pasteof{i}",
                _set_length(data, n, 0xFFFF),
                f"{label}: short length past the end of the file",
                size - n.offset - 8 < 0xFFFF,
            )


def with_transfer_syntax(data: bytes, syntax: str) -> bytes:
    """Rewrite the Transfer Syntax UID in the meta header (and fix the group length)."""
    layout_meta = []
    pos = 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            header, (length,) = 12, struct.unpack_from("<I", data, pos + 8)
        else:
            header, (length,) = 8, struct.unpack_from("<H", data, pos + 6)
        layout_meta.append((elem, pos, header, length))
        pos += header + length
    raw = syntax.encode("latin-1")
    raw += b"\0" if len(raw) % 2 else b""
    out = bytearray(data[:132])
    for elem, start, header, length in layout_meta:
        if elem == 0x0010:
            out += data[start : start + 6] + struct.pack("<H", len(raw)) + raw
        else:
            out += data[start : start + header + length]
    body = bytes(out[132:])
    group_length = len(body) - 12  # (0002,0000) UL is 12 bytes
    body = body[:8] + struct.pack("<I", group_length) + body[12:]
    return bytes(out[:132]) + body + data[pos:]


def _replace_uid(data: bytes, old: str, new: str) -> bytes:
    """Replace a UID value everywhere, fixing short-VR lengths of the elements holding it."""
    old_raw = old.encode() + (b"\0" if len(old) % 2 else b"")
    new_raw = new.encode() + (b"\0" if len(new) % 2 else b"")
    out = bytearray()
    pos = 0
    while True:
        at = data.find(old_raw, pos)
        if at < 0:
            out += data[pos:]
            break
        out += data[pos:at]
        # the length field is right before the value (UI has a 2-byte length in explicit VR)
        if data[at - 4 : at - 2] == b"UI":
            struct.pack_into("<H", out, len(out) - 2, len(new_raw))
        else:
            struct.pack_into("<I", out, len(out) - 4, len(new_raw))
        out += new_raw
        pos = at + len(old_raw)
    return bytes(out)


def headers(name: str, data: bytes, sop_class: str) -> Iterator[Broken]:
    """Wrong preamble, no meta header, wrong transfer syntax, hostile UIDs."""
    layout = walk(data)
    yield Broken(f"{name}-nodicm", data[:128] + b"DICN" + data[132:], "DICN instead of DICM", True)
    yield Broken(f"{name}-nopreamble", data[128:], "no 128-byte preamble", True)
    yield Broken(f"{name}-shifted", b"\0" + data, "preamble one byte too long", True)
    yield Broken(
        f"{name}-nometa", data[:132] + data[layout.dataset_offset :], "no meta header", True
    )
    yield Broken(f"{name}-rawdataset", data[layout.dataset_offset :], "a bare data set", True)
    yield Broken(f"{name}-metaonly", data[: layout.dataset_offset], "meta header only", True)
    yield Broken(f"{name}-text", b"hello, this is not DICOM\n" * 20, "a text file", True)
    yield Broken(f"{name}-zeros", bytes(4096), "4 KB of zeros", True)
    for syntax in (IMPLICIT, EXPLICIT, BIG_ENDIAN, DEFLATED, JPEG_BASELINE, "1.2.3.4.5.6"):
        if syntax != layout.transfer_syntax:
            yield Broken(
                f"{name}-ts{syntax}",
                with_transfer_syntax(data, syntax),
                f"meta header says {syntax}, data is {layout.transfer_syntax}",
                False,
            )
    yield from file_meta_in_data_set(name, layout)
    long_uid = "1." + "2" * 98  # a UID of 100 characters (the limit is 64)
    yield Broken(
        f"{name}-longclass",
        _replace_uid(data, sop_class, long_uid),
        "SOP Class UID of 100 characters",
        False,
    )
    yield Broken(
        f"{name}-longts",
        with_transfer_syntax(data, "1.2.840.10008.1.2.1." + "9" * 80),
        "Transfer Syntax UID of 100 characters",
        False,
    )
    yield Broken(
        f"{name}-binaryts",
        with_transfer_syntax(data, "1.2.\xff\xfe.3"),
        "Transfer Syntax UID with non-ASCII bytes",
        False,
    )


def file_meta_in_data_set(name: str, layout: Layout) -> Iterator[Broken]:
    """A Transfer Syntax UID (0002,0010) naming another syntax at the start of the data set, in
    the data set's own encoding: pydicom reads group 0002 on past the meta header's group length
    and takes it for the file's, DCMTK only warns. Not for a deflated data set (compressed)."""
    syntax = layout.transfer_syntax
    if syntax == DEFLATED:
        return
    other = (BIG_ENDIAN if syntax != BIG_ENDIAN else EXPLICIT).encode()
    value = other + b"\0" * (len(other) % 2)
    if syntax == IMPLICIT:
        element = struct.pack("<HHI", 0x0002, 0x0010, len(value)) + value
    else:
        order = ">" if syntax == BIG_ENDIAN else "<"
        element = struct.pack(order + "HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value
    at, data = layout.dataset_offset, layout.data
    what = "(0002,0010) naming another transfer syntax at the start of the data set"
    yield Broken(f"{name}-metaindataset", data[:at] + element + data[at:], what, True)


def bit_flips(name: str, data: bytes, count: int, rng: random.Random) -> Iterator[Broken]:
    for i in range(count):
        out = bytearray(data)
        flips = rng.randint(1, 8)
        for _ in range(flips):
            at = rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
        yield Broken(f"{name}-flip{i}", bytes(out), f"{flips} random bit flips (seed {i})", False)


def corpus(*, flips: int = 20, seed: int = 6) -> list[Broken]:
    """The whole corpus: a few thousand small files, deterministic for a given seed."""
    rng = random.Random(seed)
    out: list[Broken] = bundled_broken()
    for name, data in seed_files().items():
        layout = walk(data)
        out.extend(truncations(name, layout))
        out.extend(structural(name, layout))
        out.extend(bit_flips(name, data, flips, rng))
        sop_class = _sop_class(layout)
        if sop_class:
            out.extend(headers(name, data, sop_class))
    names = [b.name for b in out]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return out


def _sop_class(layout: Layout) -> str:
    for n in layout.nodes:
        if n.kind == "meta" and n.tag == 0x00020002:
            raw = layout.data[n.offset + n.header : n.offset + n.header + n.length]
            return raw.rstrip(b"\0 ").decode()
    return ""
