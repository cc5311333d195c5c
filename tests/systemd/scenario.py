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

This file holds the scenario's checks and its main; artifacts.py builds the .deb, the wheels and
the cached root, nspawn.py boots the container and queries the unit, drops.py makes DICOM files
and finds them at the destinations, helpers.py prints steps and waits with deadlines.

Run as root: ``.venv/bin/python tests/systemd/scenario.py`` (``make test-systemd``). Every step
is printed; a failure prints the reason, the unit's status and the journal tail, and exits 1.
Environment: FORWARDER_TEST_SYSTEMD_CACHE (default /var/cache/forwarder-test-systemd),
FORWARDER_TEST_SYSTEMD_MIRROR (default: the Debian mirror apt uses here),
FORWARDER_TEST_SYSTEMD_KEEP=1 (leave the container running on failure, for a look with nsenter;
it prints how).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: dicomgen

from artifacts import build_artifacts, cached_root, deb_depends
from dicomgen import make_dataset
from drops import PACS_DIR, SPOOL, Drops, dataset_bytes
from helpers import STARTED, Failure, expect, say, wait_until
from nspawn import UNIT, Container, Unit, drop_in

# Besides the .deb's own Depends: the init, its bus, the destination (DCMTK storescp, echoscu)
# and python3-venv for the pip variant.
EXTRA_PACKAGES = ("systemd", "dbus", "dcmtk", "python3-venv")
CONFIG = "/etc/forwarder/forwarder.yaml"
ARCHIVE_DIR = "/srv/archive"
VENV = "/opt/forwarder-venv"


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


def check_listen(box: Container, unit: Unit, drops: Drops) -> None:
    say("listen: the unit as a Storage SCP; storescu pushes; the receiving process runs sandboxed")
    config = box.path(CONFIG)
    original = config.read_text()
    config.write_text(
        original + "\nlisten: {port: 11104, ae_title: GATEWAY, min_free_space: 1MB}\n"
    )
    try:
        box.run(["forwarder", "check-config", "-c", CONFIG])
        unit.systemctl("restart")
        main_pid = unit.prop("MainPID")
        children = box.run(["pgrep", "-P", main_pid, "-f", "listen_child"], check=False)
        expect(children.returncode == 0, f"no receiving process under pid {main_pid}")
        child = children.stdout.split()[0]
        ds = make_dataset(seed=9000 + drops.count)
        local = drops.scratch / "pushed.dcm"
        ds.save_as(local, enforce_file_format=True)
        box.run(
            [
                "storescu",
                "-aet",
                "CT01",
                "-aec",
                "GATEWAY",
                "127.0.0.1",
                "11104",
                "/mnt/host/files/pushed.dcm",
            ]
        )
        sent = dataset_bytes(local.read_bytes())
        uid = str(ds.SOPInstanceUID)

        def arrived() -> bool:
            got = drops.received(uid)
            return got is not None and dataset_bytes(got.read_bytes()) == sent

        wait_until(f"{uid}, pushed to the listener, in {PACS_DIR} byte for byte", arrived, 60)
        say(f"listen: pushed by storescu, delivered (daemon {main_pid}, receiving process {child})")
        say("listen: systemctl stop (SIGTERM to both processes) drains and exits 0, none left")
        unit.systemctl("stop")
        s = unit.show("Result", "ExecMainStatus")
        expect(s["Result"] == "success" and s["ExecMainStatus"] == "0", f"after stop: {s}")
        left = box.run(["pgrep", "-f", "listen_child"], check=False)
        expect(left.returncode != 0, f"a receiving process outlived the unit: {left.stdout}")
    finally:
        config.write_text(original)
    unit.systemctl("start")


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
        check_listen(box, unit, drops)
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
