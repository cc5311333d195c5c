"""forwarder's Storage SCP engine (``forwarder receive``) against real peers and hostile bytes.

Real peers: DCMTK storescu and dcmsend (several files on one association, transfer syntax
proposals), pynetdicom as SCU (an asynchronous operations window, several contexts, parallel
associations). Hostile peers: raw bytes on a real socket (truncated PDUs, PDUs over our maximum,
bad item lengths, P-DATA before the association, a data set before its command, an abort in the
middle of an object): the engine answers A-ABORT (or A-ASSOCIATE-RJ), never Success, leaves
nothing in the output folder, and goes on serving. What lands is compared with the original:
the data set bytes, and the decoded pixels.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomgen import make_dataset
from dimse_wire import associate_rq, elem, uid_value
from pki import Pki, make_pki
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from test_receive import associate, dot_files, finish, sample, wait_until
from test_receive_integrity import (
    assert_same_object,
    dataset_bytes,
    dataset_bytes_of,
    dcm_files,
    stored_path,
)

from forwarder.net.placement import FolderSink
from forwarder.net.receiver import Receiver, ReceiverSettings
from forwarder.net.scp_codec import AssociateRequest
from forwarder.net.scp_object import Answer, Origin, ReceivedObject
from forwarder.net.scp_policy import EngineSettings, context_policy, scp_profile
from forwarder.net.scp_server import ScpServer
from forwarder.net.tls import client_context, server_context

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
STORESCU = "/usr/bin/storescu"
DCMSEND = "/usr/bin/dcmsend"
PDU = struct.Struct(">BxI")


# -- a receiver in process, and a raw requestor -------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(ReceiverSettings(output=tmp_path / "out", port=0, bind="127.0.0.1", max_pdu=65536))
    r.start()
    try:
        yield r
    finally:
        r.stop()


def command_set(message_id: int, sop_class: str, sop_instance: str, data: bool = True) -> bytes:
    body = b"".join(
        [
            elem(0x0002, uid_value(sop_class)),
            elem(0x0100, struct.pack("<H", 0x0001)),
            elem(0x0110, struct.pack("<H", message_id)),
            elem(0x0700, struct.pack("<H", 0)),
            elem(0x0800, struct.pack("<H", 0x0000 if data else 0x0101)),
            elem(0x1000, uid_value(sop_instance)),
        ]
    )
    return elem(0x0000, struct.pack("<I", len(body))) + body


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return PDU.pack(0x04, len(pdv)) + pdv


class Raw:
    """A requestor speaking bytes on a real socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk

    def pdu(self) -> tuple[int, bytes]:
        self._fill(6)
        pdu_type, length = PDU.unpack(self.buf[:6])
        self._fill(6 + length)
        body, self.buf = self.buf[6 : 6 + length], self.buf[6 + length :]
        return pdu_type, body

    def associate(self, contexts: list[tuple[int, str, list[str]]], **kw: object) -> bytes:
        self.send(associate_rq(contexts, **kw))  # type: ignore[arg-type]
        pdu_type, body = self.pdu()
        assert pdu_type == 0x02, (pdu_type, body)
        return body

    def response(self) -> tuple[dict[int, bytes], list[int]]:
        """One DIMSE response: its elements, and the sizes of the PDUs that carried it."""
        command, sizes = b"", []
        while True:
            pdu_type, body = self.pdu()
            assert pdu_type == 0x04, (pdu_type, body)
            sizes.append(len(body))
            pos, last = 0, False
            while pos < len(body):
                (n,) = struct.unpack(">I", body[pos : pos + 4])
                command += body[pos + 6 : pos + 4 + n]
                last = bool(body[pos + 5] & 0x02)
                pos += 4 + n
            if last:
                break
        out, pos = {}, 0
        while pos < len(command):
            _, e, n = struct.unpack("<HHI", command[pos : pos + 8])
            out[e] = command[pos + 8 : pos + 8 + n]
            pos += 8 + n
        return out, sizes

    def expect_abort(self) -> None:
        """The next PDU is an A-ABORT, and the connection is then closed by us or by them."""
        try:
            pdu_type, _ = self.pdu()
        except (EOFError, ConnectionResetError):
            pytest.fail("the connection closed without an A-ABORT")
        assert pdu_type == 0x07


def status(values: dict[int, bytes]) -> int:
    return int.from_bytes(values[0x0900], "little")


