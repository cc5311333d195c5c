"""Processes for the benchmark: a measured child (wall time and exact peak RSS) and storescp.

Peak RSS comes from ``os.wait4``: the kernel's ``ru_maxrss`` of that one child (KiB on Linux),
exact and free of polling error; ``_launch.py`` explains why a small launcher process starts it.
Wall time runs from spawn to exit, so it includes the sender's start-up (interpreter, imports,
dictionary loading): what an operator waits for when running the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
SCP_AET = "STORESCP"
_LAUNCHER = Path(__file__).resolve().parent / "_launch.py"

# storescp -v logs "I: Received Store Request ..." for every C-STORE request it handles, also
# with --ignore. Only the message is matched: with --fork the children share the log file, and
# the "I: " prefix, the message and the progress dots (stdout, buffered) are separate writes
# that interleave ("RECV: I: Received...", "Received..." without its prefix).
_RECEIVED = re.compile(rb"Received Store Request")


class BenchError(Exception):
    """The harness itself cannot go on (storescp does not start, a tool is missing...)."""


@dataclass(frozen=True, slots=True)
class Measured:
    """How one child process ran."""

    returncode: int
    seconds: float  # spawn to exit, as the launcher saw it
    peak_rss_mib: float
    timed_out: bool
    started: float  # time.monotonic() at spawn (comparable across processes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    """True when something listens on ``port`` of any local address (read from /proc: no probe
    connection, which storescp would log as a failed association)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":  # 0A = TCP_LISTEN
                return True
    return False


class Launched:
    """A child run through ``_launch.py`` in its own session (process group).

    ``wait`` returns its exact wall time (from spawn to exit) and peak RSS. A child still
    running at the deadline is SIGKILLed with its whole process group (the launcher and
    the command, nothing else).
    """

    def __init__(self, argv: list[str], env: dict[str, str], log: IO[bytes], result: Path):
        self.result = result
        result.unlink(missing_ok=True)
        launcher = [sys.executable, "-S", "-I", str(_LAUNCHER), str(result)]
        self.proc = subprocess.Popen(
            launcher + argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Ask the command to stop (the launcher passes SIGTERM on)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the launcher and the command (their own process group) and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float) -> Measured:
        killed = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = True
            self.kill()
        except BaseException:  # Ctrl-C: the child is in its own session and did not get it
            self.kill()
            raise
        try:
            record = json.loads(self.result.read_text())
        except (OSError, ValueError):
            return Measured(self.proc.returncode or -1, float("nan"), float("nan"), killed, 0.0)
        return Measured(
            int(record["returncode"]),
            float(record["end"]) - float(record["start"]),
            float(record["maxrss_kib"]) / 1024,
            killed,
            float(record["start"]),
        )


def run_measured(
    argv: list[str], env: dict[str, str], log: IO[bytes], result: Path, timeout: float
) -> Measured:
    """Run ``argv`` to completion (stdout and stderr to ``log``) and measure it."""
    return Launched(argv, env, log, result).wait(timeout)


class StoreSCP:
    """DCMTK storescp ``--ignore`` on a free loopback port, counting what it received.

    ``nodelay`` puts ``TCP_NODELAY=1`` in its environment (DCMTK then disables Nagle's
    algorithm); without it storescp runs as Debian ships it, Nagle on. ``-v`` makes it log one
    line per C-STORE request, which :meth:`received` counts.
    """

    name = "storescp"
    ae_title = SCP_AET

    def __init__(self, log_path: Path, *, nodelay: bool, fork: bool) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = dcmtk_env(nodelay)
        self.argv = [STORESCP, "-v", "--ignore", "-aet", SCP_AET]
        if fork:
            self.argv.append("--fork")
        self.argv.append(str(self.port))
        self._log = log_path.open("wb")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self._proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 10.0
        while not _listening(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise BenchError(f"storescp did not start on port {self.port}: {tail}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def received(self) -> int:
        """C-STORE requests logged since start."""
        return len(_RECEIVED.findall(self.log_path.read_bytes()))

    def wait_received(self, at_least: int, grace: float = 3.0) -> int:
        """The count once it reaches ``at_least``, or after ``grace`` seconds: with ``--fork``
        a child may write its last lines a moment after the sender has seen the response."""
        deadline = time.monotonic() + grace
        while True:
            count = self.received()
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.01)


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """The environment for DCMTK tools: ``TCP_NODELAY=1`` or, as shipped, no such variable."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def tool_version(argv: list[str]) -> str:
    """First line of ``argv`` (a ``--version`` call), or why it could not run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else f"unknown (exit {out.returncode})"


def works(argv: list[str], env: dict[str, str]) -> str | None:
    """None when ``argv`` (e.g. ``forwarder send --help``) exits 0, else why not."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if out.returncode == 0:
        return None
    last = (out.stderr or out.stdout).strip().splitlines()
    return f"exit {out.returncode}: {last[-1] if last else ''}"
