"""What a C-STORE attempt means for the queue (pool.classify_status, Channel.send's outcomes):
which statuses are retried, which errors are charged an attempt and to which file. Real
pynetdicom and raw-socket peers on loopback, real files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from dicomgen import write_files
from hostile import Behaviour, HostilePeer
from peers import ScriptedSCP, free_port

from forwarder.errors import ProtocolError
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.channel import Channel, SendOutcome, StoreRequest
from forwarder.net.command_set import C_STORE_RSP, NO_DATA_SET, check_response
from forwarder.net.status import Outcome, classify_status

SETTINGS = AssociationSettings(connect_timeout=5.0, response_timeout=5.0, release_timeout=2.0)


def send_all(channel: Channel, paths: list[Path | str]) -> list[SendOutcome]:
    try:
        return list(channel.send([StoreRequest(str(p), i) for i, p in enumerate(paths)]))
    finally:
        channel.release()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0213, Outcome.RETRY),  # resource limitation: was permanent
        (0x0999, Outcome.RETRY),  # no PS3.4 category (Unknown): was permanent
        (0x7F01, Outcome.RETRY),
        (0x0210, Outcome.RETRY),  # duplicate invocation
        (0xA700, Outcome.RETRY),
        (0xA7FF, Outcome.RETRY),
        (0x0110, Outcome.RETRY),
        (0xFE00, Outcome.RETRY),
        (0xA900, Outcome.FAILED),
        (0xC000, Outcome.FAILED),
        (0xCFFF, Outcome.FAILED),
        (0x0122, Outcome.FAILED),
        (0x0124, Outcome.FAILED),
        (0x0117, Outcome.FAILED),
        (0x0000, Outcome.STORED),
        (0xB007, Outcome.WARNING),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else str(v),
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize("status", [0xFF00, 0xFF01])
def test_pending_is_not_classified_the_response_check_refuses_it(status: int) -> None:
    """classify_status documented Pending as retried while check_response refuses it before:
    the two said different things. Pending is the response check's (a protocol error)."""
    values = {
        0x0100: struct.pack("<H", C_STORE_RSP),
        0x0120: struct.pack("<H", 1),
        0x0800: struct.pack("<H", NO_DATA_SET),
        0x0900: struct.pack("<H", status),
    }
    with pytest.raises(ProtocolError, match="Pending"):
        check_response(values, C_STORE_RSP, 1, b"1.2.3")
    with pytest.raises(ValueError, match="Pending"):
        classify_status(status)


def test_a_resource_limitation_from_a_real_peer_is_retry_with_its_status(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 2, rows=8, columns=8)
    with ScriptedSCP(status=0x0213) as scp:
        outcomes = send_all(Channel(Peer("127.0.0.1", scp.port, "SCP"), SETTINGS), [*paths])
    assert [(o.outcome, o.status, o.attempted) for o in outcomes] == [
        (Outcome.RETRY, 0x0213, True)
    ] * 2


def test_a_read_error_at_send_time_is_retried_not_failed(tmp_path: Path) -> None:
    """EISDIR/EACCES/EIO: nothing is known against the file, as at ingest (it was permanent
    at send time). A file that is not DICOM stays a permanent failure."""
    unreadable = tmp_path / "unreadable.dcm"
    unreadable.mkdir()  # open() fails with an OS error, as an unreadable file would
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"no DICOM here" * 20)
    (good,) = write_files(tmp_path / "good", 1, rows=8, columns=8)
    with ScriptedSCP() as scp:
        outcomes = send_all(
            Channel(Peer("127.0.0.1", scp.port, "SCP"), SETTINGS), [unreadable, junk, good]
        )
    assert [o.outcome for o in outcomes] == [Outcome.RETRY, Outcome.FAILED, Outcome.STORED]
    assert "cannot read" in (outcomes[0].error or "")


def test_an_unreachable_peer_charges_only_the_file_tried(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 4, rows=8, columns=8)
    outcomes = send_all(Channel(Peer("127.0.0.1", free_port(), "NOBODY"), SETTINGS), [*paths])
    assert [o.outcome for o in outcomes] == [Outcome.RETRY] * 4
    assert [o.attempted for o in outcomes] == [True, False, False, False]
    assert [o.association_failed for o in outcomes] == [True] * 4


def test_a_file_failing_before_any_association_is_not_an_association_failure(
    tmp_path: Path,
) -> None:
    """Channel.down is the last association attempt's error, kept until one works; a later
    batch whose files all fail before any association is tried must not look like the peer
    being down (the worker used to read channel.down for that, and hand such files back
    uncharged or mark the destination DOWN)."""
    (good,) = write_files(tmp_path, 1, rows=8, columns=8)
    unreadable = tmp_path / "unreadable.dcm"
    unreadable.mkdir()
    channel = Channel(Peer("127.0.0.1", free_port(), "NOBODY"), SETTINGS)
    (refused,) = send_all(channel, [good])
    assert refused.association_failed and channel.down is not None
    (outcome,) = send_all(channel, [unreadable])
    assert outcome.outcome is Outcome.RETRY and outcome.attempted
    assert not outcome.association_failed
    assert channel.down is not None  # still the old error: callers must not read it per batch


def test_a_permanent_rejection_charges_no_file(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 3, rows=8, columns=8)
    with HostilePeer(Behaviour.REJECT) as peer:
        channel = Channel(Peer("127.0.0.1", peer.port, "SCP"), SETTINGS)
        outcomes = send_all(channel, [*paths])
    assert [(o.outcome, o.attempted) for o in outcomes] == [(Outcome.FAILED, False)] * 3
    assert all(o.association_failed for o in outcomes)
    assert channel.down is not None and not channel.down.retryable
    assert "rejected-permanent" in (outcomes[0].error or "")


@pytest.mark.parametrize(
    "behaviour", [Behaviour.EMPTY_STATUS, Behaviour.NO_STATUS, Behaviour.PENDING]
)
def test_a_response_that_breaks_ps37_is_retry_on_the_file_sent(
    tmp_path: Path, behaviour: Behaviour
) -> None:
    """Used to raise out of the engine (a zero-length Status) or count as Success (no Status)
    or as a failure (Pending). Now a protocol error: the association is aborted, the file
    that was being sent is retried, the next file opens a new association."""
    paths = write_files(tmp_path, 2, rows=8, columns=8)
    with HostilePeer(behaviour) as peer:
        channel = Channel(Peer("127.0.0.1", peer.port, "SCP"), SETTINGS)
        outcomes = send_all(channel, [*paths])
    assert [(o.outcome, o.attempted) for o in outcomes] == [(Outcome.RETRY, True)] * 2
    assert channel.associations_opened == 2
