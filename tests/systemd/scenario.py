"""``make test-systemd``: the .deb (and a pip install) under a real systemd, end to end.

A Debian bookworm root made with debootstrap (cached in /var/cache/forwarder-test-systemd,
keyed on its package list) is booted with ``systemd-nspawn -b`` on a throw-away overlay
(``--volatile=overlay``: the cached root is never written) and its own network namespace
(``--private-network``: only a loopback of its own, so ports never clash with the host's).
This host's PID 1 is not systemd, so there is no machined: ``--register=no --keep-unit``, and
every command goes in with ``nsenter`` into the container's PID 1. Inside: DCMTK storescp as the
destination, the freshly built .deb installed with dpkg, then the operations scenario of issue
17 as assertions (readiness, delivery, journal fields, reload, watchdog with a thread dump,
stop, exit 78 without a restart loop, unwritable done/, security score, remove/purge/reinstall,
and the same unit on a plain ``pip install`` in a venv). The container is powered off at the
end whatever happens; nothing stays mounted on the host.

Run as root: ``.venv/bin/python tests/systemd/scenario.py`` (``make test-systemd``). Every step
is printed; a failure prints the reason, the unit's status and the journal tail, and exits 1.
Environment: FORWARDER_TEST_SYSTEMD_CACHE (default /var/cache/forwarder-test-systemd),
FORWARDER_TEST_SYSTEMD_MIRROR (default: the Debian mirror apt uses here),
FORWARDER_TEST_SYSTEMD_KEEP=1 (leave the container running on failure, for a look with nsenter;
it prints how).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from dicomgen import make_dataset  # noqa: E402

SUITE = "bookworm"  # the package is built for its python3 (3.11)
ROOT_LAYOUT = 1  # bump when the root's preparation below changes
# Besides the .deb's own Depends: the init, its bus, the destination (DCMTK storescp, echoscu)
# and python3-venv for the pip variant.
EXTRA_PACKAGES = ("systemd", "dbus", "dcmtk", "python3-venv")
CACHE = Path(os.environ.get("FORWARDER_TEST_SYSTEMD_CACHE", "/var/cache/forwarder-test-systemd"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT = "forwarder"
SPOOL = "/var/spool/forwarder"
CONFIG = "/etc/forwarder/forwarder.yaml"
PACS_DIR = "/srv/pacs"
ARCHIVE_DIR = "/srv/archive"
VENV = "/opt/forwarder-venv"
STARTED = time.monotonic()


class Failure(Exception):
    """A failed expectation: the message says what was expected and what was seen."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def host(cmd: list[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=ROOT
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise Failure(f"{' '.join(cmd)} exited {result.returncode}:\n{output}")
    return result.stdout