def ac_results(body: bytes) -> dict[int, tuple[int, str]]:
    """{context id: (result, transfer syntax)} and nothing else of an A-ASSOCIATE-AC body."""
    out, pos = {}, 68
    while pos < len(body):
        item_type, length = struct.unpack(">BxH", body[pos : pos + 4])
        value = body[pos + 4 : pos + 4 + length]
        if item_type == 0x21:
            ts = value[8:].rstrip(b"\x00").decode() if len(value) > 8 else ""
            out[value[0]] = (value[2], ts)
        pos += 4 + length
    return out


def user_items(body: bytes) -> dict[int, bytes]:
    pos = 68
    while pos < len(body):
        item_type, length = struct.unpack(">BxH", body[pos : pos + 4])
        if item_type == 0x50:
            value, out, sub = body[pos + 4 : pos + 4 + length], {}, 0
            while sub < len(value):
                t, n = struct.unpack(">BxH", value[sub : sub + 4])
                out[t] = value[sub + 4 : sub + 4 + n]
                sub += 4 + n
            return out
        pos += 4 + length
    return {}


def ct_object(seed: int) -> tuple[str, bytes]:
    ds = make_dataset(rows=16, columns=16, seed=seed)
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    (meta_length,) = struct.unpack("<I", raw[140:144])
    return str(ds.SOPInstanceUID), raw[144 + meta_length :]


def nothing_left(output: Path) -> None:
    assert dcm_files(output) == [] if output.exists() else True
    wait_until(lambda: not output.exists() or dot_files(output) == [], 10, "partial files gone")


# -- real peers ----------------------------------------------------------------------------------


# storescu proposes compressed syntaxes only when told, one at a time (test_receive_integrity.py
# pushes those one file a run); these go on one association.
GOOD = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "waveform_ecg.dcm", "test-SR.dcm"]


