"""``forwarder receive``: a real subprocess fed by DCMTK storescu and by a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dicomgen import make_dataset
from dimse_wire import rejection
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.association import Association

from forwarder.net.receiver import Receiver, ReceiverSettings, safe_uid_name

STORESCU = "/usr/bin/storescu"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"

# (pydicom test file, storescu option proposing its transfer syntax)
DCMTK_FILES = [
    ("CT_small.dcm", None),  # Explicit VR Little Endian
    ("rtplan.dcm", None),  # Implicit VR Little Endian, RT Plan Storage
    ("SC_rgb_rle.dcm", "-xr"),  # RLE Lossless
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),  # JPEG Baseline
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000 (lossy)
    ("MR_small_jp2klossless.dcm", "-xv"),  # JPEG 2000 lossless
]
PYNETDICOM_FILES = [
    "CT_small.dcm",
    "SC_rgb_jpeg_dcmd.dcm",  # Implicit VR Little Endian (rtplan.dcm's meta header and data set
    # name different SOP Instance UIDs: refused with 0xA900, see test_receive_integrity.py)
    "MR_small_RLE.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "JPEG2000.dcm",
]


# -- helpers -------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class ReceiverProcess:
    """A running ``python -m forwarder receive`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


_LISTENING = re.compile(r"listening on \S+:(\d+) as AE")


@contextlib.contextmanager
def run_receiver(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ReceiverProcess]:
    """Start ``forwarder receive --port 0`` on 127.0.0.1 writing to ``folder/out``; stop it (by
    PID) on exit. Its stdout and stderr go to ``folder/receiver.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "out"
    log = folder / "receiver.log"
    cmd = [sys.executable, "-m", "forwarder", "receive", "--port", "0", "--bind", "127.0.0.1"]
    cmd += ["--output", str(output), "-v", *args]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=folder, env=env)
    try:
        port: list[int] = []

        def started() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"receiver exited with {proc.returncode}: {log.read_text()}")
            match = _LISTENING.search(log.read_text(errors="replace"))
            if match:
                port.append(int(match.group(1)))
            return bool(match)

        wait_until(started, 30, "the receiver to listen")
        yield ReceiverProcess(proc=proc, port=port[0], output=output, log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file: everything after the file meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert raw[132:136] == b"\x02\x00\x00\x00", "file meta must start with its group length"
    (meta_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + meta_length :]


def stored_path(output: Path, source: Path) -> Path:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return output / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def dot_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


def finish(assoc: Association) -> None:
    """Release ``assoc`` if it is up, and join its thread if it ever started."""
    if assoc.is_established:
        assoc.release()
    if assoc.ident is not None:
        assoc.join(10)


def associate(port: int, calling: str = "SCU", called: str = "FORWARDER") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title=called)


@contextlib.contextmanager
def store_association(
    port: int, files: list[Path], calling: str = "SCU", called: str = "FORWARDER"
) -> Iterator[Association]:
    """An association proposing each file's SOP Class in its own transfer syntax; released and
    its thread joined on exit."""
    ae = AE(ae_title=calling)
    for path in files:
        meta = read_file_meta_info(path)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        assert assoc.is_established, "association not established"
        yield assoc
    finally:
        finish(assoc)


@pytest.fixture
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends files' encoded datasets as they are on disk (no decode/re-encode)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_files(port: int, files: list[Path]) -> list[int]:
    with store_association(port, files) as assoc:
        return [int(assoc.send_c_store(os.fspath(path)).Status) for path in files]


def run_storescu(port: int, files: list[str], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, *options, "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def without_padding(ds: Dataset) -> dict[int, object]:
    return {
        int(elem.tag): elem.value
        for elem in ds
        if elem.tag != 0xFFFCFFFC and elem.tag.element != 0x0000  # padding, group lengths
    }


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiverProcess]:
    """One plain receiver shared by the tests that only add distinct objects to it."""
    with run_receiver(tmp_path_factory.mktemp("receiver")) as proc:
        yield proc


# -- storing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "option"), DCMTK_FILES, ids=[n for n, _ in DCMTK_FILES])
def test_dcmtk_storescu_objects_land_as_study_sop(
    receiver: ReceiverProcess, name: str, option: str | None
) -> None:
    source = sample(name)
    options = ["-R", option] if option else ["-R"]
    result = run_storescu(receiver.port, [os.fspath(source)], *options, "-aec", "FORWARDER")
    assert result.returncode == 0, result.stdout + result.stderr

    target = stored_path(receiver.output, source)
    assert target.is_file(), receiver.log_text()
    original = pydicom.dcmread(source)
    received = pydicom.dcmread(target)
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert without_padding(received) == without_padding(original)
    if "PixelData" in original:
        assert received.PixelData == original.PixelData
    assert dot_files(receiver.output) == []
    assert f"stored {original.SOPInstanceUID} from STORESCU at {target}" in receiver.log_text()


@pytest.mark.parametrize("pdu", ["4096", "100000", "131072"])
def test_a_big_object_in_small_pdus_lands_byte_identical(
    receiver: ReceiverProcess, tmp_path: Path, pdu: str
) -> None:
    """Small fragments are held and written together (scp_object.STAGED), big ones written as
    they come: every byte lands in order whatever the sender's PDU size."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()  # not CT_small's: the receiver is shared
    ds.Rows, ds.Columns = 500, 1000
    ds.PixelData = os.urandom(500 * 1000 * 2)
    source = tmp_path / "big.dcm"
    ds.save_as(source, enforce_file_format=True)
    result = run_storescu(
        receiver.port, [os.fspath(source)], "--max-send-pdu", pdu, "-aec", "FORWARDER"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    target = stored_path(receiver.output, source)
    assert target.is_file(), receiver.log_text()
    received = pydicom.dcmread(target)
    assert without_padding(received) == without_padding(ds)
    assert received.PixelData == ds.PixelData
    assert received.pixel_array.tobytes() == ds.pixel_array.tobytes()
    assert dot_files(receiver.output) == []


def test_pynetdicom_scu_datasets_are_byte_identical(
    receiver: ReceiverProcess, raw_send: None
) -> None:
    files = [sample(name) for name in PYNETDICOM_FILES]
    assert send_files(receiver.port, files) == [0x0000] * len(files)
    for source in files:
        target = stored_path(receiver.output, source)
        assert dataset_bytes(target) == dataset_bytes(source), source.name
        meta = pydicom.dcmread(target, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.dcmread(source).file_meta.TransferSyntaxUID
    # A resend overwrites atomically: still one file per object, nothing half-written.
    assert send_files(receiver.port, files[:1]) == [0x0000]
    assert dataset_bytes(stored_path(receiver.output, files[0])) == dataset_bytes(files[0])
    assert len(list(stored_path(receiver.output, files[0]).parent.iterdir())) == 1
    assert dot_files(receiver.output) == []


PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage


def _send(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "send", f"FORWARDER@127.0.0.1:{port}", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_private_sop_classes_are_accepted_only_with_promiscuous(tmp_path: Path) -> None:
    """A vendor's private objects (CSA, raw data) are refused like storescp refuses them, and
    stored byte for byte with --promiscuous (storescp +pm)."""
    source = tmp_path / "in" / "csa.dcm"
    source.parent.mkdir()
    ds = make_dataset(rows=8, columns=8, seed=11)
    ds.SOPClassUID = PRIVATE_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    ds.save_as(source, enforce_file_format=True)
    with run_receiver(tmp_path / "strict") as strict:
        refused = _send(strict.port, source)
        assert refused.returncode == 1, refused.stderr
        assert "FAILED" in refused.stderr and PRIVATE_SOP_CLASS in refused.stderr, refused.stderr
        assert not strict.output.exists() or not list(strict.output.rglob("*.dcm"))
        wait_until(
            lambda: "accepted with --promiscuous" in strict.log_text(), 10, "the refusal logged"
        )
        assert f"SOP class(es): {PRIVATE_SOP_CLASS} (private" in strict.log_text()
    with run_receiver(tmp_path / "promiscuous", "--promiscuous") as open_:
        stored = _send(open_.port, source)
        assert stored.returncode == 0, stored.stderr
        target = stored_path(open_.output, source)
        assert target.is_file(), open_.log_text()
        assert dataset_bytes(target) == dataset_bytes(source)
        received = pydicom.dcmread(target)
        assert received.file_meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS
        assert received.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_echo_succeeds(receiver: ReceiverProcess) -> None:
    assoc = associate(receiver.port)
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        finish(assoc)


def test_unparseable_dataset_gets_c000_and_the_server_carries_on(
    receiver: ReceiverProcess, raw_send: None, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999.1"
    meta.TransferSyntaxUID = EXPLICIT_LE
    with bad.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        # Study Instance UID claimed as a sequence of undefined length, then junk.
        fh.write(b"\x20\x00\x0d\x00SQ\x00\x00\xff\xff\xff\xff" + b"\x01" * 40)
    good = sample("SC_rgb_jpeg_dcmtk.dcm")
    with store_association(receiver.port, [bad, good]) as assoc:
        status = assoc.send_c_store(os.fspath(bad)).Status
        assert 0xC000 <= status <= 0xCFFF
        assert assoc.send_c_store(os.fspath(good)).Status == 0x0000
    assert "refused SOP Instance 1.2.826.0.1.3680043.8.498.999.1" in receiver.log_text()
    assert "cannot parse: " in receiver.log_text()
    assert not list(receiver.output.rglob("1.2.826.0.1.3680043.8.498.999.1.dcm"))


def test_copy_into_place_when_tmpdir_is_another_filesystem(tmp_path: Path, raw_send: None) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a $TMPDIR on another filesystem than the output folder")
    tmpdir = shm / f"forwarder-test-{os.getpid()}-{threading.get_ident()}"
    tmpdir.mkdir()
    try:
        env = {**os.environ, "TMPDIR": os.fspath(tmpdir)}
        with run_receiver(tmp_path, env=env) as proc:
            files = [sample("CT_small.dcm"), sample("MR_small_RLE.dcm")]
            assert send_files(proc.port, files) == [0x0000, 0x0000]
            for source in files:
                assert dataset_bytes(stored_path(proc.output, source)) == dataset_bytes(source)
            assert dot_files(proc.output) == []
            mode = stored_path(proc.output, files[0]).stat().st_mode & 0o777
            assert mode == 0o666 & ~_umask()
            assert list(tmpdir.iterdir()) == []  # pynetdicom removed its temporary files
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


# -- limits and access control -------------------------------------------------------------------


def test_object_larger_than_max_object_size_gets_a700(tmp_path: Path, raw_send: None) -> None:
    big, small = sample("CT_small.dcm"), sample("SC_rgb_small_odd.dcm")  # 39 kB and 1.4 kB
    with run_receiver(tmp_path, "--max-object-size", "10K") as proc:
        with store_association(proc.port, [big, small]) as assoc:
            assert assoc.send_c_store(os.fspath(big)).Status == 0xA700
            assert assoc.send_c_store(os.fspath(small)).Status == 0x0000
        sop = pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID
        assert not stored_path(proc.output, big).exists()
        assert stored_path(proc.output, small).is_file()
        lines = [line for line in proc.log_text().splitlines() if "refused SOP Instance" in line]
        assert len(lines) == 1
        assert sop in lines[0] and "10240-byte limit" in lines[0]


def test_calling_and_called_ae_allow_lists_reject(tmp_path: Path) -> None:
    args = ("--ae-title", "RCV", "--require-called-aet", "--allow-calling-aet", "GOOD")
    with run_receiver(tmp_path, *args) as proc:
        # rejected permanent, by the service user, calling / called AE title not recognised
        assert rejection(proc.port, "BAD", "RCV") == (1, 1, 3)
        assert rejection(proc.port, "GOOD", "OTHER") == (1, 1, 7)

        good = associate(proc.port, "GOOD", "RCV")
        try:
            assert good.is_established
            assert good.send_c_echo().Status == 0x0000
        finally:
            finish(good)

        result = run_storescu(proc.port, [_ct()], "-aet", "BAD", "-aec", "RCV", "-R")
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        log = proc.log_text()
        assert "calling AE 'BAD', called AE 'RCV'): calling AE not recognised" in log
        assert "calling AE 'GOOD', called AE 'OTHER'): called AE not recognised" in log


def _ct() -> str:
    return os.fspath(sample("CT_small.dcm"))


def test_max_associations_rejects_the_one_too_many_transiently(tmp_path: Path) -> None:
    with run_receiver(tmp_path, "--max-associations", "1") as proc:
        first = associate(proc.port)
        try:
            assert first.is_established
            # transient, service provider (presentation), local limit exceeded
            assert rejection(proc.port) == (2, 3, 2)
        finally:
            finish(first)
        assert "too many associations (max 1)" in proc.log_text()

        def slot_free_again() -> bool:  # once the server side of `first` has wound down
            return rejection(proc.port) is None

        wait_until(slot_free_again, 10, "the association slot to be free again")


def test_source_address_outside_allowed_networks_is_refused(tmp_path: Path) -> None:
    with run_receiver(tmp_path / "a", "--allow-host", "10.0.0.0/8") as proc:
        with (
            socket.create_connection(("127.0.0.1", proc.port), timeout=10) as conn,
            contextlib.suppress(ConnectionResetError),
        ):
            assert conn.recv(1) == b"", "the connection must be closed without a word"
        wait_until(
            lambda: "refused connection from 127.0.0.1" in proc.log_text(), 10, "the refusal log"
        )
    with run_receiver(tmp_path / "b", "--allow-host", "::1", "--allow-host", "127.0.0.0/8") as proc:
        assoc = associate(proc.port)
        try:
            assert assoc.is_established
        finally:
            finish(assoc)


def test_bad_allow_host_is_a_usage_error(tmp_path: Path) -> None:
    result = _run_cli(tmp_path, "--port", "0", "--output", "out", "--allow-host", "not-an-ip")
    assert result.returncode == 2
    assert "not an IP address or CIDR network" in result.stderr


# -- process life --------------------------------------------------------------------------------


def test_sigterm_with_an_open_association_exits_0_promptly(tmp_path: Path) -> None:
    with (
        run_receiver(tmp_path) as proc,
        # A peer that connected and never spoke must not hold the shutdown up either.
        socket.create_connection(("127.0.0.1", proc.port), timeout=10),
    ):
        assoc = associate(proc.port)
        try:
            assert assoc.is_established
            started = time.monotonic()
            assert proc.terminate(timeout=10) == 0
            assert time.monotonic() - started < 5
            assert "forwarder receive: stopped after 0 objects" in proc.log_text()
            assoc.join(10)
            assert not assoc.is_established
        finally:
            if assoc.is_established:
                assoc.abort()
            finish(assoc)


def _run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "receive", *args],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=60,
        check=False,
    )


def test_port_in_use_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_cli(tmp_path, "--port", str(port), "--bind", "127.0.0.1", "--output", "out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0].lower()


def test_output_not_writable_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _run_cli(tmp_path, "--port", "0", "--bind", "127.0.0.1", "--output", "file/out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "output folder" in lines[0] and "file/out" in lines[0]


@pytest.mark.parametrize("size", ["lots", "0", "-5M"])
def test_bad_max_object_size_is_a_usage_error(tmp_path: Path, size: str) -> None:
    result = _run_cli(tmp_path, "--port", "0", "--output", "out", "--max-object-size", size)
    assert result.returncode == 2


def test_size_parsing() -> None:
    from forwarder.cli.receive import parse_size

    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1.5k") == 1536
    assert parse_size("300KiB") == 300 * 1024
    assert parse_size("4096") == 4096


# -- file names and the output folder's boundary -------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["../../x", "..", ".", "", "/etc/passwd", "1.2/../../3", "1..2", "1.2.", ".1.2", "1.2.3a",
     "1" * 65, "1.2\n3", "1.2.3\\4"],
)  # fmt: skip
def test_bad_uids_become_safe_generated_names(value: str) -> None:
    name = safe_uid_name(value)
    assert re.fullmatch(r"2\.25\.[0-9]+", name), name
    assert len(name) <= 64
    if value:
        assert safe_uid_name(value) == name  # the same bad value, the same name (resends)


@pytest.mark.parametrize("value", ["1.2.840.10008.1.2", "1.2.3\x00", " 1.2.3 ", "0.0", "1"])
def test_good_uids_are_kept(value: str) -> None:
    assert safe_uid_name(value) == value.strip(" \x00")


def test_crafted_uids_cannot_escape_output(receiver: ReceiverProcess) -> None:
    """An invalid SOP Instance UID is refused by the shared check (0xC000, PS3.5 9.1); an
    invalid Study Instance UID (not checked there) names a safe generated folder."""
    statuses = []
    for sop_uid in ("../../x", "1.2.826.0.1.3680043.8.498.999.77"):
        ds = Dataset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we craft
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = "../../../escaped"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CT_IMAGE_STORAGE, [EXPLICIT_LE])
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="FORWARDER")
            try:
                assert assoc.is_established
                rsp = assoc.send_c_store(ds)
                statuses.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            finally:
                finish(assoc)
    assert statuses[0][0] == 0xC000 and "invalid SOP Instance UID" in statuses[0][1], statuses
    assert statuses[1] == (0x0000, ""), statuses
    study = safe_uid_name("../../../escaped")
    assert [p.name for p in (receiver.output / study).iterdir()] == [
        "1.2.826.0.1.3680043.8.498.999.77.dcm"
    ]
    base = receiver.output.parent
    assert sorted(p.name for p in base.iterdir()) == ["out", "receiver.log"]
    assert not (base.parent / "escaped").exists() and not (base.parent / "x").exists()
    assert "refused SOP Instance '../../x' from SCU" in receiver.log_text()


def test_symlink_inside_output_is_not_followed(tmp_path: Path, raw_send: None) -> None:
    source = sample("CT_small.dcm")
    outside = tmp_path / "outside"
    outside.mkdir()
    with run_receiver(tmp_path / "r") as proc:
        study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
        (proc.output / study).symlink_to(outside, target_is_directory=True)
        assert send_files(proc.port, [source]) == [0xA700]
        assert list(outside.iterdir()) == []
        assert "refusing to follow a symlink" in proc.log_text()


# -- the library, in process ---------------------------------------------------------------------


def test_receiver_in_process_port_0_counter_nodelay_and_stop(tmp_path: Path) -> None:
    receiver = Receiver(ReceiverSettings(output=tmp_path / "out", port=0, bind="127.0.0.1"))
    before = set(threading.enumerate())
    receiver.start()
    try:
        assert receiver.port > 0
        source = sample("CT_small.dcm")
        with store_association(receiver.port, [source]) as assoc:
            assert assoc.send_c_store(pydicom.dcmread(source)).Status == 0x0000
            server_side = [
                t for t in threading.enumerate() if t.name.startswith("receiver-association-")
            ]
            assert server_side
            sock = server_side[0].sock  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert receiver.received == 1
        received = pydicom.dcmread(stored_path(receiver.output, source))
        assert received.SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
        assert dot_files(receiver.output) == []
    finally:
        receiver.stop()
    wait_until(lambda: set(threading.enumerate()) <= before, 10, "receiver threads to end")
