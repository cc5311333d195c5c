"""A TCP connect that hangs (a peer dropping SYNs) ends at once when the stop is set.

The hung connect is real: a loopback port whose accept queue is full (``peers.black_hole``).
Covered: the kernel behaviour the design rests on (shutdown() wakes a connect in SYN_SENT),
:mod:`forwarder.net.interrupt` (IPv4 and IPv6); the C-STORE sender's connect, TLS handshake,
A-ASSOCIATE-AC wait and channel (an established association is left alone); the STOW-RS
client; the pynetdicom associations of the proof threads (:mod:`forwarder.net.cancel`). The
timeouts and their messages are unchanged without a stop.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from dicomgen import write_file
from peers import BlackHole, ScriptedSCP, black_hole

from forwarder.config import Destination, RetryPolicy
from forwarder.daemon.spares import SpareAssociations
from forwarder.dicomweb.channel import StowChannel
from forwarder.dicomweb.http import WebSettings
from forwarder.errors import AssociationError, ConnectInterrupted
from forwarder.net.association import Association, AssociationSettings, Peer
from forwarder.net.channel import Channel, StoreRequest
from forwarder.net.commitment import CommitmentBook
from forwarder.net.commitment_scu import open_association
from forwarder.net.interrupt import StopEvent, open_connection
from forwarder.net.pdu import VERIFICATION_SOP_CLASS, ProposedContext
from forwarder.net.status import Outcome
from forwarder.net.transport import connect

PROMPT = 2.0  # seconds an interrupted connect may take to return
_ECHO = ProposedContext(VERIFICATION_SOP_CLASS, ("1.2.840.10008.1.2",))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` on a thread; its result or exception, and how long it took, land in the
    dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = call()
        except BaseException as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, name="test-connect", daemon=True)
    thread.start()
    return thread, out


def _interrupt(hole: BlackHole, stop: threading.Event, thread: threading.Thread) -> float:
    """Wait until the thread's connect hangs, set ``stop``, return how long it took to end."""
    wait_until(hole.connecting, 10, what="a connect waiting in SYN_SENT")
    assert thread.is_alive()
    stopped = time.monotonic()
    stop.set()
    thread.join(10)
    assert not thread.is_alive(), "the connect was not interrupted"
    return time.monotonic() - stopped


# -- the kernel behaviour the design rests on ----------------------------------------------------


def test_shutdown_wakes_a_connect_in_syn_sent() -> None:
    with black_hole() as hole, socket.socket() as sock:
        sock.settimeout(60)
        thread, out = _in_thread(lambda: sock.connect((hole.host, hole.port)))
        wait_until(hole.connecting, 10, what="SYN_SENT")
        sock.shutdown(socket.SHUT_RDWR)
        thread.join(PROMPT)
        assert not thread.is_alive()
        assert isinstance(out["error"], ConnectionResetError)


# -- forwarder.net.interrupt ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
def test_open_connection_is_interrupted_by_the_stop(host: str) -> None:
    stop = StopEvent()
    with black_hole(host) as hole:
        thread, out = _in_thread(lambda: open_connection((host, hole.port), 60.0, stop=stop))
        took = _interrupt(hole, stop, thread)
        assert took < PROMPT
        assert isinstance(out["error"], ConnectInterrupted)
        assert hole.connecting() == 0  # the socket was closed, not left in SYN_SENT


def test_open_connection_after_the_stop_does_not_connect() -> None:
    stop = StopEvent()
    stop.set()
    with black_hole() as hole:
        with pytest.raises(ConnectInterrupted):
            open_connection((hole.host, hole.port), 60.0, stop=stop)
        assert hole.connecting() == 0


def test_open_connection_keeps_its_timeout_and_connects() -> None:
    stop = StopEvent()
    with black_hole() as hole:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            open_connection((hole.host, hole.port), 0.3, stop=stop)
        assert time.monotonic() - started < PROMPT
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with open_connection(("localhost", port), 5.0, stop=stop) as sock:
            peer, _ = server.accept()
            with peer:
                sock.sendall(b"ping")
                assert peer.recv(4) == b"ping"
    assert not stop.is_set()


# -- the C-STORE sender ---------------------------------------------------------------------------


def test_transport_connect_is_interrupted_and_says_so() -> None:
    stop = StopEvent()
    with black_hole() as hole:
        peer = Peer(hole.host, hole.port, "PACS")
        settings = AssociationSettings(connect_timeout=60.0, stop=stop)
        thread, out = _in_thread(lambda: connect(peer, settings))
        assert _interrupt(hole, stop, thread) < PROMPT
    error = out["error"]
    assert isinstance(error, ConnectInterrupted) and error.retryable
    assert str(error) == f"cannot connect to {peer}: interrupted: forwarder is stopping"


