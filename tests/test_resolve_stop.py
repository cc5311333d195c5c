"""A name lookup that hangs (a DNS server that never answers) is given up when the stop is set.

The hang is real: the code under test runs in a mount namespace of its own (``unshare -m``)
whose ``/etc/resolv.conf`` names a DNS server on a loopback address that reads every query and
answers none; glibc's resolver then waits its full timeout (``RES_OPTIONS``). The queries are
counted, so a test cannot pass because the name was never looked up. Nothing leaves loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from dicomgen import write_file

SILENT_DNS = "127.53.0.1"  # a loopback address no resolver uses
NAME = "pacs.forwarder-test.invalid"  # not in /etc/hosts, not .local (mDNS): asked of DNS


class SilentDns:
    """A UDP server on ``SILENT_DNS``:53 that counts the queries it reads and answers none."""

    def __init__(self, root: Path) -> None:
        self.resolv_conf = root / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {SILENT_DNS}\n")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((SILENT_DNS, 53))
        self._sock.settimeout(0.2)
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def wrapper(self) -> list[str]:
        """argv that runs the rest in a mount namespace where this server is the resolver."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.resolv_conf),
        ]


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[SilentDns]:
    server = SilentDns(tmp_path)
    try:
        yield server
    finally:
        server.close()


_PROBE = """
import json, socket, sys, threading, time
from forwarder.errors import ConnectInterrupted
from forwarder.net.interrupt import StopEvent, open_connection

out = {}
started = time.monotonic()
try:  # no stop: the resolver's own timeout
    socket.getaddrinfo(sys.argv[1], 104, 0, socket.SOCK_STREAM)
    out["plain"] = "resolved"
except socket.gaierror as exc:
    out["plain"] = f"gaierror after {time.monotonic() - started:.2f}"
out["plain_s"] = time.monotonic() - started
stop = StopEvent()
threading.Timer(0.5, stop.set).start()
started = time.monotonic()
try:
    open_connection((sys.argv[1], 104), 30.0, stop=stop)
    out["stopped"] = "connected"
except ConnectInterrupted as exc:
    out["stopped"] = str(exc)
out["stopped_s"] = time.monotonic() - started
try:
    open_connection((sys.argv[1], 104), 30.0, stop=stop)
except ConnectInterrupted:
    out["after"] = "interrupted at once"
print(json.dumps(out))
"""


def test_a_lookup_that_hangs_is_given_up_at_the_stop(dns: SilentDns) -> None:
    env = {**os.environ, "RES_OPTIONS": "timeout:3 attempts:1"}
    result = subprocess.run(
        [*dns.wrapper(), sys.executable, "-c", _PROBE, NAME],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # the lookup really hangs here: the resolver waited its timeout for the silent server
    assert out["plain"].startswith("gaierror") and out["plain_s"] >= 2.5, out
    assert dns.queries > 0
    # under a stop event it is given up as the stop comes, not when the resolver gives up
    assert "forwarder is stopping" in out["stopped"], out
    assert 0.4 <= out["stopped_s"] < 1.5, out
    assert out["after"] == "interrupted at once"


def test_the_daemon_stops_at_once_while_a_destination_name_does_not_resolve(
    tmp_path: Path, dns: SilentDns
) -> None:
    """SIGTERM while the sender waits for a name the resolver will not answer for 30 s: the
    daemon exits within seconds, the file still queued in incoming (sent after the restart,
    as any other)."""
    d = Daemon(
        tmp_path / "d",
        destinations=[destination("pacs", 104, host=NAME)],
        env={"RES_OPTIONS": "timeout:30 attempts:1"},
        wrapper=dns.wrapper(),
    )
    with d:
        write_file(d.incoming / "a.dcm")
        wait_until(lambda: dns.queries > 0, 20, what="the sender looking the name up")
        started = time.monotonic()
        assert d.stop(timeout=20) == 0
        assert time.monotonic() - started < 5.0, d.log_tail()
    assert (d.incoming / "a.dcm").exists()
    assert d.done_files() == [] and d.failed_files() == []
