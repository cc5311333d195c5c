"""A booted systemd-nspawn container driven from a host whose PID 1 is not systemd, and the
forwarder unit inside it as ``systemctl``/``journalctl`` see it.

No machined here: ``--register=no --keep-unit``, and every command goes in with ``nsenter`` into
the container's PID 1 (found as the nspawn process's child whose PID in its namespace is 1).
``--volatile=overlay`` keeps the cached root unwritten, ``--private-network`` gives the container
a loopback of its own. Not here: what runs inside (scenario.py), building the root (artifacts.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import Failure, expect, say, wait_until

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT = "forwarder"


# --- the container -----------------------------------------------------------------------


class Container:
    """A booted systemd-nspawn container over ``root``; ``share`` appears read-only at /mnt/host."""

    def __init__(self, root: Path, share: Path, log: Path) -> None:
        self.root, self.share, self.log = root, share, log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self) -> None:
        say("boot: systemd-nspawn -b (volatile overlay, private network)")
        with open(self.log, "wb") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--volatile=overlay",
                    "--private-network",
                    f"--machine=fwdtest{os.getpid()}",
                    f"--directory={self.root}",
                    f"--bind-ro={self.share}:/mnt/host",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until("the container's init", self._find_init, 30)
        say(f"boot: container PID 1 is host pid {self.pid}")
        started = time.monotonic()
        states: list[str] = []

        def booted() -> bool:
            # Right after the fork systemd may not listen yet ("offline", or no bus): retry.
            cmd = ["systemctl", "is-system-running", "--wait"]
            result = self.run(cmd, check=False, timeout=90)
            states.append(result.stdout.strip() or result.stderr.strip())
            return states[-1] in ("running", "degraded", "maintenance", "stopping")

        wait_until("the boot (systemctl is-system-running --wait)", booted, 90)
        state = states[-1]
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False)
            say(f"boot: degraded; failed units:\n{failed.stdout}")
        elif state != "running":
            raise Failure(f"the container did not boot: is-system-running says {state!r}")
        say(f"boot: {state} after {time.monotonic() - started:.1f}s")

    def _find_init(self) -> bool:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise Failure(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console_tail()}")
        try:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text()
        except OSError:
            return False
        for child in children.split():
            status = Path(f"/proc/{child}/status").read_text()
            nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
            if nspid and nspid.group(1).split()[-1] == "1":
                self.pid = int(child)
                return True
        return False

    def console_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container, as root, with a clean environment."""
        cmd = ["nsenter", f"--target={self.pid}", "--all", "--"]
        cmd += ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_COLORS=0", "TERM=dumb"]
        result = subprocess.run(
            cmd + argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and result.returncode != 0:
            raise Failure(
                f"in the container: {' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from the host (through its PID 1's root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def poweroff(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        say("poweroff")
        if self.pid:
            with contextlib.suppress(Exception):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=20)
        try:
            self.nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            say("poweroff: still running after 30s; SIGTERM to systemd-nspawn")
            self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                say("poweroff: SIGKILL to systemd-nspawn")
                self.nspawn.kill()
                self.nspawn.wait(timeout=20)


# --- the unit, seen from inside -----------------------------------------------------------


class Unit:
    def __init__(self, box: Container) -> None:
        self.box = box

    def show(self, *props: str) -> dict[str, str]:
        out = self.box.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.show(name).get(name, "")

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> int:
        started = time.monotonic()
        result = self.box.run(["systemctl", *args, UNIT], check=check, timeout=timeout)
        say(
            f"  systemctl {' '.join(args)} {UNIT}: exit {result.returncode} "
            f"in {time.monotonic() - started:.1f}s"
        )
        return result.returncode

    @staticmethod
    def cursor() -> int:
        """Now, as journald's __MONOTONIC_TIMESTAMP (the container shares the host's clock).
        Not a journal cursor: systemd 252's ``--after-cursor`` with ``-u``/``-p`` matches
        skips the first matching entry."""
        return int(time.monotonic() * 1_000_000)

    def journal(self, since: int, *args: str) -> str:
        """The MESSAGE lines of ``journalctl -u forwarder ARGS`` logged after ``since``."""
        out = self.box.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "json", *args]).stdout
        lines = []
        for raw in out.splitlines():
            entry = json.loads(raw)
            if int(entry["__MONOTONIC_TIMESTAMP"]) > since:
                message = entry.get("MESSAGE", "")
                if isinstance(message, list):  # not UTF-8: journalctl gives the bytes
                    message = bytes(message).decode(errors="replace")
                lines.append(str(message))
        return "\n".join(lines)

    def wait_journal(self, since: int, needle: str, *args: str, timeout: float = 20) -> str:
        found: list[str] = []

        def has() -> bool:
            found[:] = [self.journal(since, *args)]
            return needle in found[0]

        wait_until(f"{needle!r} in journalctl -u {UNIT} {' '.join(args)}", has, timeout)
        return found[0]

    def wait_active(self, timeout: float = 30) -> None:
        wait_until(f"{UNIT} active", lambda: self.prop("ActiveState") == "active", timeout)

    def failed_with(self, status: int) -> dict[str, str]:
        s = self.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
        expect(
            s["ActiveState"] == "failed"
            and s["SubState"] == "failed"  # not auto-restart: no restart loop
            and s["ExecMainStatus"] == str(status),
            f"expected failed with exit {status} and no restart pending, got {s}",
        )
        return s


@contextlib.contextmanager
def drop_in(box: Container, name: str, text: str) -> Iterator[None]:
    path = f"/run/systemd/system/{UNIT}.service.d/{name}.conf"
    box.run(["mkdir", "-p", os.path.dirname(path)])
    box.run(["tee", path], input=text)
    box.run(["systemctl", "daemon-reload"])
    try:
        yield
    finally:
        box.run(["rm", "-f", path])
        box.run(["systemctl", "daemon-reload"])
