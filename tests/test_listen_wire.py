"""The daemon's socket pairs to its processes (forwarder/daemon/listen_wire.py): a message to
a process that does not read gives up at its deadline instead of blocking the sender."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from forwarder.daemon.listen_wire import Peer, PeerGone, PeerStuck


def test_a_send_to_an_end_that_does_not_read_gives_up_at_its_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = Peer(ours)
        big = b"x" * (4 << 20)  # far more than the socket holds
        started = time.monotonic()
        with pytest.raises(PeerStuck):
            peer.send("forget", big, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5.0
        # Part of that message went: the stream is cut, nothing more is sent on it.
        with pytest.raises(PeerGone):
            peer.send("rescan", timeout=0.5)


def test_a_send_waiting_for_the_lock_gives_up_at_its_deadline_too() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = Peer(ours)
        ended: list[str] = []

        def send_without_deadline() -> None:
            try:
                peer.send("forget", b"x" * (4 << 20))
            except PeerGone:
                ended.append("gone")

        blocked = threading.Thread(target=send_without_deadline, daemon=True)
        blocked.start()  # stuck in sendall, holding the lock
        started = time.monotonic()
        while not peer._send_lock.locked():
            assert time.monotonic() - started < 5.0
        with pytest.raises(PeerStuck):
            peer.send("stop", timeout=0.3)
        theirs.close()  # the blocked send ends (PeerGone)
        blocked.join(5.0)
        assert ended == ["gone"]


def test_a_send_with_a_deadline_arrives_whole_when_the_other_end_reads() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender, reader = Peer(ours), Peer(theirs)
        big = b"y" * (2 << 20)
        got: list[tuple[object, ...]] = []
        thread = threading.Thread(target=lambda: got.append(reader.receive(10.0)), daemon=True)
        thread.start()
        sender.send("forget", big, timeout=10.0)
        thread.join(10.0)
        assert got == [("forget", 0, big)]
