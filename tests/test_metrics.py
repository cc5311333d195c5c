"""Metrics: a real HTTP server on 127.0.0.1, scraped with urllib."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import RetryPolicy
from forwarder.daemon import metrics as metrics_module
from forwarder.daemon.destination_state import DestinationState
from forwarder.daemon.metrics import Metrics
from forwarder.daemon.status import read_status
from forwarder.errors import ForwarderError
from forwarder.queue import Queue


@dataclasses.dataclass(frozen=True, slots=True)
class Counts:
    pending: int
    in_flight: int
    done: int
    failed: int
    oldest_pending_seconds: float | None


def _wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    threads_before = set(threading.enumerate())
    m = Metrics(destinations=["pacs", "archive"])
    yield m
    m.stop()
    _wait_until(lambda: set(threading.enumerate()) <= threads_before)


def _scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert m.address is not None
    host, port = m.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_sends_retries_ingest_and_associations(metrics: Metrics) -> None:
    metrics.file_sent("pacs", "stored", 1000, 0.02)
    metrics.file_sent("pacs", "stored", 500, 0.3)
    metrics.file_sent("pacs", "warning", 10, 0.01)
    metrics.file_sent("archive", "retry", 2000, 60.0)
    metrics.file_sent("archive", "failed", 7, 0.004)
    metrics.retry("archive")
    metrics.retry("archive")
    metrics.ingested(True)
    metrics.ingested(True)
    metrics.ingested(False, "not_dicom")
    metrics.ingested(False, "no_route")
    metrics.ingested(False, "not_dicom")
    metrics.associations_open("pacs", +1)
    metrics.associations_open("pacs", +1)
    metrics.associations_open("pacs", -1)
    metrics.start_server("127.0.0.1:0")

    s = _scrape(metrics)

    def files(dest: str, outcome: str) -> float:
        return s[("forwarder_files_sent_total", (("destination", dest), ("outcome", outcome)))]

    def sent_bytes(dest: str, outcome: str) -> float:
        return s[("forwarder_sent_bytes_total", (("destination", dest), ("outcome", outcome)))]

    assert files("pacs", "stored") == 2
    assert files("pacs", "warning") == 1
    assert files("pacs", "failed") == 0  # pre-created by destinations=
    assert files("archive", "retry") == 1
    assert files("archive", "failed") == 1
    assert sent_bytes("pacs", "stored") == 1500
    assert sent_bytes("archive", "retry") == 2000

    def bucket(dest: str, le: str) -> float:
        key = ("forwarder_send_duration_seconds_bucket", (("destination", dest), ("le", le)))
        return s[key]

    assert bucket("pacs", "0.025") == 2
    assert bucket("pacs", "0.5") == 3
    assert bucket("archive", "0.005") == 1
    assert bucket("archive", "30.0") == 1
    assert bucket("archive", "60.0") == 2
    assert s[("forwarder_send_duration_seconds_count", (("destination", "pacs"),))] == 3
    assert s[("forwarder_send_duration_seconds_sum", (("destination", "pacs"),))] == pytest.approx(
        0.33
    )

    assert s[("forwarder_retries_total", (("destination", "archive"),))] == 2
    assert s[("forwarder_retries_total", (("destination", "pacs"),))] == 0
    assert s[("forwarder_associations_open", (("destination", "pacs"),))] == 1
    assert s[("forwarder_associations_open", (("destination", "archive"),))] == 0
    assert s[("forwarder_ingest_accepted_total", ())] == 2
    assert s[("forwarder_ingest_rejected_total", (("reason", "not_dicom"),))] == 2
    assert s[("forwarder_ingest_rejected_total", (("reason", "no_route"),))] == 1
    assert ("forwarder_build_info", (("version", _version()),)) in s
    assert not any(name.endswith("_created") for name, _ in s)
    # No queue source yet: no queue series, and the scrape still works.
    assert not any(name.startswith("forwarder_queue") for name, _ in s)


def _version() -> str:
    from forwarder import __version__

    return __version__


def test_queue_source_read_at_scrape_time(metrics: Metrics, tmp_path: Path) -> None:
    state: dict[str, Counts] = {"pacs": Counts(3, 1, 10, 2, 42.5)}

    def source() -> Mapping[str, Counts]:
        return dict(state)

    failed = tmp_path / "failed"
    (failed / "ct" / "study").mkdir(parents=True)
    (failed / "a.dcm").write_bytes(b"x")
    (failed / "a.dcm.error.json").write_text("{}")
    (failed / "ct" / "study" / "b.dcm").write_bytes(b"x")
    metrics.set_queue_source(source)
    metrics.set_failed_folder(failed)
    metrics.start_server("127.0.0.1:0")

    s = _scrape(metrics)
    for st, value in {"pending": 3, "in_flight": 1, "done": 10, "failed": 2}.items():
        assert s[("forwarder_queue_items", (("destination", "pacs"), ("state", st)))] == value
    assert s[("forwarder_queue_oldest_pending_seconds", (("destination", "pacs"),))] == 42.5
    assert s[("forwarder_failed_folder_files", ())] == 2

    state["pacs"] = Counts(0, 0, 14, 2, None)
    state["archive"] = Counts(5, 0, 0, 0, 1.0)
    (failed / "c.dcm").write_bytes(b"x")
    s = _scrape(metrics)
    assert s[("forwarder_queue_items", (("destination", "pacs"), ("state", "pending")))] == 0
    assert s[("forwarder_queue_oldest_pending_seconds", (("destination", "pacs"),))] == 0
    assert s[("forwarder_queue_items", (("destination", "archive"), ("state", "pending")))] == 5
    assert s[("forwarder_failed_folder_files", ())] == 3


def test_broken_queue_source_does_not_break_the_scrape(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Mapping[str, Counts]:
        raise RuntimeError("database is locked")

    metrics.set_queue_source(broken)
    metrics.file_sent("pacs", "stored", 1, 0.001)
    metrics.start_server("127.0.0.1:0")
    s = _scrape(metrics)
    assert s[("forwarder_files_sent_total", (("destination", "pacs"), ("outcome", "stored")))] == 1
    assert any("database is locked" in r.getMessage() for r in caplog.records)


def test_unknown_outcome_is_a_programming_error(metrics: Metrics) -> None:
    with pytest.raises(ValueError):
        metrics.file_sent("pacs", "stord", 1, 0.1)


def test_bind_failure_raises_forwarder_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ForwarderError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
            metrics.start_server(f"127.0.0.1:{port}")
    assert metrics.address is None


@pytest.mark.parametrize("listen", ["nohost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_bad_listen_value(metrics: Metrics, listen: str) -> None:
    with pytest.raises(ForwarderError, match="host:port"):
        metrics.start_server(listen)


def test_stop_joins_threads_and_frees_the_port() -> None:
    before = set(threading.enumerate())
    m = Metrics()
    m.start_server("127.0.0.1:0")
    assert m.address is not None
    port = m.address[1]
    _scrape(m)
    assert any(t.name == "metrics-http" for t in threading.enumerate())
    m.stop()
    assert set(threading.enumerate()) <= before
    m.stop()  # idempotent
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        probe.bind(("127.0.0.1", port))  # nothing listens there any more
        probe.listen()
    # The default registry also carries the process collector.
    m.start_server(f"127.0.0.1:{port}")
    assert any(name.startswith("process_") for name, _ in _scrape(m))
    m.stop()
    assert set(threading.enumerate()) <= before


def test_stop_does_not_wait_forever_for_a_silent_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 0.5)
    before = set(threading.enumerate())
    m = Metrics()
    m.start_server("127.0.0.1:0")
    assert m.address is not None
    with socket.create_connection(m.address, timeout=5):
        # Connected and silent: a request thread now waits for a request line.
        _wait_until(lambda: threading.active_count() >= len(before) + 2)
        started = time.monotonic()
        m.stop()
        assert time.monotonic() - started < 5
    assert set(threading.enumerate()) <= before


def test_metric_names_follow_prometheus_conventions(metrics: Metrics) -> None:
    metrics.set_queue_source(lambda: {"pacs": Counts(0, 0, 0, 0, None)})
    metrics.start_server("127.0.0.1:0")
    names = {name for name, _ in _scrape(metrics) if name.startswith("forwarder_")}
    assert names
    for name in names:
        assert re.fullmatch(r"forwarder_[a-z_]+", name)
        if "bytes" in name:
            assert name.endswith("_bytes_total")
        if "duration" in name or "pending_seconds" in name:
            assert re.search(r"_seconds(_bucket|_sum|_count)?$", name)


def test_destination_up_starts_at_1_and_follows_the_workers(metrics: Metrics) -> None:
    metrics.start_server("127.0.0.1:0")
    s = _scrape(metrics)
    assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 1.0
    metrics.destination_up("pacs", False)
    s = _scrape(metrics)
    assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 0.0
    assert s[("forwarder_destination_up", (("destination", "archive"),))] == 1.0
    metrics.add_destination("pacs")  # a reload re-adds it: the state is kept
    s = _scrape(metrics)
    assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 0.0
    metrics.destination_up("pacs", True)
    s = _scrape(metrics)
    assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 1.0


def _trickle(address: tuple[str, int], stop: threading.Event, every: float = 0.2) -> None:
    """A slow client: its request line one byte at a time, for as long as it is let."""
    with socket.create_connection(address, timeout=5) as sock:
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
            if stop.wait(every):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return  # the server dropped it


def test_stop_is_prompt_while_a_client_trickles_its_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client sending a byte now and then never lets the socket time out: stop() (SIGTERM)
    must not wait for it."""
    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 0.5)
    before = set(threading.enumerate())
    m = Metrics()
    m.start_server("127.0.0.1:0")
    assert m.address is not None
    stop = threading.Event()
    slow = threading.Thread(target=_trickle, args=(m.address, stop))
    slow.start()
    stopper = threading.Thread(target=m.stop)
    try:
        _wait_until(lambda: threading.active_count() >= len(before) + 3)
        stopper.start()
        stopper.join(timeout=3)
        hung = stopper.is_alive()
    finally:
        stop.set()
        slow.join()
        stopper.join()
    assert not hung, "stop() still waits for the trickling client after 3 s"
    assert set(threading.enumerate()) <= before


