"""The daemon sending to a DICOMweb destination (a scripted STOW-RS server): per-instance
outcomes into done/ and failed/ with their reasons, a held destination on wrong auth that
resumes when the token is fixed, and Retry-After honoured."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from daemon import Daemon, uids
from dicomgen import write_files
from stowserver import Answer, Seen, StowServer

from forwarder.dicom.part10 import read_meta


def web_destination(url: str, **extra: object) -> dict[str, object]:
    return {
        "name": "cloud",
        "url": url,
        "connect_timeout": "2s",
        "response_timeout": "10s",
        "idle_timeout": "5s",
        **extra,
    }


def test_per_instance_outcomes_land_in_done_and_failed_with_reasons(tmp_path: Path) -> None:
    calls: dict[str, int] = {}
    state: dict[str, str] = {}

    def answer(seen: Seen) -> Answer:
        failed, warnings = {}, {}
        for uid in seen.uids:
            calls[uid] = calls.get(uid, 0) + 1
            if uid == state["bad"]:
                failed[uid] = 0xA900  # permanent: to failed/
            elif uid == state["busy"] and calls[uid] == 1:
                failed[uid] = 0xA700  # transient: retried, then stored
            elif uid == state["odd"]:
                warnings[uid] = 0xB000
        return Answer(status=202 if failed or warnings else 200, failed=failed, warnings=warnings)

    staged = write_files(tmp_path / "staging", 5)
    names = [p.name for p in staged]
    all_uids = [read_meta(str(p)).sop_instance_uid for p in staged]
    bad, busy, odd = all_uids[:3]
    state.update(bad=bad, busy=busy, odd=odd)
    with (
        StowServer(answer) as server,
        Daemon(tmp_path / "d", destinations=[web_destination(server.url)]) as daemon,
    ):
        for path in staged:
            os.rename(path, daemon.incoming / path.name)
        daemon.wait_failed(1, timeout=30)
        daemon.wait_done(4, timeout=30)
        (result,) = daemon.error_json(names[0])["destinations"]
        assert result["destination"] == "cloud"
        assert result["status"] == "0xA900"
        assert "Failure Reason" in result["error"] and "HTTP 202" in result["error"]
        status = daemon.status_json()["destinations"]["cloud"]
        assert (status["done"], status["failed"], status["pending"]) == (4, 1, 0), status
        assert sorted(daemon.done_files()) == names[1:]
        log = daemon.log_text()
        assert "stored with warning" in log and "0xB000" in log
        assert "will retry" in log and "0xA700" in log
    assert set(server.uids()) == set(all_uids)


def test_wrong_auth_holds_the_destination_until_the_token_is_fixed(tmp_path: Path) -> None:
    token = tmp_path / "cloud.token"
    token.write_text("expired")
    token.chmod(0o600)

    def answer(seen: Seen) -> Answer:
        if seen.headers.get("authorization") != "Bearer fresh":
            return Answer(status=401, body=b"invalid token")
        return Answer()

    dest = web_destination("", auth={"bearer_token_file": str(token)})
    with StowServer(answer) as server:
        dest["url"] = server.url
        with Daemon(tmp_path / "d", destinations=[dest]) as daemon:
            dropped = daemon.drop_files(3)
            doc = daemon.wait_status(
                lambda d: d["cloud"]["state"] == "down", 20, "the destination held"
            )["destinations"]["cloud"]
            assert "HTTP 401" in doc["last_error"] and "held" in doc["last_error"]
            assert doc["failed"] == 0 and doc["pending"] + doc["in_flight"] == 3
            assert daemon.failed_files() == []
            token.write_text("fresh\n")  # rotated: read again without a restart
            daemon.wait_done(3, timeout=30)
            assert "expired" not in daemon.log_text() and "fresh" not in daemon.log_text()
    assert set(server.uids()) >= uids(dropped)


def test_429_retry_after_is_honoured(tmp_path: Path) -> None:
    times: list[float] = []

    def answer(seen: Seen) -> Answer:
        times.append(time.monotonic())
        if len(times) == 1:
            return Answer(status=429, headers={"Retry-After": "3"}, body=b"slow down")
        return Answer()

    with (
        StowServer(answer) as server,
        Daemon(tmp_path, destinations=[web_destination(server.url)]) as daemon,
    ):
        dropped = daemon.drop_files(2)
        daemon.wait_done(2, timeout=30)
        assert "429" in daemon.log_text()
    assert len(times) >= 2 and times[1] - times[0] >= 2.9, times
    assert set(server.uids()) >= uids(dropped)


def test_an_unsafe_secret_file_stops_the_start_with_exit_78(tmp_path: Path) -> None:
    token = tmp_path / "cloud.token"
    token.write_text("s3cret")
    token.chmod(0o640)
    dest = web_destination("https://127.0.0.1:9/dicom-web", auth={"bearer_token_file": str(token)})
    daemon = Daemon(tmp_path / "d", destinations=[dest])
    try:
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(30) == 78
        log = daemon.log_text()
        assert "accessible by others (mode 0640): chmod 600 it" in log
        assert "s3cret" not in log
    finally:
        daemon.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_while_retry_after_runs_the_workers_wait_rather_than_spin(tmp_path: Path) -> None:
    # Retry-After longer than the retry backoff (the usual case: 30s or more against 5s): the
    # files are due again before the server wants them, and the channel hands them back
    # untried. The workers must wait for Retry-After, not claim and release in a loop.
    answered = threading.Event()
    posts: list[float] = []

    def answer(seen: Seen) -> Answer:
        posts.append(time.monotonic())
        if len(posts) == 1:
            answered.set()
            return Answer(status=429, headers={"Retry-After": "5"}, body=b"slow down")
        return Answer()

    with (
        StowServer(answer) as server,
        Daemon(tmp_path, destinations=[web_destination(server.url)]) as daemon,
    ):
        daemon.drop_files(2)
        assert answered.wait(30)
        cpu_before, began = _cpu_seconds(daemon.pid), time.monotonic()
        daemon.wait_done(2, timeout=30)
        cpu = _cpu_seconds(daemon.pid) - cpu_before
        took = time.monotonic() - began
    assert posts[1] - posts[0] >= 4.9, posts
    assert cpu < 0.25 * took, f"{cpu:.2f}s of CPU in {took:.2f}s waiting for Retry-After"
