"""Bad bytes: a corpus of broken DICOM and property tests over the header parser and ingest.

Every broken file must end either queued (it looked valid: it will be sent, and the peer's answer
decides) or in failed/ with a reason; the parser may raise only ``InvalidFileError``, must never
hang, and must not allocate what a length field claims.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest
from badbytes import Broken, corpus, seed_files, walk, with_transfer_syntax
from conftest import wait_until
from daemon import Daemon, destination
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariants import settled_problems
from peers import ScriptedSCP, storescp
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from forwarder.daemon.ingest import Ingest
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool
from forwarder.daemon.watch_settle import ReadyFile
from forwarder.dicom.check import scan_file
from forwarder.dicom.part10 import parse_meta, read_meta
from forwarder.errors import InvalidFileError
from forwarder.queue import Queue

pytestmark = pytest.mark.faults

WANT = {0x00080060: "Modality", 0x00081010: "StationName", 0x00100010: "PatientName"}
PROPERTY = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    derandomize=True,  # the same examples in every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(path: Path) -> str | None:
    """What read_meta + scan_file make of a file: None if accepted, else the reason."""
    try:
        meta = read_meta(path)
        scan_file(path, meta, WANT)
    except InvalidFileError as exc:
        assert exc.reason, "an InvalidFileError must say why"
        return exc.reason
    return None


@pytest.fixture(scope="module")
def the_corpus() -> list[Broken]:
    return corpus()


# -- the corpus against the parser ------------------------------------------------------------


def test_the_walker_understands_every_seed() -> None:
    """The corpus is only as good as its walker: it must account for every byte of each seed,
    and the parser must accept every seed."""
    for name, data in seed_files().items():
        layout = walk(data)
        assert layout.nodes, name
        meta = parse_meta(data, len(data))
        assert meta.dataset_offset == layout.dataset_offset, name


def test_corpus_never_crashes_the_parser_and_what_must_be_rejected_is(
    the_corpus: list[Broken], tmp_path: Path
) -> None:
    crashes: list[str] = []
    accepted: list[str] = []
    slow: list[str] = []
    checked = 0
    for b in the_corpus:
        path = tmp_path / b.name
        path.write_bytes(b.data)
        started = time.monotonic()
        try:
            reason = check(path)
        except Exception as exc:
            crashes.append(f"{b.name} ({b.what}): {type(exc).__name__}: {exc}")
            continue
        finally:
            if time.monotonic() - started > 1.0:
                slow.append(b.name)
            path.unlink()
        checked += 1
        if b.must_reject and reason is None:
            accepted.append(f"{b.name} ({b.what})")
    assert checked > 2000
    assert not crashes, "the parser raised something else than InvalidFileError:\n" + "\n".join(
        crashes[:20]
    )
    assert not accepted, "broken files the parser took for valid:\n" + "\n".join(accepted[:20])
    assert not slow, f"files that took over a second to check: {slow[:10]}"


def test_a_file_cut_inside_a_long_meta_header_is_rejected(tmp_path: Path) -> None:
    data = seed_files()["explicit-undef"]
    # (0002,0000) UL is 12 bytes from 132; (0002,0001) OB starts at 144 with a 12-byte header
    for cut in range(152, 156):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidFileError):
            read_meta(path)


def test_a_length_past_the_end_inside_a_defined_length_sequence_is_rejected(
    tmp_path: Path,
) -> None:
    data = seed_files()["explicit-defined"]
    layout = walk(data)
    item = next(n for n in layout.nodes if n.kind == "item" and n.opaque)
    broken = bytearray(data)
    struct.pack_into("<I", broken, item.offset + 4, 0xFFFFFFF0)
    path = tmp_path / "x.dcm"
    path.write_bytes(bytes(broken))
    assert check(path) is not None


def test_huge_lengths_allocate_nothing(tmp_path: Path) -> None:
    """Lengths of ~4 GB in the meta header and the data set: rejected without allocating."""
    data = seed_files()["rle"]
    layout = walk(data)
    victims = [n for n in layout.nodes if n.header == 12 or n.kind == "item"]
    paths = []
    for i, n in enumerate(victims):
        broken = bytearray(data)
        struct.pack_into("<I", broken, n.offset + (8 if n.header == 12 else 4), 0xFFFFFFF0)
        path = tmp_path / f"huge{i}.dcm"
        path.write_bytes(bytes(broken))
        paths.append(path)
    tracemalloc.start()
    try:
        for path in paths:
            assert check(path) is not None, path.name
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"checking {len(paths)} small files peaked at {peak} bytes"


def test_a_big_file_is_scanned_through_a_window_without_reading_it_into_memory(
    tmp_path: Path,
) -> None:
    """A 24 MB file whose last element is cut: found, with memory flat (one 64 KiB window)."""
    ds = _dataset(ExplicitVRLittleEndian)
    ds.Rows, ds.Columns = 2048, 2048
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(2048 * 2048 * 2 * 3)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = tmp_path / "big.dcm"
    path.write_bytes(buf.getvalue()[:-10])
    del buf
    tracemalloc.start()
    try:
        reason = check(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason is not None and "truncated" in reason
    assert peak < 4 * 1024 * 1024, f"scanning a 24 MB file peaked at {peak} bytes"


def test_deep_nesting_and_endless_items_are_bounded(tmp_path: Path) -> None:
    """Sequences nested 1,000 deep and a sequence of 200,000 empty items: an answer, quickly."""
    head = parse_meta_bytes()
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    deep = head + (sq + item) * 1000
    empty = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    wide = head + sq + empty * 200_000 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    for name, data in (("deep", deep), ("wide", wide)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        started = time.monotonic()
        reason = check(path)
        assert time.monotonic() - started < 2.0, name
        if name == "deep":
            assert reason is not None and "deeper" in reason


def parse_meta_bytes() -> bytes:
    """Preamble + a minimal valid meta header (explicit VR little endian)."""
    data = seed_files()["explicit-undef"]
    return data[: walk(data).dataset_offset]


# -- property tests ---------------------------------------------------------------------------

_VRS = [b"UL", b"OB", b"UI", b"SH", b"AE", b"UN", b"SQ", b"OB", b"UI", b"xx", b"\0\0"]
_LIES = [None] * 8 + [0, 0xFFFF, 0xFFFFFFFF, 1]


@st.composite
def meta_headers(draw: st.DrawFn) -> bytes:
    """A preamble and a group 0002 of random elements, lengths that may lie, random tails."""
    out = bytearray(draw(st.sampled_from([bytes(128), b"\xff" * 128])))
    out += draw(st.sampled_from([b"DICM"] * 6 + [b"DICN", b""]))
    starts = []
    for _ in range(draw(st.integers(0, 8))):
        starts.append(len(out))
        elem = draw(st.sampled_from([0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0012, 0x0100]))
        group = draw(st.sampled_from([0x0002] * 6 + [0x0008, 0xFFFE]))
        vr = draw(st.sampled_from(_VRS))
        value = draw(st.binary(max_size=80))
        lie = draw(st.sampled_from(_LIES))
        length = len(value) if lie is None else lie
        out += struct.pack("<HH", group, elem) + vr
        if vr in (b"OB", b"UN", b"SQ"):
            out += b"\0\0" + struct.pack("<I", length & 0xFFFFFFFF)
        else:
            out += struct.pack("<H", length & 0xFFFF)
        out += value
    out += draw(st.binary(max_size=64))
    if starts and draw(st.booleans()):
        # the file ends somewhere in the first bytes of an element: inside its header
        cut = draw(st.sampled_from(starts[:2])) + draw(st.integers(6, 12))
        return bytes(out[:cut])
    return bytes(out)


@PROPERTY
@given(meta_headers())
def test_parse_meta_raises_only_invalid_file_error(head: bytes) -> None:
    try:
        meta = parse_meta(head, len(head))
    except InvalidFileError:
        return
    assert meta.sop_class_uid and meta.sop_instance_uid and meta.transfer_syntax
    assert 132 < meta.dataset_offset <= len(head)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid seed file with random damage that keeps the meta header's length (overwritten
    bytes, bytes inserted or deleted in the data set, a length field set to anything)."""
    seeds = _SEEDS
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    layout = _LAYOUTS[name]
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["overwrite", "insert", "delete", "length"]))
        at = draw(st.integers(132, len(data) - 1))
        if how == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            node = draw(st.sampled_from(layout.nodes))
            length = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF]))
            if node.header == 12 and node.offset + 12 <= len(data):
                struct.pack_into("<I", data, node.offset + 8, length)
            elif node.offset + 8 <= len(data):
                struct.pack_into("<H", data, node.offset + 6, length & 0xFFFF)
    return bytes(data)


