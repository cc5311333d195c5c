"""Shared fixtures: free ports, deadline polling, a guard against leaked threads, and reports
that survive pytest-xdist's transport."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FORWARDER = str(REPO / ".venv" / "bin" / "forwarder")


def _close_even_if_shutdown_fails() -> None:
    """pynetdicom's ``AssociationSocket._shutdown_socket`` closes the socket only when
    ``shutdown()`` succeeds; when the peer closed first (ENOTCONN, more likely on a loaded
    machine) the socket is dropped unclosed, and its ResourceWarning (an error here) fails
    whichever test the in-process peer (tests/peers.py) or a pynetdicom SCU was serving. The
    same fix as ws4py's (Lawouach/WebSocket-for-Python#272): close in any case."""
    import socket

    from pynetdicom.transport import AssociationSocket

    def _shutdown_socket(self: AssociationSocket) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()

    AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]


_close_even_if_shutdown_fails()


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a non-daemon or forwarder thread running behind it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(("pydevd", "Dummy"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def forwarder_env(tmp_path: Path) -> dict[str, str]:
    """Environment for forwarder subprocesses: no inherited config, no crash hooks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.hookimpl(hookwrapper=True)
def pytest_report_to_serializable(
    config: pytest.Config, report: pytest.TestReport | pytest.CollectReport
) -> Iterator[None]:
    """A report crosses from a pytest-xdist worker as UTF-8: a file name that is not (the
    tests of such names log and assert on them, as surrogate escapes) is shown escaped
    instead of ending the worker."""
    outcome: Any = yield
    data = outcome.get_result()
    if data is not None:
        outcome.force_result(_utf8_safe(data))


def _utf8_safe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_utf8_safe(v) for v in value]
    if isinstance(value, tuple):
        items = [_utf8_safe(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value
