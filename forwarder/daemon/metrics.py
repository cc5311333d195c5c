"""Prometheus metrics (``metrics.listen`` in the config): text format at ``/metrics``.

The same listener serves the read-only status page, ``/`` and ``/api/status``, when the service
hands it one (:meth:`Metrics.set_status_app`; the page is :mod:`forwarder.daemon.status_page`).

Counters and histograms are updated by the code that sees the event (the service calls
:meth:`Metrics.file_sent` and friends); queue depth, the age of the oldest pending item and
the number of files in ``failed/`` are read at scrape time by a collector, so they are never
stale and cost nothing between scrapes (``failed/`` through
:class:`~forwarder.daemon.failed_folder.FailedFolder`, which re-lists only the folders that
changed). ``/metrics`` answers HEAD as GET without the body, as the status page's paths do.
A listener on a loopback address answers only requests naming a loopback host (DNS rebinding:
:func:`_loopback_host`).

Exposed (see ``packaging/alerts.yml`` and ``packaging/grafana-dashboard.json``)::

    forwarder_files_sent_total{destination,outcome}      outcome: stored warning retry failed
    forwarder_sent_bytes_total{destination,outcome}
    forwarder_send_duration_seconds{destination}         histogram, one C-STORE
    forwarder_associations_open{destination}
    forwarder_destination_up{destination}                1 up, 0 down (unreachable, refused or
                                                         rejected: held, its files stay queued)
    forwarder_destination_state{destination,state}       1 for its state now (up down paused
                                                         outside_window), 0 for the others
    forwarder_destination_state_since_seconds{destination}  Unix time it entered that state
    forwarder_retries_total{destination}
    forwarder_ingest_accepted_total                      files taken into the queue
    forwarder_ingest_rejected_total{reason}              not_dicom, no_route, discarded, ...
    forwarder_queue_items{destination,state}             pending in_flight done failed
    forwarder_queue_oldest_pending_seconds{destination}  0 when nothing is pending
    forwarder_failed_folder_files                        files in failed/ (without .error.json)
    forwarder_listen_accepting                           1 while the listener takes objects, 0
                                                         while free space on the spool is below
                                                         listen.min_free_space (0xA700 answered);
                                                         with listen only, from its first check
    forwarder_listen_spool_free_space                    free space on the incoming filesystem
    forwarder_listen_objects_total{outcome}              received through listen: stored,
                                                         refused (low space, cannot store/queue)
    forwarder_listen_process_restarts_total              the receiving process died and was
                                                         restarted (listen.separate_process)
    forwarder_ingest_process_restarts_total              the watch-and-ingest process died
                                                         and was restarted
    forwarder_build_info{version}
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from forwarder import __version__
from forwarder.daemon.failed_folder import FailedFolder
from forwarder.errors import ForwarderError
from forwarder.net.status import Outcome  # the outcome label values

logger = logging.getLogger(__name__)

DESTINATION_STATES = ("up", "down", "paused", "outside_window")

QueueSource = Callable[[], Mapping[str, Any]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# The status page's; every other path is the metrics.
STATUS_PATHS = ("/", "/api/status", "/api/find")

# One C-STORE takes milliseconds on a LAN and up to response_timeout on a stalled peer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_STATES = ("pending", "in_flight", "done", "failed")
_SCRAPE_TIMEOUT = 10.0  # seconds a scrape connection may stay silent before it is dropped
# Seconds a client has to send its whole request: one that sends a byte now and then never
# times out on a read, and would hold its thread (and stop()) for as long as it likes.
_REQUEST_DEADLINE = 30.0
# Connections served at once (a thread each); more are answered 503 at once, not queued.
_MAX_CONNECTIONS = 64
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _QueueCollector(Collector):
    """Reads the queue (and the failed folder) when Prometheus scrapes."""

    def __init__(self) -> None:
        self.source: QueueSource | None = None
        self.failed_folder: FailedFolder | None = None
        self.commitment_source: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [*self._families(), self._awaiting_family()]

    @staticmethod
    def _awaiting_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "forwarder_awaiting_commitment",
            "Instances stored at a destination that requires proof of delivery and not yet "
            "committed (storage commitment or a verifying query) per destination.",
            labels=["destination"],
        )

    def collect(self) -> Iterable[GaugeMetricFamily]:
        awaiting = self._awaiting_family()
        if self.commitment_source is not None:
            try:
                for destination, c in sorted(self.commitment_source().items()):
                    awaiting.add_metric([destination], float(c.awaiting))
            except Exception as exc:
                logger.warning("metrics: cannot read the commitment counts: %s", exc)
        yield awaiting
        items, oldest, failed_files = self._families()
        source = self.source
        if source is not None:
            try:
                counts = source()
                for destination, c in sorted(counts.items()):
                    for state in QUEUE_STATES:
                        items.add_metric([destination, state], float(getattr(c, state)))
                    age = c.oldest_pending_seconds
                    oldest.add_metric([destination], float(age) if age is not None else 0.0)
            except Exception as exc:
                # A locked or broken database must not break the whole scrape.
                logger.warning("metrics: cannot read the queue counts: %s", exc)
        if self.failed_folder is not None:
            failed_files.add_metric([], float(self.failed_folder.count()))
        yield from (items, oldest, failed_files)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "forwarder_queue_items",
                "Queue items per destination by state (pending, in_flight, done, failed).",
                labels=["destination", "state"],
            ),
            GaugeMetricFamily(
                "forwarder_queue_oldest_pending_seconds",
                "Age of the oldest pending item per destination; 0 when nothing is pending.",
                labels=["destination"],
            ),
            GaugeMetricFamily(
                "forwarder_failed_folder_files",
                "Files in the failed/ folder, not counting their .error.json reports.",
            ),
        )


class _QuietHandler(WSGIRequestHandler):
    timeout = _SCRAPE_TIMEOUT  # a silent client cannot hold stop() forever
    server: _Server

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        # The request line and headers are in: no longer subject to _REQUEST_DEADLINE.
        self.server.request_read(self.connection)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: %s " + format, self.address_string(), *args)


class _Server(ThreadingMixIn, WSGIServer):
    # Request threads are joined by server_close(), so stop() leaves no thread behind: it
    # first cuts every open connection (close_connections), so none holds it.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = _MAX_CONNECTIONS  # a burst of scrapers is not left to SYN retries

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # socket -> monotonic deadline for its request (None: request read)
        self._open: dict[socket.socket, float | None] = {}
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            busy = len(self._open) >= _MAX_CONNECTIONS
            if not busy:
                self._open[request] = time.monotonic() + _REQUEST_DEADLINE
        if busy:
            logger.debug(
                "metrics: %s connections open, refusing %s", _MAX_CONNECTIONS, client_address
            )
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def request_read(self, request: socket.socket) -> None:
        with self._open_lock:
            if request in self._open:
                self._open[request] = None

    def service_actions(self) -> None:
        """Every poll of serve_forever: cut the connections still sending their request after
        _REQUEST_DEADLINE."""
        now = time.monotonic()
        with self._open_lock:
            late = [
                s for s, deadline in self._open.items() if deadline is not None and now > deadline
            ]
        for sock in late:
            logger.debug(
                "metrics: a client took over %.0f s to send its request", _REQUEST_DEADLINE
            )
            _cut(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone or cut (a stop, the request deadline) is not an error of ours: the
        answer to its half-sent request meets a closed socket. socketserver's own handler
        prints a traceback to stderr (the journal) for it; anything else is logged as one."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            logger.debug("metrics: %s: connection ended: %s", client_address, error)
        else:
            logger.exception("metrics: serving %s failed", client_address)

    def close_connections(self) -> None:
        """Cut every open connection: their threads end at once (stop())."""
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    """Shut ``sock`` down: a read blocked on it returns, a write fails; its thread closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed meanwhile


