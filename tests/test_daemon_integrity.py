"""The daemon (a real subprocess) against what used to fail files nobody was at fault for, or
kill a worker thread: a PACS that rejects our AE title for good (the destination is held, its
files stay queued, status/metrics/log say so), and an I/O error in the middle of a send (one
attempt, the worker goes on). Real peers, real SQLite; faults injected with strace, not mocks.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from daemon import Daemon, destination, uids
from peers import ScriptedSCP, free_port, start_server, stop_process, wait_for_port
from pynetdicom import AE, AllStoragePresentationContexts, evt

STRACE = shutil.which("strace")


def _attempts(queue: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(queue) as conn:
        rows = conn.execute("SELECT status, attempts FROM jobs ORDER BY id").fetchall()
    return [(str(s), int(a)) for s, a in rows]


def _metric(port: int, name: str, destination_name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf'^{name}{{destination="{destination_name}"}} (\S+)$', text, re.M)
    assert m is not None, text
    return float(m.group(1))


@contextmanager
def strict_pacs(port: int, ae_title: str) -> Iterator[list[int]]:
    """A pynetdicom Storage SCP that rejects (permanently: called AE title not recognised)
    every association not addressed to ``ae_title``; yields the list of rejections."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    rejected: list[int] = []
    server = start_server(
        ae,
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_REJECTED, lambda event: rejected.append(1))],
    )
    try:
        yield rejected
    finally:
        server.shutdown()


