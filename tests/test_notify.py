"""Notifier against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.daemon.notify import Notifier


def _needs_systemd_python() -> None:
    pytest.importorskip("systemd.daemon", reason="systemd-python (the systemd extra) not installed")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    _needs_systemd_python()
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_watchdog_stopping(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled

    notifier.ready("queue: 0 pending")
    assert _receive(notify_socket) == {"READY": "1", "STATUS": "queue: 0 pending"}

    notifier.status("pacs: 3 pending, last stored 1.2.3")
    assert _receive(notify_socket) == {"STATUS": "pacs: 3 pending, last stored 1.2.3"}

    notifier.watchdog()
    assert _receive(notify_socket) == {"WATCHDOG": "1"}

    notifier.stopping()
    assert _receive(notify_socket) == {"STOPPING": "1"}


def test_ready_without_status_sends_only_ready(notify_socket: socket.socket) -> None:
    Notifier().ready()
    assert _receive(notify_socket) == {"READY": "1"}


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = _receive(notify_socket)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    notifier.ready()
    assert _receive(notify_socket) == {"READY": "1"}


def test_status_newlines_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    Notifier().status("line one\nREADY=1")
    assert _receive(notify_socket) == {"STATUS": "line one READY=1"}


def test_extend_timeout(notify_socket: socket.socket) -> None:
    Notifier().extend_timeout(90)
    assert _receive(notify_socket) == {"EXTEND_TIMEOUT_USEC": "90000000"}


def test_watchdog_interval_for_this_process(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval == 30.0

    monkeypatch.delenv("WATCHDOG_PID")
    assert Notifier().watchdog_interval == 30.0


def test_watchdog_interval_meant_for_another_process(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval is None


@pytest.mark.parametrize("value", ["", "0", "soon"])
def test_watchdog_interval_off(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", value)
    assert Notifier().watchdog_interval is None


def test_no_notify_socket_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_vanished_socket_is_logged_not_raised(
    notify_socket: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier()
    notify_socket.close()
    (tmp_path / "notify.sock").unlink()
    notifier.watchdog()
    notifier.watchdog()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()


def _without_systemd_python(code: str) -> None:
    """Run ``code`` in a child where ``import systemd`` fails, as on an install without the
    systemd extra (a plain ``pip install forwarder``)."""
    subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['systemd'] = None\n" + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_without_systemd_python_the_socket_is_written_directly(
    notify_socket: socket.socket,
) -> None:
    _without_systemd_python(
        "from forwarder.daemon.notify import Notifier\n"
        "n = Notifier(); assert n.enabled\n"
        "n.ready('queue: 0 pending'); n.watchdog(); n.stopping()\n"
    )
    assert _receive(notify_socket) == {"READY": "1", "STATUS": "queue: 0 pending"}
    assert _receive(notify_socket) == {"WATCHDOG": "1"}
    assert _receive(notify_socket) == {"STOPPING": "1"}


def test_without_systemd_python_an_abstract_socket_works() -> None:
    # systemd may name an abstract socket ("@/org/freedesktop/systemd1/notify/...").
    name = f"forwarder-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        _without_systemd_python(
            "import os\n"
            f"os.environ['NOTIFY_SOCKET'] = '@{name}'\n"
            "from forwarder.daemon.notify import Notifier\n"
            "Notifier().ready()\n"
        )
        assert _receive(sock) == {"READY": "1"}


def test_without_systemd_python_a_vanished_socket_is_not_raised(tmp_path: Path) -> None:
    _without_systemd_python(
        "import os\n"
        f"os.environ['NOTIFY_SOCKET'] = {str(tmp_path / 'gone.sock')!r}\n"
        "from forwarder.daemon.notify import Notifier\n"
        "n = Notifier(); n.ready(); n.watchdog()\n"
    )