class Metrics:
    """The daemon's metrics, in their own registry (not prometheus_client's global one)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, destinations: Iterable[str] = ()
    ) -> None:
        """``destinations`` pre-creates each destination's series at zero, so rates and
        alerts see them before the first send."""
        # The *_created series double the output and no dashboard uses them (process-wide
        # switch; only this module uses prometheus_client).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        own_registry = registry is None
        self.registry = CollectorRegistry() if registry is None else registry
        reg = self.registry
        self._files = Counter(
            "forwarder_files_sent",
            "C-STORE attempts per destination by outcome (stored, warning, retry, failed).",
            ["destination", "outcome"],
            registry=reg,
        )
        self._bytes = Counter(
            "forwarder_sent_bytes",
            "Bytes of the files in those C-STORE attempts, by outcome.",
            ["destination", "outcome"],
            registry=reg,
        )
        self._latency = Histogram(
            "forwarder_send_duration_seconds",
            "Time for one C-STORE, request to response (or failure).",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._associations = Gauge(
            "forwarder_associations_open",
            "Associations currently open per destination.",
            ["destination"],
            registry=reg,
        )
        self._up = Gauge(
            "forwarder_destination_up",
            "1 when the destination's last association attempt worked (or none was needed), 0 "
            "while it is down: unreachable, refusing or rejecting associations (files stay "
            "queued). After a restart, what the previous run recorded until the first attempt.",
            ["destination"],
            registry=reg,
        )
        self._state = Gauge(
            "forwarder_destination_state",
            "1 for the destination's state now (up, down, paused, outside_window), else 0.",
            ["destination", "state"],
            registry=reg,
        )
        self._state_since = Gauge(
            "forwarder_destination_state_since_seconds",
            "When the destination entered its state (Unix time).",
            ["destination"],
            registry=reg,
        )
        self._retries = Counter(
            "forwarder_retries",
            "Items put back into the queue for another attempt after a transient failure.",
            ["destination"],
            registry=reg,
        )
        self._accepted = Counter(
            "forwarder_ingest_accepted",
            "Files taken from incoming/ into the queue.",
            registry=reg,
        )
        self._rejected = Counter(
            "forwarder_ingest_rejected",
            "Files from incoming/ moved to failed/ without sending, by reason.",
            ["reason"],
            registry=reg,
        )
        # Registered at the listener's first measurement: a daemon without ``listen`` (or
        # before its first check) has no such series, rather than a 0 that reads "refusing".
        self._registry = reg
        self._listen_accepting = Gauge(
            "forwarder_listen_accepting",
            "1 while the listener takes objects; 0 while the free space on the incoming "
            "filesystem is below listen.min_free_space (objects are answered 0xA700).",
            registry=None,
        )
        self._listen_free = Gauge(
            "forwarder_listen_spool_free_space",
            "Free space on the incoming filesystem in bytes, as the listener last measured it.",
            registry=None,
        )
        self._listen_measured = False
        self._listen_objects = Counter(
            "forwarder_listen_objects",
            "Objects received through listen, by outcome (stored: queued before Success; "
            "refused: answered a failure status by the daemon's sink).",
            ["outcome"],
            registry=reg,
        )
        self._listen_restarts = Counter(
            "forwarder_listen_process_restarts",
            "Times the listener's receiving process died and was restarted (its open "
            "associations were cut; the port stayed open).",
            registry=reg,
        )
        self._ingest_restarts = Counter(
            "forwarder_ingest_process_restarts",
            "Times the watch-and-ingest process died and was restarted (files waited in "
            "incoming meanwhile).",
            registry=reg,
        )
        self._commitment = Counter(
            "forwarder_commitment_instances",
            "Instances whose proof of delivery was decided, by outcome: committed, resent (not "
            "committed, sent again), failed (not committed, resends exhausted).",
            ["destination", "outcome"],
            registry=reg,
        )
        self._info = Gauge(
            "forwarder_build_info", "Always 1; the version label.", ["version"], registry=reg
        )
        self._info.labels(__version__).set(1)
        self._queue = _QueueCollector()
        reg.register(self._queue)
        if own_registry:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
        self._known: set[str] = set()
        for name in destinations:
            self.add_destination(name)
        self._lock = threading.Lock()
        self._status_app: WSGIApp | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add_destination(self, destination: str) -> None:
        """Create a destination's series at zero (idempotent)."""
        for outcome in Outcome:
            self._files.labels(destination, outcome.value)
            self._bytes.labels(destination, outcome.value)
        self._latency.labels(destination)
        self._associations.labels(destination)
        if destination not in self._known:
            self._known.add(destination)
            self._up.labels(destination).set(1)
        self._retries.labels(destination)

    def remove_destination(self, destination: str) -> None:
        """Drop a destination's series (a reload removed it): a ``destination_up`` left at 0,
        or a state, would go on alerting for a destination that is no longer there."""
        self._known.discard(destination)
        for metric, labels in (
            *((m, (destination, o.value)) for m in (self._files, self._bytes) for o in Outcome),
            *((self._state, (destination, s)) for s in DESTINATION_STATES),
            *((self._commitment, (destination, o)) for o in ("committed", "resent", "failed")),
            *(
                (m, (destination,))
                for m in (
                    self._latency,
                    self._associations,
                    self._up,
                    self._state_since,
                    self._retries,
                )
            ),
        ):
            with contextlib.suppress(KeyError):  # never created
                metric.remove(*labels)

    def file_sent(self, destination: str, outcome: str, nbytes: int, seconds: float) -> None:
        """One C-STORE attempt: ``outcome`` is stored, warning, retry or failed."""
        value = Outcome(outcome).value  # ValueError on a typo, not a silent new series
        self._files.labels(destination, value).inc()
        self._bytes.labels(destination, value).inc(max(0, nbytes))
        self._latency.labels(destination).observe(max(0.0, seconds))

    def commitment_outcome(
        self, destination: str, committed: int, resent: int, failed: int
    ) -> None:
        """One commitment transaction's (or verifying query's) outcome."""
        for outcome, n in (("committed", committed), ("resent", resent), ("failed", failed)):
            self._commitment.labels(destination, outcome).inc(n)

    def set_commitment_source(self, fn: Callable[[], dict[str, Any]]) -> None:
        """``fn()`` returns ``{destination: counts}`` with ``.awaiting``, read on scrape."""
        self._queue.commitment_source = fn

    def retry(self, destination: str) -> None:
        """An item was rescheduled after a transient failure (refused, timeout, busy)."""
        self._retries.labels(destination).inc()

    def ingested(self, accepted: bool, reason: str = "", count: int = 1) -> None:
        """``count`` files left incoming/: queued (``accepted``) or rejected for ``reason``
        (``not_dicom``, ``no_route``, ``discarded`` by a discard route...)."""
        if accepted:
            self._accepted.inc(count)
        else:
            self._rejected.labels(reason or "unknown").inc(count)

    def listen_space(self, accepting: bool, free_bytes: int) -> None:
        """The listener measured the spool's free space (``accepting``: above the watermark)."""
        self._listen_accepting.set(1 if accepting else 0)
        self._listen_free.set(max(0, free_bytes))
        with self._lock:
            if not self._listen_measured:
                self._listen_measured = True
                self._registry.register(self._listen_accepting)
                self._registry.register(self._listen_free)

    def listen_object(self, outcome: str) -> None:
        """An object received through listen: ``stored`` or ``refused``."""
        self._listen_objects.labels(outcome).inc()

    def listen_restart(self) -> None:
        """The listener's receiving process died and is being restarted."""
        self._listen_restarts.inc()

    def ingest_restart(self) -> None:
        """The watch-and-ingest process died and is being restarted."""
        self._ingest_restarts.inc()

    def associations_open(self, destination: str, delta: int) -> None:
        """+1 when an association is established, -1 when it is released or aborted."""
        self._associations.labels(destination).inc(delta)

    def destination_up(self, destination: str, up: bool) -> None:
        """The destination came up (an association worked) or went down."""
        self._known.add(destination)
        self._up.labels(destination).set(1 if up else 0)

    def destination_state(self, destination: str, state: str, since: float) -> None:
        """The destination's state (up, down, paused, outside_window) and since when."""
        for s in DESTINATION_STATES:
            self._state.labels(destination, s).set(1 if s == state else 0)
        self._state_since.labels(destination).set(since)

    def set_queue_source(self, fn: QueueSource) -> None:
        """``fn()`` returns ``{destination: counts}`` where counts has ``.pending``,
        ``.in_flight``, ``.done``, ``.failed`` and ``.oldest_pending_seconds``; it is called
        on every scrape, from the HTTP server's thread."""
        self._queue.source = fn

    def set_failed_folder(self, folder: str | os.PathLike[str] | FailedFolder | None) -> None:
        """Count the files in ``failed/`` at scrape time (None: do not); a FailedFolder is
        shared with the status page (one listing of the folder for both)."""
        if folder is not None and not isinstance(folder, FailedFolder):
            folder = FailedFolder(folder)
        self._queue.failed_folder = folder

    def set_status_app(self, app: WSGIApp | None) -> None:
        """Serve :data:`STATUS_PATHS` with ``app`` (None: those paths are metrics again, as
        every path but them is)."""
        self._status_app = app

    def _app(self, loopback: list[bool]) -> WSGIApp:
        """The listener's application; ``loopback[0]``, set once it is bound: it listens on a
        loopback address only, and answers only requests that name a loopback host (see
        :func:`_loopback_host`)."""
        metrics_app: WSGIApp = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if loopback[0] and not _loopback_host(environ.get("HTTP_HOST")):
                return _wrong_host(environ, start_response)
            status_app = self._status_app
            if status_app is not None and environ.get("PATH_INFO", "/") in STATUS_PATHS:
                return status_app(environ, start_response)
            return _with_head(metrics_app, environ, start_response)

        return app

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the server listens on, or None when it is not running."""
        server = self._server
        if server is None:
            return None
        host, port = server.server_address[:2]
        return str(host), int(port)

    def start_server(self, listen: str) -> None:
        """Serve ``/metrics`` (and the status page) on ``listen`` (``host:port``,
        ``[v6]:port``; an empty host is every address, port 0 picks a free one). Raises
        ForwarderError when it cannot bind."""
        host, port = _parse_listen(listen)
        with self._lock:
            if self._server is not None:
                raise ForwarderError("the metrics server is already running")
            try:
                family = _family_for(host, port)
                server_class = type("_MetricsServer", (_Server,), {"address_family": family})
                loopback = [True]  # until bound: nothing is served before
                app = self._app(loopback)
                server: _Server = make_server(host, port, app, server_class, _QuietHandler)
                # By the address bound, not the name configured: a host name may resolve to
                # loopback (Debian maps the machine's own name to 127.0.1.1).
                loopback[0] = _is_loopback(str(server.server_address[0]))
            except OSError as exc:
                raise ForwarderError(
                    f"cannot serve metrics on {listen}: {exc.strerror or exc}; "
                    "choose another metrics.listen address or free the port"
                ) from None
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="metrics-http",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        logger.info("metrics at http://%s/metrics", listen)

    def stop(self) -> None:
        """Stop the HTTP server and join its threads. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()


