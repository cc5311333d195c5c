"""SIGTERM while a worker's TCP connect hangs (the destination's host drops SYNs): the daemon
exits 0 within a few seconds, not after ``connect_timeout`` (60 s here); the files stay queued,
uncharged, the destination is not marked down, and after a restart against a real peer they are
delivered as they were.

The hung connect is real: a loopback port whose accept queue is full (``peers.black_hole``);
the test waits until the daemon's socket is in SYN_SENT (/proc/net/tcp)."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

from conftest import wait_until
from daemon import Daemon, Dropped, destination
from peers import black_hole, orthanc, orthanc_dicomweb_url, storescp
from pydicom import dcmread

PROMPT = 5.0  # seconds a SIGTERM may take (the connect_timeout is 60 s)


def _stop_promptly(d: Daemon) -> None:
    started = time.monotonic()
    assert d.stop(timeout=30) == 0
    took = time.monotonic() - started
    assert took < PROMPT, f"SIGTERM took {took:.1f}s"


def _jobs(queue: Path) -> list[tuple[str, int]]:
    """(status, attempts) of every job."""
    with closing(sqlite3.connect(queue)) as conn:
        return [(str(s), int(a)) for s, a in conn.execute("SELECT status, attempts FROM jobs")]


def _still_queued(d: Daemon, dropped: list[Dropped]) -> None:
    assert d.done_files() == [] and d.failed_files() == []
    assert d.incoming_files() == sorted(f.rel_path for f in dropped)
    assert _jobs(d.queue) == [("READY", 0)] * len(dropped)  # back to READY, nothing charged
    log = d.log_text()
    assert "interrupted: forwarder is stopping" in log
    assert "is down" not in log and "no answer within" not in log


def _same_as_dropped(d: Daemon, received: list[Path]) -> None:
    """What the peer holds is what was dropped (data sets compared, pixels included)."""
    sent = {str(ds.SOPInstanceUID): ds for ds in (dcmread(d.done / r) for r in d.done_files())}
    held = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in received)}
    assert held.keys() == sent.keys()
    for uid, ds in sent.items():
        assert held[uid].PixelData == ds.PixelData
        assert held[uid].StudyInstanceUID == ds.StudyInstanceUID


def test_sigterm_while_the_connect_to_a_dimse_peer_hangs(tmp_path: Path) -> None:
    with black_hole() as hole:
        dest = destination("pacs", hole.port, ae_title="STORESCP", connect_timeout="60s")
        with Daemon(tmp_path / "fw", destinations=[dest]) as d:
            dropped = d.drop_files(2)
            wait_until(hole.connecting, 30, what="the daemon's connect to hang")
            _stop_promptly(d)
            _still_queued(d, dropped)
            with storescp(tmp_path / "peer") as peer:
                d.write_config(destinations=[destination("pacs", peer.port, ae_title="STORESCP")])
                d.start()
                d.wait_done(2)
                wait_until(lambda: len(peer.files()) == 2, 15, what="2 files at storescp")
                assert d.stop() == 0
                _same_as_dropped(d, peer.files())
            assert _jobs(d.queue) == [("DONE", 1)] * 2
        d.assert_no_phi()


def test_sigterm_while_the_connect_to_a_stow_rs_service_hangs(tmp_path: Path) -> None:
    with black_hole() as hole:
        url = f"http://{hole.host}:{hole.port}/dicom-web"
        dest = {"name": "web", "url": url, "connect_timeout": "60s", "response_timeout": "20s"}
        with Daemon(tmp_path / "fw", destinations=[dest]) as d:
            dropped = d.drop_files(2)
            wait_until(hole.connecting, 30, what="the daemon's connect to hang")
            _stop_promptly(d)
            _still_queued(d, dropped)
            with orthanc(tmp_path / "orthanc", dicomweb=True) as peer:
                d.write_config(destinations=[{**dest, "url": orthanc_dicomweb_url(peer)}])
                d.start()
                d.wait_done(2)
                assert d.stop() == 0
                _same_as_dropped(d, peer.take_all(tmp_path / "held"))
        d.assert_no_phi()