def test_transport_connect_timeout_message_is_unchanged() -> None:
    with black_hole() as hole:
        peer = Peer(hole.host, hole.port, "PACS")
        with pytest.raises(AssociationError) as caught:
            connect(peer, AssociationSettings(connect_timeout=0.3, stop=StopEvent()))
    assert not isinstance(caught.value, ConnectInterrupted)
    assert str(caught.value) == f"cannot connect to {peer}: no answer within 0.3s"


def _first_bytes(server: socket.socket) -> socket.socket:
    """Accept the client's connection and read its first bytes (the A-ASSOCIATE-RQ or the TLS
    ClientHello): the client then waits for an answer that never comes."""
    server.settimeout(10)
    conn, _ = server.accept()
    conn.settimeout(10)
    assert conn.recv(1)
    return conn


def _stopped_while_it_waits(
    server: socket.socket, stop: threading.Event, call: Callable[[], Any]
) -> dict[str, Any]:
    """Run ``call`` on a thread; once its first bytes reached ``server`` (which never answers),
    set ``stop``: the call must end promptly. Its result or exception (``_in_thread``)."""
    thread, out = _in_thread(call)
    with _first_bytes(server):
        stopped = time.monotonic()
        stop.set()
        thread.join(10)
        assert time.monotonic() - stopped < PROMPT
    return out


def test_the_wait_for_the_a_associate_ac_is_interrupted() -> None:
    stop = StopEvent()
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = Peer("127.0.0.1", server.getsockname()[1], "PACS")
        settings = AssociationSettings(connect_timeout=60.0, stop=stop)
        out = _stopped_while_it_waits(
            server, stop, lambda: Association.request(peer, settings, [_ECHO])
        )
    error = out["error"]
    assert isinstance(error, ConnectInterrupted)
    assert (
        str(error) == f"association with {peer} not established: interrupted: forwarder is stopping"
    )


def test_the_tls_handshake_is_interrupted() -> None:
    stop = StopEvent()
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = Peer("127.0.0.1", server.getsockname()[1], "PACS")
        tls = ssl.create_default_context()
        settings = AssociationSettings(connect_timeout=60.0, stop=stop, tls=tls)
        out = _stopped_while_it_waits(server, stop, lambda: connect(peer, settings))
    error = out["error"]
    assert isinstance(error, ConnectInterrupted)
    assert str(error) == f"TLS handshake with {peer}: interrupted: forwarder is stopping"


def test_an_established_association_is_not_cut_by_the_stop(tmp_path: Path) -> None:
    """Only the setting up is watched: once negotiated, the stop leaves the association alone
    (the worker finishes the file it is sending)."""
    stop = StopEvent()
    with ScriptedSCP() as scp:
        peer = Peer("127.0.0.1", scp.port, scp.ae_title)
        settings = AssociationSettings(connect_timeout=10.0, stop=stop)
        assoc = Association.request(peer, settings, [_ECHO])
        try:
            stop.set()
            assert assoc.echo().status == 0x0000
        finally:
            assoc.release()


def test_channel_hands_the_files_back_untried(tmp_path: Path) -> None:
    files = [tmp_path / f"img{i}.dcm" for i in range(3)]
    for i, path in enumerate(files):
        write_file(path, seed=i)
    stop = StopEvent()
    with black_hole() as hole:
        channel = Channel(
            Peer(hole.host, hole.port, "PACS"), AssociationSettings(connect_timeout=60.0, stop=stop)
        )
        requests = [StoreRequest(str(p), key=i) for i, p in enumerate(files)]
        thread, out = _in_thread(lambda: list(channel.send(requests)))
        assert _interrupt(hole, stop, thread) < PROMPT
    outcomes = out["result"]
    assert [o.request.key for o in outcomes] == [0, 1, 2]
    for o in outcomes:
        assert o.outcome is Outcome.RETRY
        assert not o.attempted and not o.association_failed  # nothing charged, peer not blamed
        assert "interrupted: forwarder is stopping" in (o.error or "")
    assert channel.down is None and not channel.is_open


