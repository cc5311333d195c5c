"""Flow control (issue 16) with Orthanc as the destination, as a new user would try it: a pause
and a resume on a running daemon, then Orthanc stopped (the destination goes down, its files
wait charged nothing while C-ECHO probes it) and started again on the same ports (sending
resumes on its own). What Orthanc holds is compared with what the daemon was given."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import wait_until
from daemon import Daemon, destination
from peers import free_port, orthanc
from pydicom import dcmread


def _attempts(queue: Path, prefix: str) -> int:
    with sqlite3.connect(queue) as conn:
        row = conn.execute(
            """SELECT COALESCE(SUM(j.attempts), 0) FROM jobs AS j
               JOIN files AS f ON f.id = j.file_id WHERE f.rel_path LIKE :p""",
            {"p": f"{prefix}%"},
        ).fetchone()
    return int(row[0])


def test_pause_resume_and_the_breaker_with_orthanc(tmp_path: Path) -> None:
    ports = (free_port(), free_port())
    storage = tmp_path / "orthanc"
    d = Daemon(
        tmp_path / "d",
        destinations=[destination("orthanc", ports[0], ae_title="ORTHANC", connect_timeout="1s")],
        retry={"initial_delay": "100ms", "max_delay": "1s"},  # probes every 1 s at most
        extra={"log_level": "DEBUG"},  # each failed probe is a DEBUG line
    )
    with d:
        with orthanc(storage, ports=ports, graceful_stop=True) as peer:
            d.drop_files(2, prefix="before")
            d.wait_done(2)
            # Paused: what is dropped stays queued, the state says so; resumed: it goes.
            assert d.cli("pause", "orthanc").returncode == 0
            d.drop_files(3, prefix="paused")
            d.wait_status(
                lambda s: s["orthanc"]["state"] == "paused" and s["orthanc"]["pending"] == 3,
                what="paused with 3 pending",
            )
            assert peer.instance_count() == 2
            assert d.cli("resume", "orthanc").returncode == 0
            d.wait_done(5, timeout=30)
            wait_until(lambda: peer.instance_count() == 5, 15, what="5 at Orthanc")
        # Orthanc stopped: down, probed with C-ECHO, nothing charged while down.
        d.drop_files(10, prefix="during")
        d.wait_status(lambda s: s["orthanc"]["state"] == "down", what="orthanc down")
        d.wait_log("next probe in", what="a failed probe")
        charged = _attempts(d.queue, "during")
        probes = d.log_text(current_run=True).count("next probe in")
        wait_until(
            lambda: d.log_text(current_run=True).count("next probe in") >= probes + 2,
            timeout=15,
            what="two more failed probes",
        )
        assert _attempts(d.queue, "during") == charged
        assert d.failed_files() == [] and len(d.incoming_files()) == 10
        # Started again where it was: the next probe answers, sending resumes by itself.
        with orthanc(storage, ports=ports, graceful_stop=True) as peer:
            d.wait_status(lambda s: s["orthanc"]["state"] == "up", timeout=15, what="up again")
            d.wait_done(15, timeout=60)
            wait_until(lambda: peer.instance_count() == 15, 30, what="15 at Orthanc")
            held = {
                str(ds.SOPInstanceUID): ds for ds in map(dcmread, peer.take_all(tmp_path / "got"))
            }
        for path in d.done.rglob("*.dcm"):
            original = dcmread(path)
            got = held[str(original.SOPInstanceUID)]
            assert got.PixelData == original.PixelData
            assert got.StudyInstanceUID == original.StudyInstanceUID
        log = d.log_text(current_run=True)
        assert sum("orthanc: DOWN:" in ln for ln in log.splitlines()) == 1
        assert sum("orthanc: up again" in ln for ln in log.splitlines()) == 1
        assert d.stop() == 0
