"""The decompression fallback (``forwarder.transcode``) on pydicom's bundled test files."""

from __future__ import annotations

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

from forwarder.errors import SendError
from forwarder.transcode import LOSSY_SYNTAXES, syntax_name, transcode

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
    assert source_syntax in LOSSY_SYNTAXES
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