def test_storescu_several_files_one_association_arrive_equal(receiver: Receiver) -> None:
    files = [sample(name) for name in GOOD]
    result = subprocess.run(
        [STORESCU, "-aec", "FORWARDER", "127.0.0.1", str(receiver.port), "-R"]
        + [os.fspath(p) for p in files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for source in files:
        # DCMTK re-encodes some files (lengths, padding): equal element by element, pixels
        # decoded and compared; the bytes as received are compared in the raw tests below.
        assert_same_object(stored_path(receiver.output, source), source)
    assert receiver.received == len(files)
    assert dot_files(receiver.output) == []


# -xi proposes Implicit VR Little Endian only; -xb all uncompressed syntaxes, big endian first:
# our order of preference wins (explicit little endian), and storescu converts.
@pytest.mark.parametrize(("option", "syntax"), [("-xi", IMPLICIT_LE), ("-xb", EXPLICIT_LE)])
def test_storescu_proposing_one_syntax_gets_it(
    receiver: Receiver, option: str, syntax: str
) -> None:
    source = sample("CT_small.dcm")
    result = subprocess.run(
        [STORESCU, option, "-aec", "FORWARDER", "127.0.0.1", str(receiver.port), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stored = stored_path(receiver.output, source)
    assert str(read_file_meta_info(stored).TransferSyntaxUID) == syntax
    original = pydicom.dcmread(source)
    assert np.array_equal(pydicom.dcmread(stored).pixel_array, original.pixel_array)


def test_dcmsend_a_folder(receiver: Receiver, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        make_dataset(rows=8, columns=8, seed=100 + i).save_as(
            folder / f"{i}.dcm", enforce_file_format=True
        )
    result = subprocess.run(
        [DCMSEND, "-aec", "FORWARDER", "127.0.0.1", str(receiver.port), "--scan-directories",
         os.fspath(folder)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for path in folder.iterdir():
        assert dataset_bytes(stored_path(receiver.output, path)) == dataset_bytes(path)
    assert receiver.received == 30


def test_pynetdicom_async_window_several_contexts_parallel_associations(
    receiver: Receiver, tmp_path: Path
) -> None:
    paths = []
    for i in range(12):
        ds = make_dataset(modality="MR" if i % 2 else "CT", rows=8, columns=8, seed=200 + i)
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    statuses: list[int] = []
    windows: list[tuple[int, int]] = []
    lock = threading.Lock()

    def push(chunk: list[Path]) -> None:
        ae = AE(ae_title="ASYNC")
        for abstract in (CT, MR):
            ae.add_requested_context(abstract, [EXPLICIT_LE, IMPLICIT_LE])
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 40
        window.maximum_number_operations_performed = 0
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="FORWARDER", ext_neg=[window])
        try:
            assert assoc.is_established
            with lock:
                windows.append(assoc.acceptor.asynchronous_operations)
            for path in chunk:
                rsp = assoc.send_c_store(pydicom.dcmread(path))
                with lock:
                    statuses.append(int(rsp.Status))
        finally:
            finish(assoc)

    threads = [threading.Thread(target=push, args=(paths[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [0] * len(paths)
    assert windows == [(16, 16)] * 3  # min(40, ours); 0 (unlimited) counts as ours
    for path in paths:
        assert stored_path(receiver.output, path).is_file()


def test_async_requests_sent_back_to_back_are_answered_in_order(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        ac = raw.associate([(1, CT, [EXPLICIT_LE])], window=(8, 8))
        assert struct.unpack(">HH", user_items(ac)[0x53]) == (8, 8)
        objects = [ct_object(300 + i) for i in range(6)]
        # Every request goes out before any response is read.
        for message_id, (uid, data) in enumerate(objects, start=1):
            raw.send(pdata(1, 0x03, command_set(message_id, CT, uid)) + pdata(1, 0x02, data))
        for message_id, (uid, _) in enumerate(objects, start=1):
            values, _ = raw.response()
            assert int.from_bytes(values[0x0120], "little") == message_id
            assert status(values) == 0x0000
            assert values[0x1000].rstrip(b"\x00").decode() == uid
        for uid, data in objects:
            (stored,) = receiver.output.rglob(f"{uid}.dcm")
            assert dataset_bytes(stored) == data  # the bytes as sent
        raw.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert raw.pdu()[0] == 0x06  # A-RELEASE-RP
    finally:
        raw.close()
    assert receiver.received == 6


def test_our_replies_honour_the_peers_small_maximum_pdu(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])], max_pdu=64)
        uid, data = ct_object(400)
        raw.send(pdata(1, 0x03, command_set(1, CT, uid)) + pdata(1, 0x02, data))
        values, sizes = raw.response()
        assert status(values) == 0x0000
        assert len(sizes) > 1 and max(sizes) <= 64
    finally:
        raw.close()


def test_no_acceptable_context_is_an_ac_with_every_context_rejected(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        ac = raw.associate(
            [(1, "1.2.840.10008.5.1.4.1.2.1.1", [EXPLICIT_LE]), (3, CT, ["1.2.3.4.5"])]
        )
        # refused, each with a Transfer Syntax sub-item all the same (PS3.8 9.3.3.2)
        assert ac_results(ac) == {1: (3, EXPLICIT_LE), 3: (4, "1.2.3.4.5")}
        assert user_items(ac)[0x52].rstrip(b"\x00") == b"1.2.826.0.1.3680043.10.1284.1"
    finally:
        raw.close()


def test_protocol_version_not_supported_is_rejected(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        raw.send(associate_rq([(1, CT, [EXPLICIT_LE])], version=2))
        pdu_type, body = raw.pdu()
        assert (pdu_type, body[1:]) == (0x03, bytes((1, 2, 2)))
    finally:
        raw.close()


# -- hostile byte streams ------------------------------------------------------------------------


def _after_association(fault: str, port: int) -> Raw:
    raw = Raw(port)
    raw.associate([(1, CT, [EXPLICIT_LE])])
    uid, data = ct_object(500)
    command = pdata(1, 0x03, command_set(1, CT, uid))
    if fault == "P-DATA over our maximum PDU":
        raw.send(command + PDU.pack(0x04, 65537) + bytes(64))
    elif fault == "PDV item longer than its PDU":
        raw.send(command + PDU.pack(0x04, 10) + struct.pack(">IBB", 200, 1, 0x02) + bytes(4))
    elif fault == "data set before its command":
        raw.send(pdata(1, 0x02, data))
    elif fault == "PDV on a context not accepted":
        raw.send(pdata(3, 0x03, command_set(1, CT, uid)))
    elif fault == "command fragment inside the data set":
        raw.send(command + pdata(1, 0x00, data[:100]) + pdata(1, 0x03, b"\x00" * 8))
    elif fault == "release in the middle of an object":
        raw.send(command + pdata(1, 0x00, data[:100]) + b"\x05\x00\x00\x00\x00\x04" + bytes(4))
    elif fault == "unknown PDU type":
        raw.send(command + pdata(1, 0x00, data[:100]) + PDU.pack(0x09, 4) + bytes(4))
    elif fault == "A-ASSOCIATE-RQ again":
        raw.send(associate_rq([(1, CT, [EXPLICIT_LE])]))
    elif fault == "a C-FIND":
        find = command_set(1, CT, uid).replace(
            elem(0x0100, struct.pack("<H", 0x0001)), elem(0x0100, struct.pack("<H", 0x0020))
        )
        raw.send(pdata(1, 0x03, find))
    elif fault == "an N-ACTION on a storage context":
        action = (
            elem(0x0003, uid_value("1.2.840.10008.1.20.1"))
            + elem(0x0100, struct.pack("<H", 0x0130))
            + elem(0x0110, struct.pack("<H", 1))
            + elem(0x0800, struct.pack("<H", 0x0000))
            + elem(0x1001, uid_value("1.2.840.10008.1.20.1.1"))
            + elem(0x1008, struct.pack("<H", 1))
        )
        raw.send(pdata(1, 0x03, elem(0x0000, struct.pack("<I", len(action))) + action))
    elif fault == "an N-EVENT-REPORT-RSP for no report":
        rsp = (
            elem(0x0100, struct.pack("<H", 0x8100))
            + elem(0x0120, struct.pack("<H", 7))
            + elem(0x0800, struct.pack("<H", 0x0101))
            + elem(0x0900, struct.pack("<H", 0x0000))
        )
        raw.send(pdata(1, 0x03, elem(0x0000, struct.pack("<I", len(rsp))) + rsp))
    return raw


@pytest.mark.parametrize(
    "fault",
    [
        "P-DATA over our maximum PDU",
        "PDV item longer than its PDU",
        "data set before its command",
        "PDV on a context not accepted",
        "command fragment inside the data set",
        "release in the middle of an object",
        "unknown PDU type",
        "A-ASSOCIATE-RQ again",
        "a C-FIND",
        "an N-ACTION on a storage context",
        "an N-EVENT-REPORT-RSP for no report",
    ],
)
def test_protocol_faults_after_association_are_aborted_and_leave_nothing(
    receiver: Receiver, fault: str
) -> None:
    raw = _after_association(fault, receiver.port)
    try:
        raw.expect_abort()
    finally:
        raw.close()
    nothing_left(receiver.output)
    assert receiver.received == 0
    # The receiver goes on serving.
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])])
        uid, data = ct_object(501)
        raw.send(pdata(1, 0x03, command_set(1, CT, uid)) + pdata(1, 0x02, data))
        assert status(raw.response()[0]) == 0x0000
    finally:
        raw.close()


@pytest.mark.parametrize(
    "rq",
    [
        PDU.pack(0x04, 8) + struct.pack(">IBB", 2, 1, 0x03),  # P-DATA before the association
        PDU.pack(0x01, 20) + bytes(20),  # A-ASSOCIATE-RQ shorter than its fixed fields
        # a presentation context item whose length runs past the PDU
        associate_rq([(1, CT, [EXPLICIT_LE])])[:-30] + b"\x20\x00\xff\xff" + bytes(26),
        # an even presentation context ID
        associate_rq([(2, CT, [EXPLICIT_LE])]),
        # no presentation context at all
        associate_rq([]),
    ],
    ids=["pdata-first", "short-rq", "item-past-end", "even-context-id", "no-context"],
)
def test_malformed_association_requests_are_aborted(receiver: Receiver, rq: bytes) -> None:
    raw = Raw(receiver.port)
    try:
        if rq[0] == 0x01:  # keep the PDU length right, the fault is inside
            rq = PDU.pack(0x01, len(rq) - 6) + rq[6:]
        raw.send(rq)
        raw.expect_abort()
    finally:
        raw.close()


def test_truncated_pdu_then_close_leaves_nothing(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])])
        uid, data = ct_object(600)
        whole = pdata(1, 0x03, command_set(1, CT, uid)) + pdata(1, 0x02, data)
        raw.send(whole[: len(whole) - 100])  # the data set PDU cut short
        wait_until(lambda: dot_files(receiver.output), 10, "the partial file")
    finally:
        raw.close()
    nothing_left(receiver.output)
    assert receiver.received == 0


def test_abort_in_the_middle_of_an_object_leaves_nothing(receiver: Receiver) -> None:
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])])
        uid, data = ct_object(601)
        raw.send(pdata(1, 0x03, command_set(1, CT, uid)) + pdata(1, 0x00, data[:200]))
        wait_until(lambda: dot_files(receiver.output), 10, "the partial file")
        raw.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        with pytest.raises((EOFError, ConnectionResetError)):
            raw.pdu()  # no answer: the connection is closed
    finally:
        raw.close()
    nothing_left(receiver.output)