def _with_head(
    metrics_app: WSGIApp, environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """prometheus_client's application, taking HEAD as the status page does (it answers 405
    to it): a GET's status and headers, with the body's Content-Length, and no body."""

    def allow_head(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
        allow = [(k, "GET, HEAD, OPTIONS" if k.lower() == "allow" else v) for k, v in headers]
        return start_response(status, allow, *args)

    if environ.get("REQUEST_METHOD") != "HEAD":
        return metrics_app(environ, allow_head)
    answered: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(
        metrics_app(
            {**environ, "REQUEST_METHOD": "GET"},
            lambda status, headers, *_: answered.append((status, headers)),
        )
    )
    status, headers = answered[-1]
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    allow_head(status, [*headers, ("Content-Length", str(len(body)))])
    return []


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: 127.0.0.0/8, ::1, ::ffff:127.0.0.1."""
    try:
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        return bool((mapped or address).is_loopback)
    except ValueError:
        return host.lower() == "localhost"


def _loopback_host(header: str | None) -> bool:
    """Whether a request's Host header names a loopback host (``127.0.0.1:9750``,
    ``localhost``, ``[::1]:9750``), or there is none (HTTP/1.0).

    A listener on loopback is reachable from this machine only, but a browser on it can be
    led there by a web page whose name an attacker re-points at 127.0.0.1 (DNS rebinding):
    its requests name the attacker's host, and are refused. Prometheus, curl and an SSH
    tunnel name the loopback address or ``localhost``."""
    if not header:
        return True
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host == "localhost" or _is_loopback(host)


def _wrong_host(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = (
        f"forwarder: this listener is on a loopback address; Host "
        f"{environ.get('HTTP_HOST', '')!r} is not one of its names (use 127.0.0.1 or "
        "localhost)\n"
    ).encode()
    start_response(
        "403 Forbidden",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ForwarderError(f"metrics.listen {listen!r}: use host:port, e.g. 127.0.0.1:9750")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def _family_for(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
