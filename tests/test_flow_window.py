"""Send windows (issue 16): ``window:`` parsed and judged against an injected clock (crossing
midnight, whole days, day ranges that wrap), config errors with key and line, the gate's
decision (nothing, or urgent only), and a real daemon whose window excludes now (silent,
``outside_window``, an urgent file let through) and then, reloaded, includes it (the backlog
drains)."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import FORWARDER
from daemon import Daemon, destination, route, subprocess_env, uids
from peers import ScriptedSCP

from forwarder.config.flow import DAYS, parse_window, window_open
from forwarder.daemon.flow import URGENT_ONLY, FlowGate
from forwarder.queue import Queue

# 2026-11-23 is a Monday.
MON = datetime(2026, 11, 23)


def at(day: int, hhmm: str) -> datetime:
    h, m = map(int, hhmm.split(":"))
    return MON + timedelta(days=day, hours=h, minutes=m)


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(0, "18:59"), False),
        (at(0, "19:00"), True),
        (at(1, "06:59"), True),  # Monday night into Tuesday
        (at(1, "07:00"), False),
        (at(0, "03:00"), False),  # Sunday night is not in Mon-Fri 19:00-07:00 ...
        (at(4, "23:00"), True),  # Friday night
        (at(5, "06:00"), True),  # ... into Saturday (and Saturday is a whole day anyway)
        (at(5, "12:00"), True),
        (at(6, "23:59"), True),
        (at(2, "12:00"), False),
    ],
)
def test_a_window_judged_against_an_injected_now(when: datetime, inside: bool) -> None:
    windows = [parse_window("Mon-Fri 19:00-07:00"), parse_window("Sat-Sun")]
    assert window_open(windows, when) is inside


def test_window_forms() -> None:
    wrap = parse_window("Fri-Mon")
    assert wrap.days == {4, 5, 6, 0}
    assert parse_window("mon,wed 08:00-12:00").contains(at(2, "11:59"))
    assert not parse_window("mon,wed 08:00-12:00").contains(at(1, "10:00"))
    nightly = parse_window("22:00-06:00")
    assert nightly.contains(at(3, "23:00")) and nightly.contains(at(3, "05:59"))
    assert not nightly.contains(at(3, "12:00"))
    assert parse_window("Tue 20:00-24:00").contains(at(1, "23:59"))
    assert not parse_window("Tue 20:00-24:00").contains(at(2, "00:00"))
    assert window_open([], at(0, "12:00"))  # no window: always
    assert DAYS[MON.weekday()] == "mon"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Mon-Frx", "'Frx' is not a weekday"),
        ("25:00-01:00", "25:00 is not a time of day"),
        ("Mon 08:00", "a window is DAYS [HH:MM-HH:MM]"),
        ("Mon 08:00-08:00", "empty or the whole day"),
        ("Mon Tue 08:00-09:00", "a window is DAYS"),
    ],
)
def test_bad_windows_are_config_errors_with_key_and_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    config = tmp_path / "f.yaml"
    config.write_text(
        f"""incoming: {tmp_path}/in
done: {tmp_path}/done
failed: {tmp_path}/failed
queue: {tmp_path}/q.sqlite
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: 104
    window:
      - Sat-Sun
      - "{text}"