def test_a_spare_association_interrupted_is_not_taken_for_the_peers_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A spare association (a sibling's is open) whose connect the stop interrupts: the thread
    may not claim, and no "the peer took only 1 of the 2 associations" warning is logged."""
    stop = StopEvent()
    settings = AssociationSettings(connect_timeout=60.0, stop=stop)
    with ScriptedSCP() as scp, black_hole() as hole:
        first = Channel(Peer("127.0.0.1", scp.port, scp.ae_title), settings)
        spare = Channel(Peer(hole.host, hole.port, scp.ae_title), settings)
        try:
            assert first.open([(VERIFICATION_SOP_CLASS, "1.2.840.10008.1.2")])
            dest = Destination(
                name="pacs", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port, associations=2
            )
            spares = SpareAssociations(dest, RetryPolicy(), {0: first, 1: spare})
            needs = [(VERIFICATION_SOP_CLASS, "1.2.840.10008.1.2")]
            thread, out = _in_thread(
                lambda: spares.may_claim(spare, 1, lambda: True, lambda: needs)
            )
            assert _interrupt(hole, stop, thread) < PROMPT
        finally:
            first.release()
    assert out["result"] is False
    assert not spares.paused(1, time.monotonic())
    assert "associations configured" not in caplog.text


# -- the STOW-RS client -----------------------------------------------------------------------


def test_stow_connect_is_interrupted(tmp_path: Path) -> None:
    files = [tmp_path / f"img{i}.dcm" for i in range(2)]
    for i, path in enumerate(files):
        write_file(path, seed=i)
    stop = StopEvent()
    with black_hole() as hole:
        url = f"http://{hole.host}:{hole.port}/dicom-web"
        channel = StowChannel(WebSettings(url=url, connect_timeout=60.0, stop=stop))
        requests = [StoreRequest(str(p), key=i) for i, p in enumerate(files)]
        thread, out = _in_thread(lambda: list(channel.send(requests)))
        assert _interrupt(hole, stop, thread) < PROMPT
    outcomes = out["result"]
    assert len(outcomes) == 2
    for o in outcomes:
        assert o.outcome is Outcome.RETRY
        assert not o.attempted and not o.association_failed
        assert o.error == f"{url}: cannot connect: interrupted: forwarder is stopping"
    assert channel.down is None and not channel.is_open


def test_stow_tls_handshake_is_interrupted(tmp_path: Path) -> None:
    write_file(tmp_path / "img.dcm")
    stop = StopEvent()
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"https://127.0.0.1:{server.getsockname()[1]}/dicom-web"
        tls = ssl.create_default_context()
        channel = StowChannel(WebSettings(url=url, tls=tls, connect_timeout=60.0, stop=stop))
        request = StoreRequest(str(tmp_path / "img.dcm"))
        out = _stopped_while_it_waits(server, stop, lambda: list(channel.send([request])))
    [outcome] = out["result"]
    assert outcome.outcome is Outcome.RETRY
    assert not outcome.attempted and not outcome.association_failed
    assert outcome.error == f"{url}: cannot connect: interrupted: forwarder is stopping"


def test_stow_connect_timeout_is_unchanged(tmp_path: Path) -> None:
    write_file(tmp_path / "img.dcm")
    with black_hole() as hole:
        url = f"http://{hole.host}:{hole.port}/dicom-web"
        channel = StowChannel(WebSettings(url=url, connect_timeout=0.3, stop=StopEvent()))
        [outcome] = list(channel.send([StoreRequest(str(tmp_path / "img.dcm"))]))
    assert outcome.outcome is Outcome.RETRY and outcome.association_failed
    assert outcome.error is not None and "cannot connect" in outcome.error
    assert "timed out" in outcome.error


# -- the proof threads' pynetdicom associations -----------------------------------------------


def test_commitment_association_connect_is_interrupted() -> None:
    """The cancelled associate returns at once, and pynetdicom's connection thread (not a
    daemon thread: it would hold the daemon's exit) ends too: the autouse leak check fails
    the test otherwise."""
    cancel = threading.Event()
    with black_hole() as hole:
        peer = Peer(hole.host, hole.port, "PACS")
        settings = AssociationSettings(connect_timeout=60.0)
        book = CommitmentBook()
        call = lambda: open_association(  # noqa: E731
            peer, settings, book, ["1.2.840.10008.1.20.1"], cancel
        )
        thread, out = _in_thread(call)
        assert _interrupt(hole, cancel, thread) < PROMPT
        assert "stopping" in str(out["error"])
        wait_until(lambda: hole.connecting() == 0, PROMPT, what="the connect to end")
        main = threading.main_thread()

        def holding_exit() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if not t.daemon and t is not main]

        wait_until(lambda: not holding_exit(), 5, what="pynetdicom's threads to end")
