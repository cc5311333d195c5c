"""The daemon as systemd sees it: sd_notify messages, the watchdog, and /metrics."""

from __future__ import annotations

import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from peers import ScriptedSCP, free_port
from test_ingest_process import site_env

# The daemon's main loop sends STATUS= every second, not every 5 s (it still checks its health
# and feeds the watchdog each second, as in production).
STATUS_EVERY_SECOND = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    import forwarder.daemon.service_loop

    forwarder.daemon.service_loop._STATUS_EVERY = 1.0
"""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield sock
    finally:
        sock.close()


class Messages:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[str] = []

    def pump(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.seen

    def wait_for(self, fragment: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            self.pump()
            return next((m for m in self.seen if fragment in m), None)

        return str(wait_until(found, timeout, what=f"sd_notify {fragment!r}"))


def test_ready_watchdog_status_and_stopping(notify_socket: socket.socket, tmp_path: Path) -> None:
    messages = Messages(notify_socket)
    _, site = site_env(tmp_path, STATUS_EVERY_SECOND)
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={
                "NOTIFY_SOCKET": notify_socket.getsockname(),
                "WATCHDOG_USEC": "2000000",
                **site,
            },
        )
        with d:
            ready = messages.wait_for("READY=1")
            assert "STATUS=" in ready or any("STATUS=" in m for m in messages.seen)
            messages.wait_for("WATCHDOG=1", timeout=10)
            d.drop_files(3)
            d.wait_done(3)
            wait_until(
                lambda: any(
                    "0 pending, 0 in flight; last: pacs stored" in m for m in messages.pump()
                ),
                15,
                what="a STATUS= line with the last outcome",
            )
            # The watchdog keeps being fed while the loop is healthy.
            count = sum("WATCHDOG=1" in m for m in messages.pump())
            wait_until(
                lambda: sum("WATCHDOG=1" in m for m in messages.pump()) > count, 10,
                what="another WATCHDOG=1",
            )  # fmt: skip
            d.signal(signal.SIGTERM)
            assert d.wait_exit(20) == 0
            messages.wait_for("STOPPING=1", timeout=5)


def test_ready_and_watchdog_without_systemd_python(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    """Installed without the systemd extra, the daemon still tells systemd it is ready and
    feeds the watchdog: under the shipped Type=notify unit it would otherwise be killed at the
    start timeout."""
    hidden = tmp_path / "no-systemd-python"
    (hidden / "systemd").mkdir(parents=True)
    (hidden / "systemd" / "__init__.py").write_text(
        "raise ImportError('systemd-python hidden by the test')\n"
    )
    messages = Messages(notify_socket)
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "daemon",
            destinations=[destination("pacs", scp.port)],
            env={
                "NOTIFY_SOCKET": notify_socket.getsockname(),
                "WATCHDOG_USEC": "2000000",
                "PYTHONPATH": str(hidden),
            },
        )
        with d:
            messages.wait_for("READY=1")
            messages.wait_for("WATCHDOG=1", timeout=10)
            d.drop_files(2)
            d.wait_done(2)
            d.signal(signal.SIGTERM)
            assert d.wait_exit(20) == 0
            messages.wait_for("STOPPING=1", timeout=5)


def test_a_starved_watchdog_is_explained_once_not_every_second(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    """When the loop stops feeding systemd's watchdog, the log says which part is unwell."""
    messages = Messages(notify_socket)
    _, site = site_env(tmp_path, STATUS_EVERY_SECOND)
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={
                "NOTIFY_SOCKET": notify_socket.getsockname(),
                "WATCHDOG_USEC": "60000000",
                **site,
            },
        )
        with d:
            messages.wait_for("WATCHDOG=1", timeout=10)
            shutil.rmtree(d.incoming)
            line = "not feeding systemd's watchdog: the watcher of incoming is not running"
            d.wait_log(line, timeout=15)
            fed = sum("WATCHDOG=1" in m for m in messages.pump())
            # The loop checks every second and sends STATUS= every second here: after six more
            # STATUS= lines it has found the same problem 5+ times, and said so once.
            statuses = sum("STATUS=" in m for m in messages.pump())
            wait_until(
                lambda: sum("STATUS=" in m for m in messages.pump()) >= statuses + 6, 20,
                what="six more STATUS= lines",
            )  # fmt: skip
            assert d.log_text(current_run=True).count("not feeding systemd's watchdog") == 1
            assert sum("WATCHDOG=1" in m for m in messages.pump()) == fed  # starved meanwhile


def test_reload_notifies_and_applies_a_new_destination(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    messages = Messages(notify_socket)
    with ScriptedSCP(ae_title="A") as a, ScriptedSCP(ae_title="B") as b:
        d = Daemon(
            tmp_path,
            destinations=[destination("a", a.port, ae_title="A")],
            env={"NOTIFY_SOCKET": notify_socket.getsockname()},
        )
        with d:
            messages.wait_for("READY=1")
            d.drop_files(1, prefix="first")
            d.wait_done(1)
            d.write_config(
                destinations=[
                    destination("a", a.port, ae_title="A"),
                    destination("b", b.port, ae_title="B"),
                ]
            )
            d.reload()
            messages.wait_for("RELOADING=1")
            d.drop_files(2, prefix="second")
            d.wait_done(3)
            assert len(b.received) == 2  # the new destination gets the new files
            assert len(a.received) == 3
            assert d.running()


def test_metrics_show_per_destination_counters(tmp_path: Path) -> None:
    port = free_port()
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            extra={"metrics": {"listen": f"127.0.0.1:{port}"}},
        )
        with d:
            d.drop_files(3)
            d.wait_done(3)

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())

            def counted() -> bool:
                text = scrape()
                return 'forwarder_files_sent_total{destination="pacs",outcome="stored"} 3.0' in text

            wait_until(counted, 10, what="3 stored files in /metrics")
            text = scrape()
            assert 'forwarder_queue_items{destination="pacs",state="pending"} 0.0' in text
            assert "forwarder_send_duration_seconds_bucket" in text
            assert "forwarder_ingest_accepted_total 3.0" in text
            started = time.monotonic()
            assert d.stop() == 0
            assert time.monotonic() - started < 15
