"""sd_notify(3) for the daemon: READY, STATUS, WATCHDOG, STOPPING, RELOADING.

The service owns one :class:`Notifier` and decides *when* to call it: ``ready()`` only once
the queue is recovered, the watcher runs and the workers are up; ``watchdog()`` from the
health of the worker loop (never from a timer that always pings, or a wedged sender would
never be restarted). Notifications go through ``systemd.daemon.notify`` when systemd-python
(the ``systemd`` extra) is installed, and otherwise straight to the ``NOTIFY_SOCKET`` datagram
socket (the whole sd_notify protocol: one datagram of ``KEY=value`` lines), so readiness and
the watchdog work however forwarder was installed (a plain ``pip install`` under the shipped
Type=notify unit would otherwise be killed at the start timeout). Every method is a no-op when
``NOTIFY_SOCKET`` is unset, so the daemon runs the same outside systemd. A failing
notification is logged, never raised: the daemon must not die because the notify socket went
away.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

_SendFunction = Callable[[str], bool]


def _load_sender(address: str) -> _SendFunction:
    try:
        from systemd import daemon
    except ImportError:
        return _DatagramSender(address)
    send: _SendFunction = daemon.notify
    return send


class _DatagramSender:
    """sd_notify(3) without libsystemd: one datagram to the AF_UNIX socket ``NOTIFY_SOCKET``
    names (a path, or ``@name`` in the abstract namespace). Raises OSError like the library."""

    def __init__(self, address: str) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address

    def __call__(self, message: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(self._address)
            sock.sendall(message.encode())
        return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram (STATUS=x\nREADY=1).
    return " ".join(text.splitlines()).strip()


class Notifier:
    """sd_notify via ``systemd.daemon.notify``, or the socket itself without systemd-python.

    Every method is a no-op without ``NOTIFY_SOCKET``. The environment is read once, at
    construction (systemd sets it before ``exec``).
    """

    def __init__(self) -> None:
        env = os.environ
        self._socket = env.get("NOTIFY_SOCKET") or None
        self._watchdog_interval = _watchdog_interval(env, os.getpid())
        self._send = _load_sender(self._socket) if self._socket else None
        self._failed_once = False

    @property
    def enabled(self) -> bool:
        """True when notifications are actually sent."""
        return self._send is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WATCHDOG_USEC``), or None when the watchdog is
        off or meant for another process (``WATCHDOG_PID``). Ping at about half of it."""
        return self._watchdog_interval

    def ready(self, status: str = "") -> None:
        """READY=1: the queue is recovered, the watcher runs and the workers are up."""
        self._notify("READY=1", status)

    def status(self, text: str) -> None:
        """STATUS=: one line for ``systemctl status`` (queue depth, last outcome)."""
        self._notify("", text)

    def watchdog(self) -> None:
        """WATCHDOG=1: call only when the worker loop has shown it is healthy."""
        self._notify("WATCHDOG=1")

    def watchdog_trigger(self) -> None:
        """WATCHDOG=trigger: ask systemd to act as if the watchdog had expired."""
        self._notify("WATCHDOG=trigger")

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC=: keep a long start-up or shutdown from hitting the unit's
        timeout (for example recovering a big queue)."""
        self._notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self._notify("STOPPING=1")

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (systemd 253+ requires it); call :meth:`ready`
        when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def _notify(self, assignment: str, status: str = "") -> None:
        if self._send is None:
            return
        lines = [assignment] if assignment else []
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        if not lines:
            return
        try:
            self._send("\n".join(lines))
        except OSError as exc:
            # Log the first failure loudly, the rest quietly: a gone socket repeats forever.
            log = logger.debug if self._failed_once else logger.warning
            log("sd_notify to %s failed: %s", self._socket, exc)
            self._failed_once = True


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            logger.warning("ignoring WATCHDOG_PID=%r: not an integer", watchdog_pid)
            return None
    return value / 1_000_000
