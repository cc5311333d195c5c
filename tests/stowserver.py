"""A scripted STOW-RS server for tests: http.server on 127.0.0.1 in a thread, HTTP or HTTPS.

Each POST is parsed (multipart/related parts, the SOP Instance UID of each) and answered with
what the test's ``answer`` callable returns: a status, headers, and a body (by default a
DICOM JSON response storing every instance), or a misbehaviour: ``stall`` (never answer),
``drop`` (close the connection halfway through reading the body), ``early`` (answer after
reading part of the body, then close). ``stream=True`` keeps no
parts: the body is hashed as it arrives (for very large objects).
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    uids: list[str] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    sha256: str = ""


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: a JSON response from stored/failed/warnings below
    failed: dict[str, int] = field(default_factory=dict)  # uid -> Failure Reason
    warnings: dict[str, int] = field(default_factory=dict)  # uid -> Warning Reason
    omit: set[str] = field(default_factory=set)  # uids the response does not mention
    stall: bool = False
    drop: bool = False
    # Answer (``body``) after reading this many bytes of the request, then close the
    # connection without reading the rest (a server or proxy that answers early).
    early: int | None = None


def stow_json(stored: dict[str, int | None], failed: dict[str, int]) -> bytes:
    """A STOW-RS response data set in DICOM JSON."""

    def ref(uid: str) -> dict[str, Any]:
        return {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }

    data: dict[str, Any] = {"00081190": {"vr": "UR", "Value": ["http://x/studies/1"]}}
    if stored:
        items = []
        for uid, warning in stored.items():
            item = ref(uid)
            if warning is not None:
                item["00081196"] = {"vr": "US", "Value": [warning]}
            items.append(item)
        data["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        data["00081198"] = {
            "vr": "SQ",
            "Value": [
                {**ref(uid), "00081197": {"vr": "US", "Value": [reason]}}
                for uid, reason in failed.items()
            ],
        }
    return json.dumps(data).encode()


class StowServer:
    def __init__(
        self,
        answer: Callable[[Seen], Answer] | Answer | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        stream: bool = False,
    ) -> None:
        self.answer = answer or Answer()
        self.seen: list[Seen] = []
        self.stream = stream
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
                server._record(seen)
                a = server._answer(seen)
                self._reply(a, b"[]" if a.body is None else a.body)

            def do_POST(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen = Seen("POST", self.path, headers)
                length = int(headers.get("content-length", "0"))
                # A callable answer is asked once, after the body; ``drop`` needs a fixed one.
                a = server.answer if isinstance(server.answer, Answer) else Answer()
                if a.drop:
                    self.rfile.read(length // 2)
                    server._record(seen)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if a.early is not None:
                    self.rfile.read(a.early)
                    server._record(seen)
                    self._reply(a, a.body or b"")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True
                    return
                digest = hashlib.sha256()
                body = io.BytesIO()
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
                    digest.update(chunk)
                    if not server.stream:
                        body.write(chunk)
                seen.nbytes = length - left
                seen.sha256 = digest.hexdigest()
                if not server.stream:
                    seen.parts = _parts(body.getvalue(), headers.get("content-type", ""))
                    seen.uids = [_uid(p) for p in seen.parts]
                if callable(server.answer):
                    a = server.answer(seen)
                server._record(seen)
                if a.stall:
                    server.stop_event.wait(60)
                    self.close_connection = True
                    return
                body_out = a.body
                if body_out is None:
                    stored = {u: a.warnings.get(u) for u in seen.uids if u not in a.failed}
                    stored = {u: w for u, w in stored.items() if u not in a.omit}
                    failed = {u: r for u, r in a.failed.items() if u not in a.omit}
                    body_out = stow_json(stored, failed)
                    a.headers.setdefault("Content-Type", "application/dicom+json")
                self._reply(a, body_out)

            def _reply(self, a: Answer, body: bytes) -> None:
                self.send_response(a.status)
                for k, v in a.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}/dicom-web"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="stow-server"
        )

    def _answer(self, seen: Seen) -> Answer:
        return self.answer(seen) if callable(self.answer) else self.answer

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def posts(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == "POST"]

    def uids(self) -> list[str]:
        return [u for s in self.posts() for u in s.uids]

    def __enter__(self) -> StowServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def _parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    delimiter = b"--" + boundary.encode()
    pieces = body.split(delimiter)
    assert pieces[0] == b"", "the body must start with the boundary"
    assert pieces[-1] == b"--\r\n", f"the body must end with the close delimiter: {pieces[-1]!r}"
    parts = []
    for piece in pieces[1:-1]:
        head, _, content = piece.partition(b"\r\n\r\n")
        assert b"content-type: application/dicom" in head.lower(), head
        assert content.endswith(b"\r\n")
        parts.append(content[:-2])
    return parts


def _uid(part: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
