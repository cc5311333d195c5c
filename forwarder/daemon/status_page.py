"""The read-only status page on the metrics listener: ``/`` (HTML), ``/api/status`` and
``/api/find`` (JSON).

``/api/status`` is ``forwarder status --json``'s document (:mod:`forwarder.daemon.status`) plus,
per destination, ``rate`` (files stored per minute over ``rate_window_seconds``), and
``recent_failures`` (the newest reports in ``failed/``, with their reasons per destination),
``finishing`` (files waiting to be moved out of incoming) and ``daemon`` (version, start, uptime).
The reports are found through a :class:`~forwarder.daemon.failed_folder.FailedFolder` (shared
with the metrics by the daemon): a page view re-lists only the folders that changed.

``/api/find?key=KEY`` is ``forwarder find --json``'s document
(:func:`~forwarder.daemon.status.find_document`): every file of a Study, Series or SOP Instance
UID or an Accession Number the queue knows, where it is and its state per destination.

``/`` renders the same document as plain HTML: inline CSS, no script, no external asset, a meta
refresh, and a search box (``/?find=KEY``, a GET form) that shows what ``/api/find`` says as a
table; a page showing a search does not refresh, so a key being typed is not lost. Every value
is escaped. It shows what the queue and the reports hold (destination names, counts, states,
paths, UIDs, DICOM statuses and error comments), never a patient's name or ID, which the queue
does not keep; an Accession Number appears only as the key the user typed.

Not here: the HTTP server (:mod:`forwarder.daemon.metrics` routes these paths here), what the
documents hold (:mod:`forwarder.daemon.status`) and the search's HTML
(:mod:`forwarder.daemon.status_find`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from forwarder import __version__
from forwarder.daemon.failed_folder import FailedFolder
from forwarder.daemon.status import (
    RateMeter,
    find_document,
    format_age,
    iso_local,
    read_status,
)
from forwarder.daemon.status_find import (
    MAX_KEYS,
    Search,
    search_form,
    search_keys,
    search_section,
)
from forwarder.errors import ForwarderError
from forwarder.queue import Queue

logger = logging.getLogger(__name__)

PAGE_PATH = "/"
API_PATH = "/api/status"
FIND_API_PATH = "/api/find"
PATHS = (PAGE_PATH, API_PATH, FIND_API_PATH)
REFRESH_SECONDS = 5
RECENT_FAILURES = 50

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

# No script, no external asset, nothing may frame it; inline styles only.
_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("Referrer-Policy", "no-referrer"),
]


class StatusPage:
    """The page's state (the rate samples, the start time) and its WSGI application."""

    def __init__(
        self,
        queue: Queue,
        destinations: Callable[[], Sequence[str]],
        failed: Path | FailedFolder,
        *,
        started: float | None = None,
        failures: int = RECENT_FAILURES,
        refresh: int = REFRESH_SECONDS,
        proof: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        """``destinations()`` names the configured destinations (read on every request: a
        reload may change them), ``proof()`` those requiring proof of delivery (their
        commitment fields show, as in ``status --json``); ``started`` is the daemon's start
        (epoch seconds)."""
        self._queue = queue
        self._destinations = destinations
        self._proof = proof
        # Shared with the metrics by the daemon: one listing of failed/ for both.
        self._failed = failed if isinstance(failed, FailedFolder) else FailedFolder(failed)
        self._started = time.time() if started is None else started
        self._started_mono = time.monotonic() - (time.time() - self._started)
        self._failures = failures
        self._refresh = refresh
        self.rates = RateMeter()
        # ``status --json``'s "listen" object, when the daemon listens (set by the service)
        self.listen_status: Callable[[], dict[str, Any] | None] | None = None

    def sample(self) -> None:
        """Record the done counters for the rates (the service calls this every few seconds).
        Raises ForwarderError when the queue cannot be read."""
        stats = self._queue.stats(destinations=self._destinations())
        self.rates.sample({name: s.done for name, s in stats.items()})

    def document(self) -> dict[str, Any]:
        """``/api/status``. Raises ForwarderError when the queue cannot be read."""
        status = read_status(self._queue, self._destinations(), self._proof())
        self.rates.sample({name: r["done"] for name, r in status.destinations.items()})
        rates, span = self.rates.rates()
        destinations = status.destinations
        for name, r in destinations.items():
            rate = rates.get(name)
            r["rate"] = None if rate is None else round(rate, 2)
        now = time.time()
        return {
            "destinations": destinations,
            "rate_window_seconds": None if span is None else round(span, 1),
            "recent_failures": self._failed.recent(self._failures),
            "finishing": {
                "waiting": status.waiting_to_move,
                "last_error": status.finishing_error if status.waiting_to_move else None,
            },
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "started_at": iso_local(self._started),
                "uptime_seconds": round(max(0.0, time.monotonic() - self._started_mono), 1),
            },
            "generated_at": iso_local(now),
            **({"listen": self.listen_status()} if self.listen_status is not None else {}),
        }

    def find(self, keys: Sequence[str]) -> dict[str, Any]:
        """``/api/find``. Raises ForwarderError when the queue cannot be read."""
        return find_document(keys, self._queue.find(keys))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application for :data:`PATHS`."""
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(
                start_response,
                "405 Method Not Allowed",
                "text/plain",
                b"read-only\n",
                [("Allow", "GET, HEAD")],
                method,
            )
        try:
            query = parse_qs(
                environ.get("QUERY_STRING", ""), keep_blank_values=True, max_num_fields=MAX_KEYS
            )
        except ValueError:
            query = {}  # more fields than any search takes: none is read
        if path == FIND_API_PATH:
            return self._find_api(search_keys(query.get("key", [])), start_response, method)
        search = search_keys(query["find"]) if path == PAGE_PATH and "find" in query else None
        try:
            doc = self.document()
            found = self.find(search) if search else None
        except ForwarderError as exc:
            logger.warning("status page: cannot read the queue: %s", exc)
            if path == API_PATH:
                body = json.dumps({"error": str(exc)}).encode()
                return _respond(
                    start_response, "503 Service Unavailable", "application/json", body, [], method
                )
            html = render_error(str(exc), self._refresh).encode()
            return _respond(
                start_response, "503 Service Unavailable", "text/html", html, [], method
            )
        if path == API_PATH:
            body = (json.dumps(doc, indent=2) + "\n").encode()
            return _respond(start_response, "200 OK", "application/json", body, [], method)
        shown = None if search is None else Search(tuple(search), found)
        html = render(doc, self._refresh, shown).encode()
        return _respond(start_response, "200 OK", "text/html", html, [], method)

    def _find_api(self, keys: list[str], start_response: StartResponse, method: str) -> list[bytes]:
        """``/api/find``: 200 with the document (``files`` may be empty), 400 without a key,
        503 when the queue cannot be read."""
        if not keys:
            body = json.dumps({"error": "give one or more keys: /api/find?key=UID"}).encode()
            return _respond(start_response, "400 Bad Request", "application/json", body, [], method)
        try:
            doc = self.find(keys)
        except ForwarderError as exc:
            logger.warning("status page: cannot read the queue: %s", exc)
            body = json.dumps({"error": str(exc)}).encode()
            return _respond(
                start_response, "503 Service Unavailable", "application/json", body, [], method
            )
        body = (json.dumps(doc, indent=2) + "\n").encode()
        return _respond(start_response, "200 OK", "application/json", body, [], method)


def _respond(
    start_response: StartResponse,
    status: str,
    content_type: str,
    body: bytes,
    headers: list[tuple[str, str]],
    method: str,
) -> list[bytes]:
    charset = "; charset=utf-8" if not content_type.endswith("json") else ""
    start_response(
        status,
        [
            ("Content-Type", content_type + charset),
            ("Content-Length", str(len(body))),
            *_HEADERS,
            *headers,
        ],
    )
    return [] if method == "HEAD" else [body]


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.5em 0 .5em}
.meta{color:#59636e;margin:0}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #d1d9e0;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;min-width:3.5em;text-align:center;padding:.1em .5em;
border-radius:.8em;font-weight:700;color:#fff}
.up{background:#1a7f37}.down{background:#cf222e}.other{background:#9a6700}
.since,.none{color:#59636e;font-size:.9em}td .since{white-space:nowrap}
.err{color:#cf222e;word-break:break-word}
code{font:12px ui-monospace,monospace;word-break:break-all}
ul{margin:0;padding-left:1.2em}
form.find{margin:.8em 0 0}form.find input{font:12px ui-monospace,monospace;padding:.3em}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_age(seconds)


def _badge(state: str) -> str:
    kind = state if state in ("up", "down") else "other"
    return f'<span class="badge {kind}">{_e(state.replace("_", " "))}</span>'


def _when(iso: str, now: float) -> str:
    """``2026-11-26 03:13:39 (5m ago)`` from ``2026-11-26T03:13:39+0000``."""
    try:
        at = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return iso
    return f"{iso[:10]} {iso[11:19]} ({format_age(max(0.0, now - at))} ago)"


def _destination_rows(destinations: dict[str, dict[str, Any]]) -> str:
    rows = []
    now = time.time()
    for name, r in destinations.items():
        since = r.get("state_since")
        since_html = (
            f'<div class="since">since {_e(_when(since, now))}</div>'
            if since
            else '<div class="since">no outage recorded</div>'
        )
        rate = r.get("rate")
        rows.append(
            "<tr>"
            f"<td><b>{_e(name)}</b></td>"
            f"<td>{_badge(str(r.get('state') or 'up'))}{since_html}</td>"
            f'<td class="n">{_e(r["pending"])}</td>'
            f'<td class="n">{_e(r["in_flight"])}</td>'
            f'<td class="n">{_e(_age(r["oldest_pending_seconds"]))}</td>'
            f'<td class="n">{_e("-" if rate is None else f"{rate:.1f}")}</td>'
            f'<td class="n">{_e(r["done"])}{_proof(r)}</td>'
            f'<td class="n">{_e(r["failed"])}</td>'
            f'<td class="err">{_e(r.get("last_error") or "")}</td>'
            "</tr>"
        )
    return "\n".join(rows)


def _proof(r: dict[str, Any]) -> str:
    """Under Done, for a destination with proof of delivery: committed and awaiting."""
    if "awaiting_commitment" not in r:
        return ""
    return (
        f'<div class="since">{_e(r["committed"])} committed, '
        f"{_e(r['awaiting_commitment'])} awaiting</div>"
    )


def _outcome_item(d: dict[str, Any]) -> str:
    """One destination's outcome for a failed file: name, outcome, status, error, attempts."""
    status, error, attempts = d.get("status"), d.get("error"), d.get("attempts")
    html = f"<li><b>{_e(d.get('destination'))}</b>: {_e(d.get('outcome'))}"
    if status:
        html += f" <code>{_e(status)}</code>"
    if error and error != f"status {status}":  # the bare status says nothing more
        html += f" {_e(error)}"
    if attempts:
        html += (
            f' <span class="since">({_e(attempts)} attempt{"" if attempts == 1 else "s"})</span>'
        )
    return html + "</li>"