def one_slot_server(
    settings: EngineSettings,
    sink: FolderSink,
    admit: Callable[[AssociateRequest, Origin], tuple[tuple[int, int, int], str] | None] = (
        lambda _rq, _origin: None
    ),
) -> ScpServer:
    """The engine on a free loopback port with one association slot, started."""
    profile = scp_profile(max_pdu=65536, max_associations=1, require_called_aet=False)
    server = ScpServer(
        "127.0.0.1",
        0,
        settings=settings,
        policy=context_policy(profile),
        sink=sink,
        admit=admit,
        allow_host=lambda _host: True,
        max_associations=1,
    )
    server.start()
    return server


def test_a_silent_connection_is_dropped_and_frees_its_slot(tmp_path: Path) -> None:
    """The first PDU has a short timeout of its own: a bare TCP connection does not hold one of
    the association slots for long (here 1 slot, 0.5 s)."""
    output = tmp_path / "out"
    output.mkdir()
    sink = FolderSink(output)
    server = one_slot_server(EngineSettings(65536, None, 16, 0.5, 5.0, 1.0), sink)
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        started = time.monotonic()
        try:
            assert silent.recv(64)[:1] in (b"\x07", b"")  # A-ABORT, or closed
        finally:
            silent.close()
        assert time.monotonic() - started < 5

        def slot_free() -> bool:
            raw = Raw(server.port)
            try:
                raw.send(associate_rq([(1, CT, [EXPLICIT_LE])]))
                return raw.pdu()[0] == 0x02
            finally:
                raw.close()

        wait_until(slot_free, 10, "the slot to be free")
    finally:
        server.stop()