# --- the cached root ---------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    configured = os.environ.get("FORWARDER_TEST_SYSTEMD_MIRROR")
    if configured:
        return configured
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                for uri in fields.get("URIs", "").split():
                    if SUITE in suites and uri.rstrip("/").endswith("/debian"):
                        return uri
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def deb_depends(deb: Path) -> list[str]:
    depends = host(["dpkg-deb", "-f", str(deb), "Depends"]).strip()
    names = {re.split(r"[\s(:]", alt.split("|")[0].strip())[0] for alt in depends.split(",")}
    return sorted(n for n in names if n)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """The whole cache, exclusively: building, choosing and pruning its entries."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Anything half-built here was left by a run that was killed while holding this lock.
        for stale in [*CACHE.glob(".building-*"), *CACHE.glob(".wheels-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        yield


def cached_root(packages: list[str], stack: contextlib.ExitStack) -> Path:
    """The debootstrapped root for ``packages``, built once. A shared lock on it is held until
    ``stack`` closes, so that a run needing another package list never deletes it in use."""
    mirror = apt_mirror()
    key_text = json.dumps([SUITE, mirror, packages, ROOT_LAYOUT])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = CACHE / f"root-{key}"
    with cache_lock():
        if (root / ".complete").exists():
            say(f"root: cached {root}")
        else:
            build_root(root, packages, mirror, key_text)
        in_use = stack.enter_context(open(CACHE / f"root-{key}.lock", "a"))  # noqa: SIM115
        fcntl.flock(in_use, fcntl.LOCK_SH)
        for old in CACHE.glob("root-*"):
            if old.suffix == ".lock" or old == root:
                continue
            with open(old.with_name(old.name + ".lock"), "a") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another run boots it right now
                say(f"root: removing the outdated {old}")
                shutil.rmtree(old, ignore_errors=True)
                old.with_name(old.name + ".lock").unlink(missing_ok=True)
    return root


def build_root(root: Path, packages: list[str], mirror: str, key_text: str) -> None:
    say(f"root: debootstrap {SUITE} from {mirror} with {','.join(packages)} (once)")
    work = CACHE / f".building-{root.name}"
    try:
        host(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                SUITE,
                str(work),
                mirror,
            ],
            timeout=900,
        )
        shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
        (work / "var/cache/apt/archives/partial").mkdir(parents=True)
        # No getty on the console: the container's console is our log file.
        (work / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
        # The man-db trigger would only slow dpkg -i down.
        (work / "var/lib/man-db/auto-update").unlink(missing_ok=True)
        (work / ".complete").write_text(key_text + "\n")
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"root: cached as {root}")


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


# --- DICOM files -------------------------------------------------------------------------


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the File Meta group (explicit VR LE)."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return b""  # not (yet) a whole Part 10 file with a group length
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


class Drops:
    """Files dropped into the container's incoming folder, and checks on where they went."""

    def __init__(self, box: Container, scratch: Path) -> None:
        self.box, self.scratch = box, scratch
        self.count = 0

    def drop(self, tag: str) -> tuple[str, str, bytes]:
        """Write one new image atomically (a dot name, then rename); returns (name, uid, bytes)."""
        self.count += 1
        name = f"{tag}-{self.count:03d}.dcm"
        local = self.scratch / name
        ds = make_dataset(seed=self.count)
        ds.save_as(local, enforce_file_format=True)
        data, uid = local.read_bytes(), str(ds.SOPInstanceUID)
        incoming = self.box.path(f"{SPOOL}/incoming")
        tmp = incoming / f".{name}.part"
        tmp.write_bytes(data)
        tmp.rename(incoming / name)
        return name, uid, data

    def received(self, uid: str, folder: str = PACS_DIR) -> Path | None:
        hits = [p for p in self.box.path(folder).iterdir() if p.name.endswith(uid)]
        return hits[0] if hits else None

    def wait_delivered(
        self, name: str, uid: str, data: bytes, timeout: float = 60, to: tuple[str, ...] = ()
    ) -> None:
        done = self.box.path(f"{SPOOL}/done/{name}")
        sent = dataset_bytes(data)
        for folder in (PACS_DIR, *to):

            def arrived() -> bool:  # storescp may still be writing it: compare until equal
                got = self.received(uid, folder)  # noqa: B023 (used at once)
                return got is not None and dataset_bytes(got.read_bytes()) == sent

            wait_until(f"{uid} in {folder}, its data set byte for byte", arrived, timeout)
        wait_until(f"{name} in done/", done.exists, timeout)
        expect(done.read_bytes() == data, f"done/{name} differs from the file dropped")


# --- the scenario ------------------------------------------------------------------------


def start_destination(box: Container, name: str, ae_title: str, port: int, folder: str) -> None:
    say(f"destination: DCMTK storescp --fork on 127.0.0.1:{port} as AE {ae_title} into {folder}")
    box.run(["mkdir", "-p", folder])
    box.run(
        [
            "systemd-run",
            f"--unit={name}",
            "--property=Type=exec",
            "/usr/bin/storescp",
            "--fork",
            "--aetitle",
            ae_title,
            "--bit-preserving",  # the data set exactly as received: compared byte for byte
            "--output-directory",
            folder,
            str(port),
        ]
    )

    def echo() -> bool:
        cmd = ["echoscu", "-aec", ae_title, "127.0.0.1", str(port)]
        return box.run(cmd, check=False).returncode == 0

    wait_until(f"storescp answering C-ECHO on port {port}", echo, 20)


def metrics_answer(box: Container) -> bool:
    url = "http://127.0.0.1:9750/metrics"
    code = f"import urllib.request as u; u.urlopen({url!r}, timeout=5).read()"
    return box.run(["python3", "-c", code], check=False).returncode == 0


