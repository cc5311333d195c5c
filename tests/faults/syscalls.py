"""Trace the durability-relevant system calls of a running daemon with strace.

``with trace(pid, path) as t: ...`` attaches ``strace -f -y -xx`` to every thread of ``pid``
and of its child processes (the daemon's watch-and-ingest process: :func:`family`) (renames,
fsyncs, opens, and writes to the queue's WAL), and on exit detaches (SIGINT to
strace's own PID) and parses the log into :class:`Call` records in the order they started. ``-y``
prints the path behind every file descriptor, so ``fsync(7</spool/done>)`` says which folder was
synced.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STRACE = shutil.which("strace")
_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_QUOTED = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')  # -xx: every string byte as \xNN
_FD_PATH = re.compile(r"^\d+<((?:\\x[0-9a-f]{2})*)>")


def _unhex(escaped: str) -> bytes:
    return bytes.fromhex(escaped.replace("\\x", ""))


def _text(escaped: str) -> str:
    return os.fsdecode(_unhex(escaped))


@dataclass(frozen=True, slots=True)
class Call:
    tid: int
    name: str  # rename, fsync, fdatasync, openat, pwrite64...
    paths: tuple[str, ...]  # file paths named or behind the fd
    data: bytes = b""  # the first bytes written (pwrite64)


@dataclass
class Trace:
    log: Path
    calls: list[Call] = field(default_factory=list)

    def parse(self) -> list[Call]:
        calls = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "resumed>" in line:
                continue  # the call was recorded when it started (<unfinished ...>)
            m = _LINE.match(line)
            if m is None:
                continue
            tid, name, rest = int(m.group(1)), m.group(2), m.group(3)
            calls.append(Call(tid, name, _paths(name, rest), _data(name, rest)))
        self.calls = calls
        return calls


def _paths(name: str, rest: str) -> tuple[str, ...]:
    if name.startswith("rename"):
        return tuple(_text(q) for q in _QUOTED.findall(rest)[:2])
    if name == "openat":
        return tuple(_text(q) for q in _QUOTED.findall(rest)[:1])
    m = _FD_PATH.match(rest)
    return (_text(m.group(1)),) if m else ()


def _data(name: str, rest: str) -> bytes:
    if name not in ("pwrite64", "write"):
        return b""
    # the first quoted string after the fd (whose path is in <...>)
    after_fd = rest.split(">, ", 1)[-1]
    m = _QUOTED.match(after_fd)
    return _unhex(m.group(1)) if m else b""


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (read from /proc): the daemon and the processes it
    started, which write the same queue and folders."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            pids.append(int(entry))
    return pids


@contextmanager
def trace(pid: int, log: Path) -> Iterator[Trace]:
    """strace every thread of ``pid`` and of its children while the block runs; parse the
    calls afterwards."""
    assert STRACE is not None
    pids = family(pid)
    proc = subprocess.Popen(
        [
            STRACE,
            "-f",
            "-qq",
            "-y",
            "-xx",
            "-s",
            "32",
            "-e",
            "trace=openat,rename,renameat,renameat2,fsync,fdatasync,pwrite64",
            "-o",
            str(log),
            *(arg for p in pids for arg in ("-p", str(p))),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t = Trace(log)
    try:
        for p in pids:
            _wait_attached(p, proc)
        yield t
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # detach; the traced process runs on
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
    t.parse()


def _wait_attached(pid: int, proc: subprocess.Popen[bytes]) -> None:
    """Until every thread of ``pid`` shows strace as its tracer (/proc/PID/task/*/status)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"strace exited with {proc.returncode} before attaching")
        tracers = []
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            m = re.search(r"^TracerPid:\s+(\d+)", text, re.M)
            tracers.append(int(m.group(1)) if m else 0)
        if tracers and all(t == proc.pid for t in tracers):
            return
        time.sleep(0.02)
    raise RuntimeError(f"strace did not attach to every thread of {pid} within 10s")