def test_a_rejected_association_left_open_does_not_hold_its_slot(tmp_path: Path) -> None:
    """After an A-ASSOCIATE-RJ the engine waits a while for the requestor to close (PS3.8
    Sta13); a requestor that keeps the connection open meanwhile must not hold the only slot:
    the next, admitted association is accepted, not rejected for the limit."""
    output = tmp_path / "out"
    output.mkdir()

    def admit(rq: AssociateRequest, _origin: Origin) -> tuple[tuple[int, int, int], str] | None:
        return None if rq.called_ae == "FORWARDER" else ((1, 1, 7), "called AE not recognised")

    server = one_slot_server(
        EngineSettings(65536, None, 16, 5.0, 5.0, 1.0), FolderSink(output), admit=admit
    )
    lingering = Raw(server.port)
    try:
        lingering.send(associate_rq([(1, CT, [EXPLICIT_LE])], called="ELSEWHERE"))
        pdu_type, body = lingering.pdu()
        assert (pdu_type, body[1:4]) == (0x03, bytes((1, 1, 7)))  # RJ, and still open
        admitted = Raw(server.port)  # connected only now: the slot was taken until the RJ
        admitted.send(associate_rq([(1, CT, [EXPLICIT_LE])]))
        pdu_type, body = admitted.pdu()
        assert pdu_type == 0x02, body  # A-ASSOCIATE-AC, not RJ "local limit exceeded"
        admitted.close()
    finally:
        lingering.close()
        server.stop()


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_async_pushes_then_stop_aborts_inside_tls(pki: Pki, tmp_path: Path) -> None:
    """Back-to-back requests over TLS are answered; stopping the receiver with the association
    open ends the connection promptly (an end of file the client's TLS layer reads cleanly,
    no bytes in clear)."""
    settings = ReceiverSettings(
        output=tmp_path / "out",
        port=0,
        bind="127.0.0.1",
        tls=server_context(pki.server_cert, pki.server_key),
    )
    receiver = Receiver(settings)
    receiver.start()
    try:
        raw = Raw(receiver.port)
        raw.sock = client_context(pki.ca_cert).wrap_socket(raw.sock, server_hostname="localhost")
        try:
            raw.associate([(1, CT, [EXPLICIT_LE])], window=(4, 4))
            objects = [ct_object(700 + i) for i in range(3)]
            raw.send(
                b"".join(
                    pdata(1, 0x03, command_set(i, CT, uid)) + pdata(1, 0x02, data)
                    for i, (uid, data) in enumerate(objects, start=1)
                )
            )
            assert [status(raw.response()[0]) for _ in objects] == [0, 0, 0]
            stopper = threading.Thread(target=receiver.stop)
            stopper.start()
            with pytest.raises((EOFError, ssl.SSLEOFError, ConnectionResetError)):
                raw.pdu()
            stopper.join(15)
            assert not stopper.is_alive()
        finally:
            raw.close()
    finally:
        receiver.stop()
    assert receiver.received == 3


