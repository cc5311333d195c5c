"""``forwarder receive`` never answers Success for an object it did not fully parse, nor for one
that is not what its C-STORE request says, never aborts for a SOP Class not negotiated, and
never stores one object twice. Pushed by pynetdicom (raw bytes, so broken objects reach it),
DCMTK storescu and dcmsend, and Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomgen import make_dataset
from dimse_wire import elem, uid_value
from peers import orthanc
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from test_receive import (
    ReceiverProcess,
    dot_files,
    finish,
    run_receiver,
    sample,
    wait_until,
    without_padding,
)

from forwarder.dicom.part10 import read_meta
from forwarder.net.receiver import NO_STUDY_FOLDER, Receiver, ReceiverSettings

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DCMSEND = "/usr/bin/dcmsend"
STORESCU = "/usr/bin/storescu"

# Real files nobody on the project wrote, one per transfer syntax family, whose data sets carry
# the same SOP Class/Instance UIDs as their meta headers (so any sender's request matches).
# Each has its own SOP Instance UID (many of pydicom's files share one).
# (file, the storescu option that proposes its transfer syntax)
GOOD = [
    ("CT_small.dcm", "-xe"),  # Explicit VR Little Endian
    ("MR_small_implicit.dcm", "-xi"),  # Implicit VR Little Endian
    ("liver_expb_1frame.dcm", "-xb"),  # Explicit VR Big Endian
    ("image_dfl.dcm", "-xd"),  # Deflated Explicit VR Little Endian, odd length
    ("SC_rgb_rle.dcm", "-xr"),  # RLE Lossless
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("JPEGLSNearLossless_16.dcm", "-xu"),  # JPEG-LS near lossless; no Study Instance UID
    ("SC_rgb_small_odd.dcm", "-xe"),  # odd rows/columns
    ("examples_palette.dcm", "-xe"),  # palette colour
    ("waveform_ecg.dcm", "-xe"),  # waveform, no pixel data
    ("test-SR.dcm", "-xe"),  # structured report: nested sequences
]
GOOD_FILES = [name for name, _ in GOOD]


# -- helpers -------------------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, as is: everything after its meta header."""
    return path.read_bytes()[read_meta(path).dataset_offset :]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiverProcess]:
    """The command as operators run it (streamed to temporary files)."""
    with run_receiver(tmp_path_factory.mktemp("integrity")) as proc:
        yield proc


def open_association(port: int, *contexts: tuple[str, str]) -> Association:
    ae = AE(ae_title="SCU")
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, [transfer])
    assoc = ae.associate("127.0.0.1", port, ae_title="FORWARDER")
    assert assoc.is_established
    return assoc


def raw_store(
    assoc: Association,
    data: bytes,
    *,
    context_class: str,
    sop_class: str,
    sop_instance: str,
    message_id: int = 1,
) -> C_STORE:
    """Send ``data`` (an encoded data set, as is) in a C-STORE-RQ naming ``sop_class`` on the
    presentation context accepted for ``context_class``; return the C-STORE-RSP."""
    contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == context_class]
    assert contexts, f"no accepted context for {context_class}"
    req = c_store_rq(data, sop_class, sop_instance, message_id)
    # Pause the requestor's reactor, as pynetdicom's send_c_store does, or it takes the
    # response off the queue first.
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, 10, "the SCU's reactor to pause")
    try:
        assoc.dimse.send_msg(req, contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert isinstance(rsp, C_STORE), f"no C-STORE-RSP (association aborted: {assoc.is_aborted})"
    assert rsp.MessageIDBeingRespondedTo == message_id
    return rsp


def store_ok(assoc: Association, ds: Dataset, *, message_id: int) -> None:
    """Store the valid CT object ``ds`` on ``assoc`` and expect Success: the association (or
    the receiver) goes on after whatever was refused before."""
    rsp = raw_store(
        assoc,
        dataset_bytes_of(ds),
        context_class=CT,
        sop_class=CT,
        sop_instance=ds.SOPInstanceUID,
        message_id=message_id,
    )
    assert rsp.Status == 0x0000, f"status 0x{rsp.Status:04X}"


def store_file(port: int, path: Path) -> C_STORE:
    """One raw C-STORE of the file's data set bytes, naming its meta header's UIDs."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    assoc = open_association(port, (sop_class, ts))
    try:
        return raw_store(
            assoc,
            dataset_bytes(path),
            context_class=sop_class,
            sop_class=sop_class,
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
        )
    finally:
        finish(assoc)


def stored_path(output: Path, source: Path) -> Path:
    """Where the receiver files ``source``: under its study, or the fixed no-study folder."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    study = ds.get("StudyInstanceUID") or NO_STUDY_FOLDER
    return output / str(study) / f"{ds.SOPInstanceUID}.dcm"


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if not p.name.startswith("."))


