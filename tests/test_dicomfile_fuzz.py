"""Property tests: whatever the bytes, the meta reader, the scanner and the uncompressed
converters raise nothing but their own errors (InvalidFileError; UnconvertibleError)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from forwarder.dicom.check import check_file, scan_file
from forwarder.dicom.part10 import parse_meta, read_meta
from forwarder.dicom.reencode import (
    UnconvertibleError,
    big_to_little_endian,
    reencode_little_endian,
)
from forwarder.errors import InvalidFileError

SEEDS = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",  # encapsulated
    "rtplan.dcm",  # implicit VR, nested sequences
    "reportsi.dcm",  # deep sequences
    "image_dfl.dcm",  # deflated
    "SC_rgb_small_odd_big_endian.dcm",
]
SEED_BYTES = {name: Path(str(get_testdata_file(name))).read_bytes() for name in SEEDS}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WANT = {0x00080060: "Modality", 0x00280010: "Rows", 0x0020000D: "StudyInstanceUID"}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "fuzz.dcm"


def check_bytes(path: Path, data: bytes) -> None:
    """check_file and scan_file on ``data``: they may accept it or raise InvalidFileError."""
    path.write_bytes(data)
    try:
        meta = read_meta(path)
    except InvalidFileError:
        return
    for call in (lambda: check_file(path), lambda: scan_file(path, meta, WANT)):
        try:
            call()
        except InvalidFileError:
            pass


@FUZZ
@given(st.binary(max_size=600))
def test_parse_meta_on_arbitrary_bytes(data: bytes) -> None:
    for head in (data, b"\x00" * 128 + b"DICM" + data):
        try:
            parse_meta(head, len(head))
        except InvalidFileError:
            pass


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(SEEDS))
def test_scan_of_arbitrary_data_sets_after_a_real_header(
    scratch: Path, data: bytes, name: str
) -> None:
    real = SEED_BYTES[name]
    offset = parse_meta(real, len(real)).dataset_offset
    check_bytes(scratch, real[:offset] + data)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_real_files_truncated_anywhere(scratch: Path, name: str, data: st.DataObject) -> None:
    real = SEED_BYTES[name]
    cut = data.draw(st.integers(min_value=0, max_value=len(real)))
    check_bytes(scratch, real[:cut])


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_real_files_with_flipped_bytes(scratch: Path, name: str, data: st.DataObject) -> None:
    real = bytearray(SEED_BYTES[name])
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(real) - 1), st.integers(1, 255)), min_size=1, max_size=6
        )
    )
    for at, mask in flips:
        real[at] ^= mask
    check_bytes(scratch, bytes(real))


@FUZZ
@given(st.binary(max_size=1500), st.booleans(), st.booleans())
def test_converters_on_arbitrary_bytes(data: bytes, implicit: bool, to_implicit: bool) -> None:
    for convert in (
        lambda: big_to_little_endian(data),
        lambda: reencode_little_endian(data, implicit, to_implicit),
    ):
        try:
            convert()
        except UnconvertibleError:
            pass


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_converters_on_damaged_real_data_sets(name: str, data: st.DataObject) -> None:
    real = SEED_BYTES[name]
    dataset = bytearray(real[parse_meta(real, len(real)).dataset_offset :])
    for at in data.draw(st.lists(st.integers(0, len(dataset) - 1), max_size=4)):
        dataset[at] ^= 0xFF
    cut = data.draw(st.integers(0, len(dataset)))
    for convert in (
        lambda: big_to_little_endian(bytes(dataset[:cut])),
        lambda: reencode_little_endian(bytes(dataset[:cut]), True, False),
        lambda: reencode_little_endian(bytes(dataset[:cut]), False, True),
    ):
        try:
            convert()
        except UnconvertibleError:
            pass


def test_the_seeds_are_valid() -> None:
    for name in SEEDS:
        path = get_testdata_file(name)
        assert path is not None and os.path.isfile(path)
        check_file(path)
