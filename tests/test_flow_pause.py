"""``forwarder pause`` / ``resume`` (issue 16): on a running daemon within a second (a file
being sent finishes), kept across a restart, shown by ``status`` (text and --json) and the
metrics; an unknown destination is a usage error (2), a bad config 78."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

from conftest import wait_until
from daemon import Daemon, destination, uids
from peers import Received, ScriptedSCP, free_port


class _TimedSCP(ScriptedSCP):
    """A slow ScriptedSCP that records when each file was stored (monotonic)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.times: list[float] = []
        self._times_lock = threading.Lock()
        self.status = self._stamp

    def _stamp(self, _: Received) -> int:
        with self._times_lock:
            self.times.append(time.monotonic())
        return 0x0000


def _state_metric(port: int, state: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = rf'^forwarder_destination_state{{destination="pacs",state="{state}"}} (\S+)$'
    m = re.search(pattern, text, re.M)
    assert m is not None, text
    return float(m.group(1))


def test_pause_and_resume_a_running_daemon_and_across_a_restart(tmp_path: Path) -> None:
    metrics_port = free_port()
    with _TimedSCP(delay=0.05) as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            extra={"metrics": {"listen": f"127.0.0.1:{metrics_port}"}},
        )
        with d:
            dropped = d.drop_files(60)
            wait_until(lambda: len(scp.times) >= 5, 30, what="5 files stored")
            result = d.cli("pause", "pacs")
            paused_at = time.monotonic()
            assert result.returncode == 0, result.stderr
            assert "pacs paused" in result.stderr
            doc = d.wait_status(lambda s: s["pacs"]["state"] == "paused", 5, "pacs paused")
            assert doc["destinations"]["pacs"]["state_since"]
            d.wait_log("pacs: PAUSED by an operator", timeout=5)
            # Within a second: the file being sent may finish, then nothing more.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                with scp._times_lock:
                    late = [t - paused_at for t in scp.times if t > paused_at + 1.0]
                assert not late, f"stored {late[0]:.2f}s after the pause"
                time.sleep(0.05)
            stored = len(scp.times)
            assert stored < 60
            assert "PAUSED since" in d.cli("status").stdout
            assert _state_metric(metrics_port, "paused") == 1.0
            assert _state_metric(metrics_port, "up") == 0.0
            assert d.cli("pause", "pacs").stderr.strip().endswith("pacs was already paused")
            assert d.stop() == 0
            # Kept across a restart: still paused, nothing sent.
            d.start()
            d.wait_log("pacs: PAUSED by an operator", timeout=10)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert len(scp.times) == stored
                time.sleep(0.05)
            assert d.status_json()["destinations"]["pacs"]["state"] == "paused"
            result = d.cli("resume", "pacs")
            resumed_at = time.monotonic()
            assert result.returncode == 0 and "pacs resumed" in result.stderr
            wait_until(lambda: len(scp.times) > stored, 5, what="sending again")
            with scp._times_lock:
                first = min(t for t in scp.times if t > resumed_at) - resumed_at
            assert first < 2.0, f"first file stored {first:.2f}s after resume"
            d.wait_done(60, timeout=60)
            assert scp.uids() == uids(dropped)
            doc = d.wait_status(lambda s: s["pacs"]["state"] == "up", 5, "pacs up")
            assert d.cli("resume", "pacs").stderr.strip().endswith("pacs was not paused")
            log = d.log_text()
            assert log.count("pacs: resumed by an operator") == 1
            assert d.stop() == 0


def test_pause_of_an_unknown_destination_is_a_usage_error(tmp_path: Path) -> None:
    d = Daemon(tmp_path, destinations=[destination("pacs", 104)])
    result = d.cli("pause", "nosuch")
    assert result.returncode == 2
    assert "no destination 'nosuch'" in result.stderr and "known: pacs" in result.stderr
    result = d.cli("resume", "nosuch")
    assert result.returncode == 2
    d.write_raw("destinations: [oops\n")
    assert d.cli("pause", "pacs").returncode == 78
    assert d.cli("resume", "pacs").returncode == 78
    result = d.cli("pause")
    assert result.returncode == 2  # the destination is required


def test_resume_of_a_destination_that_sent_nothing_yet_shows_it_up_again(
    tmp_path: Path,
) -> None:
    """Paused and resumed before its first association (an idle destination): ``status`` must
    not go on saying ``paused`` after ``resume``, and the journal says it resumed."""
    with ScriptedSCP() as scp, Daemon(tmp_path, destinations=[destination("pacs", scp.port)]) as d:
        assert d.cli("pause", "pacs").returncode == 0
        d.wait_log("pacs: PAUSED by an operator", timeout=5)
        assert d.cli("resume", "pacs").returncode == 0
        # up, as the daemon records it (status says so at once, without a since)
        d.wait_status(
            lambda s: s["pacs"]["state"] == "up" and s["pacs"]["state_since"] is not None,
            5,
            "pacs up after resume",
        )
        d.wait_log("pacs: resumed by an operator", timeout=5)
        dropped = d.drop_files(2)
        d.wait_done(2, timeout=20)
        assert scp.uids() == uids(dropped)
        assert d.stop() == 0


def _state_since_metric(listen: str) -> float | None:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'^forwarder_destination_state_since_seconds\{destination="pacs"\} (\S+)$',
                      text, re.M)  # fmt: skip
    return float(found.group(1)) if found else None


def test_paused_since_is_when_it_was_paused_not_the_last_restart(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            extra={"metrics": {"listen": listen}},
        )
        with d:
            assert d.cli("pause", "pacs").returncode == 0
            d.wait_log("pacs: PAUSED by an operator", timeout=5)
            since = d.status_json()["destinations"]["pacs"]["state_since"]
            wait_until(lambda: _state_since_metric(listen) is not None, 5, what="the metric")
            exported = _state_since_metric(listen)
            assert exported is not None
            assert d.stop() == 0
            # a restart well after the pause (and in a later second)
            wait_until(lambda: time.time() > exported + 1.5, 3, what="1.5 s")
            d.start()
            d.wait_log("pacs: PAUSED by an operator", timeout=10)
            pacs = d.status_json()["destinations"]["pacs"]
            assert pacs["state"] == "paused" and pacs["state_since"] == since
            # the metric too says since the pause, not since the restart
            wait_until(lambda: _state_since_metric(listen) is not None, 5, what="the metric")
            assert abs((_state_since_metric(listen) or 0.0) - exported) < 1.0
            assert d.stop() == 0


def test_resume_while_the_daemon_is_stopped_is_shown_at_once(tmp_path: Path) -> None:
    """``status`` shows a pause at once, daemon running or not; a resume likewise: it must
    not go on showing the state the stopped daemon recorded while paused."""
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            assert d.cli("pause", "pacs").returncode == 0
            d.wait_log("pacs: PAUSED by an operator", timeout=5)
            assert d.stop() == 0
        assert d.cli("resume", "pacs").returncode == 0
        assert d.status_json()["destinations"]["pacs"]["state"] != "paused"
        assert "PAUSED" not in d.cli("status").stdout
