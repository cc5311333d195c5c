"""Real DICOM peers for tests: a scripted pynetdicom SCP, DCMTK storescp, Orthanc.

Each is started on a free 127.0.0.1 port and stopped by its owner (context managers), by PID
for processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

STORESCP = "/usr/bin/storescp"  # not .venv/bin/storescp, which is pynetdicom's
STORESCU = "/usr/bin/storescu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    nbytes: int
    calling_ae: str


@dataclass
class ScriptedSCP:
    """A pynetdicom Storage SCP whose answers the test decides.

    ``status`` is an int or a callable(Received) -> int. ``transfer_syntaxes`` limits what it
    accepts (e.g. only uncompressed). ``delay`` sleeps in the handler (slow peer).
    """

    ae_title: str = "SCP"
    status: int | Callable[[Received], int] = 0x0000
    transfer_syntaxes: list[str] = field(default_factory=lambda: list(ALL_TRANSFER_SYNTAXES))
    sop_classes: list[str] | None = None
    delay: float = 0.0
    max_pdu: int = 16382
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _handle(self, event: Any) -> int:
        ds_bytes = event.request.DataSet.getvalue()
        ctx = event.context
        rec = Received(
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            transfer_syntax=str(ctx.transfer_syntax),
            nbytes=len(ds_bytes),
            calling_ae=event.assoc.requestor.ae_title,
        )
        if self.delay:
            time.sleep(self.delay)
        status = self.status(rec) if callable(self.status) else self.status
        if status in (0x0000, 0xB000, 0xB006, 0xB007):
            with self._lock:
                self.received.append(rec)
        return status

    def start(self) -> ScriptedSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        contexts = AllStoragePresentationContexts
        for cx in contexts:
            if self.sop_classes is None or cx.abstract_syntax in self.sop_classes:
                ae.add_supported_context(cx.abstract_syntax, self.transfer_syntaxes)
        ae.add_supported_context("1.2.840.10008.1.1")
        self._server = ae.start_server(
            ("127.0.0.1", self.port or free_port()),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._handle)],
        )
        self.port = self._server.socket.getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def uids(self) -> set[str]:
        with self._lock:
            return {r.sop_instance_uid for r in self.received}

    def __enter__(self) -> ScriptedSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StoreSCP:
    """DCMTK storescp writing into ``output`` (or ``--ignore``)."""

    port: int
    output: Path
    proc: subprocess.Popen[bytes]
    ae_title: str

    def files(self) -> list[Path]:
        return sorted(p for p in self.output.iterdir() if p.is_file())


@contextmanager
def storescp(
    output: Path, *, ae_title: str = "STORESCP", nagle: bool = False, extra: list[str] | None = None
) -> Iterator[StoreSCP]:
    """DCMTK storescp on a free port; ``nagle=True`` leaves Debian's default (Nagle on)."""
    output.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    cmd = [STORESCP, "-aet", ae_title, "-od", str(output), *(extra or []), str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        yield StoreSCP(port, output, proc, ae_title)
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


@dataclass
class OrthancPeer:
    port: int
    http_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]

    def instance_count(self) -> int:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/statistics", timeout=5
        ) as r:
            return int(json.load(r)["CountInstances"])


@contextmanager
def orthanc(folder: Path, *, ae_title: str = "ORTHANC") -> Iterator[OrthancPeer]:
    """Orthanc (Debian's, Nagle on as shipped) with its storage in ``folder``."""
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    folder.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = {
        "Name": "forwarder-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": ae_title,
        "DicomPort": port,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "StableAge": 1,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        wait_for_port(http_port, timeout=30, proc=proc)
        yield OrthancPeer(port, http_port, ae_title, proc)
    finally:
        stop_process(proc, timeout=15)
        log.close()