_SEEDS = seed_files()
_LAYOUTS = {name: walk(data) for name, data in _SEEDS.items()}


@PROPERTY
@given(mutated())
def test_scan_file_raises_only_invalid_file_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "mutated.dcm"
    path.write_bytes(data)
    started = time.monotonic()
    check(path)  # returns, or raises InvalidFileError: anything else fails the test
    assert time.monotonic() - started < 1.0


# Values valid for their VR (pydicom warns about others, and warnings are errors here).
_CS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ", max_size=16).map(str.strip)
_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
    max_size=16,
).map(str.strip)


@st.composite
def valid_datasets(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """Valid files pydicom writes: random values, random nested sequences of defined or
    undefined length, explicit or implicit VR. Returns the bytes and the expected values."""
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ds = _dataset(syntax)
    expected = {}
    for keyword, strategy in (("Modality", _CS), ("StationName", _TEXT)):
        value = draw(strategy)
        setattr(ds, keyword, value)
        expected[keyword] = value
    ds.PatientName = draw(_CS)

    def items(depth: int) -> list[Dataset]:
        out = []
        for _ in range(draw(st.integers(0, 3))):
            item = Dataset()
            item.CodeValue = draw(_TEXT)
            item.CodeMeaning = draw(_TEXT)
            if depth < 3 and draw(st.booleans()):
                item.PurposeOfReferenceCodeSequence = items(depth + 1)
                item["PurposeOfReferenceCodeSequence"].is_undefined_length = draw(st.booleans())
            item.is_undefined_length_sequence_item = draw(st.booleans())
            out.append(item)
        return out

    if draw(st.booleans()):
        ds.AnatomicRegionSequence = items(0)
        ds["AnatomicRegionSequence"].is_undefined_length = draw(st.booleans())
    ds.BitsAllocated = 8  # resolves the OB/OW ambiguity of Pixel Data in implicit VR
    ds.PixelData = draw(st.binary(max_size=64).map(lambda b: b + b"\0" * (len(b) % 2)))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    expected["PatientName"] = str(ds.PatientName)
    return buf.getvalue(), expected


def _dataset(syntax: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.6.1000"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    return ds


@PROPERTY
@given(valid_datasets())
def test_valid_files_are_accepted_with_their_values(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[bytes, dict[str, str]]
) -> None:
    data, expected = case
    path = tmp_path_factory.getbasetemp() / "valid.dcm"
    path.write_bytes(data)
    meta = read_meta(path)
    assert meta.sop_instance_uid == "1.2.826.0.1.3680043.10.6.1000"
    values = scan_file(path, meta, WANT)
    for keyword, value in expected.items():
        assert values.get(keyword, "") == value, keyword


# -- ingest of the corpus ---------------------------------------------------------------------


def test_ingest_queues_or_fails_every_corpus_file(the_corpus: list[Broken], tmp_path: Path) -> None:
    """Ingest (the watcher's callback) on the corpus, in batches as the watcher makes them:
    each file is queued, or in failed/ with a NAME.error.json that gives a reason; none is left
    behind in incoming, none vanishes."""
    incoming, done, failed = tmp_path / "in", tmp_path / "done", tmp_path / "failed"
    rng = random.Random(6)
    sample = rng.sample(the_corpus, 400)
    with Queue(tmp_path / "q.sqlite") as queue:
        ingest = Ingest(Spool(incoming, done, failed), queue, Router(None, ["pacs"]))
        ready = []
        for b in sample:
            path = incoming / f"{b.name}.dcm"
            path.write_bytes(b.data)
            st_ = path.stat()
            ready.append(ReadyFile(path, path.name, st_.st_size, st_.st_mtime_ns))
        for start in range(0, len(ready), 100):
            ingest(ready[start : start + 100])
        queued = {Path(p).name for p in queue.active_files()}
    rejected = {p.name for p in failed.iterdir() if not p.name.endswith(".error.json")}
    left = {p.name for p in incoming.iterdir()} - queued
    assert not left, f"files neither queued nor failed: {sorted(left)[:10]}"
    assert len(queued) + len(rejected) == len(sample)
    for b in sample:
        name = f"{b.name}.dcm"
        if b.must_reject:
            assert name in rejected, f"{b.what}: queued, but it is broken"
        if name in rejected:
            doc = json.loads((failed / f"{name}.error.json").read_text())
            assert doc["reason"].startswith("not usable DICOM: "), doc
            assert doc["file"] == name


# -- the daemon on the corpus -----------------------------------------------------------------


def test_the_daemon_puts_every_corpus_file_in_done_or_failed_with_a_reason(
    the_corpus: list[Broken], tmp_path: Path
) -> None:
    """A sample of the corpus dropped into a running daemon (retries capped so that it ends):
    every file ends in done/ or in failed/ beside a NAME.error.json with a reason; the daemon
    never stops, its memory stays bounded, and it logs no patient data."""
    rng = random.Random(7)
    sample = [
        b
        for b in the_corpus
        if b.name.startswith("bundled-") or "-ts" in b.name or b.name.endswith("-metaindataset")
    ]
    sample += rng.sample(the_corpus, 150)
    # files with an invalid UID in their header poison their destination (a known bug, see
    # test_one_file_with_an_invalid_uid_does_not_block_the_others); they are left out here
    sample = [b for b in {b.name: b for b in sample}.values() if not has_invalid_uid(b.data)]
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port, response_timeout="2s")],
            retry={"initial_delay": "100ms", "max_delay": "300ms", "max_attempts": 3},
        )
        for b in sample:
            (d.incoming / f"{b.name}.dcm").write_bytes(b.data)
        with d:
            proc = psutil.Process(d.pid)
            peak = 0

            def rss() -> int:
                """The daemon's and its watch-and-ingest process's (which reads the files)."""
                total = proc.memory_info().rss
                for child in proc.children():
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                return total

            def finished() -> bool:
                nonlocal peak
                peak = max(peak, rss())
                return not d.incoming_files()

            wait_until(finished, 60, what="every corpus file out of incoming")
            assert d.running()
            assert d.stop() == 0
    done, failed = set(d.done_files()), set(d.failed_files())
    assert len(done) + len(failed) == len(sample)
    for name in failed:
        reason = d.error_json(name)["reason"]
        assert reason, name
    for b in sample:
        if b.must_reject:
            assert f"{b.name}.dcm" in failed, f"{b.what}: delivered, but it is broken"
    assert settled_problems(d.queue, d.incoming, d.done, d.failed) == []
    assert peak < 400 * 1024 * 1024, f"the daemon's processes' RSS peaked at {peak >> 20} MB"
    d.assert_no_phi()


