"""Real DICOM peers for tests: a scripted pynetdicom SCP, DCMTK storescp, Orthanc.

Each is started on a free 127.0.0.1 port and stopped by its owner (context managers), by PID
for processes.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

STORESCP = "/usr/bin/storescp"  # not .venv/bin/storescp, which is pynetdicom's
STORESCU = "/usr/bin/storescu"
DCMSEND = "/usr/bin/dcmsend"


_PORTS_FROM, _PORTS_PER_WORKER = 12_000, 5_000  # below Linux's ephemeral range (32768-)
_next_port: list[int] = []
_port_lock = threading.Lock()  # peers started together (all_entered) ask from several threads


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a peer that must be told its port. Each
    pytest-xdist worker hands out ports from a range of its own below the kernel's ephemeral
    range: the other worker never hands out the same one, and no connection's source port takes
    it between this choice and the peer's bind (as a port the kernel chose for bind(0) could).
    Sequential from a random start, skipping ports in use; two threads never get the same one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _PORTS_FROM + (int(worker) % 4 if worker.isdigit() else 0) * _PORTS_PER_WORKER
    with _port_lock:
        if not _next_port:
            _next_port.append(random.randrange(_PORTS_PER_WORKER))
        for _ in range(_PORTS_PER_WORKER):
            port = first + _next_port[0] % _PORTS_PER_WORKER
            _next_port[0] += 1
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use (or in TIME_WAIT): the next one
                return port
    raise RuntimeError(f"no free port in {first}-{first + _PORTS_PER_WORKER - 1}")


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


@contextmanager
def all_entered(
    managers: Mapping[str, AbstractContextManager[Any]],
) -> Iterator[dict[str, Any]]:
    """Enter every context manager (a peer: each start waits for its port) in a thread of its
    own, and exit them likewise (Orthanc takes seconds to stop); yields name -> what each
    entered to. If one fails to start, those started are stopped before its error is raised;
    every one started is stopped however the block ends, and the first error of a stop is
    raised after all have stopped."""
    if not managers:
        yield {}
        return
    with ThreadPoolExecutor(len(managers), thread_name_prefix="peer-start") as pool:
        starts = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
    entered = {name: f.result() for name, f in starts.items() if f.exception() is None}
    try:
        for f in starts.values():
            if (exc := f.exception()) is not None:
                raise exc
        yield entered
    finally:
        with ThreadPoolExecutor(len(entered) or 1, thread_name_prefix="peer-stop") as pool:
            stops = [pool.submit(managers[name].__exit__, None, None, None) for name in entered]
        for f in stops:
            if (exc := f.exception()) is not None:
                raise exc


@dataclass
class BlackHole:
    """A port where a TCP connect hangs, as at a host whose firewall drops SYNs."""

    host: str
    port: int

    def connecting(self) -> int:
        """How many sockets of this machine wait in SYN_SENT for this port (/proc/net/tcp*)."""
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == self.port:
                    count += 1
        return count


@contextmanager
def black_hole(host: str = "127.0.0.1") -> Iterator[BlackHole]:
    """A listening socket with backlog 0 that never accepts, its accept queue filled by one
    connection: Linux then drops every further SYN (unless ``tcp_abort_on_overflow`` is set,
    when it resets them: the test is skipped), so a connect to it waits for its timeout.
    Checked before it is handed over."""
    import pytest

    if Path("/proc/sys/net/ipv4/tcp_abort_on_overflow").read_text().strip() != "0":
        pytest.skip("tcp_abort_on_overflow is set: a full accept queue resets, not drops")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    held: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler = socket.socket(family, socket.SOCK_STREAM)
        held.append(filler)
        filler.settimeout(5.0)
        filler.connect((host, port))  # completed by the kernel, never accepted: queue full
        with socket.socket(family, socket.SOCK_STREAM) as check:
            check.settimeout(0.5)
            try:
                check.connect((host, port))
            except TimeoutError:
                pass
            else:
                raise AssertionError(f"a connect to the black hole {host}:{port} completed")
        yield BlackHole(host, port)
    finally:
        for sock in held:
            sock.close()
        listener.close()


class _QuickServer(ThreadedAssociationServer):
    """pynetdicom's acceptor, its accept loop polling every 20 ms instead of 0.5 s: its
    ``shutdown()`` waits for the loop's current poll, so a peer stopped at a test's end took
    0.25 s on average (0.5 s when it served nothing), hundreds of times over the suite."""

    def serve_forever(self, poll_interval: float = 0.02) -> None:
        super().serve_forever(poll_interval)


def start_server(ae: AE, address: tuple[str, int], **kwargs: Any) -> ThreadedAssociationServer:
    """``ae.start_server(address, block=False, **kwargs)`` (``evt_handlers``,
    ``ssl_context``...), with an acceptor that stops within milliseconds (:class:`_QuickServer`);
    stopped with ``server.shutdown()`` as pynetdicom's."""
    server = ae.make_server(address, server_class=_QuickServer, **kwargs)
    ae._servers.append(server)  # as start_server does: its shutdown() takes it off the list
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    return server


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
    #: SOP Instance UIDs of the C-STOREs it began to answer (before ``delay``).
    started: list[str] = field(default_factory=list)
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
        with self._lock:
            self.started.append(rec.sop_instance_uid)
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
        self._server = start_server(
            ae,
            ("127.0.0.1", self.port or free_port()),
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
    output: Path,
    *,
    ae_title: str = "STORESCP",
    nagle: bool = False,
    extra: list[str] | None = None,
    log: Path | None = None,
) -> Iterator[StoreSCP]:
    """DCMTK storescp on a free port; ``nagle=True`` leaves Debian's default (Nagle on).
    ``log``: its stderr goes to this file (a long run's warnings would fill an unread pipe)."""
    output.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    cmd = [STORESCP, "-aet", ae_title, "-od", str(output), *(extra or []), str(port)]
    log_file = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file if log_file is not None else subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc=proc)
        yield StoreSCP(port, output, proc, ae_title)
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()
        if log_file is not None:
            log_file.close()


