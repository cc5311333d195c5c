"""The Part 10 meta reader and the whole-file scanner, on real and generated files."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dicomgen import make_dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from forwarder.dicom.check import scan_file
from forwarder.dicom.part10 import FileMeta, parse_meta, read_meta
from forwarder.errors import InvalidFileError

MODALITY = 0x00080060
STATION = 0x00081010
ROWS = 0x00280010
IMAGE_TYPE = 0x00080008
CODE_VALUE = 0x00080100
WANT = {MODALITY: "Modality", STATION: "StationName", ROWS: "Rows", IMAGE_TYPE: "ImageType"}


def bundled(name: str) -> Path:
    """A file bundled with pydicom (never a downloadable one)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom"
    return Path(str(path))


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "f.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def scan(path: Path, want: dict[int, str] | None = None) -> dict[str, str]:
    return scan_file(path, read_meta(path), want)


# -- meta ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "rtplan.dcm",
        "reportsi.dcm",
        "image_dfl.dcm",
    ],
)
def test_meta_agrees_with_pydicom(name: str) -> None:
    path = bundled(name)
    meta = read_meta(path)
    ds = pydicom.dcmread(path)
    assert meta.sop_class_uid == ds.SOPClassUID
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert meta.size == path.stat().st_size
    if meta.transfer_syntax != "1.2.840.10008.1.2.1.99":  # deflated: no plain tags
        # the data set starts right after group 0002, with group 0008
        with open(path, "rb") as f:
            f.seek(meta.dataset_offset)
            first = f.read(2)
        assert first in (b"\x08\x00", b"\x00\x08")
    assert meta.dataset_length == meta.size - meta.dataset_offset


def test_meta_of_a_generated_file(tmp_path: Path) -> None:
    ds = make_dataset(modality="MR", transfer_syntax=ImplicitVRLittleEndian)
    path = write(tmp_path, to_bytes(ds))
    meta = read_meta(path)
    assert meta == FileMeta(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=ImplicitVRLittleEndian,
        dataset_offset=meta.dataset_offset,
        size=path.stat().st_size,
    )


@pytest.mark.parametrize("syntax", ["explicit", ImplicitVRLittleEndian])
def test_dataset_uids_win_over_a_stale_meta_header(tmp_path: Path, syntax: str) -> None:
    kwargs = {} if syntax == "explicit" else {"transfer_syntax": syntax}
    ds = make_dataset(**kwargs)  # type: ignore[arg-type]
    real = str(ds.SOPInstanceUID)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    assert b"1.2.3.4.5.6.7.8.9" in data[:400]
    meta = read_meta(write(tmp_path, data))
    assert meta.sop_instance_uid == real
    assert meta.sop_class_uid == str(ds.SOPClassUID)


def test_meta_uids_are_used_when_the_dataset_lacks_them(tmp_path: Path) -> None:
    ds = make_dataset()
    meta_uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
    del ds.SOPInstanceUID
    del ds.SOPClassUID
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    meta = read_meta(write(tmp_path, buf.getvalue()))
    assert meta.sop_instance_uid == meta_uid
    assert meta.sop_class_uid == str(ds.file_meta.MediaStorageSOPClassUID)


def test_uid_padding_is_stripped(tmp_path: Path) -> None:
    ds = make_dataset(sop_instance_uid="1.2.3.45")  # odd length: padded with \0 on disk
    meta = read_meta(write(tmp_path, to_bytes(ds)))
    assert meta.sop_instance_uid == "1.2.3.45"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty file"),
        (b"garbage" * 50, "'DICM' prefix at byte 128 is missing"),
        (b"\x00" * 128 + b"DICM", "lacks MediaStorageSOPClassUID"),
    ],
)
def test_meta_errors(tmp_path: Path, data: bytes, words: str) -> None:
    with pytest.raises(InvalidFileError, match=words):
        read_meta(write(tmp_path, data))


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("no_meta.dcm", "'DICM' prefix"),  # a raw data set without Part 10 header
        ("meta_missing_tsyntax.dcm", "TransferSyntaxUID"),
    ],
)
def test_meta_errors_of_bundled_files(name: str, words: str) -> None:
    with pytest.raises(InvalidFileError, match=words):
        read_meta(bundled(name))


def test_meta_without_a_dataset_is_invalid(tmp_path: Path) -> None:
    data = to_bytes(make_dataset())
    meta = read_meta(write(tmp_path, data))
    with pytest.raises(InvalidFileError, match="no data set after the file meta"):
        read_meta(write(tmp_path, data[: meta.dataset_offset], "meta-only.dcm"))