def check_install(box: Container, unit: Unit) -> None:
    say("install: dpkg -i forwarder.deb (no --force: the root has exactly its Depends)")
    box.run(["dpkg", "-i", "/mnt/host/forwarder.deb"], timeout=300)
    unit.wait_active()
    expect(box.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled", "not enabled")
    s = unit.show("Type", "User", "NRestarts")
    expect(s["Type"] == "notify", f"Type={s['Type']}")
    say(f"install: active and enabled, {s}")


def check_ready_and_status(box: Container, unit: Unit) -> None:
    say("readiness: systemctl restart returns only once READY=1 came (Type=notify)")
    unit.systemctl("restart", timeout=120)
    # No retry: if start had returned before READY, the listener could still be missing.
    expect(metrics_answer(box), "metrics not served right after systemctl restart returned")
    s = unit.show(
        "ActiveState",
        "SubState",
        "StatusText",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    expect(s["ActiveState"] == "active" and s["SubState"] == "running", f"state {s}")
    expect(s["StatusText"] != "", f"no STATUS= text: {s}")
    waited = int(s["ActiveEnterTimestampMonotonic"]) - int(s["ExecMainStartTimestampMonotonic"])
    say(f"readiness: active {waited / 1e6:.2f}s after the exec; StatusText={s['StatusText']!r}")


def check_delivery_and_journal(box: Container, unit: Unit, drops: Drops) -> None:
    say("delivery: a file dropped into incoming/ reaches storescp byte for byte, then done/")
    name, uid, data = drops.drop("first")
    drops.wait_delivered(name, uid, data)
    say(f"delivery: {name} ({uid}) delivered")
    say("journal: journalctl -u forwarder DESTINATION=pacs -o json has the SOP Instance UID")
    entry = wait_journal_fields(box, "pacs", uid)
    say(f"journal: {entry.get('MESSAGE')!r} PRIORITY={entry.get('PRIORITY')}")


def wait_journal_fields(box: Container, destination: str, uid: str) -> dict[str, str]:
    """The journal entry with DESTINATION= and SOP_INSTANCE_UID= (structured fields)."""
    hits: list[dict[str, str]] = []

    def logged() -> bool:
        argv = ["journalctl", "--no-pager", "-u", UNIT, f"DESTINATION={destination}"]
        out = box.run([*argv, "-o", "json"]).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        hits[:] = [e for e in entries if e.get("SOP_INSTANCE_UID") == uid]
        return bool(hits)

    wait_until(f"a journal entry DESTINATION={destination} SOP_INSTANCE_UID={uid}", logged, 20)
    return hits[0]


def check_reload(box: Container, unit: Unit, drops: Drops) -> None:
    say("reload: a second destination added to the config; systemctl reload; same process")
    start_destination(box, "archive", "ARCHIVE", 11113, ARCHIVE_DIR)
    config = box.path(CONFIG)
    text = config.read_text()
    second = (
        "destinations:\n  - name: archive\n    ae_title: ARCHIVE\n"
        "    host: 127.0.0.1\n    port: 11113\n"
    )
    expect("\ndestinations:\n" in text, "no destinations: list in the packaged config")
    config.write_text(text.replace("\ndestinations:\n", "\n" + second, 1))
    box.run(["forwarder", "check-config", "-c", CONFIG])
    before = unit.show("MainPID", "NRestarts")
    unit.systemctl("reload")
    after = unit.show("MainPID", "NRestarts", "ActiveState")
    expect(after["ActiveState"] == "active", f"after reload: {after}")
    expect(after["MainPID"] == before["MainPID"], f"reload restarted the daemon: {before} {after}")
    name, uid, data = drops.drop("after-reload")
    drops.wait_delivered(name, uid, data, to=(ARCHIVE_DIR,))
    wait_journal_fields(box, "archive", uid)
    say(f"reload: {name} delivered to both destinations by pid {after['MainPID']}")


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


def check_watchdog(box: Container, unit: Unit, drops: Drops, label: str) -> None:
    say(f"watchdog ({label}): WatchdogSec=4s in a drop-in; pings arrive; SIGSTOP gets it killed")
    with drop_in(box, "test-watchdog", "[Service]\nWatchdogSec=4s\nRestartSec=1s\n"):
        unit.systemctl("restart")
        first = unit.prop("WatchdogTimestampMonotonic")
        wait_until(
            "a WATCHDOG=1 ping (WatchdogTimestamp moving)",
            lambda: unit.prop("WatchdogTimestampMonotonic") != first,
            10,
        )
        before = unit.show("MainPID", "NRestarts")
        cursor = unit.cursor()
        box.run(["kill", "-STOP", before["MainPID"]])
        say(f"  SIGSTOP to pid {before['MainPID']}")

        def restarted() -> bool:
            s = unit.show("MainPID", "NRestarts", "ActiveState")
            return (
                s["ActiveState"] == "active"
                and s["MainPID"] not in ("0", before["MainPID"])
                and int(s["NRestarts"]) > int(before["NRestarts"])
            )

        wait_until("systemd to kill and restart the stopped daemon", restarted, 60)
        log = unit.journal(cursor)
        expect("Watchdog timeout" in log, f"no 'Watchdog timeout' in the journal:\n{log}")
        expect("SIGABRT" in log, f"not killed with SIGABRT:\n{log}")
        expect(
            "most recent call first" in log, f"no faulthandler thread dump in the journal:\n{log}"
        )
        dump = [line for line in log.splitlines() if "most recent call first" in line]
        say(f"watchdog: killed with SIGABRT, restarted, {len(dump)} thread stacks in the journal")
        name, uid, data = drops.drop(f"after-watchdog-{label}")
        drops.wait_delivered(name, uid, data)


def check_stop_loses_nothing(box: Container, unit: Unit, drops: Drops) -> None:
    say("stop: systemctl stop while files arrive exits 0; after a start every file is delivered")
    files = [drops.drop("burst") for _ in range(12)]
    unit.systemctl("stop")
    s = unit.show("Result", "ExecMainStatus", "ExecMainCode", "ActiveState")
    expect(s["Result"] == "success" and s["ExecMainStatus"] == "0", f"after stop: {s}")
    unit.systemctl("start")
    for name, uid, data in files:
        drops.wait_delivered(name, uid, data)
    say(f"stop: exit 0, all {len(files)} files delivered after the start")


def check_bad_config(box: Container, unit: Unit) -> None:
    say("bad config: exit 78, no restart loop, the reason at priority err")
    original = box.path(CONFIG).read_bytes()
    nrestarts = unit.prop("NRestarts")
    cursor = unit.cursor()
    box.path(CONFIG).write_bytes(original + b"\nno_such_key: 1\n")
    try:
        code = unit.systemctl("restart", check=False)
        expect(code != 0, "systemctl restart succeeded on an invalid config")
        s = unit.failed_with(78)
        expect(s["NRestarts"] == nrestarts, f"restarted anyway: {s}")
        err = unit.wait_journal(cursor, "no_such_key", "-p", "err")
        say(f"bad config: journalctl -p err says: {first_line_with(err, 'no_such_key')!r}")
    finally:
        box.path(CONFIG).write_bytes(original)
        box.run(["systemctl", "reset-failed", UNIT], check=False)
    unit.systemctl("start")


def first_line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def check_unwritable_done(box: Container, unit: Unit, drops: Drops) -> None:
    folder = "/srv/forwarder-done"
    say(f"unwritable done/: {folder} (outside ReadWritePaths=) gives exit 78 naming it")
    box.run(["install", "-d", "-o", "forwarder", "-g", "forwarder", "-m", "0750", folder])
    original = box.path(CONFIG).read_bytes()
    changed = re.sub(rb"(?m)^done: \S+", f"done: {folder}".encode(), original)
    expect(changed != original, "no done: line in the packaged config")
    cursor = unit.cursor()
    box.path(CONFIG).write_bytes(changed)
    try:
        expect(unit.systemctl("restart", check=False) != 0, "started with an unwritable done/")
        unit.failed_with(78)
        err = unit.wait_journal(cursor, folder, "-p", "err")
        say(f"unwritable done/: journalctl -p err says: {first_line_with(err, folder)!r}")
        box.run(["systemctl", "reset-failed", UNIT], check=False)
        say("unwritable done/: the fix it names (ReadWritePaths= in a drop-in) lets it start")
        with drop_in(box, "test-done", f"[Service]\nReadWritePaths={folder}\n"):
            unit.systemctl("start")
            name, uid, _ = drops.drop("moved-done")
            wait_until(f"{name} in {folder}", lambda: box.path(f"{folder}/{name}").exists(), 60)
            wait_until(f"{uid} at the destination", lambda: drops.received(uid) is not None, 60)
            unit.systemctl("stop")
    finally:
        box.path(CONFIG).write_bytes(original)
        box.run(["systemctl", "reset-failed", UNIT], check=False)
    unit.systemctl("start")


def check_security(box: Container) -> None:
    out = box.run(["systemd-analyze", "security", "--no-pager", f"{UNIT}.service"]).stdout
    m = re.search(r"Overall exposure level for forwarder\.service: (\d+\.\d+) (\S+)", out)
    expect(m is not None, f"no exposure level in:\n{out}")
    assert m is not None
    say(f"security: systemd-analyze security forwarder: {m.group(1)} {m.group(2)}")
    expect(float(m.group(1)) <= 2.0, f"exposure {m.group(1)} > 2.0:\n{out}")


def check_remove_purge_reinstall(box: Container, unit: Unit, drops: Drops) -> None:
    say("remove: dpkg -r stops the service, keeps config, user and spool")
    box.run(["dpkg", "-r", "forwarder"], timeout=120)
    expect(unit.prop("ActiveState") in ("inactive", "failed"), "still running after dpkg -r")
    expect(not box.path("/lib/systemd/system/forwarder.service").exists(), "unit file left")
    expect(box.path(CONFIG).exists(), "dpkg -r removed the conffile")
    expect(box.run(["getent", "passwd", "forwarder"], check=False).returncode == 0, "user gone")
    say("purge: dpkg -P takes config, queue and user; keeps the spool holding delivered files")
    purge = box.run(["dpkg", "-P", "forwarder"], timeout=120)
    expect(not box.path("/etc/forwarder").exists(), "/etc/forwarder left after purge")
    expect(not box.path("/var/lib/forwarder").exists(), "/var/lib/forwarder left after purge")
    expect(box.run(["getent", "passwd", "forwarder"], check=False).returncode != 0, "user left")
    expect(box.path(f"{SPOOL}/done").is_dir(), "purge deleted done/ with delivered files in it")
    expect(f"kept {SPOOL}" in purge.stderr, f"no 'kept {SPOOL}' message: {purge.stderr!r}")
    say("reinstall: dpkg -i again: enabled, started, delivering")
    box.run(["dpkg", "-i", "/mnt/host/forwarder.deb"], timeout=300)
    unit.wait_active()
    expect(box.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled", "not enabled")
    name, uid, data = drops.drop("reinstalled")
    drops.wait_delivered(name, uid, data)


def check_pip_install(box: Container, unit: Unit, drops: Drops) -> None:
    say("pip: the wheel in a venv without the systemd extra, the unit pointed at it (drop-in)")
    box.run(["python3", "-m", "venv", VENV], timeout=120)
    box.run(
        [
            f"{VENV}/bin/pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links=/mnt/host/wheels",
            "forwarder",
        ],
        timeout=300,
    )
    probe = box.run([f"{VENV}/bin/python", "-c", "import systemd"], check=False)
    expect(probe.returncode != 0, "systemd-python is importable in the venv: not the test wanted")
    exec_start = f"{VENV}/bin/forwarder run -c {CONFIG}"
    text = f"[Service]\nExecStart=\nExecStart={exec_start}\nTimeoutStartSec=30s\n"
    with drop_in(box, "test-pip", text):
        check_ready_and_status(box, unit)
        expect(exec_start.split()[0] in unit.prop("ExecStart"), "the drop-in is not in effect")
        name, uid, data = drops.drop("pip")
        drops.wait_delivered(name, uid, data)
        check_watchdog(box, unit, drops, "pip")
    unit.systemctl("restart")


def show_warnings(unit: Unit) -> None:
    """What the daemon and systemd logged about it at warning or worse over the scenario (all
    provoked, when all is well): printed for the reader, not judged."""
    distinct = sorted(set(unit.journal(0, "-p", "warning").splitlines()))
    say(f"journal: {len(distinct)} distinct lines at warning or worse for the unit:")
    for line in distinct[:40]:
        print(f"    {line[:200]}", flush=True)


def build_artifacts(share: Path, with_wheels: bool) -> Path:
    say("build: packaging/build-deb.sh (the freshly built .deb)")
    env = dict(os.environ, OUT_DIR=str(share / "dist"), PYTHON=sys.executable)
    out = host(["bash", str(ROOT / "packaging/build-deb.sh")], env=env).strip().splitlines()[-1]
    deb = share / "forwarder.deb"
    shutil.move(out, deb)
    shutil.rmtree(share / "dist")
    if with_wheels:
        say("build: the forwarder wheel, and its dependencies' wheels (downloaded once, cached)")
        wheels = share / "wheels"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        host([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)])
        dependency_wheels(pip, wheels)
    return deb


def dependency_wheels(pip: list[str], into: Path) -> None:
    """The wheels of forwarder's dependencies at the versions of this venv (pip freeze),
    downloaded once into the cache and copied ``into``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    frozen = host([*pip, "freeze", "--exclude-editable"]).splitlines()
    constraints = [line for line in frozen if not re.match(r"(?i)^forwarder[ =@]", line)]
    key_text = json.dumps([requirements, constraints, sys.version_info[:2]])
    folder = CACHE / f"wheels-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}"
    with cache_lock():
        if not (folder / ".complete").exists():
            download_wheels(pip, folder, requirements, constraints, key_text)
        for old in CACHE.glob("wheels-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        for wheel in folder.glob("*.whl"):  # copied under the lock: never pruned mid-copy
            shutil.copy(wheel, into / wheel.name)


def download_wheels(
    pip: list[str], folder: Path, requirements: list[str], constraints: list[str], key_text: str
) -> None:
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".wheels-"))
    try:
        (work / "constraints.txt").write_text("\n".join(constraints) + "\n")
        host(
            [
                *pip,
                "download",
                "--only-binary=:all:",
                "-d",
                str(work),
                "-c",
                str(work / "constraints.txt"),
                *requirements,
            ]
        )
        (work / ".complete").write_text(key_text)
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_failure(box: Container | None, failure: BaseException) -> None:
    print(f"\nFAILED: {failure}\n", file=sys.stderr, flush=True)
    if box is None or not box.pid or box.nspawn is None or box.nspawn.poll() is not None:
        if box is not None:
            print(f"--- container console:\n{box.console_tail()}", file=sys.stderr)
        return
    for title, argv in (
        ("systemctl status forwarder", ["systemctl", "status", "--no-pager", "-l", UNIT]),
        ("journalctl -u forwarder (tail)", ["journalctl", "--no-pager", "-u", UNIT, "-n", "80"]),
        ("journalctl (tail)", ["journalctl", "--no-pager", "-n", "40"]),
    ):
        with contextlib.suppress(Exception):
            out = box.run(argv, check=False, timeout=30)
            print(f"--- {title}:\n{out.stdout}{out.stderr}", file=sys.stderr, flush=True)


def preflight() -> None:
    expect(os.geteuid() == 0, "needs root (debootstrap, systemd-nspawn, nsenter)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb"):
        expect(
            shutil.which(tool) is not None,
            f"{tool} is missing: make system-deps installs it (debootstrap, systemd-container)",
        )


def main() -> int:
    box: Container | None = None
    share = Path(tempfile.mkdtemp(prefix="forwarder-test-systemd."))
    os.chmod(share, 0o755)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    keep = False
    stack = contextlib.ExitStack()
    try:
        preflight()
        deb = build_artifacts(share, with_wheels=True)
        root = cached_root(sorted({*deb_depends(deb), *EXTRA_PACKAGES}), stack)
        box = Container(root, share, share / "console.log")
        box.boot()
        unit = Unit(box)
        scratch = share / "files"
        scratch.mkdir()
        drops = Drops(box, scratch)
        start_destination(box, "pacs", "PACS", 11112, PACS_DIR)
        check_install(box, unit)
        check_ready_and_status(box, unit)
        check_delivery_and_journal(box, unit, drops)
        check_reload(box, unit, drops)
        check_watchdog(box, unit, drops, "deb")
        check_stop_loses_nothing(box, unit, drops)
        check_bad_config(box, unit)
        check_unwritable_done(box, unit, drops)
        check_security(box)
        check_pip_install(box, unit, drops)
        check_remove_purge_reinstall(box, unit, drops)
        show_warnings(unit)
        say(f"OK: forwarder under systemd, {drops.count} files delivered")
        return 0
    except (Failure, subprocess.TimeoutExpired, KeyboardInterrupt) as failure:
        report_failure(box, failure)
        keep = os.environ.get("FORWARDER_TEST_SYSTEMD_KEEP") == "1" and box is not None
        if keep and box is not None and box.nspawn is not None:
            print(
                f"kept running: nsenter --target={box.pid} --all bash; "
                f"stop it with kill {box.nspawn.pid}; files in {share}",
                file=sys.stderr,
            )
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup itself is not interrupted
        if not keep:
            if box is not None:
                box.poweroff()
            shutil.rmtree(share, ignore_errors=True)
        stack.close()
        say(f"done in {time.monotonic() - STARTED:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