# -- the codec against the sender's strict decoders and pynetdicom's PDU classes ------------------


def test_our_answers_pass_the_senders_strict_checks_and_pynetdicoms_decoder() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ

    from forwarder.net import command_set, pdu
    from forwarder.net.scp_codec import decode_associate_rq, encode_associate_ac
    from forwarder.net.scp_command_set import DimseRequest, encode_response

    proposed = {
        1: pdu.ProposedContext(CT, (EXPLICIT_LE, IMPLICIT_LE)),
        3: pdu.ProposedContext("1.2.3.4", (EXPLICIT_LE,)),
    }
    rq = pdu.encode_associate_rq("FORWARDER", "SENDER", proposed, 32768)
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(rq)  # what we decode below is what pynetdicom reads too
    request = decode_associate_rq(rq[6:])
    assert (request.called_ae, request.calling_ae, request.max_pdu) == (
        "FORWARDER",
        "SENDER",
        32768,
    )
    assert [c.transfer_syntaxes for c in request.contexts] == [
        (EXPLICIT_LE, IMPLICIT_LE),
        (EXPLICIT_LE,),
    ]
    ac = encode_associate_ac(rq[6:], [(1, 0, EXPLICIT_LE), (3, 3, "")], 65536, (16, 16))
    results, max_pdu = pdu.decode_associate_ac(ac[6:], proposed)
    assert results == {1: (0, EXPLICIT_LE), 3: (3, "")} and max_pdu == 65536
    decoded = A_ASSOCIATE_AC()
    decoded.decode(ac)
    assert decoded.calling_ae_title == "SENDER" and decoded.called_ae_title == "FORWARDER"
    rsp = encode_response(DimseRequest(0x0001, 7, CT, "1.2.3.99", True), 0xA900, "bad\\x" * 30)
    values = command_set.decode_command(rsp, notes := [])
    assert notes == []  # group length right, elements in order
    assert (
        command_set.check_response(values, command_set.C_STORE_RSP, 7, CT.encode(), b"1.2.3.99")
        == 0xA900
    )
    comment = command_set.command_text(values[0x0902])
    assert comment is not None and len(comment) <= 64 and "\\" not in comment


# -- found by review --------------------------------------------------------------------------

VERIFICATION = "1.2.840.10008.1.1"


def test_a_c_store_on_the_verification_context_is_not_stored(receiver: Receiver) -> None:
    """Only storage contexts carry objects: a C-STORE naming Verification (with a data set that
    says so too) is answered 0x0122 and nothing is written."""
    ds = make_dataset(rows=4, columns=4, seed=7)
    ds.SOPClassUID = VERIFICATION
    ds.file_meta.MediaStorageSOPClassUID = VERIFICATION
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw_file = buffer.getvalue()
    (meta_length,) = struct.unpack("<I", raw_file[140:144])
    data = raw_file[144 + meta_length :]
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, VERIFICATION, [EXPLICIT_LE])])
        uid = str(ds.SOPInstanceUID)
        raw.send(pdata(1, 0x03, command_set(1, VERIFICATION, uid)) + pdata(1, 0x02, data))
        values, _ = raw.response()
        assert status(values) == 0x0122
    finally:
        raw.close()
    nothing_left(receiver.output)
    assert receiver.received == 0


def test_a_dripping_association_request_is_cut_at_its_deadline(tmp_path: Path) -> None:
    """The A-ASSOCIATE-RQ must arrive whole within the first-PDU timeout, not each byte of it:
    a peer sending one byte now and then cannot hold the only slot (here 1 slot, 1 s)."""
    output = tmp_path / "out"
    output.mkdir()
    server = one_slot_server(EngineSettings(65536, None, 16, 1.0, 5.0, 1.0), FolderSink(output))
    drip = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        started = time.monotonic()
        drip.sendall(b"\x01\x00\x00\x01\x86\xa0")  # an A-ASSOCIATE-RQ of 100,000 bytes
        closed = False
        drip.settimeout(0.3)
        while not closed and time.monotonic() - started < 8:
            try:
                drip.sendall(b"\x00")  # a byte every 0.3 s: each read is far within 1 s
                drip.recv(64)  # an A-ABORT, or b"" at the end of the connection
                closed = True
            except TimeoutError:
                continue  # still being served: drip on
            except OSError:
                closed = True
        assert closed, "the dripping connection was still served after 8 s"
        assert time.monotonic() - started < 5
    finally:
        drip.close()
        server.stop()