"""
    )
    result = subprocess.run(
        [FORWARDER, "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=False,
    )
    assert result.returncode == 78
    assert "destinations[0].window[1] (line 12)" in result.stderr and problem in result.stderr


def test_the_gate_decides_against_an_injected_clock(tmp_path: Path) -> None:
    now = [at(2, "12:00")]  # Wednesday noon: outside
    with Queue(tmp_path / "q.sqlite") as q:
        gate = FlowGate(
            "pacs", q, windows=[parse_window("Mon-Fri 19:00-07:00")], local_now=lambda: now[0]
        )
        d = gate.decide()
        assert not d.claim and d.state == "outside_window"
        bypass = FlowGate(
            "pacs",
            q,
            windows=[parse_window("Mon-Fri 19:00-07:00")],
            urgent_bypasses=True,
            local_now=lambda: now[0],
        )
        d = bypass.decide()
        assert d.claim and d.max_rank == URGENT_ONLY and d.state == "outside_window"
        now[0] = at(2, "19:30")
        assert gate.decide().claim and gate.decide().state is None
        q.pause("pacs")
        clock = [100.0]
        paused = FlowGate("pacs", q, clock=lambda: clock[0], local_now=lambda: now[0])
        assert paused.decide().state == "paused"


def test_a_claim_always_sees_a_pause_a_file_between_two_files_within_the_poll(
    tmp_path: Path,
) -> None:
    """``forwarder pause`` then a file queued at once: the next claim must not take it (the
    pause is read afresh before each claim), while between two files of a batch the pause is
    read at most every PAUSE_POLL (a query a file otherwise)."""
    clock = [100.0]
    with Queue(tmp_path / "q.sqlite") as q:
        gate = FlowGate("pacs", q, clock=lambda: clock[0])
        assert gate.decide().claim and gate.may_send(1)  # read at 100.0: not paused
        q.pause("pacs")
        assert gate.may_send(1)  # between two files: the read of 100.0 stands for PAUSE_POLL
        assert gate.decide().state == "paused"  # before a claim: read again, at once
        assert not gate.may_send(1)
        q.resume("pacs")
        assert gate.decide().claim


def _window_excluding_now() -> str:
    """A whole day two days from now (never today, nor tomorrow's first minutes)."""
    return DAYS[(datetime.now().weekday() + 2) % 7].capitalize()


def _window_including_now() -> list[str]:
    today = datetime.now().weekday()
    return [DAYS[today].capitalize(), DAYS[(today + 1) % 7].capitalize()]


def test_a_closed_window_keeps_the_destination_silent_and_the_backlog_drains_when_open(
    tmp_path: Path,
) -> None:
    routes = [
        route("bulk", ["pacs"], folder="bulk/*"),
        {**route("stat", ["pacs"], folder="stat/*"), "priority": "urgent"},
    ]
    with ScriptedSCP() as scp, ScriptedSCP() as other:
        closed = destination(
            "pacs", scp.port, window=[_window_excluding_now()], urgent_bypasses_window=True
        )
        others = [destination("other", other.port)]
        routes.append(route("copy", ["other"], folder="bulk/*"))
        with Daemon(tmp_path, destinations=[closed, *others], routes=routes) as d:
            bulk = d.drop_files(10, folder="bulk")
            d.wait_status(
                lambda s: s["pacs"]["state"] == "outside_window" and s["pacs"]["pending"] == 10,
                10,
                "pacs outside its window with 10 pending",
            )
            # The other destination is not slowed: all 10 stored there.
            d.wait_status(lambda s: s["other"]["done"] == 10, 20, "other done")
            assert other.uids() == uids(bulk)
            # Urgent files go through the closed window; the normal ones wait.
            stat = d.drop_files(2, folder="stat", prefix="stat")
            d.wait_status(lambda s: s["pacs"]["done"] == 2, 20, "the urgent files stored")
            assert scp.uids() == uids(stat)
            assert "OUTSIDE WINDOW since" in d.cli("status").stdout
            d.wait_log("pacs: outside its send window", timeout=5)
            deadline = time.monotonic() + 1.5  # silent for normal files: look for a while
            while time.monotonic() < deadline:
                assert scp.uids() == uids(stat)
                time.sleep(0.05)
            # The window opens (here: the config now says so): the backlog drains.
            opened = destination("pacs", scp.port, window=_window_including_now())
            d.write_config(destinations=[opened, *others], routes=routes)
            d.reload()
            d.wait_done(12, timeout=30)
            assert scp.uids() == uids(bulk) | uids(stat)
            doc = d.wait_status(lambda s: s["pacs"]["state"] == "up", 10, "pacs up")
            assert doc["destinations"]["pacs"]["pending"] == 0
            assert d.stop() == 0