def assert_failure(rsp: C_STORE, low: int, high: int, comment: str) -> None:
    status = int(rsp.Status)
    assert low <= status <= high, f"status 0x{status:04X}, comment {rsp.ErrorComment!r}"
    assert rsp.ErrorComment is not None and comment in str(rsp.ErrorComment), rsp.ErrorComment
    assert isinstance(rsp.ErrorComment, str) and len(rsp.ErrorComment) <= 64  # one LO value


def assert_same_object(received_path: Path, source: Path) -> None:
    """Data set equal element by element; pixel data equal (bytes when the transfer syntax is
    kept, decoded arrays otherwise)."""
    original, received = pydicom.dcmread(source), pydicom.dcmread(received_path)
    same_syntax = received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    mine, theirs = without_padding(received), without_padding(original)
    if not same_syntax:
        mine.pop(0x7FE00010, None)
        theirs.pop(0x7FE00010, None)
    assert mine == theirs, source.name
    if "PixelData" in original:
        if same_syntax:
            assert received.PixelData == original.PixelData, source.name
        else:
            assert np.array_equal(received.pixel_array, original.pixel_array), source.name


# -- what it cannot parse ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("SC_rgb_jpeg.dcm", "invalid VR"),  # implicit VR bytes under an explicit VR syntax
    ],
)
def test_broken_data_set_gets_c000_with_a_comment_and_is_not_kept(
    receiver: ReceiverProcess, name: str, reason: str
) -> None:
    source = sample(name)
    meta = read_file_meta_info(source)  # as a sender that reads only the meta header would
    sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    sop_instance = str(meta.MediaStorageSOPInstanceUID)
    good = make_dataset(rows=8, columns=8, seed=1)
    assoc = open_association(receiver.port, (sop_class, ts), (CT, EXPLICIT_LE))
    try:
        rsp = raw_store(
            assoc,
            dataset_bytes(source),
            context_class=sop_class,
            sop_class=sop_class,
            sop_instance=sop_instance,
        )
        assert_failure(rsp, 0xC000, 0xCFFF, reason)
        # The association carries on: the next object on it is stored.
        store_ok(assoc, good, message_id=2)
        assert len(list(receiver.output.rglob(f"{good.SOPInstanceUID}.dcm"))) == 1
    finally:
        finish(assoc)
    assert not list(receiver.output.rglob(f"{sop_instance}.dcm"))
    assert dot_files(receiver.output) == []
    assert f"refused SOP Instance {sop_instance} from SCU" in receiver.log_text()
    lines = [x for x in receiver.log_text().splitlines() if sop_instance in x and "refused" in x]
    line = lines[-1]
    assert "cannot parse: " in line and reason in line and "answering 0xC000" in line


