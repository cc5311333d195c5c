"""The C-STORE engine used directly (``Association``, ``Channel``) against real peers.

pynetdicom SCPs (data set bytes compared with the file's), DCMTK storescp, Orthanc, and the
raw-socket hostile peer of ``hostile.py`` for the misbehaviours no real SCP will produce on
demand (never answering, answering before the data set is read, closing without A-ABORT, huge
PDU lengths, garbage, stopping to read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FORWARDER, wait_until
from dicomgen import make_dataset, write_file, write_files
from hostile import EXPLICIT, IMPLICIT, Behaviour, CapturingSCP, HostilePeer
from peers import ScriptedSCP, free_port, orthanc, start_server, storescp
from pki import Pki, make_pki
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, MRImageStorage, RLELossless
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category as pynetdicom_category

from forwarder.dicom.part10 import read_meta
from forwarder.errors import AssociationError, InvalidFileError, ProtocolError
from forwarder.net.acse import AcceptedContext
from forwarder.net.association import Association, AssociationSettings, Peer
from forwarder.net.channel import Channel, SendOutcome, StoreRequest
from forwarder.net.command_set import PRIORITY
from forwarder.net.pdu import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    ProposedContext,
    decode_associate_ac,
    encode_associate_rq,
)
from forwarder.net.status import Outcome, classify_status, code_to_category
from forwarder.net.tls import client_context, server_context

SETTINGS = AssociationSettings(connect_timeout=10.0, response_timeout=10.0, release_timeout=5.0)
UNCOMPRESSED = [EXPLICIT, IMPLICIT]


def file_dataset(path: Path) -> bytes:
    """The file's bytes after its meta header."""
    return path.read_bytes()[read_meta(path).dataset_offset :]


def dataset_bytes(path: Path) -> bytes:
    """Exactly what must go over the wire: the file's data set, an odd one padded with one
    0x00 (PS3.5 7.1, as DCMTK sends it)."""
    data = file_dataset(path)
    return data + b"\x00" if len(data) % 2 else data


def gen(path: Path, **kwargs: object) -> Path:
    """``dicomgen.write_file`` returning the path."""
    write_file(path, **kwargs)
    return path


