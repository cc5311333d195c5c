"""Orthanc with its DICOMweb plugin as the benchmark's peer: one C-STORE and STOW-RS receiver.

The ``stow-*`` cases send the same corpus to the same Orthanc by C-STORE (storescu, ``forwarder
send AET@host:port``) and by STOW-RS (``forwarder send http://.../dicom-web``). Orthanc runs as
the tests start it (``tests/peers.py``; bench does not import tests/): a temporary JSON config,
a free DICOM port and a free HTTP port, Debian's ``libOrthancDicomWeb.so``. Its storage and its
SQLite index live in a temporary folder on tmpfs (``/dev/shm`` when there is one), so the
peer's disk is not what is measured, and nothing outlives the case.

What it received is counted through its REST API (``/statistics``), and :meth:`Orthanc.wipe`
deletes every patient between senders, so each sender stores into an empty Orthanc.
Afterwards it is killed (SIGKILL, by its PID) and its folder removed.
This module does not run or time any sender (``bench.run`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.procs import BenchError, _listening, dcmtk_env, free_port, tool_version

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AET = "ORTHANC"
_TMPFS = Path("/dev/shm")


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    exe = shutil.which("Orthanc") or ORTHANC
    if not os.access(exe, os.X_OK):
        return f"{ORTHANC} not found (Debian: apt install orthanc)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return f"{DICOMWEB_PLUGIN} not found (Debian: apt install orthanc-dicomweb)"
    return None


def version() -> str:
    return tool_version([shutil.which("Orthanc") or ORTHANC, "--version"])


class Orthanc:
    """Orthanc on free loopback ports, storage and index on tmpfs, counting what it holds.

    ``nodelay`` puts ``TCP_NODELAY=1`` in its environment: its DICOM server is DCMTK's, which
    then disables Nagle's algorithm, as the bench does for storescp. Its HTTP server has
    ``TcpNoDelay`` and ``KeepAlive`` on (Orthanc's defaults, written out).
    """

    name = "Orthanc"
    ae_title = AET

    def __init__(self, log_path: Path, *, nodelay: bool) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.log_path = log_path
        self.env = dcmtk_env(nodelay)
        tmp_root = _TMPFS if _TMPFS.is_dir() and os.access(_TMPFS, os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="bench-orthanc-", dir=tmp_root))
        self.config = {
            "Name": "forwarder-bench",
            "StorageDirectory": str(self._dir / "storage"),
            "IndexDirectory": str(self._dir / "index"),
            "DicomAet": AET,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "StorageCompression": False,
            "SaveJobs": False,
            "StableAge": 3600,  # no "stable" events while a sender runs
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self._log = log_path.open("wb")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The DICOMweb service root (STOW-RS: ``POST {url}/studies``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def __enter__(self) -> Orthanc:
        cfg = self._dir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        exe = shutil.which("Orthanc") or ORTHANC
        self._proc = subprocess.Popen(
            [exe, str(cfg)], env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=self._log,
        )  # fmt: skip
        deadline = time.monotonic() + 30.0
        while not (_listening(self.port) and _listening(self.http_port)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise BenchError(
                    f"Orthanc did not start on ports {self.port}/{self.http_port}: {tail}"
                )
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        # SIGKILL, not SIGTERM: Orthanc 1.10 takes ~3 s to stop (its HTTP and DICOM servers'
        # polling loops), and nothing it holds outlives the case (folder removed just below).
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _rest(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return bytes(r.read())
        except (urllib.error.URLError, OSError) as exc:
            raise BenchError(f"Orthanc REST {method} {path}: {exc} (log: {self.log_path})") from exc

    def received(self) -> int:
        """Instances Orthanc holds now (``/statistics`` CountInstances)."""
        return int(json.loads(self._rest("GET", "/statistics"))["CountInstances"])

    def wait_received(self, at_least: int, grace: float = 3.0) -> int:
        """The count once it reaches ``at_least``, or after ``grace`` seconds. Orthanc answers a
        C-STORE or a STOW-RS request once the instance is indexed, so the grace is for safety."""
        deadline = time.monotonic() + grace
        while True:
            count = self.received()
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.02)

    def wipe(self) -> None:
        """Delete every patient (and so every study, series and instance): the next sender
        stores into an empty Orthanc. Raises BenchError when something is left."""
        for patient in json.loads(self._rest("GET", "/patients")):
            self._rest("DELETE", f"/patients/{patient}")
        left = self.received()
        if left:
            raise BenchError(f"Orthanc still holds {left} instances after the wipe")