def _failure_rows(failures: list[dict[str, Any]]) -> str:
    rows = []
    for f in failures:
        items = "".join(_outcome_item(d) for d in f["destinations"])
        uid = f.get("sop_instance_uid")
        calling = f.get("calling_ae")
        rows.append(
            "<tr>"
            f"<td>{_e(f['failed_at'])}</td>"
            f"<td><code>{_e(f['path'])}</code>"
            + (f'<div class="since">SOP Instance UID <code>{_e(uid)}</code></div>' if uid else "")
            + (f'<div class="since">received from {_e(calling)}</div>' if calling else "")
            + "</td>"
            f'<td class="err">{_e(f.get("reason") or "")}</td>'
            f"<td>{f'<ul>{items}</ul>' if items else '-'}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def _page(title: str, refresh: int, body: str) -> str:
    """A whole page; ``refresh`` 0: no meta refresh."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh > 0 else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"{meta}"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def render(
    doc: dict[str, Any], refresh: int = REFRESH_SECONDS, search: Search | None = None
) -> str:
    """The HTML page of an ``/api/status`` document, with a search's result (it then does not
    refresh)."""
    daemon = doc["daemon"]
    span = doc.get("rate_window_seconds")
    rate_note = (
        f"files stored per minute over the last {format_age(span)}"
        if span is not None
        else "files stored per minute (needs a few seconds of samples)"
    )
    parts = [
        "<header><h1>forwarder</h1>",
        f'<p class="meta">version {_e(daemon["version"])} · pid {_e(daemon["pid"])} · '
        f"up {_e(format_age(daemon['uptime_seconds']))} (since {_e(daemon['started_at'])}) · "
        f"as of {_e(doc['generated_at'])}, refreshed every {int(refresh)} s · "
        '<a href="/api/status">JSON</a> · <a href="/metrics">metrics</a></p>',
        search_form(search),
        "</header>",
        search_section(search) if search is not None else "",
        "<section><h2>Destinations</h2><table><thead><tr><th>Destination</th><th>State</th>"
        '<th>Pending</th><th>In flight</th><th>Oldest pending</th><th title="'
        f'{_e(rate_note)}">Rate /min</th><th>Done</th><th>Failed</th><th>Last error</th>'
        "</tr></thead><tbody>",
        _destination_rows(doc["destinations"]),
        f'</tbody></table><p class="meta">Rate: {_e(rate_note)}.</p></section>',
    ]
    finishing = doc.get("finishing") or {}
    if finishing.get("waiting"):
        parts.append(
            f'<p class="err">{_e(finishing["waiting"])} delivered or failed files wait to be '
            "moved out of incoming"
            + (
                f"; last error: {_e(finishing['last_error'])}"
                if finishing.get("last_error")
                else ""
            )
            + "</p>"
        )
    failures = doc["recent_failures"]
    parts.append(f"<section><h2>Recent failures ({len(failures)}, newest first)</h2>")
    if failures:
        parts.append(
            "<table><thead><tr><th>Failed at</th><th>File in failed/</th><th>Reason</th>"
            "<th>Per destination</th></tr></thead><tbody>"
            + _failure_rows(failures)
            + "</tbody></table>"
        )
    else:
        parts.append('<p class="none">No files in failed/.</p>')
    parts.append(
        '<p class="meta">Put failed files back with <code>forwarder retry</code>.</p></section>'
    )
    title = "forwarder find" if search is not None else "forwarder status"
    return _page(title, 0 if search is not None else refresh, "\n".join(parts))


def render_error(message: str, refresh: int = REFRESH_SECONDS) -> str:
    """The page when the queue cannot be read."""
    body = (
        '<header><h1>forwarder</h1></header><p class="err">The queue database cannot be '
        f"read: {_e(message)}</p>"
    )
    return _page("forwarder status: unavailable", refresh, body)