def padded_file(path: Path, dataset_length: int, seed: int) -> Path:
    """A generated image whose data set is exactly ``dataset_length`` bytes (odd lengths
    included): a small image, then zero padding after the pixel data."""
    budget = max(dataset_length - 2048, 256)  # pixel bytes; the rest of the data set is < 2 KB
    write_file(path, rows=budget // 128, columns=64, seed=seed)
    have = len(file_dataset(path))
    assert have <= dataset_length, (have, dataset_length)
    with path.open("ab") as f:
        f.write(b"\x00" * (dataset_length - have))
    assert len(file_dataset(path)) == dataset_length
    return path


def peer_of(scp: ScriptedSCP | HostilePeer, aet: str = "SCP") -> Peer:
    return Peer("127.0.0.1", scp.port, aet)


def associate(
    peer: Peer, paths: list[Path], settings: AssociationSettings = SETTINGS
) -> tuple[Association, list[AcceptedContext]]:
    """An association proposing each file's (SOP class, own syntax); the accepted contexts."""
    metas = [read_meta(p) for p in paths]
    needs = list(dict.fromkeys((m.sop_class_uid, m.transfer_syntax) for m in metas))
    assoc = Association.request(peer, settings, [ProposedContext(c, (ts,)) for c, ts in needs])
    contexts = []
    for m in metas:
        ctx = assoc.context_for(m.sop_class_uid, m.transfer_syntax)
        assert ctx is not None
        contexts.append(ctx)
    return assoc, contexts


def send_all(channel: Channel, paths: list[Path]) -> list[SendOutcome]:
    try:
        return list(channel.send([StoreRequest(str(p), i) for i, p in enumerate(paths)]))
    finally:
        channel.release()


@pytest.fixture
def small_files(tmp_path: Path) -> list[Path]:
    return write_files(tmp_path / "small", 5, rows=16, columns=16)


# -- association PDUs, encoded by hand, checked with pynetdicom's PDU classes --------------------


def test_associate_rq_decodes_with_pynetdicom() -> None:
    contexts = {
        1: ProposedContext(CTImageStorage, (EXPLICIT, IMPLICIT)),
        3: ProposedContext(MRImageStorage, (RLELossless,)),
        5: ProposedContext("1.2.840.10008.1.1", (IMPLICIT,)),
    }
    raw = encode_associate_rq("CALLED_AE", "CALLING", contexts, 32768)
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    prim = rq.to_primitive()
    assert prim.called_ae_title == "CALLED_AE"
    assert prim.calling_ae_title == "CALLING"
    assert prim.application_context_name == "1.2.840.10008.3.1.1.1"
    got = {
        pc.context_id: (pc.abstract_syntax, tuple(pc.transfer_syntax))
        for pc in prim.presentation_context_definition_list
    }
    assert got == {cid: (c.abstract_syntax, c.transfer_syntaxes) for cid, c in contexts.items()}
    user = {type(item).__name__: item for item in prim.user_information}
    assert user["MaximumLengthNotification"].maximum_length_received == 32768
    assert user["ImplementationClassUIDNotification"].implementation_class_uid == (
        IMPLEMENTATION_CLASS_UID
    )
    assert user["ImplementationVersionNameNotification"].implementation_version_name == (
        IMPLEMENTATION_VERSION
    )


def test_associate_rq_with_128_contexts_decodes_with_pynetdicom() -> None:
    contexts = {2 * i + 1: ProposedContext(f"1.2.3.{i}", (EXPLICIT,)) for i in range(128)}
    rq = A_ASSOCIATE_RQ()
    rq.decode(encode_associate_rq("A", "B", contexts, 0))
    ids = [pc.context_id for pc in rq.to_primitive().presentation_context_definition_list]
    assert ids == list(range(1, 256, 2))


@pytest.mark.parametrize("max_pdu", [0, 4096, 0xFFFFFFFF])
def test_associate_ac_from_pynetdicom_decodes(max_pdu: int) -> None:
    ac = A_ASSOCIATE()
    ac.application_context_name = "1.2.840.10008.3.1.1.1"
    ac.calling_ae_title = "CALLING"
    ac.called_ae_title = "CALLED"
    ac.result = 0
    results = []
    for cid, result, ts in [(1, 0, EXPLICIT), (3, 4, RLELossless), (5, 0, IMPLICIT)]:
        pc = PresentationContext()
        pc.context_id = cid
        pc.result = result
        pc.transfer_syntax = [ts]
        results.append(pc)
    ac.presentation_context_definition_results_list = results
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    ac.user_information = [max_len]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    raw = bytes(pdu.encode())
    decoded, peer_max = decode_associate_ac(raw[6:])
    assert peer_max == max_pdu
    assert decoded == {1: (0, EXPLICIT), 3: (4, RLELossless), 5: (0, IMPLICIT)}


@pytest.mark.parametrize("cut", [10, 70, -3])
def test_truncated_associate_ac_is_a_protocol_error(cut: int) -> None:
    pdu = A_ASSOCIATE_AC()
    ac = A_ASSOCIATE()
    ac.application_context_name = "1.2.840.10008.3.1.1.1"
    ac.calling_ae_title = "A"
    ac.called_ae_title = "B"
    pc = PresentationContext()
    pc.context_id = 1
    pc.result = 0
    pc.transfer_syntax = [EXPLICIT]
    ac.presentation_context_definition_results_list = [pc]
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    ac.user_information = [max_len]
    pdu.from_primitive(ac)
    body = bytes(pdu.encode())[6:]
    with pytest.raises(ProtocolError):
        decode_associate_ac(body[:cut])


def test_code_to_category_matches_pynetdicom_on_every_code() -> None:
    differ = [c for c in range(0x10000) if code_to_category(c) != pynetdicom_category(c)]
    assert differ == []


# -- data set bytes on the wire ----------------------------------------------------------------


@pytest.mark.parametrize("max_pdu", [4096, 16382, 65535, 0], ids=lambda n: f"pdu{n or 'inf'}")
def test_pynetdicom_receives_the_file_bytes_exactly(tmp_path: Path, max_pdu: int) -> None:
    frag = (max_pdu or 1024 * 1024) - 6
    lengths = [frag - 1, frag, frag + 1, 3 * frag, 3 * frag + 7, 200_001]
    paths = [padded_file(tmp_path / f"f{i}.dcm", n, i) for i, n in enumerate(lengths)]
    paths.append(tmp_path / "rle.dcm")
    write_file(paths[-1], rows=64, columns=64, transfer_syntax=RLELossless, seed=99)
    with CapturingSCP(max_pdu=max_pdu) as scp:
        assoc, contexts = associate(peer_of(scp), paths)
        try:
            for path, ctx in zip(paths, contexts, strict=True):
                response = assoc.store_file(str(path), read_meta(path), ctx)
                assert response.status == 0x0000
        finally:
            assoc.release()
        for path in paths:
            got = scp.datasets[read_meta(path).sop_instance_uid]
            assert got == dataset_bytes(path), path.name
    assert assoc.closed


@pytest.mark.parametrize(
    ("peer_max", "our_cap", "limit"),
    [
        (4096, None, 4096),
        (65535, None, 65534),  # even fragments only: DCMTK refuses odd ones
        (0, None, 1024 * 1024),
        (0xFFFFFFFF, None, 1024 * 1024),  # "4 GiB" is clamped, not allocated
        (0, 4096, 4096),
    ],
    ids=["peer4k", "peer-odd-64k", "peer-unlimited", "peer-4GiB", "our-sndpdulen-4k"],
)
def test_p_data_pdus_respect_the_max_length_and_carry_the_exact_bytes(
    tmp_path: Path, peer_max: int, our_cap: int | None, limit: int
) -> None:
    frag = limit - 6
    paths = [padded_file(tmp_path / f"f{i}.dcm", n, i) for i, n in enumerate([frag + 1, 2_500_003])]
    settings = AssociationSettings(
        connect_timeout=10.0, response_timeout=10.0, max_pdu_send=our_cap
    )
    with HostilePeer(Behaviour.ACCEPT, max_pdu=peer_max) as peer:
        assoc, contexts = associate(peer_of(peer), paths, settings)
        try:
            for path, ctx in zip(paths, contexts, strict=True):
                assert assoc.store_file(str(path), read_meta(path), ctx).status == 0x0000
        finally:
            assoc.release()
        assert peer.released.is_set()
        lengths = peer.p_data_lengths()
        assert max(lengths) <= limit
        assert all(n % 2 == 0 for n in lengths)  # PDV header 6 + an even fragment
        # Full-size fragments: each data set takes as few PDUs as the limit allows.
        assert lengths.count(limit) == sum(len(dataset_bytes(p)) // frag for p in paths)
        assert peer.datasets == [dataset_bytes(p) for p in paths]


@pytest.mark.parametrize(
    "peer_syntaxes",
    [
        pytest.param([EXPLICIT, IMPLICIT, RLELossless], id="explicit-first"),
        pytest.param(None, id="pynetdicom-default-order"),
    ],
)
def test_implicit_and_explicit_files_keep_their_syntax_on_the_wire(
    tmp_path: Path, peer_syntaxes: list[str] | None
) -> None:
    paths = [
        gen(tmp_path / "e.dcm", transfer_syntax=EXPLICIT),
        gen(tmp_path / "i.dcm", transfer_syntax=IMPLICIT),
    ]
    scp = CapturingSCP() if peer_syntaxes is None else CapturingSCP(transfer_syntaxes=peer_syntaxes)
    with scp:
        outcomes = send_all(Channel(peer_of(scp), SETTINGS), paths)
        assert [o.outcome for o in outcomes] == [Outcome.STORED] * 2
        assert [o.sent_transfer_syntax for o in outcomes] == [EXPLICIT, IMPLICIT]
        assert sorted(r.transfer_syntax for r in scp.received_list()) == sorted(UNCOMPRESSED)
        for p in paths:
            assert scp.datasets[read_meta(p).sop_instance_uid] == dataset_bytes(p)


# -- real peers: DCMTK storescp and Orthanc -----------------------------------------------------


def test_dcmtk_storescp_stores_what_we_send(tmp_path: Path) -> None:
    paths = [
        *write_files(tmp_path / "in", 3, transfer_syntax=EXPLICIT),
        *write_files(tmp_path / "in", 2, prefix="imp", transfer_syntax=IMPLICIT, modality="MR"),
    ]
    with storescp(tmp_path / "out") as scp:
        outcomes = send_all(Channel(Peer("127.0.0.1", scp.port, scp.ae_title), SETTINGS), paths)
        assert all(o.outcome is Outcome.STORED for o in outcomes), outcomes
        wait_until(lambda: len(scp.files()) == len(paths), what="storescp to write the files")
        stored = {dcmread(f).SOPInstanceUID: dcmread(f) for f in scp.files()}
    for path in paths:
        original = dcmread(path)
        copy = stored[original.SOPInstanceUID]
        for elem in original:
            assert copy[elem.tag].value == elem.value, elem.keyword


@pytest.mark.parametrize("max_pdu", [4096, 131072])
def test_dcmtk_storescp_with_small_and_large_pdus(tmp_path: Path, max_pdu: int) -> None:
    paths = [gen(tmp_path / "odd.dcm", rows=255, columns=257, seed=1)]
    paths += write_files(tmp_path / "in", 2, rows=256, columns=256)
    with storescp(tmp_path / "out", extra=["-pdu", str(max_pdu)]) as scp:
        outcomes = send_all(Channel(Peer("127.0.0.1", scp.port, scp.ae_title), SETTINGS), paths)
        assert [o.outcome for o in outcomes] == [Outcome.STORED] * 3, outcomes
        wait_until(lambda: len(scp.files()) == 3, what="storescp to write the files")


def test_orthanc_stores_what_we_send(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "in", 3, rows=128, columns=128)
    paths += write_files(tmp_path / "in", 2, prefix="rle", transfer_syntax=RLELossless)
    with orthanc(tmp_path / "orthanc") as peer:
        outcomes = send_all(Channel(Peer("127.0.0.1", peer.port, peer.ae_title), SETTINGS), paths)
        assert [o.outcome for o in outcomes] == [Outcome.STORED] * 5, outcomes
        wait_until(lambda: peer.instance_count() == 5, what="Orthanc to index 5 instances")


# -- failure statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.STORED),
        (0xB000, Outcome.WARNING),
        (0xB007, Outcome.WARNING),
        (0x0001, Outcome.WARNING),
        (0xA700, Outcome.RETRY),
        (0xA7FF, Outcome.RETRY),
        (0x0110, Outcome.RETRY),
        (0xA900, Outcome.FAILED),
        (0xC000, Outcome.FAILED),
        (0x0122, Outcome.FAILED),
        (0x0124, Outcome.FAILED),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else str(v),
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome
    assert outcome.stored == (outcome in (Outcome.STORED, Outcome.WARNING))


def test_failure_statuses_from_a_pynetdicom_scp(small_files: list[Path]) -> None:
    statuses = [0x0000, 0xC000, 0xA700, 0xB000, 0x0122]
    by_uid = {read_meta(p).sop_instance_uid: s for p, s in zip(small_files, statuses, strict=True)}
    with CapturingSCP(status=lambda rec: by_uid[rec.sop_instance_uid]) as scp:
        channel = Channel(peer_of(scp), SETTINGS)
        outcomes = send_all(channel, small_files)
        assert channel.associations_opened == 1  # failures do not break the association
    assert [o.status for o in outcomes] == statuses
    assert [o.outcome for o in outcomes] == [
        Outcome.STORED,
        Outcome.FAILED,
        Outcome.RETRY,
        Outcome.WARNING,
        Outcome.FAILED,
    ]
    assert outcomes[0].error is None
    for o, s in zip(outcomes[1:], statuses[1:], strict=True):
        assert o.error is not None and f"0x{s:04X}" in o.error


def test_failure_response_with_comment_and_offending_element(small_files: list[Path]) -> None:
    with HostilePeer(status=0xA900, error_comment="SOP mismatch", offending=0x00080018) as peer:
        outcomes = send_all(Channel(peer_of(peer), SETTINGS), small_files[:1])
    (o,) = outcomes
    assert o.outcome is Outcome.FAILED and o.status == 0xA900
    assert o.error is not None
    assert "0xA900" in o.error and "SOP mismatch" in o.error
    assert "(offending element (0008,0018))" in o.error


# -- misbehaving peers --------------------------------------------------------------------------


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """An 8 MB image: more than any socket buffers on loopback hold."""
    return gen(tmp_path / "big.dcm", rows=512, columns=512, frames=16)


def failed_store(peer: HostilePeer, path: Path, settings: AssociationSettings) -> str:
    """Associate, store ``path``, expect a retryable AssociationError that closes the
    association; return its message."""
    assoc, (ctx,) = associate(peer_of(peer), [path], settings)
    with pytest.raises(AssociationError) as info:
        assoc.store_file(str(path), read_meta(path), ctx)
    assert info.value.retryable, info.value
    assert assoc.closed
    return str(info.value)


def test_peer_never_answers_response_timeout_aborts(small_files: list[Path]) -> None:
    settings = AssociationSettings(connect_timeout=10.0, response_timeout=0.3)
    with HostilePeer(Behaviour.NEVER_ANSWER) as peer:
        error = failed_store(peer, small_files[0], settings)
        assert "did not send a DIMSE response within 0.3s" in error
        wait_until(peer.aborted.is_set, timeout=5, what="the peer to receive our A-ABORT")
        assert peer.datasets == [dataset_bytes(small_files[0])]


@pytest.mark.parametrize("timeout", [1e12, float("inf")])
def test_unbounded_timeouts_still_send(small_files: list[Path], timeout: float) -> None:
    """Timeouts become kernel socket timeouts after negotiation; a timeout written as .inf
    or 1e12 seconds must not overflow the struct timeval."""
    settings = AssociationSettings(
        connect_timeout=10.0, response_timeout=timeout, release_timeout=timeout
    )
    with CapturingSCP() as scp:
        outcomes = send_all(Channel(peer_of(scp), settings), small_files[:2])
        assert [o.outcome for o in outcomes] == [Outcome.STORED, Outcome.STORED]
        wait_until(lambda: scp.releases == 1, timeout=5, what="the association's release")
    assert sorted(scp.datasets.values()) == sorted(dataset_bytes(p) for p in small_files[:2])


def test_peer_answers_before_reading_the_data_set(tmp_path: Path, big_file: Path) -> None:
    second = gen(tmp_path / "two.dcm", rows=512, columns=512, frames=4)
    with HostilePeer(Behaviour.ANSWER_EARLY, status=0xC001, error_comment="no thanks") as peer:
        assoc, contexts = associate(peer_of(peer), [big_file, second])
        try:
            for path, ctx in zip([big_file, second], contexts, strict=True):
                response = assoc.store_file(str(path), read_meta(path), ctx)
                assert response.status == 0xC001
                assert response.error_comment == "no thanks"
        finally:
            assoc.release()
        assert peer.released.is_set()  # the association survived, and was released cleanly
        assert peer.datasets == [dataset_bytes(big_file), dataset_bytes(second)]


def test_peer_closes_without_abort(small_files: list[Path]) -> None:
    with HostilePeer(Behaviour.CLOSE) as peer:
        error = failed_store(peer, small_files[0], SETTINGS)
    assert "closed the connection" in error


def test_peer_aborts_mid_file(big_file: Path) -> None:
    with HostilePeer(Behaviour.ABORT_MID_FILE, max_pdu=16384) as peer:
        failed_store(peer, big_file, SETTINGS)
        assert peer.datasets == []


def test_peer_stops_reading_mid_file(big_file: Path) -> None:
    settings = AssociationSettings(connect_timeout=10.0, response_timeout=0.5, so_sndbuf=4096)
    with HostilePeer(Behaviour.STOP_READING) as peer:
        error = failed_store(peer, big_file, settings)
    assert "stopped reading" in error


@pytest.mark.parametrize("behaviour", [Behaviour.HUGE_PDU, Behaviour.GARBAGE])
def test_peer_sends_a_malformed_pdu(small_files: list[Path], behaviour: Behaviour) -> None:
    with HostilePeer(behaviour) as peer:
        error = failed_store(peer, small_files[0], SETTINGS)
        wait_until(peer.closed_by_peer.is_set, timeout=5, what="us to drop the connection")
    assert "malformed PDU" in error


@pytest.mark.parametrize(
    ("behaviour", "retryable", "words"),
    [
        (Behaviour.NO_AC, True, "did not send A-ASSOCIATE-AC within 0.3s"),
        (Behaviour.GARBAGE_AC, True, "malformed PDU"),
        (Behaviour.BAD_AC, True, "malformed A-ASSOCIATE-AC"),
        (Behaviour.REJECT, False, "rejected the association (rejected-permanent"),
    ],
)
def test_negotiation_failures(
    small_files: list[Path], behaviour: Behaviour, retryable: bool, words: str
) -> None:
    meta = read_meta(small_files[0])
    settings = AssociationSettings(connect_timeout=0.3)
    with HostilePeer(behaviour) as peer:
        with pytest.raises(AssociationError) as info:
            Association.request(
                peer_of(peer), settings, [ProposedContext(meta.sop_class_uid, (EXPLICIT,))]
            )
        wait_until(peer.closed_by_peer.is_set, timeout=5, what="us to drop the connection")
    assert info.value.retryable is retryable
    assert words in str(info.value)


def test_nothing_listening_is_a_retryable_association_error() -> None:
    with pytest.raises(AssociationError) as info:
        Association.request(
            Peer("127.0.0.1", free_port(), "NOBODY"),
            SETTINGS,
            [ProposedContext(CTImageStorage, (EXPLICIT,))],
        )
    assert info.value.retryable
    assert "cannot connect" in str(info.value)


def test_too_many_contexts_is_refused_before_connecting() -> None:
    contexts = [ProposedContext(f"1.2.3.{i}", (EXPLICIT,)) for i in range(129)]
    with pytest.raises(ValueError, match="at most 128"):
        Association.request(Peer("127.0.0.1", free_port(), "X"), SETTINGS, contexts)


def test_file_changed_since_its_header_was_read(tmp_path: Path) -> None:
    path = gen(tmp_path / "a.dcm")
    meta = read_meta(path)
    with path.open("ab") as f:
        f.write(b"\x00\x00")
    with CapturingSCP() as scp:
        assoc, (ctx,) = associate(peer_of(scp), [path])
        try:
            with pytest.raises(InvalidFileError, match="changed since"):
                assoc.store_file(str(path), meta, ctx)
            assert not assoc.closed  # nothing was sent: the association is still usable
            assert assoc.store_file(str(path), read_meta(path), ctx).status == 0x0000
        finally:
            assoc.release()


def test_a_same_size_replacement_is_refused_when_the_mtime_was_recorded(tmp_path: Path) -> None:
    """The daemon's sender takes the header from the queue with the file's mtime: a file
    replaced by another of the same size (a new object with the old one's size) between the
    worker's look and the open is refused, not sent under the old header's UIDs."""
    path = gen(tmp_path / "a.dcm")
    st = path.stat()
    meta = dataclasses.replace(read_meta(path), mtime_ns=st.st_mtime_ns)
    # another instance of the same size: generated UIDs vary in length, so try a few
    for _ in range(200):
        other = gen(tmp_path / "b.dcm")
        if other.stat().st_size == st.st_size:
            break
    assert other.stat().st_size == st.st_size
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with CapturingSCP() as scp:
        assoc, (ctx,) = associate(peer_of(scp), [path])
        try:
            with pytest.raises(InvalidFileError, match="changed since"):
                assoc.store_file(str(path), meta, ctx)
            assert not assoc.closed and not scp.datasets  # nothing was sent
            fresh = dataclasses.replace(read_meta(path), mtime_ns=path.stat().st_mtime_ns)
            assert assoc.store_file(str(path), fresh, ctx).status == 0x0000
        finally:
            assoc.release()


# -- socket options, priority, echo ---------------------------------------------------------------


@pytest.mark.parametrize("nodelay", [True, False])
def test_tcp_nodelay(small_files: list[Path], nodelay: bool) -> None:
    settings = AssociationSettings(connect_timeout=10.0, tcp_nodelay=nodelay)
    with CapturingSCP() as scp:
        assoc, _ = associate(peer_of(scp), small_files[:1], settings)
        try:
            # No public accessor for the socket: this is the option the engine promises.
            sock: socket.socket = assoc._transport.sock
            assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) is nodelay
        finally:
            assoc.release()


def test_two_hundred_small_files_through_nagle_storescp(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "in", 200, rows=8, columns=8)
    with storescp(tmp_path / "out", nagle=True) as scp:
        channel = Channel(Peer("127.0.0.1", scp.port, scp.ae_title), SETTINGS)
        outcomes = send_all(channel, paths)
        assert [o.outcome for o in outcomes] == [Outcome.STORED] * 200
        assert channel.associations_opened == 1
        wait_until(lambda: len(scp.files()) == 200, what="storescp to write 200 files")


@pytest.mark.parametrize("priority", ["low", "medium", "high"])
def test_priority_goes_into_the_command(small_files: list[Path], priority: str) -> None:
    settings = AssociationSettings(connect_timeout=10.0, priority=PRIORITY[priority])
    with HostilePeer() as peer:
        send_all(Channel(peer_of(peer), settings), small_files[:1])
    assert [c.priority for c in peer.commands] == [PRIORITY[priority]]


def test_echo(small_files: list[Path]) -> None:
    with CapturingSCP() as scp:
        assoc = Association.request(
            peer_of(scp), SETTINGS, [ProposedContext("1.2.840.10008.1.1", (IMPLICIT,))]
        )
        try:
            assert [assoc.echo().status for _ in range(3)] == [0, 0, 0]
        finally:
            assoc.release()
        # An association without Verification cannot echo, and says so.
        assoc, _ = associate(peer_of(scp), small_files[:1])
        try:
            with pytest.raises(AssociationError, match="Verification"):
                assoc.echo()
        finally:
            assoc.release()


# -- Channel: renegotiation, reconnection, fallback -----------------------------------------------


def test_peer_aborting_on_the_third_file_the_rest_arrive_on_a_new_association(
    small_files: list[Path],
) -> None:
    with CapturingSCP(abort_on=3) as scp:
        channel = Channel(peer_of(scp), SETTINGS)
        outcomes = send_all(channel, small_files)
        wait_until(lambda: scp.releases == 1, what="the second association's release")
        assert scp.associations == 2 and scp.aborts == 1
        uids = [read_meta(p).sop_instance_uid for p in small_files]
        assert sorted(scp.received_uids()) == sorted(uids[:2] + uids[3:])
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 2 + [Outcome.RETRY] + [
        Outcome.STORED
    ] * 2
    assert outcomes[2].error is not None and "aborted" in outcomes[2].error
    assert outcomes[0].association == outcomes[1].association
    assert outcomes[3].association == outcomes[4].association != outcomes[0].association
    assert channel.associations_opened == 2


def test_unreachable_peer_costs_one_connect_and_every_file_is_retry(
    small_files: list[Path],
) -> None:
    channel = Channel(Peer("127.0.0.1", free_port(), "NOBODY"), SETTINGS)
    outcomes = send_all(channel, small_files)
    assert [o.outcome for o in outcomes] == [Outcome.RETRY] * 5
    assert len({o.error for o in outcomes}) == 1
    assert all(o.association is None for o in outcomes)
    assert channel.down is not None and channel.associations_opened == 0


def test_rejected_permanently_is_failed_not_retry(small_files: list[Path]) -> None:
    with HostilePeer(Behaviour.REJECT) as peer:
        outcomes = send_all(Channel(peer_of(peer), SETTINGS), small_files[:2])
    assert [o.outcome for o in outcomes] == [Outcome.FAILED] * 2


def test_a_syntax_not_proposed_renegotiates(tmp_path: Path) -> None:
    plain = gen(tmp_path / "plain.dcm")
    rle = gen(tmp_path / "rle.dcm", transfer_syntax=RLELossless)
    with CapturingSCP(transfer_syntaxes=[EXPLICIT, IMPLICIT, RLELossless]) as scp:
        channel = Channel(peer_of(scp), SETTINGS)
        outcomes = send_all(channel, [plain, rle, plain])
        wait_until(lambda: scp.releases == 2, what="both associations to be released")
        assert scp.associations == 2
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 3
    assert [o.sent_transfer_syntax for o in outcomes] == [EXPLICIT, RLELossless, EXPLICIT]
    # The second association also proposed what the first one had: no third one for `plain`.
    assert channel.associations_opened == 2


def test_hint_covers_later_files_in_one_negotiation(tmp_path: Path) -> None:
    plain = gen(tmp_path / "plain.dcm")
    rle = gen(tmp_path / "rle.dcm", transfer_syntax=RLELossless)
    mr = gen(tmp_path / "mr.dcm", modality="MR")
    hint = [(read_meta(p).sop_class_uid, read_meta(p).transfer_syntax) for p in (rle, mr)]
    with CapturingSCP() as scp:
        channel = Channel(peer_of(scp), SETTINGS)
        try:
            requests = [StoreRequest(str(p), i) for i, p in enumerate([plain, rle, mr])]
            outcomes = list(channel.send(requests, hint=hint))
        finally:
            channel.release()
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 3
    assert channel.associations_opened == 1


def _pixels(data: bytes, implicit: bool) -> np.ndarray:  # type: ignore[type-arg]
    """Decode a data set received over the network (no meta header) and return its pixels."""
    ds = read_dataset(DicomBytesIO(data), is_implicit_VR=implicit, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = IMPLICIT if implicit else EXPLICIT
    return ds.pixel_array


def test_rle_to_an_uncompressed_only_peer_is_decompressed(tmp_path: Path) -> None:
    src = make_dataset(transfer_syntax=RLELossless, seed=5)
    path = tmp_path / "rle.dcm"
    src.save_as(path, enforce_file_format=True)
    with CapturingSCP(transfer_syntaxes=UNCOMPRESSED) as scp:
        (o,) = send_all(Channel(peer_of(scp), SETTINGS), [path])
        (rec,) = scp.received_list()
        data = scp.datasets[src.SOPInstanceUID]
    assert o.outcome is Outcome.STORED
    assert o.transfer_syntax == RLELossless
    assert o.sent_transfer_syntax == rec.transfer_syntax
    assert rec.transfer_syntax in UNCOMPRESSED
    assert np.array_equal(_pixels(data, rec.transfer_syntax == IMPLICIT), dcmread(path).pixel_array)


def test_rle_to_a_peer_that_takes_rle_is_sent_as_is(tmp_path: Path) -> None:
    path = gen(tmp_path / "rle.dcm", transfer_syntax=RLELossless)
    with CapturingSCP() as scp:
        (o,) = send_all(Channel(peer_of(scp), SETTINGS), [path])
        assert scp.datasets[read_meta(path).sop_instance_uid] == dataset_bytes(path)
    assert o.sent_transfer_syntax == RLELossless


def test_lossy_jpeg_needs_the_flag(tmp_path: Path) -> None:
    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    with CapturingSCP(transfer_syntaxes=UNCOMPRESSED) as scp:
        (refused,) = send_all(Channel(peer_of(scp), SETTINGS), [jpeg])
        (allowed,) = send_all(Channel(peer_of(scp), SETTINGS, allow_lossy_decompress=True), [jpeg])
        (rec,) = scp.received_list()
    assert refused.outcome is Outcome.FAILED
    assert refused.error is not None and "--allow-lossy-decompress" in refused.error
    assert "JPEG Baseline" in refused.error
    assert allowed.outcome is Outcome.STORED
    assert rec.transfer_syntax in UNCOMPRESSED


def test_no_context_for_the_sop_class(tmp_path: Path) -> None:
    ct = gen(tmp_path / "ct.dcm")
    mr = gen(tmp_path / "mr.dcm", modality="MR")
    with CapturingSCP(sop_classes=[MRImageStorage]) as scp:
        outcomes = send_all(Channel(peer_of(scp), SETTINGS), [ct, mr])
    assert [o.outcome for o in outcomes] == [Outcome.FAILED, Outcome.STORED]
    error = outcomes[0].error
    assert error is not None
    assert "no acceptable presentation context" in error
    assert "CT Image Storage" in error and "Explicit VR Little Endian" in error
    assert "accepted nothing" in error


def _iter_paths(paths: list[Path]) -> Iterator[StoreRequest]:
    for i, p in enumerate(paths):
        yield StoreRequest(str(p), i)


def test_junk_file_is_failed_and_the_channel_carries_on(tmp_path: Path) -> None:
    good = write_files(tmp_path, 2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM" * 20)
    with CapturingSCP() as scp:
        channel = Channel(peer_of(scp), SETTINGS)
        try:
            outcomes = list(channel.send(_iter_paths([good[0], junk, good[1]])))
        finally:
            channel.release()
    assert [o.outcome for o in outcomes] == [Outcome.STORED, Outcome.FAILED, Outcome.STORED]
    assert outcomes[1].error is not None and "DICM" in outcomes[1].error
    assert channel.associations_opened == 1


# -- odd-length data sets, idle associations the peer ends ----------------------------------------


def test_an_odd_length_deflated_data_set_is_padded_and_stored_by_dcmtk_and_orthanc(
    tmp_path: Path,
) -> None:
    """image_dfl.dcm's data set is 4,303 bytes: it goes out with one 0x00 (PS3.5 7.1), as DCMTK
    sends it; storescp aborted with "Odd Fragment Length" on the unpadded stream."""
    path = Path(get_testdata_file("image_dfl.dcm"))
    assert read_meta(path).dataset_length % 2 == 1
    original = dcmread(path)
    with storescp(tmp_path / "out", extra=["+xa"]) as scp:
        outcomes = send_all(Channel(Peer("127.0.0.1", scp.port, scp.ae_title), SETTINGS), [path])
        assert [o.outcome for o in outcomes] == [Outcome.STORED], outcomes
        (stored,) = wait_until(scp.files, what="storescp to write the file")
        copy = dcmread(stored)
    assert np.array_equal(copy.pixel_array, original.pixel_array)
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    with orthanc(tmp_path / "orthanc") as peer:
        outcomes = send_all(Channel(Peer("127.0.0.1", peer.port, peer.ae_title), SETTINGS), [path])
        assert [o.outcome for o in outcomes] == [Outcome.STORED], outcomes
        wait_until(lambda: peer.instance_count() == 1, what="Orthanc to index the instance")
    with CapturingSCP() as capturing:
        send_all(Channel(peer_of(capturing), SETTINGS), [path])
        assert capturing.datasets[original.SOPInstanceUID] == file_dataset(path) + b"\x00"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("how", ["release", "abort"])
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_pynetdicom_scp_ending_an_idle_association_costs_the_next_file_nothing(
    small_files: list[Path], pki: Pki, tls: bool, how: str
) -> None:
    """pynetdicom, as acceptor, releases (A-RELEASE-RQ) or aborts an association we keep open
    between files: it is noticed before the next file, answered (A-RELEASE-RP), and the next
    file is stored on a new association. A healthy idle association (TLS too: session tickets
    are no data) is not mistaken for a dead one."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(read_meta(small_files[0]).sop_class_uid, UNCOMPRESSED)
    server = start_server(
        ae,
        ("127.0.0.1", free_port()),
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
        ssl_context=server_context(pki.server_cert, pki.server_key) if tls else None,
    )
    settings = SETTINGS
    if tls:
        settings = AssociationSettings(
            connect_timeout=10.0,
            response_timeout=10.0,
            release_timeout=5.0,
            tls=client_context(pki.ca_cert),
        )
    ender: threading.Thread | None = None
    channel = Channel(Peer("127.0.0.1", server.socket.getsockname()[1], "SCP"), settings)
    try:
        (first,) = channel.send([StoreRequest(str(small_files[0]))])
        assoc = channel._assoc  # the pooled association; no public accessor
        assert assoc is not None
        assert not any(assoc.peer_gone() for _ in range(20))
        (theirs,) = server.active_associations
        ender = threading.Thread(target=getattr(theirs, how))  # release() waits for our RP
        ender.start()
        sock = assoc._transport.sock
        wait_until(lambda: select.select([sock], [], [], 0)[0], what=f"their {how}")
        (second,) = channel.send([StoreRequest(str(small_files[1]))])
        channel.release()
        ender.join(10)
        assert not ender.is_alive()
        if how == "release":
            assert theirs.is_released and not theirs.is_aborted
    finally:
        channel.abort()  # a no-op unless the test failed half-way
        if ender is not None:
            ender.join(10)
        server.shutdown()
    assert [first.outcome, second.outcome] == [Outcome.STORED, Outcome.STORED]
    assert channel.associations_opened == 2


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to inject EIO")
def test_a_read_error_mid_send_aborts_and_is_retried(tmp_path: Path) -> None:
    """EIO from the disk while the data set streams (strace injects it into preadv): the
    message is cut, so the association is aborted; the file is not stored, and it is a read
    error (retried later), not a fault of the file."""
    path = gen(tmp_path / "a.dcm", rows=64, columns=64)
    report = tmp_path / "report.json"
    with HostilePeer() as peer:
        strace = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=preadv,preadv2"]
        inject = ["-e", "inject=preadv,preadv2:error=EIO"]
        target = f"SCP@127.0.0.1:{peer.port}"
        done = subprocess.run(
            [*strace, *inject, FORWARDER, "send", "--report", str(report), target, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        wait_until(peer.aborted.is_set, timeout=5, what="our A-ABORT")
        assert peer.datasets == []
    assert done.returncode == 1, done.stderr
    (record,) = json.loads(report.read_text())["files"]
    assert record["outcome"] == "retry"
    assert record["error"] == "read error while sending: Input/output error"


def test_a_batch_of_fragments_is_filled_by_short_vectored_reads_in_order() -> None:
    """The sender reads a batch's fragments with one vectored read; a read that returns less
    (a network filesystem, a signal) is continued where it stopped, byte for byte."""
    from forwarder.net.association_dimse import DimseExchange, _after

    data = bytes(range(256)) * 41
    buf = bytearray(len(data) + 60)
    view = memoryview(buf)
    # Fragments with 12-byte gaps (the PDU headers) between them, of uneven sizes.
    sizes, views, pos = [1000, 3000, 7, 2500, len(data) - 6507], [], 0
    for size in sizes:
        views.append(view[pos + 12 : pos + 12 + size])
        pos += 12 + size
    calls: list[int] = []

    def read_at(targets: list[memoryview], at: int) -> int:
        calls.append(at)
        n = 0
        for target in targets:
            take = min(len(target), 777 - n, len(data) - at - n)
            target[:take] = data[at + n : at + n + take]
            n += take
            if n == 777 or take < len(target):
                break
        return n

    DimseExchange._fill(None, read_at, views, len(data), 0, "f.dcm")  # type: ignore[arg-type]
    assert b"".join(bytes(v) for v in views) == data
    assert len(calls) == -(-len(data) // 777)  # one read per 777 bytes, none repeated
    assert [len(v) for v in _after([view[:10], view[10:30]], 15)] == [15]
    assert _after([view[:10], view[10:30]], 10)[0].obj is buf
    assert _after([view[:10]], 10) == []
