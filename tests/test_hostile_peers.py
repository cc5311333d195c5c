"""Hostile peers against the sender (issue 12, items 6 and 7): each misbehaviour of PS3.7/PS3.8
ends as a RETRY with a clear reason, the file is never reported stored, and the same
:class:`~forwarder.net.channel.Channel` (the worker's sending loop) carries on: the next file is
stored on a new association.

The peer is the raw-socket :class:`hostile.HostilePeer`: the first connection misbehaves, later
ones (``then``) behave.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import wait_until
from dicomgen import write_files
from hostile import Behaviour, HostilePeer

from forwarder.dicom.part10 import read_meta
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.channel import Channel, SendOutcome, StoreRequest
from forwarder.net.status import Outcome

SETTINGS = AssociationSettings(connect_timeout=5.0, response_timeout=5.0, release_timeout=5.0)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_files(tmp_path / "in", 3, rows=16, columns=16)


def channel_to(peer: HostilePeer, settings: AssociationSettings = SETTINGS) -> Channel:
    return Channel(Peer("127.0.0.1", peer.port, "HOSTILE"), settings)


def send(channel: Channel, paths: list[Path]) -> list[SendOutcome]:
    """What the worker does: one Channel.send per batch; it must never raise."""
    return list(channel.send([StoreRequest(str(p), i) for i, p in enumerate(paths)]))


def wire(path: Path) -> bytes:
    data = path.read_bytes()[read_meta(path).dataset_offset :]
    return data + b"\x00" if len(data) % 2 else data


def assert_retry(outcome: SendOutcome, *words: str) -> None:
    assert outcome.outcome is Outcome.RETRY, outcome
    assert not outcome.outcome.stored
    assert outcome.status is None  # no status was believed
    assert outcome.error is not None
    for word in words:
        assert word in outcome.error, outcome.error


# -- C-STORE-RSPs that break PS3.7 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "words"),
    [
        (Behaviour.NO_STATUS, "without Status (0000,0900)"),
        (Behaviour.EMPTY_STATUS, "Status (0000,0900) has 0 bytes"),
        (Behaviour.WRONG_MESSAGE_ID, "response to message 30583; our request was message 1"),
        (Behaviour.WRONG_INSTANCE, "Affected SOP Instance UID is not the one we sent"),
        (Behaviour.WRONG_CLASS, "Affected SOP Class UID is not the one we sent"),
        (Behaviour.WITH_DATA_SET, "announces a data set"),
        (Behaviour.PENDING, "Pending status 0xFF00"),
        (Behaviour.REPEATED_STATUS, "(0000,0900) repeated with another value"),
    ],
)
def test_a_bad_response_is_retried_and_the_next_file_goes_on_a_new_association(
    files: list[Path], behaviour: Behaviour, words: str
) -> None:
    with HostilePeer(behaviour, then=Behaviour.ACCEPT) as peer:
        channel = channel_to(peer)
        try:
            first, second = send(channel, files[:2])
        finally:
            channel.release()
        wait_until(peer.aborted.is_set, timeout=5, what="our A-ABORT of the bad association")
        assert peer.connections == 2
        assert peer.datasets == [wire(files[0]), wire(files[1])]  # it had the bytes: no matter
    assert_retry(first, "sent a bad DIMSE response", words)
    assert second.outcome is Outcome.STORED
    assert channel.associations_opened == 2


@pytest.mark.parametrize(
    ("behaviour", "note"),
    [
        (Behaviour.NO_GROUP_LENGTH, "no Command Group Length"),
        (Behaviour.WRONG_GROUP_LENGTH, "Command Group Length says"),
        (Behaviour.OUT_OF_ORDER, "out of ascending order"),
        (Behaviour.REPEATED_SAME, "(0000,0900) repeated"),
        (Behaviour.EMPTY_INSTANCE, None),
        (Behaviour.EMPTY_CLASS, None),
    ],
)
def test_a_response_pynetdicom_accepts_is_stored_on_one_association(
    files: list[Path],
    behaviour: Behaviour,
    note: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A C-STORE-RSP without (or with a wrong) Command Group Length, with its elements out of
    order or repeated alike, or with an empty Affected SOP Class/Instance UID, says nothing
    different: pynetdicom and DCMTK accept it. Each used to be a protocol error: every file,
    already stored by the peer, was resent and finally moved to failed/. Layout faults are
    logged as a warning once per association."""
    caplog.set_level("DEBUG", logger="forwarder.net.association")
    with HostilePeer(behaviour) as peer:
        channel = channel_to(peer)
        try:
            outcomes = send(channel, files)
        finally:
            channel.release()
        assert peer.datasets == [wire(f) for f in files]
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 3, outcomes
    assert [o.status for o in outcomes] == [0x0000] * 3
    assert channel.associations_opened == 1 and peer.connections == 1
    assert not peer.aborted.is_set()
    noted = [r for r in caplog.records if "accepted in spite of" in r.getMessage()]
    if note is None:
        assert noted == []
        return
    assert [r.levelname for r in noted] == ["WARNING", "DEBUG", "DEBUG"]
    assert note in noted[0].getMessage()


# -- negotiation ----------------------------------------------------------------------------------


