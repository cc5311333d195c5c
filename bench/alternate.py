"""Alternating gateway pushes: two or more variants of the daemon's listener, pushed into in turn.

``python -m bench.alternate [--corpus small|ct] [--rounds N] [--disk] [--push-only] VARIANT...``

Each VARIANT is ``NAME`` or ``NAME=VAR:VALUE,VAR:VALUE`` (environment variables for that
variant's daemon, e.g. a ``PYTHONPATH`` pointing at another checkout). Each round starts a
gateway per variant (``forwarder run`` with ``listen:``, as ``make bench``'s gateway cases do,
on tmpfs unless ``--disk``), pushes the corpus with ``storescu`` on one association, and times
it until the PACS (``storescp --ignore``) has counted every C-STORE (``--push-only``: until
storescu exits, the modality's side alone). Rounds alternate the order (ABBA), so that the
machine's drift falls on every variant alike: on a 2-core machine one push's rate moves by
+-10% from one minute to the next, which no single pair of runs can tell from a change.

A first push per variant warms the page cache and is not counted. Printed per push: files/s
and the CPU each of the gateway's processes spent an object (user and system, from /proc): the
daemon, its watch-and-ingest process and its receiving process. Used for the measurements in
the README's throughput notes (session 23).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import corpus as corpora
from bench.gateway import GATEWAY_AET, MODALITY_AET, _daemon_config, _echoes, _Process, tmpfs
from bench.procs import STORESCU, StoreSCP, dcmtk_env, free_port

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    found, grew = {pid}, True
    while grew:
        grew = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in found:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) in found:
                found.add(int(entry))
                grew = True
    return found


def _role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"run" in argv:
        return "daemon"
    if any(b"listen" in a for a in argv):
        return "listen"
    if any(b"ingest" in a for a in argv):
        return "ingest"
    return None


def _cpu(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks so far; (0, 0) once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def push(
    data: corpora.Corpus, env: dict[str, str], pacs: StoreSCP, logs: Path, *, disk: bool, only: bool
) -> tuple[float, dict[str, float]]:
    """One push into a fresh gateway: (files a second, role.u/.s -> CPU ms an object)."""
    with tempfile.TemporaryDirectory(prefix="alternate-", dir=None if disk else tmpfs()) as tmp:
        root, port = Path(tmp), free_port()
        config = _daemon_config(root, pacs, port)
        forwarder = str(Path(sys.executable).parent / "forwarder")
        gateway = _Process(
            [forwarder, "run", "-c", str(config)], env, logs / "daemon.log", lambda: _echoes(port)
        )
        try:
            roles = {p: r for p in _children(gateway.proc.pid) if (r := _role(p)) is not None}
            before = {p: _cpu(p) for p in roles}
            counted = pacs.received()
            started = time.monotonic()
            argv = [STORESCU, "-aet", MODALITY_AET, "-aec", GATEWAY_AET, "+sd", "+r"]
            subprocess.run(
                [*argv, "127.0.0.1", str(port), str(data.folder)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while not only and pacs.received() - counted < data.count:
                if time.monotonic() - started > 300:
                    raise SystemExit(f"the PACS did not count every file (logs: {logs})")
                time.sleep(0.002)
            seconds = time.monotonic() - started
            after = {p: _cpu(p) for p in roles}
        finally:
            gateway.stop()
    per: dict[str, float] = {}
    scale = 1000 / _TICK / data.count
    for p, role in roles.items():
        for i, kind in enumerate(("u", "s")):
            key = f"{role}.{kind}"
            per[key] = per.get(key, 0.0) + (after[p][i] - before[p][i]) * scale
    return data.count / seconds, per


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition("=")
    env = dict(a.split(":", 1) for a in assignments.split(",")) if assignments else {}
    return name, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="small", choices=["small", "ct"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--disk", action="store_true", help="the gateway's folders on the disk")
    parser.add_argument("--push-only", action="store_true", help="time the modality's push only")
    parser.add_argument("variants", nargs="+", metavar="NAME[=VAR:VALUE,...]")
    args = parser.parse_args(argv)
    data = corpora.ensure(args.corpus, 1.0)
    variants = [_variant(v) for v in args.variants]
    base = {k: v for k, v in dcmtk_env(True).items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
    logs = Path(tempfile.mkdtemp(prefix="alternate-logs-"))
    rates: dict[str, list[float]] = {name: [] for name, _ in variants}
    with StoreSCP(logs / "pacs.log", nodelay=True, fork=False) as pacs:
        # One push each first, not counted: the corpus and the code into the page cache.
        for _, extra in variants:
            push(data, {**base, **extra}, pacs, logs, disk=args.disk, only=args.push_only)
        for n in range(args.rounds):
            for name, extra in variants if n % 2 == 0 else variants[::-1]:
                rate, per = push(
                    data, {**base, **extra}, pacs, logs, disk=args.disk, only=args.push_only
                )
                rates[name].append(rate)
                cpu = " ".join(f"{k}={v:.3f}" for k, v in sorted(per.items()))
                load = os.getloadavg()[0]
                print(f"{name:<12} {rate:8.0f} files/s  load {load:.1f}  ms/object: {cpu}")
    for name, values in rates.items():
        every = [round(v) for v in values]
        print(f"{name:<12} median {statistics.median(values):.0f}  all {every}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