def test_meta_cut_anywhere_inside_the_header_is_invalid(tmp_path: Path) -> None:
    data = to_bytes(make_dataset())
    offset = read_meta(write(tmp_path, data)).dataset_offset
    target = tmp_path / "cut.dcm"
    wrong = []
    for cut in range(1, offset + 1):
        target.write_bytes(data[:cut])
        try:
            read_meta(target)
        except InvalidFileError:
            continue
        except Exception as exc:
            wrong.append(f"{cut}: {type(exc).__name__}: {exc}")
            continue
        wrong.append(f"{cut}: accepted")
    assert not wrong, wrong


def test_meta_cut_inside_the_header_is_invalid_except_in_a_long_length() -> None:
    """The part of the above that works today (parse_meta on the bytes, sizes 1..151, 156..)."""
    data = to_bytes(make_dataset())
    offset = parse_meta(data, len(data)).dataset_offset
    for cut in [*range(1, 152), *range(156, offset + 1)]:
        with pytest.raises(InvalidFileError):
            parse_meta(data[:cut], cut, f"cut{cut}")


def test_meta_with_a_group_length_past_its_elements_is_invalid(tmp_path: Path) -> None:
    data = bytearray(to_bytes(make_dataset()))
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    (length,) = struct.unpack_from("<I", data, 140)
    struct.pack_into("<I", data, 140, length + 8)  # runs into the data set's group 0008
    with pytest.raises(InvalidFileError, match="group length disagrees"):
        read_meta(write(tmp_path, bytes(data)))


def test_meta_with_a_short_group_length_still_finds_the_dataset(tmp_path: Path) -> None:
    # Lenient like pydicom: the element that straddles the stated end is read whole.
    data = bytearray(to_bytes(make_dataset()))
    good = read_meta(write(tmp_path, bytes(data)))
    (length,) = struct.unpack_from("<I", data, 140)
    struct.pack_into("<I", data, 140, length - 8)
    assert read_meta(write(tmp_path, bytes(data), "short.dcm")) == good


def test_meta_with_an_invalid_vr_is_invalid(tmp_path: Path) -> None:
    data = bytearray(to_bytes(make_dataset()))
    data[136:138] = b"\x01\x02"
    with pytest.raises(InvalidFileError, match="has no valid VR"):
        read_meta(write(tmp_path, bytes(data)))


def test_an_unreadable_path_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidFileError, match="cannot read"):
        read_meta(tmp_path / "missing.dcm")
    with pytest.raises(InvalidFileError, match="cannot read"):
        read_meta(tmp_path)  # a folder


# -- scan_file: values -----------------------------------------------------------------------


def test_scan_returns_top_level_values_as_text(tmp_path: Path) -> None:
    ds = make_dataset(modality="MR", station="SCANNER7", rows=8, columns=8)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    item = Dataset()
    item.StationName = "NESTED"  # not top level: not reported
    ds.ReferencedImageSequence = Sequence([item])
    values = scan(write(tmp_path, to_bytes(ds)), WANT)
    assert values == {
        "Modality": "MR",
        "StationName": "SCANNER7",
        "Rows": "8",
        "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
    }


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
    ],
)
def test_scan_values_of_bundled_files_agree_with_pydicom(name: str) -> None:
    path = bundled(name)
    ds = pydicom.dcmread(path)
    values = scan(path, {MODALITY: "Modality", ROWS: "Rows"})
    assert values == {"Modality": ds.Modality, "Rows": str(ds.Rows)}


def test_scan_without_want_returns_nothing(tmp_path: Path) -> None:
    assert scan(bundled("CT_small.dcm")) == {}


def test_scan_accepts_trailing_zero_padding(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(rows=4, columns=4))
    assert scan(write(tmp_path, data + b"\x00" * 3), WANT)["Modality"] == "CT"


def test_a_deflated_dataset_is_inflated_and_walked() -> None:
    path = bundled("image_dfl.dcm")
    ds = pydicom.dcmread(path)
    assert scan(path, {MODALITY: "Modality", ROWS: "Rows"}) == {
        "Modality": ds.Modality,
        "Rows": str(ds.Rows),
    }


# -- scan_file: every element boundary of real files ----------------------------------------


@dataclass(frozen=True, slots=True)
class Element:
    start: int  # offset of the tag
    header: int  # bytes of tag (+VR) + length
    length: int | None  # value length; None = undefined
    depth: int  # 0 = top level


LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
LONG_VRS |= {b"UV"}