def test_truncated_data_set_refused_in_memory_mode_too(tmp_path: Path) -> None:
    """The library without streamed receive (the data set buffered in memory)."""
    receiver = Receiver(ReceiverSettings(output=tmp_path / "out", port=0, bind="127.0.0.1"))
    receiver.start()
    try:
        source = sample("MR_truncated.dcm")
        rsp = store_file(receiver.port, source)
        assert_failure(rsp, 0xC000, 0xCFFF, "truncated")
        assert receiver.received == 0
        assert dcm_files(receiver.output) == []
        assert list(receiver.output.iterdir()) == []  # its buffer file is gone too
        good = store_file(receiver.port, sample("MR_small.dcm"))
        assert good.Status == 0x0000
        assert receiver.received == 1
    finally:
        receiver.stop()


def test_undefined_length_without_delimiter_gets_c000(receiver: ReceiverProcess) -> None:
    ds = make_dataset(rows=8, columns=8, seed=3)
    encoded = dataset_bytes_of(ds)
    # A sequence of undefined length that is never closed, appended at the end.
    broken = encoded + b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    assoc = open_association(receiver.port, (CT, EXPLICIT_LE))
    try:
        rsp = raw_store(
            assoc, broken, context_class=CT, sop_class=CT, sop_instance=ds.SOPInstanceUID
        )
    finally:
        finish(assoc)
    assert_failure(rsp, 0xC000, 0xCFFF, "")
    assert not list(receiver.output.rglob(f"{ds.SOPInstanceUID}.dcm"))


