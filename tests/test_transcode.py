"""The decompression fallback (``forwarder.dicom.transcode``) on pydicom's bundled test files."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from dicomgen import make_dataset
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from forwarder.dicom.transcode import possibly_lossy, syntax_name, transcode
from forwarder.errors import SendError

EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)


def bundled(name: str) -> Path:
    """A file bundled with pydicom (never a downloadable one)."""
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


def decode(data: bytes, syntax: str) -> Dataset:
    """A data set as sent over the network (no meta header) in ``syntax``."""
    ds = read_dataset(DicomBytesIO(data), is_implicit_VR=syntax == IMPLICIT, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "SC_rgb_rle.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_sources_decompress_to_the_same_pixels(name: str, target: str) -> None:
    source = dcmread(bundled(name))
    out = decode(transcode(str(bundled(name)), target, allow_lossy=False), target)
    assert np.array_equal(out.pixel_array, source.pixel_array)
    # The same object: its UIDs are kept, and everything but the pixel module is unchanged.
    assert out.SOPInstanceUID == source.SOPInstanceUID
    assert out.SOPClassUID == source.SOPClassUID
    for elem in source:
        if elem.keyword not in ("PixelData", "PhotometricInterpretation", "PlanarConfiguration"):
            assert out[elem.tag].value == elem.value, elem.keyword


def test_uncompressed_reencoding_keeps_every_element(tmp_path: Path) -> None:
    path = tmp_path / "explicit.dcm"
    make_dataset(seed=3).save_as(path, enforce_file_format=True)
    source = dcmread(path)
    out = decode(transcode(str(path), IMPLICIT, allow_lossy=False), IMPLICIT)
    assert [e.tag for e in out] == [e.tag for e in source]
    for elem in source:
        assert out[elem.tag].value == elem.value, elem.keyword


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"])
def test_lossy_sources_are_refused_without_the_flag(name: str) -> None:
    source_syntax = str(dcmread(bundled(name)).file_meta.TransferSyntaxUID)
    assert possibly_lossy(source_syntax)
    with pytest.raises(SendError) as info:
        transcode(str(bundled(name)), EXPLICIT, allow_lossy=False)
    assert not info.value.retryable
    message = str(info.value)
    assert "--allow-lossy-decompress" in message
    assert syntax_name(source_syntax) in message


def test_lossy_jpeg_with_the_flag_decompresses() -> None:
    path = bundled("SC_rgb_jpeg_dcmtk.dcm")
    out = decode(transcode(str(path), EXPLICIT, allow_lossy=True), EXPLICIT)
    source = dcmread(path)
    assert out.pixel_array.shape == source.pixel_array.shape
    assert out.SOPInstanceUID == source.SOPInstanceUID


def test_a_lossy_capable_syntax_marked_lossless_needs_no_flag(tmp_path: Path) -> None:
    # JPEG 2000 (4.91) may be lossy; LossyImageCompression "00" says this one is not.
    ds = dcmread(bundled("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEG2000
    ds.LossyImageCompression = "00"
    marked = tmp_path / "marked.dcm"
    ds.save_as(marked, enforce_file_format=True)
    out = decode(transcode(str(marked), EXPLICIT, allow_lossy=False), EXPLICIT)
    assert np.array_equal(out.pixel_array, dcmread(marked).pixel_array)
    del ds.LossyImageCompression
    unmarked = tmp_path / "unmarked.dcm"
    ds.save_as(unmarked, enforce_file_format=True)
    with pytest.raises(SendError, match="allow-lossy-decompress"):
        transcode(str(unmarked), EXPLICIT, allow_lossy=False)


def test_only_uncompressed_targets() -> None:
    with pytest.raises(ValueError, match="uncompressed"):
        transcode(str(bundled("MR_small.dcm")), str(RLELossless), allow_lossy=False)


def test_not_dicom_is_a_permanent_send_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10 + b"not dicom at all")
    with pytest.raises(SendError, match="cannot decode") as info:
        transcode(str(junk), EXPLICIT, allow_lossy=False)
    assert not info.value.retryable


def test_undecodable_pixel_data_is_a_permanent_send_error(tmp_path: Path) -> None:
    ds = dcmread(bundled("MR_small_RLE.dcm"))
    data = bytearray(ds.PixelData)
    # Keep the basic offset table and item structure, wreck the RLE segment header.
    first_fragment = 8 + int.from_bytes(data[4:8], "little") + 8
    data[first_fragment : first_fragment + 64] = b"\xff" * 64
    ds.PixelData = bytes(data)
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(SendError, match="cannot convert") as info:
        transcode(str(broken), EXPLICIT, allow_lossy=False)
    assert not info.value.retryable
    assert "RLE Lossless" in str(info.value)


def test_syntax_name() -> None:
    assert syntax_name(str(RLELossless)) == f"RLE Lossless ({RLELossless})"
    assert syntax_name("1.2.3.4") == "1.2.3.4"


# -- what counts as possibly lossy: everything not known to be lossless ----------------------


def test_the_lossless_list_agrees_with_pydicom_s_names() -> None:
    """Every syntax pydicom names lossless (not near-lossless) is in the list, and nothing
    pydicom knows as possibly lossy is."""
    from pydicom.uid import AllTransferSyntaxes

    from forwarder.dicom.transcode import LOSSLESS_SYNTAXES

    for uid in AllTransferSyntaxes:
        name = uid.name
        if not uid.is_compressed:
            continue
        lossless = ("Lossless" in name and "Near" not in name) or "Uncompressed" in name
        lossless |= "PCM" in name
        assert (uid in LOSSLESS_SYNTAXES) == lossless, name
        assert possibly_lossy(uid) != lossless, name
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"):
        assert not possibly_lossy(uid)


def with_syntax(data: bytes, syntax: str) -> bytes:
    """A Part 10 file's bytes with another Transfer Syntax UID in its meta header (pydicom
    refuses to write syntaxes it does not know)."""
    at = data.index(b"\x02\x00\x10\x00UI")
    (length,) = struct.unpack_from("<H", data, at + 6)
    value = syntax.encode() + b"\0" * (len(syntax) % 2)
    out = bytearray(
        data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length :]
    )
    group_length_at = data.index(b"\x02\x00\x00\x00UL") + 8
    (group_length,) = struct.unpack_from("<I", out, group_length_at)
    struct.pack_into("<I", out, group_length_at, group_length + len(value) - length)
    return bytes(out)


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component (may be lossy)
        "1.2.840.10008.1.2.4.112",  # JPEG XL
        "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG recompression: a lossy JPEG's pixels
        "1.2.840.10008.1.2.4.53",  # a retired lossy JPEG process
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.999.1",  # a syntax forwarder does not know
    ],
)
def test_a_syntax_not_known_to_be_lossless_needs_the_flag(tmp_path: Path, syntax: str) -> None:
    path = tmp_path / "relabelled.dcm"
    path.write_bytes(with_syntax(bundled("MR_small_jp2klossless.dcm").read_bytes(), syntax))
    assert str(dcmread(path).file_meta.TransferSyntaxUID) == syntax
    assert possibly_lossy(syntax)
    with pytest.raises(SendError, match="possibly lossy; decompressing it needs --allow-lossy"):
        transcode(str(path), EXPLICIT, allow_lossy=False)


def test_a_decoder_failure_is_one_line_and_pydicom_stays_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """libjpeg cannot decode JPEG-lossy.dcm: pydicom logs an ERROR with a traceback before it
    raises; the user sees only forwarder's one-line reason, and pydicom's level is restored."""
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SendError, match="cannot convert JPEG Extended") as info:
        transcode(str(bundled("JPEG-lossy.dcm")), EXPLICIT, allow_lossy=True)
    assert "\n" not in str(info.value)
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    assert pydicom_logger.level == level