class Walker:
    """Lists every data element, item and delimiter of a data set, independently of the code
    under test (checked against pydicom's top-level element count in ``element_map``)."""

    def __init__(self, data: bytes, fmt: str) -> None:
        self.data = data
        self.fmt = fmt
        self.found: list[Element] = []

    def elements(self, pos: int, end: int, implicit: bool, depth: int) -> int:
        data, fmt = self.data, self.fmt
        while pos < end:
            group, elem = struct.unpack_from(fmt + "HH", data, pos)
            if group == 0xFFFE:  # the item delimiter of an undefined-length item
                self.found.append(Element(pos, 8, 0, depth))
                return pos + 8
            if implicit:
                (length,) = struct.unpack_from(fmt + "I", data, pos + 4)
                header, vr = 8, b""
            else:
                vr = data[pos + 4 : pos + 6]
                if vr in LONG_VRS:
                    (length,) = struct.unpack_from(fmt + "I", data, pos + 8)
                    header = 12
                else:
                    (length,) = struct.unpack_from(fmt + "H", data, pos + 6)
                    header = 8
            undefined = length == 0xFFFFFFFF
            self.found.append(Element(pos, header, None if undefined else length, depth))
            value = pos + header
            is_sq = vr == b"SQ" or (implicit and _implicit_sq(group, elem))
            if undefined:
                pos = self.items(value, None, implicit or vr == b"UN", depth + 1, not is_sq)
            elif is_sq:
                self.items(value, value + length, implicit, depth + 1, False)
                pos = value + length
            else:
                pos = value + length
        return pos

    def items(self, pos: int, end: int | None, implicit: bool, depth: int, fragments: bool) -> int:
        while end is None or pos < end:
            group, elem, length = struct.unpack_from(self.fmt + "HHI", self.data, pos)
            undefined = length == 0xFFFFFFFF
            self.found.append(Element(pos, 8, None if undefined else length, depth))
            pos += 8
            if (group << 16) | elem == 0xFFFEE0DD:
                return pos
            if fragments:
                pos += length
            elif undefined:
                pos = self.elements(pos, len(self.data), implicit, depth + 1)
            else:
                self.elements(pos, pos + length, implicit, depth + 1)
                pos += length
        return pos


def _implicit_sq(group: int, elem: int) -> bool:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR((group << 16) | elem) == "SQ"
    except KeyError:
        return False


def element_map(path: Path) -> tuple[bytes, FileMeta, list[Element]]:
    data = path.read_bytes()
    meta = read_meta(path)
    implicit = meta.transfer_syntax == ImplicitVRLittleEndian
    fmt = ">" if meta.transfer_syntax == "1.2.840.10008.1.2.2" else "<"
    walker = Walker(data, fmt)
    walker.elements(meta.dataset_offset, len(data), implicit, 0)
    found = walker.found
    top = [e for e in found if e.depth == 0]
    ds = pydicom.dcmread(path)
    assert len(top) == len(ds), "the test's walker disagrees with pydicom"
    return data, meta, found


def cut_points(data: bytes, elements: list[Element]) -> dict[int, str]:
    """Offsets where a cut leaves an incomplete data set, with what is cut. Left out: a cut
    inside a top-level header that leaves only zero bytes (big endian group 0008 starts with
    00), which the scanner rightly takes for trailing padding."""
    cuts: dict[int, str] = {}
    for e in elements:
        if e.depth > 0:
            cuts[e.start] = f"before the nested element at {e.start}"
        for k in sorted({1, 4, 6, e.header - 1} & set(range(1, e.header))):
            if e.depth == 0 and k < 8 and not data[e.start : e.start + k].strip(b"\x00"):
                continue
            cuts[e.start + k] = f"inside the header of the element at {e.start}"
        if e.length:
            cuts[e.start + e.header + e.length // 2] = f"inside the value at {e.start}"
            cuts[e.start + e.header + e.length - 1] = f"one byte short at {e.start}"
    return {c: what for c, what in cuts.items() if c < len(data)}


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",  # implicit VR
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_RLE.dcm",  # encapsulated pixel data (undefined length, fragments)
        "rtplan.dcm",  # implicit VR, nested sequences
        "reportsi.dcm",  # structured report: deeply nested sequences
    ],
)
def test_truncation_at_every_element_boundary_is_detected(tmp_path: Path, name: str) -> None:
    """Cut the file inside every element's header, inside its value, one byte short of its end,
    and at every boundary inside a sequence or item: each cut must be rejected. (A cut exactly
    between two top-level elements leaves a well-formed, shorter data set: the watcher's
    settle rule, not the scanner, guards against those.)"""
    data, _, elements = element_map(bundled(name))
    assert scan(write(tmp_path, data), WANT) is not None  # the whole file is fine
    cuts = cut_points(data, elements)
    assert len(cuts) > 50
    missed = []
    target = tmp_path / "cut.dcm"
    for cut, what in sorted(cuts.items()):
        target.write_bytes(data[:cut])
        try:
            scan_file(target, read_meta(target))
        except InvalidFileError:
            continue
        missed.append(f"{cut}: {what}")
    assert not missed, f"{len(missed)} truncations not detected, e.g. {missed[:5]}"