def test_a_short_associate_rj_is_a_retry_not_a_crash(files: list[Path]) -> None:
    with HostilePeer(Behaviour.SHORT_RJ, then=Behaviour.ACCEPT) as peer:
        channel = channel_to(peer)
        try:
            outcomes = send(channel, files[:2])
            wait_until(peer.closed_by_peer.is_set, timeout=5, what="us to drop the connection")
            later = send(channel, files[2:])
        finally:
            channel.release()
    for o in outcomes:  # one connect for the batch, every file RETRY with the reason
        assert_retry(o, "malformed A-ASSOCIATE-RJ", "A-ASSOCIATE-RJ of 2 bytes")
    assert [o.outcome for o in later] == [Outcome.STORED]


@pytest.mark.parametrize("max_pdu", [0xFFFFFFFF, 0])
def test_an_unlimited_peer_max_pdu_allocates_no_more_than_a_batch(
    tmp_path: Path, max_pdu: int
) -> None:
    paths = write_files(tmp_path / "in", 2, rows=512, columns=512, frames=3)  # ~1.5 MB each
    with HostilePeer(max_pdu=max_pdu) as peer:
        channel = channel_to(peer)
        tracemalloc.start()
        try:
            outcomes = send(channel, paths)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            channel.release()
        assert max(peer.p_data_lengths()) == 1024 * 1024
        assert peer.datasets == [wire(p) for p in paths]
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 2
    assert peak < 8 * 1024 * 1024, peak  # one ~1 MB batch buffer, not 4 GiB


@pytest.mark.parametrize("max_pdu", [1, 6, 7])
def test_a_peer_max_pdu_too_small_for_any_fragment_is_a_protocol_error(
    files: list[Path], max_pdu: int
) -> None:
    with HostilePeer(max_pdu=max_pdu) as peer:
        channel = channel_to(peer)
        try:
            (o,) = send(channel, files[:1])
        finally:
            channel.release()
        wait_until(peer.aborted.is_set, timeout=5, what="our A-ABORT")
    assert_retry(o, f"maximum PDU length {max_pdu} cannot carry a PDV")


def test_the_smallest_usable_max_pdu_is_honoured(files: list[Path]) -> None:
    with HostilePeer(max_pdu=8) as peer:
        channel = channel_to(peer)
        try:
            (o,) = send(channel, files[:1])
        finally:
            channel.release()
        assert set(peer.p_data_lengths()) == {8}  # 2-byte fragments, command set included
        assert peer.datasets == [wire(files[0])]
    assert o.outcome is Outcome.STORED


# -- association life -----------------------------------------------------------------------------


def test_a_release_collision_is_answered(files: list[Path]) -> None:
    with HostilePeer(Behaviour.RELEASE_COLLISION) as peer:
        channel = channel_to(peer)
        (o,) = send(channel, files[:1])
        started = time.monotonic()
        channel.release()
        took = time.monotonic() - started
        # PS3.8: their A-RELEASE-RQ crossed ours; we (the requestor) answer it with an
        # A-RELEASE-RP, they answer ours, and nobody aborts or waits for a timeout.
        assert peer.events == ["A-RELEASE-RQ", "sent A-RELEASE-RQ", "A-RELEASE-RP"]
        assert not peer.aborted.is_set()
    assert o.outcome is Outcome.STORED
    assert took < SETTINGS.release_timeout / 2
    assert not channel.is_open


@pytest.mark.parametrize(
    ("behaviour", "event"),
    [
        (Behaviour.IDLE_CLOSE, "closed"),
        (Behaviour.IDLE_RELEASE, "sent A-RELEASE-RQ"),
        (Behaviour.IDLE_ABORT, "sent A-ABORT"),
        (Behaviour.IDLE_GARBAGE, "sent P-DATA-TF"),
    ],
)
def test_an_idle_association_the_peer_ended_is_replaced_before_the_next_file(
    files: list[Path], behaviour: Behaviour, event: str
) -> None:
    with HostilePeer(behaviour, then=Behaviour.ACCEPT) as peer:
        channel = channel_to(peer)
        try:
            (first,) = send(channel, files[:1])
            wait_until(lambda: event in peer.events, timeout=5, what=event)
            assert channel.is_open  # as far as anyone knows before looking
            (second,) = send(channel, files[1:2])
        finally:
            channel.release()
        if behaviour is Behaviour.IDLE_RELEASE:  # answered politely, PS3.8 AR-2/AR-4
            wait_until(peer.release_rp.is_set, timeout=5, what="our A-RELEASE-RP")
        if behaviour is Behaviour.IDLE_GARBAGE:
            wait_until(peer.closed_by_peer.is_set, timeout=5, what="us to drop it")
        assert peer.connections == 2
    # No failed attempt, no backoff: the second file never saw the dead association.
    assert [first.outcome, second.outcome] == [Outcome.STORED, Outcome.STORED]
    assert channel.associations_opened == 2
    assert second.association != first.association


def test_an_abort_mid_store_is_a_retry_and_the_next_file_arrives(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "in", 2, rows=256, columns=256)
    with HostilePeer(Behaviour.ABORT_MID_FILE, max_pdu=16384, then=Behaviour.ACCEPT) as peer:
        channel = channel_to(peer)
        try:
            first, second = send(channel, paths)
        finally:
            channel.release()
        assert peer.datasets == [wire(paths[1])]
    assert_retry(first, "aborted")
    assert second.outcome is Outcome.STORED
