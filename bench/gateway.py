"""The gateway cases: a modality's push reaching the PACS through a gateway, against the same
push going straight to the PACS (issue 13).

The PACS is DCMTK ``storescp --ignore`` (as in the send cases); the modality is ``storescu +sd
+r`` pushing the corpus on one association. Each row is timed from the push's start until the
PACS has logged every C-STORE, so the gateway's queueing and forwarding are inside the time:

- ``storescu -> PACS``: the reference, no gateway;
- ``storescu -> forwarder run (listen)``: the daemon's own Storage SCP, forwarding to the PACS
  (defaults: one association; objects fsynced and queued before each Success);
- ``storescu -> storescp -> forwarder run``: DCMTK ``storescp -od incoming`` feeding the
  daemon's watched folder (for comparison: the two-process set-up it replaces);
- ``storescu -> Orthanc (Lua) -> PACS``: Orthanc with the Lua sample of issue 13,
  ``OnStoredInstance`` -> ``SendToModality`` (for comparison: its auto-routing).
- ``storescu -> forwarder run (listen, on disk)``: the first with the daemon's folders and
  queue on the disk under the system's temporary folder, not tmpfs (for comparison: what the
  fsyncs before each Success cost on this disk; the others run on tmpfs).

The gateways are started (and idle) before each push; their start-up is not timed. The
``latency`` case pushes one object at a time into an idle gateway (and renames one at a time
into its watched folder) and reports the median time until the PACS logged it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import corpus as corpora
from bench import orthanc as orthanc_mod
from bench.cases import Attempt, Case, CaseResult, Kind, Row, Sender, Statistic
from bench.procs import (
    STORESCP,
    STORESCU,
    BenchError,
    Launched,
    Measured,
    StoreSCP,
    _listening,
    dcmtk_env,
    free_port,
    run_measured,
)

GATEWAY_AET = "GATEWAY"
MODALITY_AET = "MODALITY"
_LUA = """function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'pacs')
end
"""


def tmpfs() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _daemon_config(
    root: Path, pacs: StoreSCP, listen_port: int | None, *, separate_process: bool = True
) -> Path:
    incoming, done, failed = root / "incoming", root / "done", root / "failed"
    for folder in (incoming, done, failed):
        folder.mkdir(exist_ok=True)
    text = (
        f"ae_title: {GATEWAY_AET}\n"
        f"incoming: {incoming}\ndone: {done}\nfailed: {failed}\nqueue: {root / 'q.sqlite'}\n"
        "destinations:\n"
        f"  - {{name: pacs, ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}\n"
        "log_level: WARNING\n"
    )
    if listen_port is not None:
        text += (
            f"listen: {{port: {listen_port}, bind: 127.0.0.1, ae_title: {GATEWAY_AET}, "
            f"separate_process: {str(separate_process).lower()}}}\n"
        )
    config = root / "forwarder.yaml"
    config.write_text(text)
    return config


class _Process:
    """A helper process (a gateway) started before the push and stopped after it, by PID."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool]
    ) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 60.0
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{argv[0]} did not get ready (log: {log})")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def _gateway(
    kind: Kind,
    pacs: StoreSCP,
    args: argparse.Namespace,
    env: dict[str, str],
    logs: Path,
    probe: Path,
) -> Iterator[tuple[str, int]]:
    """Start the gateway of ``kind`` forwarding to ``pacs``; yields (its AE title, its port)."""
    where = None if kind is Kind.GATEWAY_DISK else tmpfs()  # None: the disk (comparison)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-", dir=where) as tmp:
        root = Path(tmp)
        env = {k: v for k, v in env.items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
        procs: list[_Process] = []
        try:
            if kind in (Kind.GATEWAY, Kind.GATEWAY_INPROC, Kind.GATEWAY_DISK):
                port = free_port()
                separate = kind is not Kind.GATEWAY_INPROC
                config = _daemon_config(root, pacs, port, separate_process=separate)
                argv = [str(args.forwarder), "run", "-c", str(config)]
                procs.append(_Process(argv, env, logs / "daemon.log", lambda: _echoes(port)))
                yield GATEWAY_AET, port
            elif kind is Kind.GATEWAY_STORESCP:
                port = free_port()
                config = _daemon_config(root, pacs, None)
                argv = [str(args.forwarder), "run", "-c", str(config)]
                # Ready once it has taken a probe file from incoming to done/: it is watching.
                shutil.copyfile(probe, root / "incoming" / "probe.dcm")
                done = root / "done"
                procs.append(_Process(argv, env, logs / "daemon.log", lambda: any(done.iterdir())))
                scp = [STORESCP, "-aet", GATEWAY_AET, "-od", str(root / "incoming"), str(port)]
                procs.append(_Process(scp, env, logs / "storescp-od.log", lambda: _listening(port)))
                yield GATEWAY_AET, port
            else:
                with _orthanc_router(pacs, logs / "orthanc.log", root) as port:
                    yield orthanc_mod.AET, port
        finally:
            for p in reversed(procs):
                p.stop()


@contextlib.contextmanager
def _orthanc_router(pacs: StoreSCP, log: Path, root: Path) -> Iterator[int]:
    """Orthanc (tmpfs storage) with the Lua auto-routing sample, the PACS as modality 'pacs'."""
    lua = root / "route.lua"
    lua.write_text(_LUA)
    server = orthanc_mod.Orthanc(log, nodelay=True)
    server.config.pop("Plugins", None)
    server.config.pop("DicomWeb", None)
    server.config["LuaScripts"] = [str(lua)]
    server.config["DicomModalities"] = {"pacs": [pacs.ae_title, "127.0.0.1", pacs.port]}
    with server:
        yield server.port


def run_case(
    case: Case, data: corpora.Corpus, args: argparse.Namespace, logs: Path, why: str | None
) -> CaseResult:
    load = os.getloadavg()[0]
    senders = [
        Sender(Kind.STORESCU),
        Sender(Kind.GATEWAY),
        Sender(Kind.GATEWAY_STORESCP),
        Sender(Kind.ORTHANC_ROUTE),
        Sender(Kind.GATEWAY_DISK),
    ]
    if case.modalities > 1:
        senders = [Sender(Kind.STORESCU), Sender(Kind.GATEWAY), Sender(Kind.GATEWAY_INPROC)]
    attempts: dict[Sender, list[Attempt]] = {s: [] for s in senders}
    env = dcmtk_env(case.nodelay)
    fork = case.modalities > 1  # the PACS takes the modalities' associations in parallel
    with StoreSCP(logs / f"{case.name}.pacs.log", nodelay=case.nodelay, fork=fork) as pacs:
        for rep in range(args.repeat):
            for sender in senders:
                if sender.kind in _OURS and why is not None:
                    continue
                if sender.kind is Kind.ORTHANC_ROUTE and orthanc_mod.available() is not None:
                    continue
                folder = logs / f"{case.name}.{sender.label.replace(' ', '_')}.{rep}"
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    attempt = _attempt(sender, data, pacs, args, env, folder, case.modalities)
                except BenchError as exc:  # this gateway could not start: its row FAILED
                    attempt = Attempt(
                        False, float("nan"), float("nan"), None, 0, data.count, str(exc)
                    )
                attempts[sender].append(attempt)
    rows = []
    for s in senders:
        unavailable = None
        if s.kind in _OURS:
            unavailable = why
        elif s.kind is Kind.ORTHANC_ROUTE:
            unavailable = orthanc_mod.available()
        stat = Statistic(args.statistic)
        rows.append(Row(s, data.count, data.total_bytes, tuple(attempts[s]), stat, unavailable))
    return CaseResult(case, rows[0], tuple(rows[1:]), load)


def _attempt(
    sender: Sender,
    data: corpora.Corpus,
    pacs: StoreSCP,
    args: argparse.Namespace,
    env: dict[str, str],
    logs: Path,
    modalities: int = 1,
) -> Attempt:
    rusage = logs / "storescu.rusage.json"
    with contextlib.ExitStack() as stack:
        if sender.kind is Kind.STORESCU:
            called, port = pacs.ae_title, pacs.port
        else:
            gateway = _gateway(sender.kind, pacs, args, env, logs, data.files[0])
            called, port = stack.enter_context(gateway)
        before = pacs.received()  # after any probe the gateway sent while starting
        if modalities > 1:
            measured = _push_split(data, called, port, env, logs, args.timeout, modalities)
        else:
            argv = [STORESCU, "-aet", MODALITY_AET, "-aec", called, "+sd", "+r", "127.0.0.1"]
            with (logs / "storescu.log").open("wb") as log:
                measured = run_measured(
                    [*argv, str(port), str(data.folder)], env, log, rusage, args.timeout
                )
        error = None if measured.returncode == 0 else f"storescu exit {measured.returncode}"
        deadline = measured.started + args.timeout
        received = pacs.received() - before
        while error is None and received < data.count and time.monotonic() < deadline:
            time.sleep(0.002)
            received = pacs.received() - before
        arrived = time.monotonic()
    if error is None and received < data.count:
        error = f"the PACS received {received} of {data.count} files (logs: {logs})"
    seconds = arrived - measured.started if sender.kind is not Kind.STORESCU else measured.seconds
    return Attempt(
        error is None,
        max(seconds, measured.seconds),
        measured.peak_rss_mib,
        measured.returncode,
        received,
        data.count,
        error,
    )


ECHOSCU = "/usr/bin/echoscu"
_OURS = (Kind.GATEWAY, Kind.GATEWAY_STORESCP, Kind.GATEWAY_INPROC, Kind.GATEWAY_DISK)


def _echoes(port: int) -> bool:
    """The daemon's listener answers a C-ECHO: not only is the port bound (the daemon binds it
    before its receiving process has started), the engine serves it."""
    if not _listening(port):
        return False
    argv = [ECHOSCU, "-to", "5", "-aet", "BENCH", "-aec", GATEWAY_AET, "127.0.0.1", str(port)]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


def _push_split(
    data: corpora.Corpus,
    called: str,
    port: int,
    env: dict[str, str],
    logs: Path,
    timeout: float,
    modalities: int,
) -> Measured:
    """``modalities`` storescu processes at once, each pushing every n-th file of the corpus
    on its own association (calling AE titles MOD1..MODn): as one push, from the first start
    to the last exit."""
    files = [str(f) for f in data.files]
    launched = []
    with contextlib.ExitStack() as stack:
        for i in range(modalities):
            log = stack.enter_context((logs / f"storescu{i + 1}.log").open("wb"))
            argv = [STORESCU, "-aet", f"{MODALITY_AET}{i + 1}", "-aec", called, "127.0.0.1"]
            rusage = logs / f"storescu{i + 1}.rusage.json"
            launched.append(Launched([*argv, str(port), *files[i::modalities]], env, log, rusage))
        results = [one.wait(timeout) for one in launched]
    started = min(r.started for r in results)
    ended = max(r.started + r.seconds for r in results)
    failed = [r.returncode for r in results if r.returncode != 0]
    return Measured(
        returncode=failed[0] if failed else 0,
        seconds=ended - started,
        peak_rss_mib=max(r.peak_rss_mib for r in results),
        timed_out=any(r.timed_out for r in results),
        started=started,
    )


# -- latency --------------------------------------------------------------------------------------


def latency(
    data: corpora.Corpus, args: argparse.Namespace, logs: Path, count: int = 20
) -> dict[str, object]:
    """Median and 90th percentile, in ms, from one object pushed on an open association (or
    renamed into incoming) to the PACS logging it, on an idle daemon with ``listen``; and the
    same push straight to the PACS."""
    env = dcmtk_env(True)
    files = list(data.files[:count])
    out: dict[str, object] = {"objects": len(files)}
    with StoreSCP(logs / "latency.pacs.log", nodelay=True, fork=False) as pacs:
        out["pushed -> PACS (no gateway)"] = _push_latency(files, pacs.ae_title, pacs.port, pacs)
        with tempfile.TemporaryDirectory(prefix="bench-latency-", dir=tmpfs()) as tmp:
            root = Path(tmp)
            port = free_port()
            config = _daemon_config(root, pacs, port)
            clean = {k: v for k, v in env.items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
            argv = [str(args.forwarder), "run", "-c", str(config)]
            daemon = _Process(argv, clean, logs / "latency.daemon.log", lambda: _echoes(port))
            try:
                out["pushed -> forwarder run (listen) -> PACS"] = _push_latency(
                    files, GATEWAY_AET, port, pacs
                )
                out["renamed into incoming -> PACS"] = _rename_latency(files, root, pacs)
            finally:
                daemon.stop()
    (logs / "latency.json").write_text(json.dumps(out, indent=1))
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1], 1),
    }