def test_a_pdu_dripping_after_association_is_cut_at_its_deadline(tmp_path: Path) -> None:
    """Past the association checks, a PDU must still arrive whole within the idle timeout plus
    its length at the minimum rate (here 1 s + 1,000 bytes at 1,000 bytes/s): a byte every
    0.3 s, each far within the idle timeout, does not keep the association (and its slot)."""
    output = tmp_path / "out"
    output.mkdir()
    server = one_slot_server(
        EngineSettings(65536, None, 16, 1.0, 1.0, 1.0, min_pdu_rate=1000.0), FolderSink(output)
    )
    raw = Raw(server.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])])
        started = time.monotonic()
        # a P-DATA-TF of 1,000 bytes: a command PDV begun, its bytes then one at a time
        raw.send(PDU.pack(0x04, 1000) + struct.pack(">IBB", 996, 1, 0x01))
        raw.sock.settimeout(0.3)
        aborted = False
        while not aborted and time.monotonic() - started < 8:
            try:
                raw.send(b"\x00")
                aborted = raw.sock.recv(64)[:1] in (b"\x07", b"")  # A-ABORT, or closed
            except TimeoutError:
                continue  # still being served: drip on
            except OSError:
                aborted = True
        assert aborted, "the dripping association was still served after 8 s"
        assert time.monotonic() - started < 5
    finally:
        raw.close()
        server.stop()
    nothing_left(output)


def test_plain_dicom_to_a_tls_port_is_closed_not_left_hanging(pki: Pki, tmp_path: Path) -> None:
    """A failed TLS handshake closes the connection (the wrapper held its descriptor open)."""
    r = Receiver(
        ReceiverSettings(
            port=0,
            output=tmp_path / "out",
            bind="127.0.0.1",
            tls=server_context(pki.server_cert, pki.server_key),
        )
    )
    r.start()
    try:
        sock = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        try:
            sock.sendall(associate_rq([(1, CT, [EXPLICIT_LE])]))
            sock.settimeout(10)
            started = time.monotonic()
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 9, "the connection was left open"
        finally:
            sock.close()
    finally:
        r.stop()


def test_partial_objects_of_a_dead_receiver_are_swept_at_start(tmp_path: Path) -> None:
    """A receiver killed mid-object leaves a dot-file nothing else would ever remove; a fresh
    one (another receiver writing into the same folder) is left alone."""
    output = tmp_path / "out"
    output.mkdir()
    old = output / ".receiving.deadbeef.1.part"
    fresh = output / ".receiving.cafef00d.7.part"
    other = output / ".something-else.part"
    for path in (old, fresh, other):
        path.write_bytes(b"DICM partial")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    r = Receiver(ReceiverSettings(output=output, port=0, bind="127.0.0.1"))
    r.start()
    try:
        assert not old.exists()
        assert fresh.exists() and other.exists()
    finally:
        r.stop()


