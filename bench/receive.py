"""The receive cases: DCMTK storescu pushes a corpus into ``forwarder receive`` and, as the
reference, into DCMTK ``storescp -od``, both writing to a folder on tmpfs; then both again
writing to the disk under the system's temporary folder (comparison rows: what fsyncing every
object costs on this disk).

Each repetition starts each receiver afresh on a free port, pushes the whole corpus with one
``storescu +sd +r`` (one association, a C-STORE-RSP awaited per file: storescu's wall time is the
receiver's speed plus storescu's own), stops the receiver and counts the files it wrote: an
attempt that did not write every file is FAILED, never a number. ``forwarder receive`` fsyncs
every object and its folder before answering Success; storescp does not fsync. The peak RSS
column of these rows is storescu's (the measured process), not the receiver's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import corpus as corpora
from bench.cases import Attempt, Case, CaseResult, Kind, Row, Sender, Statistic
from bench.procs import (
    STORESCP,
    STORESCU,
    BenchError,
    _listening,
    dcmtk_env,
    free_port,
    run_measured,
)

SCU_AET = "STORESCU"
SCP_AET = "RECEIVER"


def tmpfs_root() -> Path:
    """Where the receivers write: /dev/shm when it is a tmpfs, else the temporary folder."""
    shm = Path("/dev/shm")
    try:
        with open("/proc/mounts") as fh:
            if any(line.split()[1] == "/dev/shm" and line.split()[2] == "tmpfs" for line in fh):
                return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


_OURS = (Kind.RECEIVE, Kind.RECEIVE_DISK)


def run_case(
    case: Case,
    data: corpora.Corpus,
    args: argparse.Namespace,
    logs: Path,
    unavailable: str | None,
) -> CaseResult:
    load = os.getloadavg()[0]
    senders = [
        Sender(Kind.STORESCP_OD),
        Sender(Kind.RECEIVE),
        Sender(Kind.STORESCP_OD_DISK),
        Sender(Kind.RECEIVE_DISK),
    ]
    attempts: dict[Sender, list[Attempt]] = {s: [] for s in senders}
    for rep in range(args.repeat):
        for sender in senders:
            if sender.kind in _OURS and unavailable is not None:
                continue
            label = sender.label.replace(" ", "_")
            attempt = _attempt(case, data, sender, args, logs / f"{case.name}.{label}.{rep}")
            attempts[sender].append(attempt)
    rows = [
        Row(
            s,
            data.count,
            data.total_bytes,
            tuple(attempts[s]),
            Statistic(args.statistic),
            unavailable if s.kind in _OURS else None,
        )
        for s in senders
    ]
    return CaseResult(case, rows[0], tuple(rows[1:]), load)


def _attempt(
    case: Case, data: corpora.Corpus, sender: Sender, args: argparse.Namespace, log_base: Path
) -> Attempt:
    env = dcmtk_env(case.nodelay)
    port = free_port()
    on_disk = sender.kind in (Kind.STORESCP_OD_DISK, Kind.RECEIVE_DISK)
    output = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=None if on_disk else tmpfs_root()))
    if sender.kind in (Kind.STORESCP_OD, Kind.STORESCP_OD_DISK):
        argv = [STORESCP, "-aet", SCP_AET, "-od", str(output), str(port)]
    else:
        argv = [str(args.forwarder), "receive", "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--ae-title", SCP_AET, "--output", str(output), "-q"]
    receiver_log = log_base.with_suffix(".receiver.log").open("wb")
    receiver = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=receiver_log, stderr=receiver_log
    )
    try:
        deadline = time.monotonic() + 30.0
        while not _listening(port):
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{sender.label} did not start on port {port}")
            time.sleep(0.01)
        push = [STORESCU, "-aet", SCU_AET, "-aec", SCP_AET, "+sd", "+r", "127.0.0.1", str(port)]
        push.append(str(data.folder))
        with log_base.with_suffix(".storescu.log").open("wb") as log:
            measured = run_measured(
                push, env, log, log_base.with_suffix(".rusage.json"), args.timeout
            )
        written = sum(
            1
            for _root, _dirs, names in os.walk(output)
            for name in names
            if not name.startswith(".")
        )
        error = None
        if measured.timed_out:
            error = f"timed out after {measured.seconds:.0f}s"
        elif measured.returncode != 0:
            error = f"storescu exit status {measured.returncode}"
        elif written != data.count:
            error = f"{sender.label} wrote {written} of {data.count} files"
        if error is not None:
            error += f" (logs: {log_base}.*)"
        return Attempt(
            error is None,
            measured.seconds,
            measured.peak_rss_mib,
            measured.returncode,
            written,
            data.count,
            error,
        )
    finally:
        receiver.terminate()
        try:
            receiver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            receiver.kill()
            receiver.wait()
        receiver_log.close()
        shutil.rmtree(output, ignore_errors=True)
