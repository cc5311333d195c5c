"""Conversion between the uncompressed syntaxes, on every real file pydicom ships.

Each file in Explicit/Implicit VR Little Endian, Deflated or Explicit VR Big Endian is converted
to Explicit and Implicit VR Little Endian, and what comes out is decoded by pydicom and compared
with the original element by element (binary values decoded with each side's byte order) and
pixel array by pixel array. Big endian conversions are also compared with DCMTK's
``dcmconv +te``, and a hand-made big endian data set holding every binary VR, nested in
sequences, must convert byte for byte to what pydicom writes in little endian.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from forwarder.dicom.check import check_file
from forwarder.dicom.part10 import read_meta
from forwarder.dicom.transcode import transcode
from forwarder.errors import InvalidFileError, SendError

EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)
BIG = str(ExplicitVRBigEndian)
SOURCES = {EXPLICIT, IMPLICIT, BIG, str(DeflatedExplicitVRLittleEndian)}
#: Explicit VR Big Endian files refused, with the words of the reason: 32-bit OW pixel data,
#: whose big endian layout DCMTK and pydicom read differently.
REFUSED = {
    "rtdose_expb.dcm": "Bits Allocated 32",
    "rtdose_expb_1frame.dcm": "Bits Allocated 32",
}
DTYPE = {"OW": "u2", "OF": "f4", "OL": "u4", "OD": "f8", "OV": "u8"}


def _real_files() -> list[str]:
    """Every Part 10 file pydicom ships in an uncompressed syntax that passes the check."""
    found = []
    for path in sorted(get_testdata_files() + get_charset_files()):
        if not os.path.isfile(path):
            continue
        try:
            meta = check_file(path)
        except InvalidFileError:
            continue
        if meta.transfer_syntax in SOURCES:
            found.append(path)
    return found


REAL_FILES = _real_files()


def _id(path: str) -> str:
    return path.split("/data/")[-1]


def dcmread_quiet(source: str | Path | io.BytesIO) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(source)


def decode(data: bytes, syntax: str) -> Dataset:
    """A converted data set (no meta header), as a peer would read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(
            io.BytesIO(data), is_implicit_VR=syntax == IMPLICIT, is_little_endian=True
        )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _as_vr(elem: DataElement, vr: str, ds: Dataset) -> DataElement:
    """``elem`` read by a peer that knows its VR (implicit VR loses private VRs)."""
    value = elem.value or b""
    raw = RawDataElement(elem.tag, vr, len(value), value, 0, True, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_raw_data_element(raw, ds=ds)


def _binary(value: bytes, vr: str, big: bool) -> Any:
    if vr in DTYPE:
        return np.frombuffer(value, (">" if big else "<") + DTYPE[vr]).tolist()
    return value


def differences(orig: Dataset, got: Dataset, big: bool, where: str = "") -> list[str]:
    """Elements of ``orig`` that ``got`` lacks or holds with another value."""
    diffs = []
    for tag in sorted(orig.keys()):  # iterating a Dataset gives elements, decoded
        try:
            elem = orig[tag]
        except ValueError:  # a value pydicom cannot decode (badVR.dcm): compare the bytes
            if orig.get_item(tag).value != got.get_item(tag).value:
                diffs.append(f"{where}{tag} (undecodable) differs")
            continue
        if elem.tag.element == 0 or elem.tag == 0x7FE00010:
            continue  # group lengths (optional, dropped by pydicom's writer); pixels: compared
        name = f"{where}{elem.tag}"
        if elem.tag not in got:
            diffs.append(f"{name} missing")
            continue
        other = got[elem.tag]
        if other.VR == "UN" and elem.VR != "UN":
            other = _as_vr(other, elem.VR, got)
        if elem.VR == "SQ":
            if len(elem.value) != len(other.value):
                diffs.append(f"{name}: {len(elem.value)} items, now {len(other.value)}")
                continue
            for i, (a, b) in enumerate(zip(elem.value, other.value, strict=True)):
                diffs += differences(a, b, big, f"{name}[{i}].")
        elif isinstance(elem.value, bytes):
            if _binary(elem.value, elem.VR, big) != _binary(other.value, elem.VR, False):
                diffs.append(f"{name} ({elem.VR}) differs")
        elif elem.value != other.value:
            diffs.append(f"{name}: {elem.value!r} != {other.value!r}")
    return diffs


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("path", REAL_FILES, ids=_id)
def test_every_uncompressed_real_file_converts_to_the_same_data_set(path: str, target: str) -> None:
    name = os.path.basename(path)
    if name in REFUSED:
        with pytest.raises(SendError, match=REFUSED[name]) as info:
            transcode(path, target, allow_lossy=False)
        assert not info.value.retryable
        assert "(7FE0,0010)" in str(info.value)
        return
    orig = dcmread_quiet(path)
    big = read_meta(path).transfer_syntax == BIG
    got = decode(transcode(path, target, allow_lossy=False), target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values in the originals (badVR.dcm, rtdose)
        assert differences(orig, got, big) == []
    if "PixelData" in orig:
        try:
            expected = pixels(orig)
        except ValueError:  # badVR.dcm: Number of Frames '1A', no pixel array even here
            assert not big
            assert got.PixelData == orig.PixelData
        else:
            assert np.array_equal(expected, pixels(got))


def pixels(ds: Dataset) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. MR_small_padded.dcm: excess padding
        return ds.pixel_array


def test_the_real_files_cover_every_uncompressed_source() -> None:
    syntaxes = {read_meta(p).transfer_syntax for p in REAL_FILES}
    assert syntaxes == SOURCES
    big = [os.path.basename(p) for p in REAL_FILES if read_meta(p).transfer_syntax == BIG]
    assert {"MR_small_bigendian.dcm", "SC_rgb_small_odd_big_endian.dcm"} <= set(big)
    assert len(REAL_FILES) > 100


BIG_ENDIAN_FILES = [
    "ExplVR_BigEnd.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "liver_expb_1frame.dcm",
]


@pytest.mark.skipif(shutil.which("/usr/bin/dcmconv") is None, reason="DCMTK is not installed")
@pytest.mark.parametrize(("option", "target"), [("+te", EXPLICIT), ("+ti", IMPLICIT)])
@pytest.mark.parametrize("name", BIG_ENDIAN_FILES)
def test_big_endian_conversion_agrees_with_dcmtk(
    tmp_path: Path, name: str, option: str, target: str
) -> None:
    """DCMTK's dcmconv +te/+ti is the oracle: its output and ours hold the same values and
    pixels."""
    source = get_testdata_file(name)
    assert source is not None
    oracle_path = tmp_path / "dcmconv.dcm"
    subprocess.run(["/usr/bin/dcmconv", option, source, str(oracle_path)], check=True)
    oracle = dcmread_quiet(oracle_path)
    assert oracle.file_meta.TransferSyntaxUID == target
    ours = decode(transcode(source, target, allow_lossy=False), target)
    assert differences(oracle, ours, big=False) == []
    assert differences(ours, oracle, big=False) == []
    assert np.array_equal(oracle.pixel_array, ours.pixel_array)
    assert oracle.PixelData == ours.PixelData


# -- a hand-made big endian data set with every binary VR ------------------------------------


def _every_vr(big: bool) -> Dataset:
    """The same data set for both byte orders: pydicom encodes the numeric VRs itself; the
    OB/OW/OF/... values are given as bytes in the byte order of the file."""
    order = ">" if big else "<"

    def raw(values: list[float], dtype: str) -> bytes:
        return np.array(values, dtype=order + dtype).tobytes()

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.add_new(0x00081160, "IS", "1")
    ds.add_new(0x00209165, "AT", [0x00100020, 0x7FE00010])
    ds.add_new(0x00181310, "US", [1, 0x0102, 0xFFFE, 4])
    ds.add_new(0x00281101, "US", [256, 0, 16])  # "US or SS": US here
    ds.add_new(0x00281201, "OW", raw([0x0102, 0x0304, 0xFFFE], "u2"))
    ds.add_new(0x00189219, "SS", [-2, 0x0102])
    ds.add_new(0x00186020, "SL", [-70000, 0x01020304])
    ds.add_new(0x00209157, "UL", [0x01020304, 9])
    ds.add_new(0x00189089, "FD", [1.5, -2.25e-10])
    ds.add_new(0x00182043, "FL", [0.5, 3.25])
    ds.add_new(0x00660040, "OL", raw([0x01020304, 7], "u4"))
    ds.add_new(0x00660016, "OF", raw([1.25, -0.5], "f4"))
    ds.add_new(0x00660022, "OD", raw([2.5, 1e100], "f8"))
    ds.add_new(0x00720082, "SV", [-(2**40), 5])
    ds.add_new(0x00720083, "UV", [2**40 + 3])
    ds.add_new(0x00720081, "OV", raw([2**60 + 1], "u8"))
    ds.add_new(0x00420011, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00080005, "CS", "ISO_IR 100")
    ds.add_new(0x00081030, "LO", "Study\xe9")
    inner = Dataset()
    inner.add_new(0x00189219, "SS", [-3])
    inner.add_new(0x00660040, "OL", raw([0x0A0B0C0D], "u4"))
    item = Dataset()
    item.add_new(0x00281101, "US", [7, 8])
    item.add_new(0x00660016, "OF", raw([9.5], "f4"))
    item.ReferencedImageSequence = Sequence([inner])
    item["ReferencedImageSequence"].is_undefined_length = True
    inner.is_undefined_length_sequence_item = True
    ds.add_new(0x00540016, "SQ", Sequence([item]))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 2, 2, 16, 1
    icon.add_new(0x7FE00010, "OW", raw([1, 0x0203, 0xFF00, 4], "u2"))
    ds.IconImageSequence = Sequence([icon])
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 3, 16, 1
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add_new(0x7FE00010, "OW", raw([1, 2, 0x0304, 0xFF00, 5, 0xABCD], "u2"))
    return ds


def _save(ds: Dataset, path: Path, syntax: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.preamble = b"\x00" * 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, implicit_vr=False, little_endian=syntax != BIG, enforce_file_format=True)


def test_every_binary_vr_is_swapped_by_its_size_inside_sequences_too(tmp_path: Path) -> None:
    big, little = tmp_path / "big.dcm", tmp_path / "little.dcm"
    _save(_every_vr(big=True), big, BIG)
    _save(_every_vr(big=False), little, EXPLICIT)
    check_file(big)
    expected = little.read_bytes()[read_meta(little).dataset_offset :]
    assert big.read_bytes()[read_meta(big).dataset_offset :] != expected
    assert transcode(str(big), EXPLICIT, allow_lossy=False) == expected
    got = decode(transcode(str(big), IMPLICIT, allow_lossy=False), IMPLICIT)
    assert differences(dcmread_quiet(little), got, big=False) == []
    assert got.pixel_array.tolist() == [[1, 2, 0x0304], [0xFF00, 5, 0xABCD]]


@pytest.mark.parametrize(
    ("tag", "vr", "value", "words"),
    [
        (0x00191010, "UN", b"\x00\x01\x02\x03", r"\(0019,1010\) is UN"),
        (0x00291010, "OB", b"\x00\x01", r"private element \(0029,1010\) is OB"),
        (0x60003000, "OW", b"\x00\x01", r"Overlay Data \(6000,3000\)"),
        (0x00291020, "US", b"\x00\x01\x02", r"\(0029,1020\) \(US\) has 3 bytes"),
        (0x00291021, "FD", b"\x00" * 12, r"\(0029,1021\) \(FD\) has 12 bytes"),
        (0x00291022, "AT", b"\x00" * 6, r"\(0029,1022\) \(AT\) has 6 bytes"),
    ],
)
def test_what_cannot_be_swapped_with_certainty_is_refused(
    tmp_path: Path, tag: int, vr: str, value: bytes, words: str
) -> None:
    ds = _every_vr(big=True)
    stored_vr = vr if vr in ("UN", "OB", "OW") else "UN"  # pydicom writes bytes as they are
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[tag] = DataElement(tag, stored_vr, value)
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    data = path.read_bytes()
    if stored_vr != vr:  # now the numeric VR, with its short length field
        group_elem = struct.pack(">HH", tag >> 16, tag & 0xFFFF)
        header = group_elem + b"UN\0\0" + struct.pack(">I", len(value))
        assert data.count(header) == 1
        path.write_bytes(
            data.replace(header, group_elem + vr.encode() + struct.pack(">H", len(value)))
        )
    for target in (EXPLICIT, IMPLICIT):
        with pytest.raises(SendError, match=words) as info:
            transcode(str(path), target, allow_lossy=False)
        assert not info.value.retryable
        assert "Explicit VR Big Endian" in str(info.value)


@pytest.mark.parametrize("bits", [1, 32])
def test_ow_pixel_data_of_other_sizes_in_big_endian_is_refused(tmp_path: Path, bits: int) -> None:
    ds = _every_vr(big=True)
    ds.BitsAllocated = bits
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    with pytest.raises(SendError, match=f"Bits Allocated {bits} in big endian"):
        transcode(str(path), EXPLICIT, allow_lossy=False)


def test_empty_un_and_private_ob_convert(tmp_path: Path) -> None:
    ds = _every_vr(big=True)
    ds[0x00191010] = DataElement(0x00191010, "UN", b"")
    ds[0x00291010] = DataElement(0x00291010, "OB", b"")
    ds.add_new(0x00291011, "OW", np.array([0x0102], ">u2").tobytes())  # private OW: words
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    got = decode(transcode(str(path), EXPLICIT, allow_lossy=False), EXPLICIT)
    assert got[0x00291011].value == b"\x02\x01"
    assert not got[0x00191010].value


def test_a_truncated_big_endian_data_set_is_refused(tmp_path: Path) -> None:
    ds = _every_vr(big=True)
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SendError, match="truncated or malformed") as info:
        transcode(str(path), EXPLICIT, allow_lossy=False)
    assert not info.value.retryable


def test_trailing_zero_padding_of_a_big_endian_file_is_dropped(tmp_path: Path) -> None:
    ds = _every_vr(big=True)
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    plain = transcode(str(path), EXPLICIT, allow_lossy=False)
    path.write_bytes(path.read_bytes() + b"\x00" * 3)
    assert transcode(str(path), EXPLICIT, allow_lossy=False) == plain


def test_a_generated_uid_keeps_its_value(tmp_path: Path) -> None:
    ds = _every_vr(big=True)
    ds.SOPInstanceUID = generate_uid()
    path = tmp_path / "big.dcm"
    _save(ds, path, BIG)
    got = decode(transcode(str(path), IMPLICIT, allow_lossy=False), IMPLICIT)
    assert got.SOPInstanceUID == ds.SOPInstanceUID


def test_an_unreadable_file_is_a_retryable_send_error(tmp_path: Path) -> None:
    """An I/O error (here EISDIR: a folder where the file was) says nothing against the file:
    tried again later. A file that is gone cannot come back: not retryable."""
    (tmp_path / "folder.dcm").mkdir()
    with pytest.raises(SendError, match="cannot read") as info:
        transcode(str(tmp_path / "folder.dcm"), EXPLICIT, allow_lossy=False)
    assert info.value.retryable
    with pytest.raises(SendError, match="No such file") as gone:
        transcode(str(tmp_path / "gone.dcm"), EXPLICIT, allow_lossy=False)
    assert not gone.value.retryable


# -- the re-encoder between explicit and implicit VR -------------------------------------------


def _icon_with_encapsulated_pixels(tmp_path: Path, syntax: str) -> Path:
    """A native-syntax file whose Icon Image Sequence item holds Pixel Data of undefined
    length (fragments): malformed in a native syntax (PS3.5 A.4); the top level is fine."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    icon = Dataset()
    icon.Rows = icon.Columns = 1
    icon.BitsAllocated = 8
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    fragment = struct.pack("<HHI", 0xFFFE, 0xE000, 2) + b"\xab\xcd"
    icon.add_new(0x7FE00010, "OB", item + fragment + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = Sequence([icon])
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "icon.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == IMPLICIT)
    data = path.read_bytes()
    assert struct.pack("<HHI", 0x7FE0, 0x0010, 0xFFFFFFFF) in data or (
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) in data
    )
    return path


@pytest.mark.parametrize(("source", "target"), [(EXPLICIT, IMPLICIT), (IMPLICIT, EXPLICIT)])
def test_nested_encapsulated_pixel_data_in_a_native_syntax_is_refused(
    tmp_path: Path, source: str, target: str
) -> None:
    path = _icon_with_encapsulated_pixels(tmp_path, source)
    with pytest.raises(SendError, match=r"element \(7FE0,0010\) \(O[BW]\) has an undefined") as e:
        transcode(str(path), target, allow_lossy=False)
    assert not e.value.retryable


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
def test_implicit_pixels_that_start_like_an_item_convert_as_pixels(
    tmp_path: Path, target: str
) -> None:
    """The re-encoder follows the check's rule: Pixel Data is never read as a sequence."""
    from dicomgen import make_dataset

    ds = make_dataset(transfer_syntax=IMPLICIT)
    pixels = bytearray(ds.PixelData)
    pixels[:8] = struct.pack("<HHI", 0xFFFE, 0xE000, 0x100)
    ds.PixelData = bytes(pixels)
    block = ds.private_block(0x0009, "FORWARDER TEST", create=True)
    block.add_new(0x10, "OB", struct.pack("<HHI", 0xFFFE, 0xE000, 0x100) + bytes(8))
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    check_file(path)
    got = decode(transcode(str(path), target, allow_lossy=False), target)
    assert np.array_equal(got.pixel_array, dcmread_quiet(path).pixel_array)
    assert got[0x00091010].value == ds[0x00091010].value