def test_a_permanent_rejection_holds_the_destination_and_the_files_stay_queued(
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    d = Daemon(
        tmp_path,
        destinations=[destination("pacs", port, ae_title="OLDNAME")],
        retry={"initial_delay": "100ms", "max_delay": "500ms", "max_attempts": 1},
        extra={"metrics": {"listen": f"127.0.0.1:{metrics_port}"}},
    )
    with strict_pacs(port, "NEWNAME") as rejected, d:
        dropped = d.drop_files(3)
        wait_until(lambda: len(rejected) >= 4, 30, what="4 rejected associations")
        # Held, not failed: max_attempts is 1, and no file was charged an attempt.
        assert d.failed_files() == []
        rows = _attempts(d.queue)
        assert rows == [("READY", 0)] * 3, rows
        doc = d.wait_status(lambda s: s["pacs"]["state"] == "down", what="pacs down")
        pacs = doc["destinations"]["pacs"]
        assert pacs["pending"] == 3 and pacs["failed"] == 0
        assert "rejected-permanent" in pacs["last_error"] and "held" in pacs["last_error"]
        assert pacs["state_since"]
        text = d.cli("status").stdout
        assert "DOWN since" in text and "rejected-permanent" in text
        assert _metric(metrics_port, "forwarder_destination_up", "pacs") == 0.0
        log = d.log_text(current_run=True)
        downs = [ln for ln in log.splitlines() if "pacs: DOWN:" in ln]
        assert len(downs) == 1, downs  # once per change, not per file or per try
        assert "ERROR" in downs[0]
    # The PACS is reconfigured to know us: everything goes, nothing was lost.
    with ScriptedSCP(ae_title="OLDNAME", port=port) as scp:
        d.start()
        d.wait_done(3, timeout=30)
        assert scp.uids() == uids(dropped)
        doc = d.wait_status(lambda s: s["pacs"]["state"] == "up", what="pacs up")
        assert doc["destinations"]["pacs"]["done"] == 3
        wait_until(
            lambda: _metric(metrics_port, "forwarder_destination_up", "pacs") == 1.0,
            10,
            what="forwarder_destination_up 1",
        )
        assert d.stop() == 0


def _wait_traced(pid: int, tracer: subprocess.Popen[bytes]) -> None:
    """Until every thread of ``pid`` has ``tracer`` as its tracer."""

    def attached() -> bool:
        if tracer.poll() is not None:
            raise AssertionError(f"strace exited with {tracer.returncode} before attaching")
        tracers = []
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                m = re.search(r"^TracerPid:\s+(\d+)", status.read_text(), re.M)
            except OSError:
                continue
            tracers.append(int(m.group(1)) if m else 0)
        return bool(tracers) and all(t == tracer.pid for t in tracers)

    wait_until(attached, 10, what="strace attached to every thread")


@contextmanager
def failing_reads(pid: int, log: Path) -> Iterator[None]:
    """While the block runs, every preadv of ``pid`` fails with EIO. Only the sender reads
    data sets with preadv (ingest reads with read/mmap, SQLite with pread64)."""
    assert STRACE is not None
    tracer = subprocess.Popen(
        [
            *(STRACE, "-f", "-qq", "-p", str(pid), "-o", str(log)),
            *("-e", "trace=preadv,preadv2", "-e", "inject=preadv,preadv2:error=EIO"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_traced(pid, tracer)
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # detach; the daemon runs on
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)


@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_a_read_error_during_a_send_is_an_attempt_and_the_worker_goes_on(tmp_path: Path) -> None:
    """EIO from the data set read escaped the engine as a bare OSError: the worker thread
    died, its jobs stayed CLAIMED until a restart, and recover() handed them back without an
    attempt, so a file that always fails was resent forever. Now it is retried as a read error
    is at ingest, each try an attempt, until max_attempts."""
    with (
        ScriptedSCP() as scp,
        Daemon(
            tmp_path,
            destinations=[destination("a", scp.port)],
            retry={"initial_delay": "100ms", "max_delay": "300ms", "max_attempts": 3},
        ) as d,
    ):
        with failing_reads(d.pid, tmp_path / "strace.log"):
            d.drop_files(1, prefix="bad")
            d.wait_failed(1, timeout=30)
        error = str(d.error_json("bad0000.dcm"))
        assert "gave up after 3 attempts" in error and "Input/output error" in error, error
        assert scp.uids() == set()
        # The same worker thread sends the next files.
        dropped = d.drop_files(2, prefix="good")
        d.wait_done(2)
        assert scp.uids() == uids(dropped)
        assert "died" not in d.log_text()
        status: dict[str, Any] = d.status_json()["destinations"]["a"]
        assert (status["done"], status["failed"], status["in_flight"]) == (2, 1, 0)
        assert d.stop() == 0


@contextmanager
def failing_store_close(pid: int, path: Path, log: Path) -> Iterator[None]:
    """While the block runs, every close() of ``path`` in each thread of ``pid`` fails with
    EIO. In the worker's thread each attempt closes the file once, after streaming it (the meta
    header comes from the queue, not read again). That OSError is translated by nobody: the
    safety net's real trigger."""
    assert STRACE is not None
    tracer = subprocess.Popen(
        [
            *(STRACE, "-f", "-qq", "-p", str(pid), "-o", str(log), "-P", str(path)),
            *("-e", "trace=close", "-e", "inject=close:error=EIO"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_traced(pid, tracer)
        yield
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)


@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_an_unexpected_exception_in_an_attempt_is_an_attempt_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    """An exception the engine does not translate (here OSError from close() after the data
    set went out) used to kill the worker thread. It is an attempt ("internal error: ..."),
    the association is aborted, the traceback is logged once, the thread carries on."""
    port = free_port()
    d = Daemon(
        tmp_path / "d",
        destinations=[destination("a", port)],
        # long pauses: the peer starts and strace attaches while the worker waits out its
        # first (refused) try, so that strace counts from the start of an attempt
        retry={"initial_delay": "4s", "max_delay": "4s", "max_attempts": 3},
    )
    out = tmp_path / "stored"
    with d:
        (bad,) = d.drop_files(1, prefix="bad")
        d.wait_log("will retry", what="a first try, refused (nobody listens yet)")
        # DCMTK, in its own process: the peer sees aborted associations and reset connections
        with (
            dcmtk_storescp(port, out),
            failing_store_close(d.pid, d.incoming / bad.rel_path, tmp_path / "strace.log"),
        ):
            d.wait_failed(1, timeout=30)
            error = str(d.error_json(bad.rel_path))
            assert "gave up after 3 attempts: internal error: OSError" in error, error
            assert d.running()
            # The same worker thread sends the next files.
            dropped = d.drop_files(2, prefix="good")
            d.wait_done(2)
        stored = {p.name for p in out.iterdir()}
        assert all(any(g.sop_instance_uid in n for n in stored) for g in dropped), stored
        log = d.log_text()
        assert log.count("internal error while sending") == 2, log
        assert log.count("Traceback") == 1, log  # the traceback once, not per attempt
        assert "died" not in log
        assert d.stop() == 0


@contextmanager
def dcmtk_storescp(port: int, output: Path, *extra: str) -> Iterator[None]:
    output.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(output), *extra, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield
    finally:
        stop_process(proc)


def test_dcmtk_refusing_every_association_holds_the_destination_until_it_accepts(
    tmp_path: Path,
) -> None:
    """DCMTK storescp --refuse answers A-ASSOCIATE-RJ rejected-permanent: held, not failed;
    the same files go once storescp accepts again."""
    port = free_port()
    d = Daemon(
        tmp_path / "d",
        destinations=[destination("pacs", port, ae_title="STORESCP")],
        retry={"initial_delay": "100ms", "max_delay": "300ms", "max_attempts": 1},
        log_level="DEBUG",  # "still down" lines count the tries
    )
    with dcmtk_storescp(port, tmp_path / "refused", "--refuse"), d:
        d.drop_files(2)
        d.wait_log("pacs: DOWN:", what="pacs held")
        d.wait_log("pacs: still down", count=3, what="three more rejected tries")
        assert d.failed_files() == []
        assert _attempts(d.queue) == [("READY", 0)] * 2
        assert d.status_json()["destinations"]["pacs"]["state"] == "down"
    with dcmtk_storescp(port, tmp_path / "stored"):
        d.start()
        d.wait_done(2)
        assert len(list((tmp_path / "stored").iterdir())) == 2
        assert d.status_json()["destinations"]["pacs"]["state"] == "up"
        assert d.stop() == 0