def has_invalid_uid(data: bytes) -> bool:
    """Whether the parser takes the file but one of its UIDs is not a valid UID."""
    try:
        meta = parse_meta(data, len(data))
    except InvalidFileError:
        return False
    uids = (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax)
    return not all(_UID.fullmatch(u) and len(u) <= _UID_MAX for u in uids)


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64


def test_one_file_with_an_invalid_uid_does_not_block_the_others(tmp_path: Path) -> None:
    bad = with_transfer_syntax(seed_files()["explicit-undef"], "1.2.840.10008.1.2.1." + "9" * 80)
    # DCMTK: it never answers such an A-ASSOCIATE-RQ (pynetdicom aborts it)
    with storescp(tmp_path / "received") as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[
                destination("pacs", scp.port, ae_title=scp.ae_title, connect_timeout="1s")
            ],
            retry={"initial_delay": "100ms", "max_delay": "200ms", "max_attempts": 3},
        )
        good = d.drop_files(5, rows=8, columns=8)
        (d.incoming / "bad.dcm").write_bytes(bad)
        with d:
            d.wait_incoming_empty(timeout=30)
    assert d.failed_files() == ["bad.dcm"]
    assert "UID" in d.error_json("bad.dcm")["reason"]
    assert sorted(d.done_files()) == sorted(f.rel_path for f in good)