def _wait_one_more(pacs: StoreSCP, before: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while pacs.received() <= before:
        if time.monotonic() > deadline:
            raise BenchError(f"the PACS did not receive the object within {timeout:g}s")
        time.sleep(0.0005)
    return time.monotonic()


def _push_latency(files: list[Path], called: str, port: int, pacs: StoreSCP) -> dict[str, float]:
    """One association (pynetdicom, as a modality keeps one open), one C-STORE at a time: from
    the request to the PACS logging the object (through the gateway when ``port`` is its)."""
    import pydicom
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=MODALITY_AET)
    for pair in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise BenchError(f"no association with {called} on port {port}")
    # pynetdicom leaves Nagle's algorithm on: with storescp's delayed ACKs every object would
    # wait ~40 ms. A modality with TCP_NODELAY, as storescu is run in these cases.
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    try:
        for ds in datasets:
            before = pacs.received()
            started = time.monotonic()
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise BenchError(f"C-STORE to {called} answered {status}")
            samples.append(_wait_one_more(pacs, before) - started)
    finally:
        assoc.release()
    return _summary(samples)


def _rename_latency(files: list[Path], root: Path, pacs: StoreSCP) -> dict[str, float]:
    staging = root / "staging"
    staging.mkdir()
    samples = []
    for n, path in enumerate(files):
        staged = staging / f"{n}.dcm"
        shutil.copyfile(path, staged)
        before = pacs.received()
        started = time.monotonic()
        os.rename(staged, root / "incoming" / staged.name)
        samples.append(_wait_one_more(pacs, before) - started)
    return _summary(samples)