def c_store_rq(data: bytes, sop_class: str, sop_instance: str, message_id: int = 1) -> C_STORE:
    """A C-STORE request primitive carrying ``data`` (an encoded data set, as is)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    return req


def dataset_bytes_of(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    (meta_length,) = np.frombuffer(raw[140:144], dtype="<u4")
    return raw[144 + int(meta_length) :]


@pytest.mark.parametrize(
    ("name", "missing"),
    [("priv_SQ.dcm", "SOP Class UID"), ("no_meta_group_length.dcm", "SOP Class UID")],
)
def test_data_set_without_its_own_sop_uids_gets_c000(
    receiver: ReceiverProcess, name: str, missing: str
) -> None:
    """The meta header (and so the request) names UIDs the data set itself does not carry."""
    source = sample(name)
    meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    rsp = store_file(receiver.port, source)
    assert_failure(rsp, 0xC000, 0xCFFF, missing)
    assert not list(receiver.output.rglob(f"{meta.MediaStorageSOPInstanceUID}.dcm"))


# -- the request against the data set -----------------------------------------------------------


def test_data_set_instance_uid_differs_from_request_gets_a900(receiver: ReceiverProcess) -> None:
    """rtplan.dcm's meta header names another SOP Instance UID than its data set; pynetdicom
    sends the meta header's. DCMTK's storescp answers 0xA900 too."""
    source = sample("rtplan.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    rsp = store_file(receiver.port, source)
    assert_failure(rsp, 0xA900, 0xA9FF, "SOP Instance UID")
    for uid in (ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID):
        assert not list(receiver.output.rglob(f"{uid}.dcm"))


def test_data_set_sop_class_differs_from_request_gets_a900(receiver: ReceiverProcess) -> None:
    """A CT data set sent as MR Image Storage on the MR context."""
    ds = make_dataset(rows=8, columns=8, seed=2)
    assoc = open_association(receiver.port, (MR, EXPLICIT_LE))
    try:
        rsp = raw_store(
            assoc,
            dataset_bytes_of(ds),
            context_class=MR,
            sop_class=MR,
            sop_instance=ds.SOPInstanceUID,
        )
    finally:
        finish(assoc)
    assert_failure(rsp, 0xA900, 0xA9FF, "SOP Class UID")
    assert not list(receiver.output.rglob(f"{ds.SOPInstanceUID}.dcm"))


# -- a SOP Class not negotiated: a failure status, not an abort ---------------------------------


@pytest.mark.parametrize(
    "named",
    [
        CT,  # a storage class the receiver supports, on the MR context
        "1.2.826.0.1.3680043.8.498.1",  # unknown: pynetdicom used to abort the association
        VERIFICATION,  # pynetdicom used to answer it as a C-ECHO
        "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Q/R FIND: pynetdicom used to abort
    ],
)
def test_sop_class_not_negotiated_on_the_context_gets_0122_and_association_goes_on(
    receiver: ReceiverProcess, named: str, tmp_path: Path
) -> None:
    ds = make_dataset(modality="MR", rows=8, columns=8, seed=4)
    source = tmp_path / "mr.dcm"
    ds.save_as(source, enforce_file_format=True)
    data = dataset_bytes(source)
    assoc = open_association(receiver.port, (MR, EXPLICIT_LE))
    try:
        rsp = raw_store(
            assoc, data, context_class=MR, sop_class=named, sop_instance=str(ds.SOPInstanceUID)
        )
        assert_failure(rsp, 0x0122, 0x0122, "not negotiated")
        assert str(rsp.AffectedSOPClassUID) == named
        assert assoc.is_established and not assoc.is_aborted
        assert not list(receiver.output.rglob(f"{ds.SOPInstanceUID}.dcm"))
        # The next C-STORE on the same association succeeds.
        ok = raw_store(
            assoc,
            data,
            context_class=MR,
            sop_class=MR,
            sop_instance=str(ds.SOPInstanceUID),
            message_id=2,
        )
        assert ok.Status == 0x0000
    finally:
        finish(assoc)
    assert_same_object(stored_path(receiver.output, source), source)
    assert "negotiated for 1.2.840.10008.5.1.4.1.1.4" in receiver.log_text()


# -- no Study Instance UID: a stable name --------------------------------------------------------


def test_object_without_study_uid_is_stored_once_when_sent_twice(
    receiver: ReceiverProcess, tmp_path: Path
) -> None:
    ds = make_dataset(rows=8, columns=8, seed=5)
    del ds.StudyInstanceUID
    path = tmp_path / "nostudy.dcm"
    ds.save_as(path, enforce_file_format=True)
    for _ in range(2):
        assert store_file(receiver.port, path).Status == 0x0000
    # And once more by DCMTK's storescu, on its own association.
    result = subprocess.run(
        [STORESCU, "-aec", "FORWARDER", "127.0.0.1", str(receiver.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    matches = list(receiver.output.rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert matches == [receiver.output / NO_STUDY_FOLDER / f"{ds.SOPInstanceUID}.dcm"]
    assert dataset_bytes(matches[0]) == dataset_bytes(path)
    assert dot_files(receiver.output) == []


# -- real pushers: what arrives is the original --------------------------------------------------


def good_files() -> list[Path]:
    return [sample(name) for name in GOOD_FILES]


def test_pynetdicom_raw_pushes_arrive_byte_identical(tmp_path: Path) -> None:
    with run_receiver(tmp_path / "r") as proc:
        for source in good_files():
            rsp = store_file(proc.port, source)
            assert rsp.Status == 0x0000, (source.name, rsp.ErrorComment, proc.log_text())
            target = stored_path(proc.output, source)
            assert dataset_bytes(target) == dataset_bytes(source), source.name
            assert_same_object(target, source)
        assert len(dcm_files(proc.output)) == len(GOOD_FILES)


@pytest.mark.parametrize("tool", ["storescu", "dcmsend"])
def test_dcmtk_pushes_arrive_equal(tmp_path: Path, tool: str) -> None:
    with run_receiver(tmp_path / "r") as proc:
        target = ["-aec", "FORWARDER", "127.0.0.1", str(proc.port)]
        if tool == "storescu":
            # storescu proposes a compressed syntax only when told; one run per file.
            runs = [
                [STORESCU, "-R", option, *target, os.fspath(sample(name))] for name, option in GOOD
            ]
        else:
            runs = [[DCMSEND, *target, *(os.fspath(p) for p in good_files())]]
        for cmd in runs:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            assert result.returncode == 0, result.stdout + result.stderr + proc.log_text()
            assert "Failed" not in result.stderr, result.stderr  # storescu exits 0 regardless
        for source in good_files():
            assert_same_object(stored_path(proc.output, source), source)
        assert len(dcm_files(proc.output)) == len(GOOD_FILES)
        assert "refused" not in proc.log_text()


def _orthanc_call(port: int, method: str, path: str, body: bytes | None = None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
    return json.loads(text) if text else None


@pytest.mark.skipif(not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists(),
                    reason="Orthanc is not installed")  # fmt: skip
def test_orthanc_pushes_arrive_equal(tmp_path: Path) -> None:
    with run_receiver(tmp_path / "r") as proc, orthanc(tmp_path / "orthanc") as peer:
        modality = {"AET": "FORWARDER", "Host": "127.0.0.1", "Port": proc.port}
        _orthanc_call(peer.http_port, "PUT", "/modalities/fwd", json.dumps(modality).encode())
        # Orthanc itself refuses objects without a Study Instance UID.
        files = [p for p in good_files() if "StudyInstanceUID" in pydicom.dcmread(p)]
        ids = []
        for source in files:
            answer = _orthanc_call(peer.http_port, "POST", "/instances", source.read_bytes())
            assert isinstance(answer, dict), answer
            ids.append(answer["ID"])
        job = _orthanc_call(
            peer.http_port,
            "POST",
            "/modalities/fwd/store",
            json.dumps({"Resources": ids, "Synchronous": True}).encode(),
        )
        assert isinstance(job, dict) and job.get("FailedInstancesCount", 0) == 0, job
        wait_until(lambda: len(dcm_files(proc.output)) == len(files), 30, "Orthanc's objects")
        for source in files:
            assert_same_object(stored_path(proc.output, source), source)
        assert "refused" not in proc.log_text()


# -- malformed requests: an A-ABORT at once, nothing kept, the next association served ----------


@pytest.mark.parametrize("fault", ["context not accepted", "no Affected SOP Instance UID"])
def test_malformed_c_store_is_aborted_at_once_and_leaves_nothing(
    tmp_path: Path, fault: str
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": os.fspath(tmpdir)}
    ds = make_dataset(rows=8, columns=8, seed=6)
    with run_receiver(tmp_path / "r", env=env) as proc:
        assoc = open_association(proc.port, (CT, EXPLICIT_LE))
        try:
            req = c_store_rq(dataset_bytes_of(ds), CT, ds.SOPInstanceUID)
            context_id = assoc.accepted_contexts[0].context_id
            if fault == "context not accepted":
                context_id += 2
            else:
                req.AffectedSOPInstanceUID = None
            assoc.dimse.send_msg(req, context_id)
            # An A-ABORT (before: the receiver's reading thread died, then the connection).
            wait_until(lambda: assoc.is_aborted, 10, "the receiver to abort the association")
        finally:
            finish(assoc)
        assert dcm_files(proc.output) == []
        # The partial temporary file is gone (before, it was left behind).
        wait_until(lambda: list(tmpdir.iterdir()) == [], 10, "the temporary file to go")
        wait_until(lambda: "invalid DIMSE message from SCU" in proc.log_text(), 10, "the log")
        # The receiver goes on serving.
        assoc = open_association(proc.port, (CT, EXPLICIT_LE))
        try:
            store_ok(assoc, ds, message_id=1)
        finally:
            finish(assoc)


def test_association_aborted_mid_data_set_leaves_no_temporary_file(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": os.fspath(tmpdir)}
    ds = make_dataset(rows=512, columns=512, seed=7)  # 512 KiB: several P-DATA PDUs
    with run_receiver(tmp_path / "r", env=env) as proc:
        assoc = open_association(proc.port, (CT, EXPLICIT_LE))
        try:
            req = c_store_rq(dataset_bytes_of(ds), CT, ds.SOPInstanceUID)
            message = C_STORE_RQ()
            message.primitive_to_message(req)
            pdus = message.encode_msg(assoc.accepted_contexts[0].context_id, 65536)
            for _ in range(3):  # the command set and the first data set fragments only
                assoc.dul.send_pdu(next(pdus))
            # The partial file is written where the object will land (a dot-file in the output
            # folder, renamed into place once checked), not in $TMPDIR.
            wait_until(lambda: dot_files(proc.output), 10, "the receiver to start a file")
            assoc.abort()
        finally:
            finish(assoc)
        wait_until(lambda: dot_files(proc.output) == [], 10, "the partial file to be deleted")
        assert list(tmpdir.iterdir()) == []
        assert dcm_files(proc.output) == []
        assert "aborted" in proc.log_text()


def test_c_store_without_a_data_set_gets_c000(tmp_path: Path) -> None:
    """Command Data Set Type 0x0101 (none): pynetdicom hands over an empty data set, which the
    receiver used to store as a Part 10 file holding only a meta header, answering Success."""
    ds = make_dataset(rows=8, columns=8, seed=8)
    body = b"".join(
        [
            elem(0x0002, uid_value(CT)),
            elem(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            elem(0x0110, struct.pack("<H", 7)),
            elem(0x0700, struct.pack("<H", 0)),
            elem(0x0800, struct.pack("<H", 0x0101)),  # no data set follows
            elem(0x1000, uid_value(ds.SOPInstanceUID)),
        ]
    )
    command = elem(0x0000, struct.pack("<I", len(body))) + body
    with run_receiver(tmp_path / "r") as proc:
        assoc = open_association(proc.port, (CT, EXPLICIT_LE))
        try:
            context_id = assoc.accepted_contexts[0].context_id
            pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
            assoc._reactor_checkpoint.clear()
            wait_until(lambda: assoc._is_paused, 10, "the SCU's reactor to pause")
            try:
                assoc.dul.socket.send(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
                _, rsp = assoc.dimse.get_msg(block=True)
            finally:
                assoc._reactor_checkpoint.set()
            assert isinstance(rsp, C_STORE) and rsp.MessageIDBeingRespondedTo == 7
            assert_failure(rsp, 0xC000, 0xCFFF, "no data set")
            # The association carries on.
            store_ok(assoc, ds, message_id=8)
        finally:
            finish(assoc)
        assert len(dcm_files(proc.output)) == 1


def test_c_store_without_affected_sop_instance_uid_is_aborted_in_memory_mode_too(
    tmp_path: Path,
) -> None:
    """The library without streamed receive: pynetdicom ignored such a request silently and
    the peer waited for an answer until its own timeout."""
    ds = make_dataset(rows=8, columns=8, seed=9)
    body = b"".join(
        [
            elem(0x0002, uid_value(CT)),
            elem(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            elem(0x0110, struct.pack("<H", 1)),
            elem(0x0700, struct.pack("<H", 0)),
            elem(0x0800, struct.pack("<H", 0x0000)),  # a data set follows
        ]
    )
    command = elem(0x0000, struct.pack("<I", len(body))) + body
    data = dataset_bytes_of(ds)
    receiver = Receiver(ReceiverSettings(output=tmp_path / "out", port=0, bind="127.0.0.1"))
    receiver.start()
    try:
        assoc = open_association(receiver.port, (CT, EXPLICIT_LE))
        try:
            cx = assoc.accepted_contexts[0].context_id
            pdvs = struct.pack(">IBB", len(command) + 2, cx, 0x03) + command
            pdvs += struct.pack(">IBB", len(data) + 2, cx, 0x02) + data
            assoc.dul.socket.send(struct.pack(">BxI", 0x04, len(pdvs)) + pdvs)
            wait_until(lambda: assoc.is_aborted, 10, "the receiver to abort the association")
        finally:
            finish(assoc)
        assert receiver.received == 0
        assert dcm_files(receiver.output) == []
    finally:
        receiver.stop()
