"""Run the benchmark: per case one storescp, then storescu and the forwarder variants alternately.

The ``stow-*`` cases have Orthanc as their peer instead (``bench.orthanc``): storescu, then
``forwarder send`` by C-STORE and by STOW-RS, Orthanc emptied before each of them.

Each repetition runs every sender once, in the same order (storescu first), against the same
storescp and corpus; a sender's time is the best (or, with ``--statistic median``, the median)
of its repetitions, its RSS the maximum.
Every attempt is checked against storescp's log: a sender whose exit status is not 0 or whose
files did not all arrive is FAILED, never a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from bench import corpus as corpora
from bench import gateway, orthanc, receive, report
from bench.cases import CASES, Attempt, Case, CaseResult, Kind, Peer, Row, Sender, Statistic
from bench.procs import (
    SCP_AET,
    STORESCP,
    STORESCU,
    BenchError,
    Launched,
    Measured,
    StoreSCP,
    dcmtk_env,
    run_measured,
    tool_version,
    works,
)

logger = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parent / "out"
FORWARDER = Path(sys.executable).parent / "forwarder"
SCU_AET = "STORESCU"
FWD_AET = "FORWARDER"
LATENCY = "latency"  # not a throughput case: bench.gateway.latency, printed after the table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="forwarder vs DCMTK storescu throughput, against DCMTK storescp --ignore.",
    )
    p.add_argument(
        "--cases", default=",".join([*CASES, LATENCY]), help="comma-separated: %(default)s"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per sender (default 3)")
    p.add_argument(
        "--statistic",
        choices=[s.value for s in Statistic],
        default=Statistic.BEST.value,
        help="per sender, the best (shortest) or the median time of the runs (default best: "
        "other work on the machine only ever adds time)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="shrink every corpus (e.g. 0.1)")
    p.add_argument(
        "--associations", default="1,2", help="forwarder variants to run (default %(default)s)"
    )
    p.add_argument("--keep-corpus", action="store_true", help="keep bench/corpus afterwards")
    p.add_argument("--corpus-dir", type=Path, default=corpora.ROOT, help="default bench/corpus")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default bench/out)")
    p.add_argument(
        "--fork",
        choices=("auto", "yes", "no"),
        default="auto",
        help="storescp --fork (one process per association); auto = when some variant uses "
        "more than one association, so that they really run in parallel",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per attempt")
    p.add_argument("--forwarder", type=Path, default=FORWARDER, help="the forwarder command")
    args = p.parse_args(argv)
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_list if c not in CASES and c != LATENCY]
    if unknown:
        known = ", ".join([*CASES, LATENCY])
        p.error(f"unknown case(s) {', '.join(unknown)}: choose from {known}")
    try:
        args.assoc_list = [int(a) for a in args.associations.split(",")]
    except ValueError:
        p.error(f"--associations: {args.associations!r} is not a list of integers")
    if args.repeat < 1 or args.scale <= 0 or any(a < 1 for a in args.assoc_list):
        p.error("--repeat, --scale and --associations must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that storescp and the senders are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for tool in (STORESCP, STORESCU):
        if not os.access(tool, os.X_OK):
            print(f"bench: {tool} not found: install DCMTK (make system-deps)", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    fwd = str(args.forwarder)
    bytecode = _byte_compile(args.forwarder)
    unavailable = {
        Kind.SEND: works([fwd, "send", "--help"], dcmtk_env(True)),
        Kind.DAEMON: works([fwd, "run", "--help"], dcmtk_env(True)),
        Kind.RECEIVE: works([fwd, "receive", "--help"], dcmtk_env(True)),
    }
    unavailable[Kind.STOW] = unavailable[Kind.SEND]  # the same command, another TARGET
    for kind, why in unavailable.items():
        if why is not None:
            logger.warning("forwarder %s unavailable (%s): its rows will show FAILED", kind, why)
    fork = args.fork == "yes" or (args.fork == "auto" and max(args.assoc_list) > 1)
    machine = _machine(fwd)
    with_orthanc = any(
        CASES[name].peer is Peer.ORTHANC or CASES[name].kind is Kind.GATEWAY
        for name in args.case_list
        if name in CASES
    )
    if with_orthanc:
        machine["orthanc"] = orthanc.version()
    results: list[CaseResult] = []
    latencies: dict[str, object] | None = None
    started = time.monotonic()
    try:
        for name in args.case_list:
            if name == LATENCY:
                continue
            case = CASES[name]
            data = corpora.ensure(case.corpus, args.scale, args.corpus_dir)
            _warm(data)
            logger.info("case %s: %d files, %.1f MB", name, data.count, data.total_bytes / 1e6)
            if case.kind is Kind.RECEIVE:
                results.append(receive.run_case(case, data, args, logs, unavailable.get(case.kind)))
                continue
            if case.kind is Kind.GATEWAY:
                why = unavailable.get(Kind.DAEMON)
                results.append(gateway.run_case(case, data, args, logs, why))
                continue
            senders = [Sender(Kind.STORESCU)] + [Sender(case.kind, a) for a in args.assoc_list]
            if case.kind is Kind.STOW:  # C-STORE to the same peer first, then STOW-RS
                senders[1:1] = [Sender(Kind.SEND, a) for a in args.assoc_list]
            if case.kind is Kind.DAEMON:  # what fsyncing to this disk costs (the rest: tmpfs)
                senders.append(Sender(Kind.DAEMON_DISK, args.assoc_list[0]))
            results.append(
                _run_case(case, data, senders, args, fork, logs, unavailable.get(case.kind))
            )
        if LATENCY in args.case_list:
            data = corpora.ensure("small", args.scale, args.corpus_dir)
            logger.info("latency: one object at a time into an idle gateway")
            latencies = gateway.latency(data, args, logs)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_corpus:
            shutil.rmtree(corpora.scale_folder(args.corpus_dir, args.scale), ignore_errors=True)
    settings = {
        "cases": args.case_list,
        "repeat": args.repeat,
        "scale": args.scale,
        "associations": args.assoc_list,
        "statistic": f"{args.statistic} of {args.repeat} runs (peak RSS: maximum)",
        "storescp": f"{STORESCP} -v --ignore -aet {SCP_AET}{' --fork' if fork else ''} PORT",
        "storescu": f"{STORESCU} -aet {SCU_AET} -aec {SCP_AET} +sd +r 127.0.0.1 PORT DIR",
        "forwarder": f"{fwd} send --calling-aet {FWD_AET} --associations N "
        f"{SCP_AET}@127.0.0.1:PORT DIR",
        "daemon_settle": "0 (the watcher's floor)",
        "receive": f"{STORESCU} -aec RECEIVER +sd +r 127.0.0.1 PORT DIR into `{STORESCP} -od "
        f"OUT` or `{fwd} receive --output OUT -q`, OUT on {receive.tmpfs_root()}",
        "forwarder_bytecode": bytecode,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if with_orthanc:
        settings["orthanc"] = (
            f"{orthanc.ORTHANC} with {orthanc.DICOMWEB_PLUGIN}, storage and index on tmpfs, "
            "emptied (DELETE /patients/ID) before every sender, counted by /statistics"
        )
        settings["forwarder_stow"] = (
            f"{fwd} send --associations N http://127.0.0.1:HTTP_PORT/dicom-web DIR"
        )
    if latencies is not None:
        settings["latency"] = latencies
    table = report.table(results) if results else ""
    if latencies is not None:
        table = "\n\n".join(t for t in (table, report.latency_lines(latencies)) if t)
    print(table)
    print(f"\n{report.footer(machine, settings, results)}")
    report.write(args.out, machine, settings, results, table)
    print(f"\nresults: {args.out / 'results.json'}  logs: {logs}")
    # Unmet goals are results; a sender that failed (or storescp missing files) is an error.
    failed = any(not row.ok for r in results for row in (r.reference, *r.contenders))
    return 1 if failed else 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _machine(fwd: str) -> dict[str, object]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dcmtk": tool_version([STORESCU, "--version"]).strip("$ ").removeprefix("dcmtk: "),
        "forwarder": tool_version([fwd, "--version"]),
    }


def _byte_compile(fwd: Path) -> str:
    """Byte-compile this checkout's forwarder package, as an installed one is (the .deb runs
    compileall, pip writes .pyc files). With PYTHONDONTWRITEBYTECODE set, as in some CI and
    container images, every start would otherwise compile ~40 modules from source (~80 ms),
    a cost no deployed daemon or send pays and storescu has no counterpart of."""
    if fwd.resolve() != FORWARDER.resolve():
        return f"as installed with {fwd}"
    import compileall

    import forwarder

    folder = Path(forwarder.__file__).resolve().parent
    if not compileall.compile_dir(folder, quiet=1):
        logger.warning("cannot byte-compile %s: forwarder runs from source", folder)
        return "from source (compileall failed)"
    return f"compiled in place ({folder})"


def _warm(data: corpora.Corpus) -> None:
    """Read every file once, so that no sender pays for the first read from disk."""
    for path in data.files:
        with path.open("rb") as fh:
            while fh.read(1 << 20):
                pass


def _run_case(
    case: Case,
    data: corpora.Corpus,
    senders: list[Sender],
    args: argparse.Namespace,
    fork: bool,
    logs: Path,
    unavailable: str | None,
) -> CaseResult:
    load = os.getloadavg()[0]
    if load > 0.5:
        logger.warning("load average %.2f before case %s: numbers will be noisy", load, case.name)
    attempts: dict[Sender, list[Attempt]] = {s: [] for s in senders}
    if case.peer is Peer.ORTHANC and (missing := orthanc.available()) is not None:
        rows = [
            Row(s, data.count, data.total_bytes, (), Statistic(args.statistic), missing)
            for s in senders
        ]
        return CaseResult(case, rows[0], tuple(rows[1:]), load)  # every row FAILED: no peer
    with _peer(case, logs, fork) as scp:
        for rep in range(args.repeat):
            for sender in senders:
                if sender.kind is not Kind.STORESCU and unavailable is not None:
                    continue
                if isinstance(scp, orthanc.Orthanc):
                    scp.wipe()  # every sender stores into an empty Orthanc
                log = logs / f"{case.name}.{sender.label.replace(' ', '_')}.{rep}.log"
                before = scp.received()
                attempt = _attempt(case, data, sender, scp, args, log, before)
                attempts[sender].append(attempt)
                logger.info(
                    "  %-22s run %d: %s",
                    sender.label,
                    rep + 1,
                    f"{attempt.seconds:.3f}s, {attempt.peak_rss_mib:.0f} MiB"
                    if attempt.ok
                    else f"FAILED: {attempt.error}",
                )
    rows = [
        Row(
            s,
            data.count,
            data.total_bytes,
            tuple(attempts[s]),
            Statistic(args.statistic),
            unavailable if s.kind is not Kind.STORESCU else None,
        )
        for s in senders
    ]
    return CaseResult(case, rows[0], tuple(rows[1:]), load)


def _peer(case: Case, logs: Path, fork: bool) -> StoreSCP | orthanc.Orthanc:
    """The receiver of ``case``, not yet started: storescp, or Orthanc for the ``stow`` cases."""
    if case.peer is Peer.ORTHANC:
        return orthanc.Orthanc(logs / f"{case.name}.orthanc.log", nodelay=case.nodelay)
    return StoreSCP(logs / f"{case.name}.storescp.log", nodelay=case.nodelay, fork=fork)


def _attempt(
    case: Case,
    data: corpora.Corpus,
    sender: Sender,
    scp: StoreSCP | orthanc.Orthanc,
    args: argparse.Namespace,
    log_path: Path,
    before: int,
) -> Attempt:
    env = dcmtk_env(case.nodelay)
    rusage = log_path.with_suffix(".rusage.json")
    with log_path.open("wb") as log:
        if sender.kind in (Kind.DAEMON, Kind.DAEMON_DISK):
            assert isinstance(scp, StoreSCP)
            measured, error = _run_daemon(data, sender, scp, args, env, log, rusage)
        else:
            if sender.kind is Kind.STORESCU:
                argv = [STORESCU, "-aet", SCU_AET, "-aec", scp.ae_title, "+sd", "+r"]
                argv += ["127.0.0.1", str(scp.port), str(data.folder)]
            elif sender.kind is Kind.STOW:
                assert isinstance(scp, orthanc.Orthanc)
                argv = [str(args.forwarder), "send", "--associations", str(sender.associations)]
                argv += [scp.url, str(data.folder)]
            else:
                argv = [str(args.forwarder), "send", "--calling-aet", FWD_AET]
                argv += ["--associations", str(sender.associations)]
                argv += [f"{scp.ae_title}@127.0.0.1:{scp.port}", str(data.folder)]
            measured = run_measured(argv, env, log, rusage, args.timeout)
            error = _exit_problem(measured)
    received = scp.wait_received(before + data.count) - before
    # The daemon may legitimately send a file twice (at least once); a one-shot sender may not.
    if error is None and (
        received < data.count
        or (sender.kind not in (Kind.DAEMON, Kind.DAEMON_DISK) and received != data.count)
    ):
        error = f"{scp.name} received {received} of {data.count} files"
    if error is not None:
        error += f" (log: {log_path})"
    return Attempt(
        error is None,
        measured.seconds,
        measured.peak_rss_mib,
        measured.returncode,
        received,
        data.count,
        error,
    )


def _exit_problem(m: Measured) -> str | None:
    if m.timed_out:
        return f"timed out after {m.seconds:.0f}s"
    if m.returncode != 0:
        return f"exit status {m.returncode}"
    return None


def _run_daemon(
    data: corpora.Corpus,
    sender: Sender,
    scp: StoreSCP,
    args: argparse.Namespace,
    env: dict[str, str],
    log: IO[bytes],
    rusage: Path,
) -> tuple[Measured, str | None]:
    """A started ``forwarder run`` given the corpus at once: time until all are in done/.

    As issue 13 measures the daemon ("the daemon already started"): it is started with an empty
    ``incoming`` and is ready once it has taken a probe file to done/. The corpus, copied just
    before into a folder beside ``incoming`` (so its bytes are still dirty: the daemon's
    fsync-before-queueing pays their writeback), is then renamed into ``incoming`` as one folder,
    the backlog an outage leaves behind. Timed from that rename until every file is in done/.
    Everything is on tmpfs, as in issue 13's measurements and the gateway cases; the
    ``DAEMON_DISK`` row puts it on the disk under the system's temporary folder instead.
    """
    where = None if sender.kind is Kind.DAEMON_DISK else gateway.tmpfs()
    with tempfile.TemporaryDirectory(prefix="bench-daemon-", dir=where) as tmp:
        root = Path(tmp)
        incoming, done, failed = root / "incoming", root / "done", root / "failed"
        staged = root / "staging" / "backlog"
        for folder in (incoming, done, failed, staged):
            folder.mkdir(parents=True)
        config = root / "forwarder.yaml"
        config.write_text(
            f"ae_title: {FWD_AET}\n"
            f"incoming: {incoming}\ndone: {done}\nfailed: {failed}\nqueue: {root / 'q.sqlite'}\n"
            "destinations:\n"
            f"  - {{name: storescp, ae_title: {SCP_AET}, host: 127.0.0.1, port: {scp.port},"
            f" associations: {sender.associations}}}\n"
            "watch: {settle: 0}\n"
            "log_level: WARNING\n"
        )
        shutil.copyfile(data.files[0], incoming / "probe.dcm")
        env = {k: v for k, v in env.items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
        daemon = Launched([str(args.forwarder), "run", "-c", str(config)], env, log, rusage)
        try:
            error = _wait_done(daemon, done, failed, 1, args.timeout)
            given = time.monotonic()
            if error is None:
                for path in data.files:
                    shutil.copyfile(path, staged / path.name)
                given = time.monotonic()
                staged.rename(incoming / staged.name)
                error = _wait_done(daemon, done / staged.name, failed, data.count, args.timeout)
        except BaseException:
            daemon.kill()
            raise
        all_done = time.monotonic()
        daemon.terminate()
        measured = daemon.wait(timeout=30.0)
        if error is None:
            error = _exit_problem(measured)
        return dataclasses.replace(measured, seconds=all_done - given), error


def _wait_done(
    daemon: Launched, done: Path, failed: Path, expected: int, timeout: float
) -> str | None:
    """Poll until ``expected`` files are in ``done`` (None), or say what went wrong.

    Listing a folder of 20,000 files takes milliseconds of the CPU the daemon is measured on, so
    the pause between polls is ten times the last listing (at least 5 ms): the poll takes at most
    a tenth of one core, and the end is seen within about 1% of the run.
    """
    deadline = time.monotonic() + timeout
    while True:
        listed = time.monotonic()
        if _entries(done) >= expected:
            return None
        pause = max(0.005, 10 * (time.monotonic() - listed))
        if _entries(failed):
            return f"{_entries(failed)} entries in failed/"
        if not daemon.running():
            return "the daemon exited early"
        if time.monotonic() > deadline:
            return f"timed out: {_entries(done)} of {expected} in done/ after {timeout:.0f}s"
        time.sleep(pause)


def _entries(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except FileNotFoundError:  # done/backlog before the first file of the backlog is done
        return 0
