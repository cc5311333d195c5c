"""The one whole-file check (``check_file``/``scan_file``) against DCMTK's verdicts on every file
pydicom ships, and on hand-made files: deflated data sets, the data set's own SOP UIDs, pixel
data that does not match the transfer syntax."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from conftest import wait_until
from dicomgen import make_dataset
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from forwarder.dicom.check import MAX_INFLATED, check_file, check_file_values, inflate, scan_file
from forwarder.dicom.part10 import FileMeta, read_meta
from forwarder.errors import InvalidFileError

MODALITY, ROWS = 0x00080060, 0x00280010

#: What DCMTK 3.6.7's dcmsend does with each pydicom file it refuses, sent to a local storescp
#: (``storescp +xa``; same verdicts with its default uncompressed-only configuration): the words
#: our reason must contain. Every other Part 10 file pydicom ships was delivered by dcmsend
#: (or failed on dcmsend's side only: rtdose_rle*.dcm, which it mis-decompresses) and must pass.
DCMTK_REFUSES = {
    # "Cannot send SOP instance, missing information: SOP Class UID / SOP Instance UID"
    "chrSQEncoding.dcm": "no SOP Class UID (0008,0016) and no SOP Instance UID (0008,0018)",
    "chrSQEncoding1.dcm": "no SOP Class UID (0008,0016) and no SOP Instance UID (0008,0018)",
    "UN_sequence.dcm": "no SOP Class UID (0008,0016) and no SOP Instance UID (0008,0018)",
    "no_meta_group_length.dcm": "no SOP Class UID (0008,0016)",
    "priv_SQ.dcm": "no SOP Class UID (0008,0016) and no SOP Instance UID (0008,0018)",
    # "PixelData (7fe0,0010) larger (8192) than remaining bytes in file"
    "MR_truncated.dcm": "truncated: element (7FE0,0010) claims 8192 bytes",
    # "IsocenterPosition (300a,012c) larger (50) than remaining bytes (29)"
    "rtplan_truncated.dcm": "truncated: element (300A,00B0)",
    # "Non-standard VR '  ' (18\00) encountered while parsing element (0008,0008)": an implicit
    # VR data set under a meta header that says JPEG Baseline (explicit VR little endian)
    "SC_rgb_jpeg.dcm": "the data set looks implicit VR",
    # "bad DICOM file: Invalid SOP Class UID" (no storage SOP class; media directories)
    "DICOMDIR": "no SOP Class UID (0008,0016)",
    "DICOMDIR-bigEnd": "no SOP Class UID (0008,0016)",
    "DICOMDIR-empty.dcm": "no SOP Class UID (0008,0016)",
    "DICOMDIR-implicit": "no SOP Class UID (0008,0016)",
    "DICOMDIR-nooffset": "truncated: an item claims 248 bytes",
    "DICOMDIR-nopatient": "no SOP Class UID (0008,0016)",
    "DICOMDIR-reordered": "no SOP Class UID (0008,0016)",
    "empty_charset_LEI.dcm": "lacks MediaStorageSOPClassUID",
    "meta_missing_tsyntax.dcm": "lacks MediaStorageSOPClassUID",
    "nested_priv_SQ.dcm": "lacks MediaStorageSOPClassUID",
}


def part10_files() -> list[str]:
    found = []
    for path in sorted(get_testdata_files() + get_charset_files()):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


PART10 = part10_files()


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path))


@pytest.mark.parametrize("path", PART10, ids=lambda p: p.split("/data/")[-1])
def test_every_pydicom_file_gets_dcmtk_s_verdict(path: str) -> None:
    words = DCMTK_REFUSES.get(os.path.basename(path))
    if words is None:
        meta = check_file(path)
        assert meta == FileMeta(
            meta.sop_class_uid,
            meta.sop_instance_uid,
            read_meta(path).transfer_syntax,
            read_meta(path).dataset_offset,
            os.path.getsize(path),
        )
    else:
        with pytest.raises(InvalidFileError) as info:
            check_file(path)
        assert words in info.value.reason
        assert info.value.path == path


_ALL_VALUES = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "Study"}


def _scan_verdict(path: str, data: bytes | None) -> tuple[str, object]:
    try:
        meta = read_meta(path)
    except InvalidFileError as exc:
        return "meta", exc.reason
    try:
        return "ok", scan_file(path, meta, _ALL_VALUES, data=data)
    except InvalidFileError as exc:
        return "refused", exc.reason


@pytest.mark.parametrize("path", PART10, ids=lambda p: p.split("/data/")[-1])
def test_the_in_memory_walk_gives_the_file_walk_s_verdict(path: str, tmp_path: Path) -> None:
    """A receiver walks the bytes it just wrote instead of reading the file back: the same
    verdict and values as the file itself, whole and cut short."""
    data = Path(path).read_bytes()
    assert _scan_verdict(path, data) == _scan_verdict(path, None)
    cut = tmp_path / "cut.dcm"
    for n in (len(data) - 1, len(data) * 2 // 3):
        cut.write_bytes(data[:n])
        assert _scan_verdict(str(cut), data[:n]) == _scan_verdict(str(cut), None), n


def test_the_table_covers_the_files() -> None:
    names = {os.path.basename(p) for p in PART10}
    assert set(DCMTK_REFUSES) <= names
    assert len(PART10) > 170


# -- the data set's own SOP UIDs -------------------------------------------------------------


def to_bytes(ds: pydicom.Dataset, *, enforce: bool = True) -> bytes:
    buf = io.BytesIO()
    if not enforce:
        ds.preamble = b"\x00" * 128
    ds.save_as(buf, enforce_file_format=enforce)
    return buf.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "f.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("remove", "words"),
    [
        (("SOPInstanceUID",), "the data set has no SOP Instance UID (0008,0018) at its top level"),
        (("SOPClassUID",), "the data set has no SOP Class UID (0008,0016) at its top level"),
        (("SOPClassUID", "SOPInstanceUID"), "no SOP Class UID (0008,0016) and no SOP Instance"),
    ],
)
def test_a_data_set_without_its_own_sop_uids_is_refused(
    tmp_path: Path, syntax: str, remove: tuple[str, ...], words: str
) -> None:
    ds = make_dataset(rows=4, columns=4, transfer_syntax=syntax)
    for keyword in remove:
        delattr(ds, keyword)
    path = write(tmp_path, to_bytes(ds, enforce=False))
    read_meta(path)  # the meta header alone is fine
    with pytest.raises(InvalidFileError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_file(path)
    with pytest.raises(InvalidFileError, match="the data set has no"):
        scan_file(path, read_meta(path))


def test_sop_uids_in_a_nested_item_do_not_count(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    item = pydicom.Dataset()
    item.SOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = pydicom.Sequence([item])
    del ds.SOPInstanceUID
    with pytest.raises(InvalidFileError, match="no SOP Instance UID"):
        check_file(write(tmp_path, to_bytes(ds, enforce=False)))


def test_an_invalid_sop_instance_uid_in_the_data_set_is_refused(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    uid = str(ds.SOPInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID too
        ds.SOPInstanceUID = "1.2.abc"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = write(tmp_path, to_bytes(ds, enforce=False))
    with pytest.raises(InvalidFileError, match=r"invalid SOP Instance UID '1\.2\.abc'"):
        check_file(path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_check_file_returns_the_data_set_s_uids(tmp_path: Path, syntax: str) -> None:
    ds = make_dataset(rows=4, columns=4)
    ds.file_meta.TransferSyntaxUID = syntax
    real = str(ds.SOPInstanceUID)
    # a stale meta header, and a long private element first: read_meta alone cannot see it
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.add_new(0x00050010, "LO", "CREATOR")  # group 0005 comes before group 0008
    ds.add_new(0x00051000, "OB", b"\x00" * 70000)
    path = write(tmp_path, to_bytes(ds, enforce=False))
    meta = check_file(path)
    assert (meta.sop_class_uid, meta.sop_instance_uid) == (str(ds.SOPClassUID), real)
    assert read_meta(path).sop_instance_uid == "1.2.3.4"  # what the header alone says


# -- deflated data sets ----------------------------------------------------------------------


def deflated(ds: pydicom.Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return to_bytes(ds)


def test_the_odd_length_deflated_file_passes_with_its_values() -> None:
    path = bundled("image_dfl.dcm")
    meta = read_meta(path)
    assert meta.dataset_length == 4303  # odd: the sender pads it on the wire
    ds = pydicom.dcmread(path)
    assert scan_file(path, meta, {MODALITY: "Modality", ROWS: "Rows"}) == {
        "Modality": ds.Modality,
        "Rows": str(ds.Rows),
    }
    assert check_file(path).sop_instance_uid == ds.SOPInstanceUID


def test_the_gzip_trailer_of_image_dfl_is_checked(tmp_path: Path) -> None:
    data = bundled("image_dfl.dcm").read_bytes()
    meta = read_meta(bundled("image_dfl.dcm"))
    inflated = zlib.decompress(data[meta.dataset_offset :], -15)
    trailer = struct.pack("<II", zlib.crc32(inflated), len(inflated))
    assert data.endswith(trailer)  # CRC-32 and size after the deflate stream, as gzip writes
    broken = data[:-8] + struct.pack("<II", zlib.crc32(inflated) ^ 1, len(inflated))
    with pytest.raises(InvalidFileError, match="unexpected bytes after the end"):
        check_file(write(tmp_path, broken))
    check_file(write(tmp_path, data[:-8], "no-trailer.dcm"))
    check_file(write(tmp_path, data[:-8] + b"\x00", "padded.dcm"))


def test_a_deflated_data_set_is_walked_like_any_other(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4, modality="MR")
    path = write(tmp_path, deflated(ds))
    assert scan_file(path, read_meta(path), {MODALITY: "Modality"}) == {"Modality": "MR"}
    # inflated content that is itself truncated: the walk finds it
    meta = read_meta(path)
    data = path.read_bytes()
    inner = zlib.decompress(data[meta.dataset_offset :], -15)
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    cut = packer.compress(inner[:-5]) + packer.flush()
    with pytest.raises(InvalidFileError, match="truncated: element"):
        check_file(write(tmp_path, data[: meta.dataset_offset] + cut, "cut.dcm"))


def test_a_deflated_data_set_without_sop_uids_is_refused(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    del ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with pytest.raises(InvalidFileError, match=r"no SOP Instance UID \(0008,0018\)"):
        check_file(write(tmp_path, to_bytes(ds, enforce=False)))


@pytest.mark.parametrize("cut", [3, 20, 200])  # pydicom may pad the stream with one zero
def test_a_truncated_deflate_stream_is_refused(tmp_path: Path, cut: int) -> None:
    data = deflated(make_dataset(rows=16, columns=16, seed=4))
    with pytest.raises(InvalidFileError, match=r"truncated|corrupt"):
        check_file(write(tmp_path, data[:-cut]))


def test_a_corrupt_deflate_stream_is_refused(tmp_path: Path) -> None:
    data = bytearray(deflated(make_dataset(rows=16, columns=16, seed=5)))
    offset = read_meta(write(tmp_path, bytes(data))).dataset_offset
    data[offset : offset + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(InvalidFileError, match="corrupt"):
        check_file(write(tmp_path, bytes(data), "corrupt.dcm"))


def test_garbage_after_the_deflate_stream_is_refused(tmp_path: Path) -> None:
    data = deflated(make_dataset(rows=4, columns=4))
    with pytest.raises(InvalidFileError, match="unexpected bytes after the end"):
        check_file(write(tmp_path, data + b"junk"))


def test_inflation_is_bounded(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    ds.add_new(0x00420011, "OB", b"\x00" * 2_000_000)  # 2 MB of zeros: deflates to 2 KB
    path = write(tmp_path, deflated(ds))
    meta = read_meta(path)
    assert meta.size < 20_000
    with open(path, "rb") as f, pytest.raises(InvalidFileError, match="inflates to more than 1"):
        inflate(f, str(path), meta.dataset_offset, limit=1024 * 1024)
    with open(path, "rb") as f:
        assert len(inflate(f, str(path), meta.dataset_offset)) > 2_000_000
    assert MAX_INFLATED >= 64 * 1024 * 1024


# -- bytes that do not match the transfer syntax ---------------------------------------------


def rewrap(source: Path, syntax: str) -> bytes:
    """The data set of ``source`` under a new meta header naming ``syntax``."""
    ds = pydicom.dcmread(source)
    meta = read_meta(source)
    elements = b""
    for elem, vr, value in (
        (0x0001, b"OB", b"\x00\x01"),
        (0x0002, b"UI", str(ds.SOPClassUID).encode()),
        (0x0003, b"UI", str(ds.SOPInstanceUID).encode()),
        (0x0010, b"UI", syntax.encode()),
    ):
        value += b"\x00" * (len(value) & 1)
        if vr == b"OB":
            elements += struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
        else:
            elements += struct.pack("<HH2sH", 2, elem, vr, len(value)) + value
    group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(elements))
    return (
        b"\x00" * 128
        + b"DICM"
        + group_length
        + elements
        + source.read_bytes()[meta.dataset_offset :]
    )


def test_encapsulated_pixel_data_under_a_native_syntax_is_refused(tmp_path: Path) -> None:
    data = rewrap(bundled("MR_small_RLE.dcm"), ExplicitVRLittleEndian)
    with pytest.raises(InvalidFileError, match=r"Pixel Data \(7FE0,0010\) is encapsulated"):
        check_file(write(tmp_path, data))


def test_native_pixel_data_under_a_compressed_syntax_is_refused(tmp_path: Path) -> None:
    data = rewrap(bundled("MR_small.dcm"), RLELossless)
    with pytest.raises(InvalidFileError, match=r"Pixel Data \(7FE0,0010\) is native"):
        check_file(write(tmp_path, data))


def test_the_rewrapped_files_are_fine_under_their_own_syntax(tmp_path: Path) -> None:
    check_file(write(tmp_path, rewrap(bundled("MR_small_RLE.dcm"), RLELossless)))
    check_file(write(tmp_path, rewrap(bundled("MR_small.dcm"), ExplicitVRLittleEndian), "b.dcm"))


def test_an_explicit_vr_data_set_under_an_implicit_header_is_refused(tmp_path: Path) -> None:
    data = rewrap(bundled("CT_small.dcm"), ImplicitVRLittleEndian)
    with pytest.raises(InvalidFileError, match="the data set looks explicit VR"):
        check_file(write(tmp_path, data))


def test_an_unknown_syntax_s_pixel_data_is_not_judged(tmp_path: Path) -> None:
    check_file(write(tmp_path, rewrap(bundled("MR_small.dcm"), "1.2.3.4.5")))


def test_odd_value_lengths_are_accepted_as_dcmtk_accepts_them(tmp_path: Path) -> None:
    """DCMTK reads an odd-length element with a warning and dcmsend delivers the file."""
    data = bytearray(bundled("CT_small.dcm").read_bytes())
    at = data.index(b"\x10\x00\x10\x00PN")
    (length,) = struct.unpack_from("<H", data, at + 6)
    struct.pack_into("<H", data, at + 6, length - 1)
    del data[at + 8 + length - 1]
    assert check_file(write(tmp_path, bytes(data))).transfer_syntax == ExplicitVRLittleEndian


def test_scan_file_still_returns_wanted_sop_uids() -> None:
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    want = {0x00080018: "SOPInstanceUID", 0x00080016: "SOPClassUID", MODALITY: "Modality"}
    assert scan_file(path, read_meta(path), want) == {
        "SOPInstanceUID": ds.SOPInstanceUID,
        "SOPClassUID": ds.SOPClassUID,
        "Modality": ds.Modality,
    }


# -- implicit VR: which values are sequences -------------------------------------------------

#: The bytes of an item tag (FFFE,E000) followed by a length far past the value.
ITEM_LOOKALIKE = struct.pack("<HHI", 0xFFFE, 0xE000, 0x100)


def implicit_image(rows: int) -> pydicom.Dataset:
    """A valid implicit VR image whose 16-bit pixels start with 0xFFFE, 0xE000, 0x0100, 0."""
    ds = make_dataset(rows=rows, columns=rows, transfer_syntax=ImplicitVRLittleEndian)
    pixels = bytearray(ds.PixelData)
    pixels[:8] = ITEM_LOOKALIKE
    ds.PixelData = bytes(pixels)
    return ds


@pytest.mark.parametrize("rows", [64, 1100], ids=["in-memory", "big-file"])
def test_implicit_pixel_data_that_starts_like_an_item_is_pixel_data(
    tmp_path: Path, rows: int
) -> None:
    """Pixel Data is never a sequence, whatever its first bytes: the file is valid."""
    path = write(tmp_path, to_bytes(implicit_image(rows)))
    decoded = pydicom.dcmread(path)
    assert decoded.pixel_array[0, :4].tolist() == [0xFFFE, 0xE000, 0x0100, 0]
    assert path.stat().st_size > 2 * 1024 * 1024 or rows == 64
    meta = check_file(path)
    assert (meta.sop_instance_uid, meta.transfer_syntax) == (
        decoded.SOPInstanceUID,
        ImplicitVRLittleEndian,
    )


@pytest.mark.parametrize("rows", [64, 1100], ids=["in-memory", "big-file"])
def test_private_binary_data_that_starts_like_an_item_is_a_value(tmp_path: Path, rows: int) -> None:
    """A private tag the dictionary does not know, holding bytes that start with an item tag
    but do not parse as items, is an opaque value, not a broken sequence."""
    ds = make_dataset(rows=rows, columns=rows, transfer_syntax=ImplicitVRLittleEndian)
    block = ds.private_block(0x0009, "FORWARDER TEST", create=True)
    block.add_new(0x10, "OB", ITEM_LOOKALIKE + bytes(range(24)))
    path = write(tmp_path, to_bytes(ds))
    assert pydicom.dcmread(path)[0x00091010].value[:8] == ITEM_LOOKALIKE
    assert check_file(path).sop_instance_uid == ds.SOPInstanceUID


def test_an_implicit_private_sequence_is_still_walked(tmp_path: Path) -> None:
    """A private tag whose value parses as items is a sequence: walked, and the file passes."""
    ds = make_dataset(transfer_syntax=ImplicitVRLittleEndian)
    inner = pydicom.Dataset()
    inner.CodeValue = "123"
    block = ds.private_block(0x0009, "FORWARDER TEST", create=True)
    block.add_new(0x10, "SQ", [inner])
    data = to_bytes(ds)
    assert check_file(write(tmp_path, data)).sop_instance_uid == ds.SOPInstanceUID


def test_an_implicit_dictionary_sequence_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    """A tag whose dictionary VR is SQ must hold items: a bad item length is a fault."""
    ds = make_dataset(transfer_syntax=ImplicitVRLittleEndian)
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = [ref]
    data = bytearray(to_bytes(ds))
    at = data.index(struct.pack("<HH", 0x0008, 0x1140))
    (length,) = struct.unpack_from("<I", data, at + 4)
    assert length != 0xFFFFFFFF and data[at + 8 : at + 12] == struct.pack("<HH", 0xFFFE, 0xE000)
    struct.pack_into("<I", data, at + 12, length)  # the item claims more than its sequence
    with pytest.raises(InvalidFileError, match="an item claims"):
        check_file(write(tmp_path, bytes(data)))


# -- big files: read through a window, never mapped -----------------------------------------

#: The scan, as its own process: it opens the file only to scan it (the meta header comes as
#: arguments), so the file being open means the scan has started.
_SCAN = """
import sys
from forwarder.dicom.check import scan_file
from forwarder.dicom.part10 import FileMeta
from forwarder.errors import InvalidFileError

