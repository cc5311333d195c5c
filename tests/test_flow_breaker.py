"""The circuit breaker (issue 16): a destination whose DCMTK storescp is stopped goes down after
a few connection failures, its files wait charged nothing while C-ECHO probes it with backoff,
and it resumes on its own within a probe interval of the peer coming back on the same port; one
journal line per change; state and since when in ``status`` (text and --json) and metrics."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import wait_until
from daemon import Daemon, destination
from peers import free_port, stop_process, wait_for_port
from pydicom import dcmread

from forwarder.daemon.destination_state import DOWN_AFTER

STORESCP = "/usr/bin/storescp"


@contextmanager
def _storescp(port: int, output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """DCMTK storescp on ``port`` (so it can come back on the same one)."""
    output.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [STORESCP, "-aet", "SCP", "-od", str(output), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield proc
    finally:
        stop_process(proc)


def _attempts(queue: Path) -> int:
    """Attempts charged to the jobs of the files dropped while the peer was away."""
    with sqlite3.connect(queue) as conn:
        row = conn.execute(
            """SELECT COALESCE(SUM(j.attempts), 0) FROM jobs AS j
               JOIN files AS f ON f.id = j.file_id WHERE f.rel_path LIKE 'during%'"""
        ).fetchone()
    return int(row[0])


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf'^{name}{{destination="pacs"}} (\S+)$', text, re.M)
    assert m is not None, text
    return float(m.group(1))


def _same_data_sets(received: Path, done: Path) -> int:
    """Every file in done/ is held by the peer with the same data set; returns how many."""
    held = {}
    for p in received.iterdir():
        ds = dcmread(p)
        held[str(ds.SOPInstanceUID)] = ds
    n = 0
    for p in done.rglob("*.dcm"):
        ds = dcmread(p)
        got = held[str(ds.SOPInstanceUID)]
        assert got.PixelData == ds.PixelData and got.StudyInstanceUID == ds.StudyInstanceUID
        n += 1
    return n


def test_a_stopped_peer_is_probed_charged_nothing_and_resumes_on_its_own(
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    received = tmp_path / "received"
    d = Daemon(
        tmp_path / "d",
        destinations=[destination("pacs", port, connect_timeout="1s")],
        retry={"initial_delay": "100ms", "max_delay": "1s"},  # probes every 1 s
        extra={"metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "log_level": "DEBUG"},
    )
    with d:
        with _storescp(port, received):
            d.drop_files(2, prefix="before")
            d.wait_done(2)
        # The peer is gone: connection refused.
        dropped = d.drop_files(20, prefix="during")
        doc = d.wait_status(lambda s: s["pacs"]["state"] == "down", what="pacs down")
        pacs = doc["destinations"]["pacs"]
        assert pacs["state_since"] and "refused" in pacs["last_error"]
        # The breaker opens after DOWN_AFTER failures in a row; then only C-ECHO probes.
        d.wait_log("next probe in", what="a failed probe")
        charged = _attempts(d.queue)
        assert 1 <= charged <= DOWN_AFTER  # the failures that opened the breaker, no more
        probes = d.log_text(current_run=True).count("next probe in")
        wait_until(
            lambda: d.log_text(current_run=True).count("next probe in") >= probes + 2,
            timeout=10,
            what="two more failed probes",
        )
        assert _attempts(d.queue) == charged  # nothing charged while down
        assert d.failed_files() == [] and len(d.incoming_files()) == 20
        text = d.cli("status").stdout
        assert "DOWN since" in text
        assert _metric(metrics_port, "forwarder_destination_up") == 0.0
        # Back on the same port: the next probe succeeds, sending resumes by itself.
        with _storescp(port, received):
            back = time.monotonic()
            d.wait_status(lambda s: s["pacs"]["state"] == "up", timeout=10, what="pacs up")
            resumed = time.monotonic() - back
            d.wait_done(22, timeout=30)
        print(f"up again {resumed:.2f}s after the peer came back (probe interval 1 s)")
        assert resumed < 1.0 + 2.0  # one probe interval, with slack for a loaded machine
        assert _attempts(d.queue) == charged + 20  # one more each: the one that stored it
        assert _same_data_sets(received, d.done) == 22
        assert {x.sop_instance_uid for x in dropped} <= {
            str(dcmread(p).SOPInstanceUID) for p in received.iterdir()
        }
        log = d.log_text(current_run=True)
        downs = [ln for ln in log.splitlines() if "pacs: DOWN:" in ln]
        ups = [ln for ln in log.splitlines() if "pacs: up again" in ln]
        assert len(downs) == 1 and len(ups) == 1, (downs, ups)
        assert "C-ECHO" in ups[0]
        assert _metric(metrics_port, "forwarder_destination_up") == 1.0
        assert d.stop() == 0


def test_a_dicomweb_destination_answering_503_is_probed_with_qido_and_resumes(
    tmp_path: Path,
) -> None:
    """The same breaker for STOW-RS: after DOWN_AFTER failed requests no more POSTs, only
    QIDO-RS GETs (charged nothing); the first 2xx resumes sending."""
    from stowserver import Answer, Seen, StowServer

    down = [True]

    def answer(seen: Seen) -> Answer:
        return Answer(status=503, body=b"maintenance") if down[0] else Answer()

    with StowServer(answer) as server:
        cloud = {"name": "cloud", "url": server.url, "connect_timeout": "2s"}
        d = Daemon(
            tmp_path,
            destinations=[cloud],
            retry={"initial_delay": "100ms", "max_delay": "1s"},
            extra={"log_level": "DEBUG"},
        )
        with d:
            dropped = d.drop_files(5)
            d.wait_log("next probe in", what="a failed QIDO-RS probe")
            posts = len(server.posts())
            assert 1 <= posts <= DOWN_AFTER
            gets = sum(1 for s in server.seen if s.method == "GET")
            wait_until(
                lambda: sum(1 for s in server.seen if s.method == "GET") >= gets + 2,
                timeout=10,
                what="two more probes",
            )
            assert len(server.posts()) == posts  # nothing sent (nor charged) while down
            assert d.status_json()["destinations"]["cloud"]["state"] == "down"
            down[0] = False
            d.wait_done(5, timeout=15)
            assert set(server.uids()) == {x.sop_instance_uid for x in dropped}
            d.wait_status(lambda s: s["cloud"]["state"] == "up", 5, "cloud up")
            assert d.stop() == 0