def test_a_failed_listening_socket_ends_the_accept_thread_and_shows_in_health(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing for good (the listening socket shut down under the engine) must not
    become a warning ten times a second with the port dead: the accept thread ends, the
    receiver says it is not healthy (the daemon then stops feeding systemd's watchdog)."""
    assert receiver.healthy
    server = receiver._server
    assert server is not None and server._listener is not None
    server._listener.shutdown(socket.SHUT_RDWR)  # accept() now fails with EINVAL
    wait_until(lambda: not receiver.healthy, 5, what="unhealthy receiver")
    failed = [r for r in caplog.records if "listening socket failed" in r.getMessage()]
    assert len(failed) == 1
    assert not [r for r in caplog.records if "cannot accept a connection" in r.getMessage()]


def test_a_connection_the_engine_cannot_serve_is_dropped_and_the_port_stays_open(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error while admitting one connection (here the allow-list check itself
    raising) drops that connection, logs it, and the next connection is served."""
    server = receiver._server
    assert server is not None
    allow = server._allow_host
    calls = 0

    def broken_once(host: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("can't start new thread")
        return allow(host)

    server._allow_host = broken_once  # type: ignore[method-assign]
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as dropped:
        dropped.settimeout(5)
        assert dropped.recv(1) == b""  # closed by the engine
    assert receiver.healthy
    assoc = associate(receiver.port)
    try:
        assert assoc.is_established
    finally:
        finish(assoc)
    assert any("cannot serve a connection" in r.getMessage() for r in caplog.records)


# -- a sink's follow-up (Answer.then) ---------------------------------------------------------


class _FollowingSink(FolderSink):
    """Files objects as ``forwarder receive`` does, and asks for a follow-up after each."""

    def __init__(self, output: Path, then: Callable[[], None]) -> None:
        super().__init__(output)
        self._then = then

    def accept(self, path: str, obj: ReceivedObject, origin: Origin) -> Answer:
        answer = super().accept(path, obj, origin)
        return Answer(answer.status, answer.comment, then=self._then)


def test_a_sinks_follow_up_runs_after_the_response_and_its_failure_is_only_logged(
    tmp_path: Path,
) -> None:
    """The daemon's receiving process tells the daemon and logs after Success is on the wire
    (the modality prepares its next object meanwhile): the follow-up runs once the response
    is sent, and one that fails leaves the association serving."""
    answered = threading.Event()
    ran: list[bool] = []

    def then() -> None:
        ran.append(answered.wait(10))  # only once the test has read the response
        if len(ran) == 1:
            raise RuntimeError("a follow-up that fails")

    output = tmp_path / "out"
    output.mkdir()
    settings = ReceiverSettings(output=output, port=0, bind="127.0.0.1")
    r = Receiver(settings, sink=_FollowingSink(output, then))
    r.start()
    raw = Raw(r.port)
    try:
        raw.associate([(1, CT, [EXPLICIT_LE])])
        for seed in (1, 2):
            answered.clear()
            ds = make_dataset(rows=4, columns=4, seed=seed)
            raw.send(
                pdata(1, 0x03, command_set(1, CT, str(ds.SOPInstanceUID)))
                + pdata(1, 0x02, dataset_bytes_of(ds))
            )
            values, _ = raw.response()
            assert status(values) == 0x0000
            answered.set()
            wait_until(lambda n=seed: len(ran) == n, 10, what="the follow-up")
        assert ran == [True, True]
    finally:
        raw.close()
        r.stop()
    assert len(dcm_files(output)) == 2


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE])
def test_a_data_set_holding_file_meta_elements_is_refused(receiver: Receiver, syntax: str) -> None:
    """Group 0002 is the File Meta Information's, never a data set's (PS3.5 7.1, PS3.10 7.1).
    Written after our meta header, a data set that starts with (0002,0010) makes a file whose
    meaning depends on the reader: pydicom (which the gateway's transcoding and editing use)
    reads the file meta on until the group changes, so the data set's Transfer Syntax UID
    replaces ours and the object is decoded as another one. It is refused (0xC000), not kept;
    the association goes on. The check is the shared walker's, so the watch folder and `send`
    refuse such a file too (tests/faults/badbytes.py's ``metaindataset`` files)."""
    ds = make_dataset(rows=4, columns=4, seed=11)
    implicit = syntax == IMPLICIT_LE
    ds.file_meta.TransferSyntaxUID = syntax
    data = dataset_bytes_of(ds)
    big_endian = b"1.2.840.10008.1.2.2"
    if implicit:
        meta = struct.pack("<HHI", 2, 0x10, len(big_endian) + 1) + big_endian + b"\x00"
    else:
        meta = _explicit(2, 0x10, b"UI", big_endian)
    raw = Raw(receiver.port)
    try:
        raw.associate([(1, CT, [syntax])])
        uid = str(ds.SOPInstanceUID)
        raw.send(pdata(1, 0x03, command_set(1, CT, uid)) + pdata(1, 0x02, meta + data))
        values, _ = raw.response()
        assert status(values) == 0xC000
        assert b"0002" in values[0x0902]
        # The same object without the stray element is stored, on the same association.
        raw.send(pdata(1, 0x03, command_set(2, CT, uid)) + pdata(1, 0x02, data))
        assert status(raw.response()[0]) == 0x0000
    finally:
        raw.close()
    stored = dcm_files(receiver.output)
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == ds.SOPInstanceUID