path, syntax, offset, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
meta = FileMeta("1.2", "1.2.3", syntax, offset, size)
try:
    scan_file(path, meta)
    print("accepted")
except InvalidFileError as exc:
    print("refused:", exc.reason)
"""


def has_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_big_file_cut_while_it_is_scanned_is_refused_not_fatal(tmp_path: Path) -> None:
    """A 32 MB file of two million small fragments, cut in half by another program while a
    scan walks it: the scan says truncated (a scan through an mmap dies of SIGBUS, exit -7)."""
    ds = make_dataset(transfer_syntax=ExplicitVRLittleEndian)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = RLELossless
    head = to_bytes(ds)
    fragment = struct.pack("<HHI", 0xFFFE, 0xE000, 8) + bytes(8)
    pixels = (
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + fragment * 2_000_000
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    path = write(tmp_path, head + pixels)
    meta = check_file(path)  # whole, it is valid
    args = [meta.transfer_syntax, str(meta.dataset_offset), str(meta.size)]
    scan = subprocess.Popen(
        [sys.executable, "-c", _SCAN, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: has_open(scan.pid, path) or scan.poll() is not None, interval=0)
        os.truncate(path, meta.size // 2 // 65536 * 65536)  # pages past the end: SIGBUS
        out, err = scan.communicate(timeout=60)
    finally:
        if scan.poll() is None:
            scan.kill()
            scan.wait()
    assert scan.returncode == 0, (scan.returncode, err)
    # "while being checked" when the cut lands mid-walk; on a loaded machine the scan may not
    # have measured the file yet when it is cut, and then it sees a file truncated from the start
    assert out.startswith("refused: truncated"), out


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_big_file_gives_the_same_values_as_a_small_one(tmp_path: Path, syntax: str) -> None:
    """Through the window (a 2.4 MB file, element headers read, values skipped) the wanted
    values and the verdict are those of the whole-buffer path."""
    want = {MODALITY: "Modality", ROWS: "Rows", 0x00080018: "SOPInstanceUID"}
    for rows, name in ((1100, "big.dcm"), (64, "small.dcm")):
        ds = make_dataset(rows=rows, columns=rows, transfer_syntax=syntax)
        ds.ReferencedImageSequence = [pydicom.Dataset()]
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
        path = write(tmp_path, to_bytes(ds), name)
        assert (path.stat().st_size > 2 * 1024 * 1024) == (rows == 1100)
        found = scan_file(path, read_meta(path), want)
        assert found == {"Modality": "CT", "Rows": str(rows), "SOPInstanceUID": ds.SOPInstanceUID}
        cut = write(tmp_path, to_bytes(ds)[:-3], "cut-" + name)
        with pytest.raises(InvalidFileError, match="truncated: element \\(7FE0,0010\\)"):
            check_file(cut)


def test_a_sop_instance_uid_given_twice_is_refused(tmp_path: Path) -> None:
    """dcmdump keeps the first copy of a repeated element, pydicom the last: a PACS could file
    the object under another UID than the one the check (and a receiver's Success) saw."""
    path = tmp_path / "twice.dcm"
    make_dataset(rows=4, columns=4, seed=3).save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x18\x00UI", 132 + 12)  # the data set's, not the meta header's
    decoy = b"\x08\x00\x18\x00UI" + struct.pack("<H", 8) + b"9.9.9.9\x00"
    path.write_bytes(data[:at] + decoy + data[at:])
    with pytest.raises(InvalidFileError) as info:
        check_file(path)
    assert "(0008,0018) appears twice" in info.value.reason


def _ui_element(group: int, element: int, value: str, vr: bytes = b"UI") -> bytes:
    raw = value.encode() + (b"\x00" if vr == b"UI" else b" ") * (len(value) % 2)
    return struct.pack("<HH2sH", group, element, vr, len(raw)) + raw


def _with_meta_after_its_group_length(ds: pydicom.Dataset, extra: bytes) -> bytes:
    """``ds`` as a Part 10 file with ``extra`` (explicit VR little endian group 0002 elements)
    right after the meta elements its group length (0002,0000) counts: a writer that left
    them out of the count."""
    data = to_bytes(ds)
    (length,) = struct.unpack_from("<I", data, 132 + 8)
    end = 132 + 12 + length
    return data[:end] + extra + data[end:]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_meta_elements_past_the_group_length_are_read_as_file_meta(
    tmp_path: Path, syntax: str
) -> None:
    """Group 0002 going on past what (0002,0000) counts (vtk-dicom#158: private meta elements
    left out of the count) is file meta, as pydicom reads it, not the data set's: the file
    passes, and its data set starts where pydicom's does (what `send` and the daemon send)."""
    ds = make_dataset(rows=4, columns=4, seed=5, transfer_syntax=syntax)
    source_ae = _ui_element(0x0002, 0x0016, "MODALITY1", b"AE")
    path = write(tmp_path, _with_meta_after_its_group_length(ds, source_ae))
    meta, _ = check_file_values(path)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    read = pydicom.dcmread(path)
    assert read.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    plain = to_bytes(ds)
    (length,) = struct.unpack_from("<I", plain, 132 + 8)
    assert meta.dataset_offset == 132 + 12 + length + len(source_ae)
    assert path.read_bytes()[meta.dataset_offset :] == plain[132 + 12 + length :]


def test_a_meta_element_repeated_past_the_group_length_with_another_value_is_refused(
    tmp_path: Path,
) -> None:
    """(0002,0010) again past the group length, naming another syntax (fo-dicom once wrote it
    twice): pydicom takes the second, DCMTK the first: which object the file holds depends on
    the reader, so it is refused, naming the element."""
    ds = make_dataset(rows=4, columns=4, seed=6)
    other = _ui_element(0x0002, 0x0010, ExplicitVRBigEndian)
    path = write(tmp_path, _with_meta_after_its_group_length(ds, other))
    with pytest.raises(InvalidFileError) as info:
        check_file(path)
    assert "(0002,0010) appears twice with different values" in info.value.reason


def test_a_meta_element_repeated_with_the_same_value_passes(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4, seed=7)
    same = _ui_element(0x0002, 0x0010, ExplicitVRLittleEndian)
    path = write(tmp_path, _with_meta_after_its_group_length(ds, same))
    meta, _ = check_file_values(path)
    assert meta.transfer_syntax == ExplicitVRLittleEndian


def test_a_meta_element_inside_the_data_set_is_refused(tmp_path: Path) -> None:
    """Group 0002 after the data set's first elements is no file meta to any reader, and no
    data set's either (PS3.10 7.1): refused, naming the element."""
    ds = make_dataset(rows=4, columns=4, seed=8)
    data = to_bytes(ds)
    at = data.index(b"\x08\x00\x18\x00UI", 132 + 12)  # the data set's SOP Instance UID
    stray = _ui_element(0x0002, 0x0010, ExplicitVRBigEndian)
    path = write(tmp_path, data[:at] + stray + data[at:])
    with pytest.raises(InvalidFileError) as info:
        check_file(path)
    assert "File Meta element (0002,0010) in the data set" in info.value.reason