def test_a_slow_request_is_dropped_and_connections_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many clients that connect and say nothing (or trickle) hold a bounded number of
    threads, each for a bounded time; once they are gone a scrape answers again."""
    monkeypatch.setattr(metrics_module, "_REQUEST_DEADLINE", 1.0)
    bound = metrics_module._MAX_CONNECTIONS + 2
    m = Metrics()
    m.start_server("127.0.0.1:0")
    assert m.address is not None
    base = threading.active_count()
    stop = threading.Event()
    slow = threading.Thread(target=_trickle, args=(m.address, stop, 0.05))
    silent: list[socket.socket] = []
    try:
        # The trickler first, so that it holds a slot (not a 503): it must be cut at the
        # deadline, not when it stops sending.
        started = time.monotonic()
        slow.start()
        _wait_until(lambda: threading.active_count() >= base + 2)  # it and its handler
        silent += [socket.create_connection(m.address, timeout=5) for _ in range(150)]
        peak, until = 0, time.monotonic() + 6.0
        while time.monotonic() < until and peak <= bound and slow.is_alive():
            peak = max(peak, threading.active_count() - base)
            time.sleep(0.01)
        assert peak <= bound, f"{peak} threads for 151 clients"
        slow.join(timeout=10)
        held = time.monotonic() - started
        assert not slow.is_alive(), "a trickling client held its connection"
        assert held >= 1.0, f"the trickling client was cut after {held:.2f} s, before the deadline"
    finally:
        stop.set()
        slow.join()
        for s in silent:
            s.close()
        try:
            _wait_until(lambda: threading.active_count() <= base, 15)
            assert any(name == "forwarder_build_info" for name, _ in _scrape(m))
        finally:
            m.stop()


def test_listen_series_appear_with_the_listeners_first_measurement(metrics: Metrics) -> None:
    """A daemon without ``listen`` must not export forwarder_listen_accepting 0, which reads
    "refusing objects for lack of space" to an alert; nor one before its first check."""
    metrics.start_server("127.0.0.1:0")
    names = {name for name, _ in _scrape(metrics)}
    assert "forwarder_listen_accepting" not in names
    assert "forwarder_listen_spool_free_space" not in names
    metrics.listen_space(False, 1234)
    metrics.listen_space(True, 5678)  # registered once
    values = _scrape(metrics)
    assert values[("forwarder_listen_accepting", ())] == 1
    assert values[("forwarder_listen_spool_free_space", ())] == 5678


def test_a_removed_destination_leaves_no_series(metrics: Metrics) -> None:
    """A reload that removes a destination drops its series: a destination_up left at 0 would
    alert for ever for a destination that is no longer there."""
    metrics.start_server("127.0.0.1:0")
    metrics.destination_up("archive", False)
    metrics.destination_state("archive", "down", 1.0)
    metrics.file_sent("archive", "retry", 10, 0.1)
    metrics.commitment_outcome("archive", 1, 0, 0)
    metrics.remove_destination("archive")
    metrics.remove_destination("never-there")
    left = [(n, labels) for n, labels in _scrape(metrics) if ("destination", "archive") in labels]
    assert left == []
    assert _scrape(metrics)[("forwarder_destination_up", (("destination", "pacs"),))] == 1
    metrics.add_destination("archive")  # added again by a later reload: starts afresh
    assert _scrape(metrics)[("forwarder_destination_up", (("destination", "archive"),))] == 1


def test_head_metrics_answers_like_get_without_a_body(metrics: Metrics) -> None:
    """``/`` and ``/api/*`` take HEAD; ``/metrics`` answered it 405 (a probe or a load balancer
    health check that uses HEAD saw the listener as broken)."""
    metrics.start_server("127.0.0.1:0")
    assert metrics.address is not None
    host, port = metrics.address
    head = urllib.request.Request(f"http://{host}:{port}/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b""
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert int(resp.headers["Content-Length"]) > 0
    post = urllib.request.Request(f"http://{host}:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post, timeout=10)
    with err.value:
        assert err.value.code == 405 and "HEAD" in err.value.headers["Allow"]
    assert _scrape(metrics)[("forwarder_build_info", (("version", _version()),))] == 1


def test_destination_up_after_a_restart_is_the_recorded_state(
    metrics: Metrics, tmp_path: Path
) -> None:
    """A destination recorded down by the previous run is down, for the metrics as for
    ``forwarder status``, until an attempt says otherwise (a restart fixes no peer)."""
    queue = Queue(tmp_path / "queue.sqlite")
    try:
        queue.set_destination_state("pacs", "down", "connection refused", since=1234.0)
        queue.set_destination_state("archive", "up", None, since=1000.0)
        states = {
            name: DestinationState(name, RetryPolicy(), queue, metrics)
            for name in ("pacs", "archive")
        }
        metrics.start_server("127.0.0.1:0")
        s = _scrape(metrics)
        status = read_status(queue, ["pacs", "archive"]).destinations
        assert status["pacs"]["state"] == "down" and status["archive"]["state"] == "up"
        assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 0
        assert s[("forwarder_destination_state", (("destination", "pacs"), ("state", "down")))] == 1
        assert s[("forwarder_destination_state_since_seconds", (("destination", "pacs"),))] == 1234
        assert s[("forwarder_destination_up", (("destination", "archive"),))] == 1
        assert s[("forwarder_destination_state", (("destination", "archive"), ("state", "up")))]
        # The first attempt decides, as before: an answer makes it up.
        states["pacs"].set_state("up", None)
        s = _scrape(metrics)
        assert s[("forwarder_destination_up", (("destination", "pacs"),))] == 1
        assert read_status(queue, ["pacs"]).destinations["pacs"]["state"] == "up"
    finally:
        queue.close()


def test_a_loopback_listener_answers_only_requests_naming_a_loopback_host(
    metrics: Metrics, tmp_path: Path
) -> None:
    """DNS rebinding: a web page whose name is re-pointed at 127.0.0.1 makes the browser of
    someone on the gateway send its requests here, naming the page's host. They are refused;
    Prometheus, curl and an SSH tunnel (127.0.0.1, localhost) are served, the page as well."""
    import http.client

    from forwarder.daemon.status_page import StatusPage
    from forwarder.queue import Queue

    queue = Queue(tmp_path / "queue.sqlite")
    metrics.set_status_app(StatusPage(queue, lambda: ["pacs"], tmp_path / "failed"))
    metrics.start_server("127.0.0.1:0")
    assert metrics.address is not None
    port = metrics.address[1]

    def get(path: str, host: str | None, method: str = "GET") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True)
            if host is not None:
                conn.putheader("Host", host)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    try:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"127.0.0.2:{port}"):
            for path in ("/metrics", "/", "/api/status"):
                assert get(path, host)[0] == 200, (host, path)
        assert get("/metrics", "[::1]:1")[0] == 200
        assert get("/metrics", None)[0] == 200  # HTTP/1.0: no Host
        for host in (f"attacker.example:{port}", "attacker.example", "10.0.0.1", "[fe80::1]"):
            for path in ("/metrics", "/", "/api/status", "/api/find?key=1.2.3"):
                status, body = get(path, host)
                assert status == 403 and b"loopback" in body, (host, path, status)
        assert get("/metrics", "attacker.example", "HEAD") == (403, b"")
    finally:
        queue.close()


def test_which_hosts_and_listen_addresses_count_as_loopback() -> None:
    loopback, named = metrics_module._is_loopback, metrics_module._loopback_host
    assert all(map(loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(loopback, ["0.0.0.0", "::", "10.0.0.1", "gateway1", "fe80::1"]))
    for host in ("127.0.0.1:9750", "LOCALHOST", "[::1]:9750", "[::ffff:127.0.0.1]", None, ""):
        assert named(host), host
    for host in ("127.0.0.1.attacker.example", "localhost.attacker.example:9750", "10.0.0.1"):
        assert not named(host), host


def test_a_listener_named_by_a_host_name_that_is_loopback_is_guarded(metrics: Metrics) -> None:
    metrics.start_server("localhost:0")  # bound to 127.0.0.1 or ::1: what counts
    assert metrics.address is not None
    host, port = metrics.address[:2]
    request = urllib.request.Request(
        f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics",
        headers={"Host": "attacker.example"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    with err.value:
        assert err.value.code == 403