@dataclass
class OrthancPeer:
    port: int
    http_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    auth: tuple[str, str] | None = None  # for an Orthanc with RegisteredUsers

    @property
    def _base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def instance_count(self) -> int:
        return int(json.loads(self.rest("GET", "/statistics", timeout=5))["CountInstances"])

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 30) -> bytes:
        """One REST call (``GET /instances``...); raises urllib's HTTPError on a 4xx/5xx."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        req = urllib.request.Request(
            f"{self._base}{path}",
            data=data.encode() if isinstance(data, str) else data,
            method=method,
        )
        if self.auth is not None:
            pair = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {pair}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return bytes(r.read())

    def instances(self) -> list[str]:
        """Orthanc's ids of every instance it holds."""
        return [str(i) for i in json.loads(self.rest("GET", "/instances"))]

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file Orthanc stored for ``instance_id`` (as received, with its meta)."""
        return self.rest("GET", f"/instances/{instance_id}/file")

    def take_all(self, into: Path) -> list[Path]:
        """Download every instance into ``into`` (``<id>.dcm``), then delete it from Orthanc."""
        into.mkdir(parents=True, exist_ok=True)
        out = []
        for iid in self.instances():
            path = into / f"{iid}.dcm"
            path.write_bytes(self.instance_file(iid))
            self.rest("DELETE", f"/instances/{iid}")
            out.append(path)
        return out

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """Declare a DICOM peer Orthanc can push to (``POST /modalities/NAME/store``)."""
        self.rest("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port})

    def push(self, modality: str, instance_id: str) -> tuple[bool, str]:
        """C-STORE one instance to ``modality``; (True, "") or (False, Orthanc's error)."""
        try:
            self.rest("POST", f"/modalities/{modality}/store", instance_id)
        except urllib.error.HTTPError as exc:
            try:
                return False, f"HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')[:300]}"
            finally:
                exc.close()
        return True, ""


ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextmanager
def orthanc(
    folder: Path,
    *,
    ae_title: str = "ORTHANC",
    extra: dict[str, Any] | None = None,
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
    ports: tuple[int, int] | None = None,
    graceful_stop: bool = False,
) -> Iterator[OrthancPeer]:
    """Orthanc (Debian's, Nagle on as shipped) with its storage in ``folder``; ``extra`` adds
    or overrides configuration keys. ``dicomweb=True`` loads the DICOMweb plugin (Debian's
    orthanc-dicomweb), serving ``http://127.0.0.1:HTTP_PORT/dicom-web`` (see
    :func:`orthanc_dicomweb_url`; put :func:`tls_proxy` in front of it for HTTPS: Debian's
    Orthanc 1.10 crashes on its own ``SslEnabled``). ``users`` turns on HTTP basic auth with
    these user names and passwords (the REST helpers use the first). ``ports`` (DICOM, HTTP):
    fixed ports, to start it again where a client expects it (default: free ones).

    At the end it is killed (SIGKILL): a clean stop takes Orthanc 1.10 3.5 s of fixed waits
    (its HTTP server 2 s, its DICOM server 1 s, its jobs engine 0.3 s), and what it leaves
    behind is never looked at again. ``graceful_stop=True``: SIGTERM, for a test that stops it
    under a client's feet or starts it again on the same storage."""
    if users:
        extra = {"AuthenticationEnabled": True, "RegisteredUsers": users, **(extra or {})}
    if dicomweb:
        plugins = {
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        extra = {**plugins, **(extra or {})}
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    folder.mkdir(parents=True, exist_ok=True)
    port, http_port = ports if ports is not None else (free_port(), free_port())
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
        **(extra or {}),
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        wait_for_port(http_port, timeout=30, proc=proc)
        auth = next(iter(users.items())) if users else None
        yield OrthancPeer(port, http_port, ae_title, proc, auth)
    finally:
        if not graceful_stop:
            proc.kill()
        stop_process(proc, timeout=15)
        log.close()


def orthanc_dicomweb_url(peer: OrthancPeer, scheme: str = "http") -> str:
    """The DICOMweb service root of an Orthanc started with ``dicomweb=True``."""
    return f"{scheme}://127.0.0.1:{peer.http_port}/dicom-web"


@contextmanager
def tls_proxy(target_port: int, cert: Path, key: Path) -> Iterator[int]:
    """A TLS-terminating relay on a free 127.0.0.1 port to ``127.0.0.1:target_port`` (HTTPS in
    front of an HTTP server, as a reverse proxy does); yields its port. A client whose
    handshake fails is dropped; the relay goes on."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = int(listener.getsockname()[1])
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def relay(tls: ssl.SSLSocket) -> None:
        import select

        try:
            plain = socket.create_connection(("127.0.0.1", target_port), timeout=5)
        except OSError:
            tls.close()
            return
        with tls, plain:
            tls.settimeout(30)
            plain.settimeout(30)
            while not stop.is_set():
                ready, _, _ = select.select([tls, plain], [], [], 0.1)
                try:
                    if tls in ready or tls.pending():
                        data = tls.recv(1 << 16)
                        if not data:
                            return
                        plain.sendall(data)
                    if plain in ready:
                        data = plain.recv(1 << 16)
                        if not data:
                            return
                        tls.sendall(data)
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(10)
                tls = ctx.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                continue
            t = threading.Thread(target=relay, args=(tls,), name="tls-proxy-relay", daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, name="tls-proxy", daemon=True)
    acceptor.start()
    try:
        yield port
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in threads:
            t.join(5)


@dataclass
class ForwarderReceive:
    """``forwarder receive`` as a subprocess (the product's own Storage SCP)."""

    port: int
    output: Path
    ae_title: str
    proc: subprocess.Popen[bytes]
    log: Path

    def files(self) -> list[Path]:
        """Every file under ``output`` (temporary and hidden names included)."""
        return sorted(p for p in self.output.rglob("*") if p.is_file())


@contextmanager
def forwarder_receive(
    output: Path,
    *,
    ae_title: str = "FWDRECV",
    extra: list[str] | None = None,
    command: list[str] | None = None,
) -> Iterator[ForwarderReceive]:
    """``forwarder receive`` on a free 127.0.0.1 port writing under ``output``; its log (stdout
    and stderr, ``-v``: one line per object) in ``output``'s sibling ``<name>.log``.
    ``command`` replaces the repository's ``.venv/bin/forwarder`` (run in ``output``'s parent)."""
    repo = Path(__file__).resolve().parent.parent
    output.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = output.with_name(f"{output.name}.log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORWARDER_", "NOTIFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    exe = command or [str(repo / ".venv" / "bin" / "forwarder")]
    cmd = [
        *exe, "receive", "-v", "--bind", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--ae-title", ae_title, *(extra or []),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=output.parent)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        yield ForwarderReceive(port, output, ae_title, proc, log_path)
    finally:
        stop_process(proc, timeout=15)
        log.close()