def test_truncation_of_a_big_file_is_detected_through_the_window(tmp_path: Path) -> None:
    ds = make_dataset(rows=1100, columns=1100)  # 2.4 MB: scanned through a window
    data = to_bytes(ds)
    assert len(data) > 2 * 1024 * 1024
    assert scan(write(tmp_path, data), WANT)["Rows"] == "1100"
    for cut in (len(data) - 1, len(data) - 1000, len(data) // 2):
        with pytest.raises(InvalidFileError, match=r"truncated: element \(7FE0,0010\)"):
            scan(write(tmp_path, data[:cut], "big.dcm"))


def test_bundled_truncated_files_are_rejected() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(InvalidFileError, match="truncated"):
            scan(bundled(name))


# -- scan_file: undefined lengths and lengths past EOF ----------------------------------------

SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


def nested_dataset(**kwargs: object) -> Dataset:
    """An image with ContentSequence > item > ConceptNameCodeSequence > item, every sequence
    and item of undefined length (so closed by delimiters)."""
    ds = make_dataset(rows=4, columns=4, **kwargs)  # type: ignore[arg-type]
    code = Dataset()
    code.CodeValue = "113000"
    code.CodeMeaning = "meaning"
    code.is_undefined_length_sequence_item = True
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([code])
    item["ConceptNameCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds.ContentSequence = Sequence([item])
    ds["ContentSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", ["explicit", ImplicitVRLittleEndian])
def test_undefined_length_sequences_with_delimiters_are_fine(tmp_path: Path, syntax: str) -> None:
    kwargs = {} if syntax == "explicit" else {"transfer_syntax": syntax}
    data = to_bytes(nested_dataset(**kwargs))
    assert data.count(SEQ_END) == 2 and data.count(ITEM_END) == 2
    assert scan(write(tmp_path, data), WANT)["Modality"] == "CT"


@pytest.mark.parametrize("syntax", ["explicit", ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("remove", "index"),
    [
        (SEQ_END, 0),  # the inner sequence's delimiter
        (SEQ_END, 1),  # the outer sequence's delimiter
        (ITEM_END, 0),  # the inner item's delimiter
        (ITEM_END, 1),  # the outer item's delimiter
    ],
)
def test_undefined_lengths_without_delimiters_are_rejected(
    tmp_path: Path, syntax: str, remove: bytes, index: int
) -> None:
    kwargs = {} if syntax == "explicit" else {"transfer_syntax": syntax}
    data = to_bytes(nested_dataset(**kwargs))
    at = -1
    for _ in range(index + 1):
        at = data.index(remove, at + 1)
    broken = data[:at] + data[at + len(remove) :]
    with pytest.raises(InvalidFileError, match=r"delimiter|expected an item|unexpected"):
        scan(write(tmp_path, broken))


def test_a_sequence_left_open_at_the_end_of_the_file_is_rejected(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    del ds.PixelData
    item = Dataset()
    item.CodeValue = "1"
    item.is_undefined_length_sequence_item = True
    ds.RequestAttributesSequence = Sequence([item])  # (0040,0275): the last element
    ds["RequestAttributesSequence"].is_undefined_length = True
    data = to_bytes(ds)
    assert data.endswith(ITEM_END + SEQ_END)
    for cut in (len(SEQ_END), len(SEQ_END) + len(ITEM_END)):
        with pytest.raises(InvalidFileError, match="truncated"):
            scan(write(tmp_path, data[:-cut]))


def test_encapsulated_pixel_data_without_its_delimiter_is_rejected(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(rows=16, columns=16, transfer_syntax=RLELossless))
    assert data.endswith(SEQ_END)
    with pytest.raises(InvalidFileError, match="no sequence delimiter"):
        scan(write(tmp_path, data[: -len(SEQ_END)]))


def _patch_length(data: bytes, tag: bytes, offset: int, fmt: str, value: int) -> bytes:
    at = data.index(tag)
    out = bytearray(data)
    struct.pack_into(fmt, out, at + offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("tag", "offset", "fmt", "words"),
    [
        (b"\x08\x00\x60\x00CS", 6, "<H", r"element \(0008,0060\) claims 60000 bytes"),
        (b"\xe0\x7f\x10\x00OW", 8, "<I", r"element \(7FE0,0010\) claims 60000 bytes"),
    ],
)
def test_an_element_length_past_the_end_is_rejected(
    tmp_path: Path, tag: bytes, offset: int, fmt: str, words: str
) -> None:
    data = _patch_length(to_bytes(make_dataset(rows=4, columns=4)), tag, offset, fmt, 60000)
    with pytest.raises(InvalidFileError, match=words):
        scan(write(tmp_path, data))


def test_an_implicit_vr_length_past_the_end_is_rejected(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(rows=4, columns=4, transfer_syntax=ImplicitVRLittleEndian))
    broken = _patch_length(data, b"\x08\x00\x60\x00", 4, "<I", 0x7FFFFFF0)
    with pytest.raises(InvalidFileError, match=r"\(0008,0060\) claims 2147483632 bytes"):
        scan(write(tmp_path, broken))


def test_an_item_length_past_the_end_is_rejected(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    item = Dataset()
    item.CodeValue = "1"
    ds.ReferencedImageSequence = Sequence([item])  # defined lengths
    data = to_bytes(ds)
    at = data.index(b"\xfe\xff\x00\xe0")
    broken = bytearray(data)
    struct.pack_into("<I", broken, at + 4, 10_000_000)
    with pytest.raises(InvalidFileError, match=r"past the end|claims"):
        scan(write(tmp_path, bytes(broken)))


def test_an_element_running_past_its_item_is_rejected(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    item = Dataset()
    item.CodeValue = "12"
    item.CodeMeaning = "ab"
    ds.ReferencedImageSequence = Sequence([item])
    data = to_bytes(ds)
    at = data.index(b"\xfe\xff\x00\xe0")
    broken = bytearray(data)
    struct.pack_into("<I", broken, at + 4, 14)  # the item now ends inside CodeMeaning
    with pytest.raises(InvalidFileError):
        scan(write(tmp_path, bytes(broken)))


def test_an_invalid_vr_is_rejected(tmp_path: Path) -> None:
    data = bytearray(to_bytes(make_dataset(rows=4, columns=4)))
    at = data.index(b"\x08\x00\x60\x00CS")
    data[at + 4 : at + 6] = b"\x00\x01"
    with pytest.raises(InvalidFileError, match=r"\(0008,0060\) has an invalid VR"):
        scan(write(tmp_path, bytes(data)))


def test_a_stray_delimiter_at_top_level_is_rejected(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(rows=4, columns=4))
    with pytest.raises(InvalidFileError, match=r"unexpected \(FFFE,E00D\)"):
        scan(write(tmp_path, data + ITEM_END))


def test_garbage_after_the_dataset_is_rejected(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(rows=4, columns=4))
    with pytest.raises(InvalidFileError):
        scan(write(tmp_path, data + b"\xff" * 5))


def deeply_nested(levels: int, *, undefined: bool) -> Dataset:
    ds = make_dataset(rows=4, columns=4)
    inner = Dataset()
    inner.CodeValue = "x"
    for _ in range(levels):
        inner.is_undefined_length_sequence_item = undefined
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        outer["ContentSequence"].is_undefined_length = undefined
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    ds["ContentSequence"].is_undefined_length = undefined
    return ds


def test_deep_nesting_is_bounded(tmp_path: Path) -> None:
    assert scan(write(tmp_path, to_bytes(deeply_nested(20, undefined=True))), WANT)
    with pytest.raises(InvalidFileError, match="nested deeper than 32"):
        scan(write(tmp_path, to_bytes(deeply_nested(40, undefined=True))))


def test_an_undefined_length_without_delimiter_inside_a_defined_sequence_is_rejected(
    tmp_path: Path,
) -> None:
    ds = make_dataset(rows=4, columns=4)
    code = Dataset()
    code.CodeValue = "1"
    code.is_undefined_length_sequence_item = True
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([code])
    item["ConceptNameCodeSequence"].is_undefined_length = True
    ds.ContentSequence = Sequence([item])  # defined length, holding undefined ones
    data = to_bytes(ds)
    at = data.index(SEQ_END)
    # replace the inner delimiters by an element of the same size: lengths stay consistent
    broken = data[:at] + b"\x08\x00\x02\x01SH\x00\x00" + data[at + 8 :]
    with pytest.raises(InvalidFileError):
        scan(write(tmp_path, broken))
