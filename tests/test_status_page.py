"""The status page on the metrics listener: ``/`` (HTML, with its search box), ``/api/status``
and ``/api/find`` (JSON); and ``forwarder find`` against the same daemon.

The daemon runs as a real subprocess with three destinations: ``pacs`` (a Storage SCP that
stores), ``offline`` (a closed port: down, its files stay queued) and ``archive`` (an SCP that
answers 0xC001 to everything: those files go to failed/). ``/api/status`` and ``/metrics`` are
read over HTTP; the page is rendered by Debian's chromium in headless mode, its DOM text and
its screenshot (decoded with a few lines of zlib) checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from conftest import FORWARDER, REPO, wait_until
from daemon import Daemon, destination, route
from dicomgen import make_dataset
from peers import ScriptedSCP, free_port

from forwarder.daemon import metrics as metrics_module
from forwarder.daemon.failed_folder import FailedFolder
from forwarder.daemon.metrics import Metrics
from forwarder.daemon.status import RateMeter, recent_failures
from forwarder.daemon.status_page import PATHS, StatusPage, render
from forwarder.queue import FileEntry, Queue

CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 1280, 900
UP_RGB = (0x1A, 0x7F, 0x37)  # .badge.up in status_page's CSS
DOWN_RGB = (0xCF, 0x22, 0x2E)  # .badge.down
CT_FILES, MR_FILES = 3, 2
CT_STUDY = "1.2.826.0.1.3680043.8.498.77"  # every CT file of the scene is of this study


# -- the scene -----------------------------------------------------------------------------------


@dataclass
class Scene:
    daemon: Daemon
    url: str  # http://127.0.0.1:PORT
    pacs: ScriptedSCP


@contextmanager
def scene(tmp_path: Path) -> Iterator[Scene]:
    """The daemon with pacs up, offline down and archive failing everything, files dropped,
    and every outcome settled (pacs stored the CT files, the MR files and a non-DICOM file are
    in failed/, offline is down)."""
    listen_port = free_port()
    closed_port = free_port()  # nothing listens there: connection refused
    with ScriptedSCP() as pacs, ScriptedSCP(status=0xC001) as archive:
        d = Daemon(
            tmp_path,
            destinations=[
                destination("pacs", pacs.port),
                destination("offline", closed_port, connect_timeout="1s"),
                destination("archive", archive.port),
            ],
            routes=[
                route("ct", ["pacs", "offline"], Modality="CT"),
                route("mr", ["archive"], Modality="MR"),
            ],
            extra={"metrics": {"listen": f"127.0.0.1:{listen_port}"}},
        )
        with d:
            d.drop_files(CT_FILES, prefix="ct", study_uid=CT_STUDY)
            d.drop_files(MR_FILES, prefix="mr", folder="mr", modality="MR")
            d.drop_bytes("junk.dcm", b"this is not DICOM" * 10)
            d.wait_failed(MR_FILES + 1)
            wait_until(lambda: len(pacs.uids()) == CT_FILES, 30, what="pacs to store the CT")
            d.wait_status(
                lambda s: (
                    s["offline"]["state"] == "down"
                    and s["pacs"]["done"] == CT_FILES
                    and s["archive"]["failed"] == MR_FILES
                    and s["offline"]["in_flight"] == 0
                ),
                what="offline down, pacs done, archive failed",
            )
            url = f"http://127.0.0.1:{listen_port}"
            wait_until(
                lambda: (
                    json.loads(get(f"{url}/api/status")[2])["destinations"]["pacs"]["rate"]
                    is not None
                ),
                30,
                what="enough samples for a rate",
            )
            yield Scene(d, url, pacs)
            assert d.stop() == 0
            d.assert_no_phi()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


# -- HTTP ----------------------------------------------------------------------------------------


def test_api_status_and_metrics_over_http(tmp_path: Path) -> None:
    with scene(tmp_path) as s:

        def read() -> dict[str, Any] | None:
            status, headers, body = get(f"{s.url}/api/status")
            assert status == 200 and headers["Content-Type"] == "application/json"
            doc: dict[str, Any] = json.loads(body)
            return doc if (doc["rate_window_seconds"] or 0) >= 2.0 else None

        # Rates need samples at least a second apart (the daemon samples every 5 s).
        doc = wait_until(read, 15, interval=0.5, what="two seconds of rate samples")
        assert isinstance(doc, dict)
        # The contract's `status --json` document, and what the page adds.
        cli = s.daemon.status_json()
        assert (
            set(doc["destinations"])
            == set(cli["destinations"])
            == {
                "pacs",
                "offline",
                "archive",
            }
        )
        # offline retries now and then: a retry may hold its files in flight in one read and not
        # in the other, so its pending and in-flight counts are compared as a sum.
        moving = ("oldest_pending_seconds", "rate", "pending", "in_flight")
        for name, entry in doc["destinations"].items():
            theirs = cli["destinations"][name]
            assert {k: v for k, v in entry.items() if k not in moving} == {
                k: v for k, v in theirs.items() if k not in moving
            }
            assert entry["pending"] + entry["in_flight"] == theirs["pending"] + theirs["in_flight"]
        pacs, offline, archive = (doc["destinations"][n] for n in ("pacs", "offline", "archive"))
        assert (pacs["state"], pacs["done"], pacs["pending"], pacs["failed"]) == ("up", 3, 0, 0)
        assert offline["state"] == "down" and offline["state_since"]
        assert offline["pending"] + offline["in_flight"] == CT_FILES and offline["done"] == 0
        assert offline["oldest_pending_seconds"] > 0
        assert "connection refused" in offline["last_error"]
        assert archive["failed"] == MR_FILES and archive["state"] == "up"
        # The rate: the daemon sampled the counters before the first file was stored.
        assert doc["rate_window_seconds"] > 0
        assert pacs["rate"] > 0 and archive["rate"] == 0 and offline["rate"] == 0
        assert doc["daemon"]["version"] and doc["daemon"]["pid"] == s.daemon.pid
        assert doc["daemon"]["uptime_seconds"] > 0
        assert doc["finishing"] == {"waiting": 0, "last_error": None}

        failures = doc["recent_failures"]
        assert len(failures) == MR_FILES + 1
        assert [f["failed_at"] for f in failures] == sorted(
            (f["failed_at"] for f in failures), reverse=True
        )
        by_path = {f["path"]: f for f in failures}
        assert set(by_path) == {"junk.dcm", "mr/mr0000.dcm", "mr/mr0001.dcm"}
        assert by_path["junk.dcm"]["reason"].startswith("not usable DICOM")
        assert by_path["junk.dcm"]["destinations"] == []
        mr = by_path["mr/mr0000.dcm"]
        assert mr["reason"].startswith("archive: ") and "0xC001" in mr["reason"]
        (outcome,) = mr["destinations"]
        assert outcome["destination"] == "archive" and outcome["outcome"] == "failed"
        assert outcome["status"] == "0xC001" and outcome["attempts"] == 1

        # /metrics still serves Prometheus text; other paths stay the metrics too.
        status, headers, body = get(f"{s.url}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert re.search(
            r'forwarder_queue_items\{destination="offline",state="pending"\} [0-3]\.0', text
        )
        assert 'forwarder_destination_up{destination="offline"} 0.0' in text

        # The page: HTML, read-only, no script allowed.
        status, headers, body = get(f"{s.url}/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src" not in headers["Content-Security-Policy"]
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert b"<script" not in body and b'http-equiv="refresh"' in body
        request = urllib.request.Request(f"{s.url}/api/status", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        with err.value:
            assert err.value.code == 405


def test_the_shipped_config_binds_the_listener_to_loopback() -> None:
    """The page has no login: the packaged config keeps it on loopback."""
    config = yaml.safe_load((REPO / "packaging" / "forwarder.yaml").read_text())
    assert config["metrics"]["listen"].startswith("127.0.0.1:")


# -- the browser ---------------------------------------------------------------------------------


def chromium(args: list[str], profile: Path, timeout: float = 60.0) -> bytes:
    """Run headless chromium; kill it (its process group, by its PID) when it overruns."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        *args,
    ]
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: the renderer and zygote die with it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout}s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
    return out


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("style", "script", "title"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def dom_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, colour, _comp, _filter, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        else:
            assert ftype == 0, f"unknown PNG filter {ftype}"
        prev = line
        rgb = bytes(line) if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3)
        rows.append(rgb)
    return width, height, rows


def count_colour(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    n = 0
    for row in rows:
        for x in range(0, len(row), 3):
            if all(abs(row[x + k] - rgb[k]) <= tolerance for k in range(3)):
                n += 1
    return n


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps)")
@pytest.mark.timeout(240)
def test_the_page_in_headless_chromium(tmp_path: Path) -> None:
    with scene(tmp_path / "daemon") as s:
        profile = tmp_path / "chromium"
        profile.mkdir()
        html = chromium(["--dump-dom", f"{s.url}/"], profile).decode()
        text = dom_text(html)
        for expected in ("forwarder", "Destinations", "pacs", "offline", "archive", "Recent"):
            assert expected in text, (expected, text)
        assert re.search(r"offline down since \S+ \S+ \(\d+s ago\)", text), text
        # name, state and since, pending, in flight, oldest pending, rate, done, failed
        since = r"(?:since \S+ \S+ \(\d+s ago\)|no outage recorded)"
        assert re.search(rf"pacs up {since} 0 0 - [0-9.]+ {CT_FILES} 0", text), text
        # A retry of the down destination may hold its files in flight at the snapshot.
        offline = re.search(rf"offline down {since} (\d+) (\d+) \d+s 0\.0 0 0 ", text)
        assert offline and int(offline[1]) + int(offline[2]) == CT_FILES, text
        assert re.search(rf"archive up {since} 0 0 - 0\.0 0 {MR_FILES} ", text), text
        assert "connection refused" in text
        assert "mr/mr0000.dcm" in text and "junk.dcm" in text
        assert (
            "archive : failed 0xC001" in text
            and "(1 attempt)" in text
            and "not usable DICOM" in text
        )
        assert "Recent failures (3, newest first)" in text
        # The search box's answer, as a browser shows it.
        found = dom_text(chromium(["--dump-dom", f"{s.url}/?find={CT_STUDY}"], profile).decode())
        assert "Found 3 files" in found and "ct0000.dcm" in found, found
        assert re.search(r"pacs : stored at \S+ \(status 0x0000, 1 attempt\)", found), found

        png = tmp_path / "page.png"
        chromium([f"--screenshot={png}", f"{s.url}/"], profile)
        width, height, rows = decode_png(png.read_bytes())
        assert (width, height) == (WIDTH, HEIGHT)
        assert len({row for row in rows}) > 50, "the screenshot is (nearly) blank"
        # The badges: two green "up" (pacs, archive) and one red "down" (offline).
        up, down = count_colour(rows, UP_RGB), count_colour(rows, DOWN_RGB)
        assert up > 2 * 400, f"{up} pixels of the up badges' green"
        assert down > 400, f"{down} pixels of the down badge's red"
        white = count_colour(rows, (255, 255, 255), tolerance=0)
        assert white > WIDTH * HEIGHT // 2, "a white page with the tables on it"


# -- the parts, without a daemon ----------------------------------------------------------------


def test_rate_meter() -> None:
    m = RateMeter(window=60.0)
    assert m.rates() == ({}, None)
    m.sample({"a": 0, "b": 5}, now=100.0)
    m.sample({"a": 0, "b": 5}, now=100.5)  # too close: replaces nothing but itself later
    assert m.rates() == ({}, None)
    m.sample({"a": 30, "b": 5, "new": 1}, now=130.0)
    rates, span = m.rates()
    assert span == 30.0 and rates == {"a": 60.0, "b": 0.0, "new": None}
    m.sample({"a": 60, "b": 5}, now=200.0)  # the 100.0 sample falls out of the window
    rates, span = m.rates()
    assert span == 70.0 and rates["a"] == pytest.approx(30 * 60 / 70)
    m.sample({"a": 10, "b": 5}, now=260.0)  # a counter that went back: never negative
    assert m.rates()[0]["a"] == 0.0


def test_recent_failures_newest_first_and_limited(tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    (failed / "sub").mkdir(parents=True)
    for i in range(5):
        report = failed / "sub" / f"f{i}.dcm.error.json"
        report.write_text(json.dumps({"reason": f"r{i}", "failed_at": f"2026-01-0{i + 1}"}))
        os.utime(report, (1000.0 + i, 1000.0 + i))
    (failed / "bad.dcm.error.json").write_text("{not json")
    os.utime(failed / "bad.dcm.error.json", (900.0, 900.0))
    (failed / ".hidden.error.json.tmp").write_text("{}")
    got = recent_failures(failed, limit=3)
    assert [f["path"] for f in got] == ["sub/f4.dcm", "sub/f3.dcm", "sub/f2.dcm"]
    everything = recent_failures(failed, limit=10)
    assert everything[-1] == {
        "path": "bad.dcm",
        "failed_at": "1970-01-01T00:15:00Z",
        "reason": "(unreadable report)",
        "sop_instance_uid": None,
        "destinations": [],
    }
    assert recent_failures(tmp_path / "missing") == []


def _walked(failed: Path) -> tuple[int, list[dict[str, Any]]]:
    """What a fresh walk says: files but reports, and the newest reports."""
    files = sum(
        not name.endswith(".error.json") for _, _, names in os.walk(failed) for name in names
    )
    return files, recent_failures(failed, limit=50)


def test_the_failed_folder_listing_says_what_a_fresh_walk_says(tmp_path: Path) -> None:
    """The page and the metrics re-read only the folders of failed/ that changed; after each
    change, in the same clock tick as a listing or later, deep or at the top, the count and
    the recent failures are those of a walk."""
    failed = tmp_path / "failed"
    index = FailedFolder(failed)
    assert (index.count(), index.recent(50)) == (0, []) == (0, recent_failures(failed))

    def report(rel: str, reason: str) -> None:
        (failed / rel).parent.mkdir(parents=True, exist_ok=True)
        (failed / rel).write_bytes(b"x")
        tmp = failed / rel.replace(rel.rsplit("/", 1)[-1], "." + rel.rsplit("/", 1)[-1] + ".tmp")
        tmp.write_text(json.dumps({"reason": reason}))
        tmp.rename(failed / f"{rel}.error.json")  # as spool writes a report

    def same() -> None:
        assert (index.count(), index.recent(50)) == _walked(failed)

    report("a.dcm", "first")
    same()
    report("ct/st1/se1/b.dcm", "deep")  # at once: the same tick as the last listing
    same()
    report("ct/st1/se2/c.dcm", "beside")
    (failed / "ct" / "st1" / "se1" / "stray.dcm").write_bytes(b"x")  # a file with no report
    same()
    (failed / "ct" / "st1" / "se1" / "b.dcm.error.json").unlink()  # forwarder retry
    (failed / "ct" / "st1" / "se1" / "b.dcm").unlink()
    same()
    shutil.rmtree(failed / "ct" / "st1" / "se2")
    (failed / "link").symlink_to(failed / "ct", target_is_directory=True)  # not followed
    same()
    assert index.count() == 2 and [f["path"] for f in index.recent(50)] == ["a.dcm"]

    # A folder unchanged since long before its listing is not read again: a report's time
    # changed in place (spool never does that) is not seen until its folder changes.
    later = FailedFolder(failed, clock=lambda: time.time() + 60)
    report("mr/d.dcm", "newest")
    os.utime(failed / "a.dcm.error.json", (1.0, 1.0))
    assert [f["path"] for f in later.recent(50)] == ["mr/d.dcm", "a.dcm"]
    os.utime(failed / "mr" / "d.dcm.error.json", (0.5, 0.5))
    assert [f["path"] for f in later.recent(50)] == ["mr/d.dcm", "a.dcm"]
    assert [f["path"] for f in recent_failures(failed)] == ["a.dcm", "mr/d.dcm"]
    (failed / "mr" / "e.dcm").write_bytes(b"x")
    changed = os.stat(failed / "mr").st_mtime_ns + 10_000_000  # as the next clock tick leaves it
    os.utime(failed / "mr", ns=(changed, changed))
    assert [f["path"] for f in later.recent(50)] == ["a.dcm", "mr/d.dcm"]
    assert later.count() == 4 == _walked(failed)[0]


def test_render_escapes_everything() -> None:
    evil = '<script>alert("x")</script>&'
    doc = {
        "destinations": {
            evil: {
                "pending": 1,
                "in_flight": 0,
                "done": 2,
                "failed": 3,
                "oldest_pending_seconds": 4.0,
                "last_error": evil,
                "state": "down",
                "state_since": evil,
                "rate": 1.5,
            }
        },
        "rate_window_seconds": 30.0,
        "recent_failures": [
            {
                "path": evil,
                "failed_at": evil,
                "reason": evil,
                "sop_instance_uid": evil,
                "destinations": [
                    {
                        "destination": evil,
                        "outcome": "failed",
                        "status": evil,
                        "error": evil,
                        "attempts": 2,
                    }
                ],
            }
        ],
        "finishing": {"waiting": 1, "last_error": evil},
        "daemon": {"version": evil, "pid": 1, "started_at": evil, "uptime_seconds": 5.0},
        "generated_at": evil,
    }
    page = render(doc)
    assert "<script" not in page and "alert(&quot;x&quot;)" in page
    assert page.count("&lt;script&gt;") == 14  # every value shown, each escaped
    assert 'http-equiv="refresh" content="5"' in page


def test_routing_and_an_unreadable_queue_on_a_real_listener(tmp_path: Path) -> None:
    """The page's two paths go to the page, every other path stays the metrics; without a page
    ``/`` is the metrics as before; a queue that cannot be read answers 503 with the reason."""
    assert metrics_module.STATUS_PATHS == PATHS  # metrics routes exactly the page's paths
    queue = Queue(tmp_path / "queue.sqlite")
    page = StatusPage(queue, lambda: ["pacs"], tmp_path / "failed")
    metrics = Metrics(destinations=["pacs"])
    metrics.set_status_app(page)
    metrics.start_server("127.0.0.1:0")
    try:
        assert metrics.address is not None
        host, port = metrics.address
        url = f"http://{host}:{port}"
        status, _, body = get(f"{url}/api/status")
        doc = json.loads(body)
        assert status == 200 and doc["recent_failures"] == []
        assert doc["destinations"]["pacs"]["state"] == "up"
        assert doc["destinations"]["pacs"]["rate"] is None  # one sample only
        status, headers, body = get(f"{url}/")
        assert status == 200 and b"No files in failed/." in body
        assert headers["Cache-Control"] == "no-store"
        for path in ("/metrics", "/other"):
            status, headers, body = get(f"{url}{path}")
            assert status == 200 and b"forwarder_build_info" in body
        head = urllib.request.Request(f"{url}/", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""
            assert int(resp.headers["Content-Length"]) > 0

        queue.close()
        status, _, body = get(f"{url}/api/status")
        assert status == 503 and "closed" in json.loads(body)["error"]
        status, _, body = get(f"{url}/")
        assert status == 503 and b"The queue database cannot be read" in body

        metrics.set_status_app(None)
        status, _, body = get(f"{url}/")
        assert status == 200 and b"forwarder_build_info" in body
    finally:
        metrics.stop()
        queue.close()


# -- find ----------------------------------------------------------------------------------------


def _find_cli(s: Scene, *keys: str) -> subprocess.CompletedProcess[str]:
    return s.daemon.cli("find", *keys)


def test_find_over_http_and_with_the_cli(tmp_path: Path) -> None:
    """``/api/find``, the page's search and ``forwarder find`` (a subprocess, while the daemon
    runs) tell the same story: the CT files in incoming, stored at pacs, pending for offline
    (down); the MR files in failed/ with archive's 0xC001."""
    with scene(tmp_path) as s:
        ds = make_dataset(station="SCANNER9")
        ds.AccessionNumber = "ACC-4711"
        staging = tmp_path / "acc.dcm"
        ds.save_as(staging, enforce_file_format=True)
        s.daemon.drop_bytes("acc.dcm", staging.read_bytes())
        wait_until(lambda: len(s.pacs.uids()) == CT_FILES + 1, 30, what="pacs to store acc.dcm")

        status, headers, body = get(f"{s.url}/api/find?key={CT_STUDY}")
        assert status == 200 and headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        assert doc["keys"] == [CT_STUDY]
        files = doc["files"]
        assert [f["rel_path"] for f in files] == ["ct0000.dcm", "ct0001.dcm", "ct0002.dcm"]
        for f in files:
            assert f["where"] == "incoming" and f["state"] == "QUEUED"
            assert f["path"] == str(s.daemon.incoming / f["rel_path"])
            assert f["matched"] == [{"key": CT_STUDY, "as": "StudyInstanceUID"}]
            assert f["study_instance_uid"] == CT_STUDY and f["series_instance_uid"]
            by = {d["destination"]: d for d in f["destinations"]}
            assert set(by) == {"pacs", "offline"}
            assert by["pacs"]["state"] == "stored" and by["pacs"]["last_status"] == "0x0000"
            assert by["pacs"]["finished_at"] and by["pacs"]["attempts"] == 1
            assert by["offline"]["state"] in ("pending", "sending")
            assert "connection refused" in (by["offline"]["last_error"] or "")
        assert {f["sop_instance_uid"] for f in files} < s.pacs.uids()

        # The same from the command line, by SOP Instance UID and by Series Instance UID.
        result = _find_cli(s, files[0]["sop_instance_uid"], "--json")
        assert result.returncode == 0, result.stderr
        (one,) = json.loads(result.stdout)["files"]
        assert one["rel_path"] == "ct0000.dcm"
        assert one["matched"] == [{"key": files[0]["sop_instance_uid"], "as": "SOPInstanceUID"}]
        text = _find_cli(s, files[1]["series_instance_uid"])
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith("ct0001.dcm  (incoming, file ")
        assert f"  path: {s.daemon.incoming / 'ct0001.dcm'}\n" in text.stdout
        assert re.search(r"\n  pacs: stored at \S+ \(status 0x0000, 1 attempt\)\n", text.stdout)
        assert re.search(r"\n  offline: (pending|sending)", text.stdout), text.stdout

        # Finished files: the MR ones are in failed/, with archive's answer.
        mr_path = s.daemon.failed / "mr" / "mr0000.dcm"
        mr_uid = str(pydicom.dcmread(mr_path, stop_before_pixels=True).SOPInstanceUID)
        result = _find_cli(s, "--json", mr_uid)
        assert result.returncode == 0, result.stderr
        (failed,) = json.loads(result.stdout)["files"]
        assert failed["where"] == "failed" and failed["state"] == "FINISHED"
        assert failed["path"] == str(mr_path)
        assert os.path.exists(failed["path"]) and failed["finished_at"]
        (archive,) = failed["destinations"]
        assert archive["destination"] == "archive" and archive["state"] == "failed"
        assert archive["last_status"] == "0xC001" and archive["attempts"] == 1
        status, _, body = get(f"{s.url}/")  # the plain page has the search box
        assert b'<form method="get" action="/" class="find">' in body
        result = _find_cli(s, "--json", CT_STUDY, "ACC-4711", "1.2.3.999")
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)["files"]
        assert [f["rel_path"] for f in found] == [
            "ct0000.dcm",
            "ct0001.dcm",
            "ct0002.dcm",
            "acc.dcm",
        ]
        assert found[-1]["matched"] == [{"key": "ACC-4711", "as": "AccessionNumber"}]

        # Nothing found: exit 1, said on stderr; the page and the API say so too.
        nothing = _find_cli(s, "1.2.3.999")
        assert nothing.returncode == 1 and nothing.stdout == ""
        assert "no file of 1.2.3.999" in nothing.stderr
        status, _, body = get(f"{s.url}/api/find?key=1.2.3.999")
        assert status == 200 and json.loads(body)["files"] == []
        status, _, body = get(f"{s.url}/api/find")
        assert status == 400 and "key" in json.loads(body)["error"]

        # The page's search: a table, no refresh, the key kept in the box.
        status, headers, body = get(f"{s.url}/?find={CT_STUDY}")
        page = body.decode()
        assert status == 200 and "form-action 'self'" in headers["Content-Security-Policy"]
        assert 'http-equiv="refresh"' not in page
        assert "Found 3 files" in page and f'value="{CT_STUDY}"' in page
        for name in ("ct0000.dcm", "ct0001.dcm", "ct0002.dcm"):
            assert name in page
        assert "pacs</b>: stored at" in page and "offline</b>:" in page
        assert "Destinations" in page  # the status is still there, below
        # The Accession Number is shown only as the key the user typed.
        status, _, body = get(f"{s.url}/?find={ds.StudyInstanceUID}")
        assert status == 200 and b"acc.dcm" in body and b"ACC-4711" not in body
        status, _, body = get(f"{s.url}/api/find?key={ds.SOPInstanceUID}")
        assert b"acc.dcm" in body and b"ACC-4711" not in body
        status, _, body = get(f"{s.url}/?find=ACC-4711")
        assert b"Found 1 file<" in body and b"AccessionNumber <code>ACC-4711</code>" in body
        status, _, body = get(f"{s.url}/?find=")
        assert status == 200 and b"Give a key to find." in body


def test_find_cli_exit_codes_without_a_daemon(tmp_path: Path) -> None:
    """A bad config exits 78; a queue that was never created finds nothing (exit 1) and is not
    created; --help says what the exit codes mean."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("incoming: [\n")
    d = Daemon(tmp_path / "d", destinations=[destination("pacs", free_port())])
    result = subprocess.run(
        [FORWARDER, "find", "-c", str(bad), "1.2.3"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 78, result.stderr
    result = d.cli("find", "1.2.3")
    assert result.returncode == 1 and "no file of 1.2.3" in result.stderr
    assert not d.queue.exists()
    usage = subprocess.run(
        [FORWARDER, "find", "--help"], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 0 and "1 when none was" in " ".join(usage.stdout.split())
    assert subprocess.run([FORWARDER, "find"], capture_output=True, check=False).returncode == 2


def _queue_with(path: Path, evil: str) -> Queue:
    queue = Queue(path)
    entry = FileEntry(
        path=f"/in/{evil}",
        rel_path=evil,
        size=1,
        mtime_ns=1,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        accession_number="SECRET-ACC",
    )
    queue.enqueue(entry, [evil])
    return queue


def test_the_search_escapes_everything_and_reads_no_more_than_it_shows(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>&'
    queue = _queue_with(tmp_path / "queue.sqlite", evil)
    page = StatusPage(queue, lambda: [evil], tmp_path / "failed")
    metrics = Metrics(destinations=["pacs"])
    metrics.set_status_app(page)
    metrics.start_server("127.0.0.1:0")
    try:
        assert metrics.address is not None
        host, port = metrics.address
        url = f"http://{host}:{port}"
        quoted = urllib.parse.quote(f"1.2.3 {evil}")
        status, _, body = get(f"{url}/?find={quoted}")
        html = body.decode()
        assert status == 200 and "<script" not in html and "Found 1 file<" in html
        assert "&lt;script&gt;" in html and "SECRET-ACC" not in html
        status, _, body = get(f"{url}/api/find?key=1.2.3&key={urllib.parse.quote(evil)}")
        doc = json.loads(body)
        assert doc["keys"] == ["1.2.3", evil] and len(doc["files"]) == 1
        assert b"SECRET-ACC" not in body
        many = "&".join(f"key=k{i}" for i in range(100))
        status, _, body = get(f"{url}/api/find?{many}")
        assert status == 400  # more fields than a search takes: none read
    finally:
        metrics.stop()
        queue.close()


def test_api_status_holds_every_field_of_status_json_with_proof_of_delivery(
    tmp_path: Path,
) -> None:
    # /api/status is `status --json`'s document plus more: a destination with verify_by_query
    # shows awaiting_commitment and committed there too, before anything was stored.
    listen_port = free_port()
    with (
        ScriptedSCP() as pacs,
        Daemon(
            tmp_path,
            destinations=[destination("pacs", pacs.port, verify_by_query={"after": "10m"})],
            extra={"metrics": {"listen": f"127.0.0.1:{listen_port}"}},
        ) as d,
    ):
        cli = d.status_json()["destinations"]["pacs"]
        api = json.loads(get(f"http://127.0.0.1:{listen_port}/api/status")[2])
        assert cli["awaiting_commitment"] == 0 and cli["committed"] == 0
        missing = set(cli) - set(api["destinations"]["pacs"])
        assert not missing, missing
        assert d.stop() == 0


def _daemon_with_page(tmp_path: Path, pacs: ScriptedSCP) -> tuple[Daemon, int]:
    """A daemon sending to ``pacs``, and the free port of its status page."""
    listen_port = free_port()
    d = Daemon(
        tmp_path,
        destinations=[destination("pacs", pacs.port)],
        extra={"metrics": {"listen": f"127.0.0.1:{listen_port}"}},
    )
    return d, listen_port


def test_a_failed_file_whose_name_is_not_utf8_does_not_break_the_page(tmp_path: Path) -> None:
    """A file named in Latin-1 (a Windows share, an old modality) lands in failed/: the page and
    /api/status still answer, the name shown with replacement characters."""
    with ScriptedSCP() as pacs:
        d, listen_port = _daemon_with_page(tmp_path, pacs)
        with d:
            name = os.fsdecode(b"M\xfcller.dcm")  # not UTF-8: a surrogate escape in Python
            d.drop_bytes(name, b"this is not DICOM" * 10)
            d.wait_failed(1)
            url = f"http://127.0.0.1:{listen_port}"
            status, _, body = get(f"{url}/")
            assert status == 200, body[:200]
            assert "M\ufffdller.dcm" in body.decode()
            status, _, body = get(f"{url}/api/status")
            assert status == 200
            (failure,) = json.loads(body)["recent_failures"]
            assert failure["path"] == "M\ufffdller.dcm"
            assert d.stop() == 0


def test_sigterm_stops_the_daemon_while_a_client_trickles_a_request(tmp_path: Path) -> None:
    """A client sending its request a byte a second never times out on a read: SIGTERM must
    still stop the daemon promptly, and the listener answers others meanwhile."""
    with ScriptedSCP() as pacs:
        d, listen_port = _daemon_with_page(tmp_path, pacs)
        url = f"http://127.0.0.1:{listen_port}"
        with d:
            stop = threading.Event()

            def trickle() -> None:
                with socket.create_connection(("127.0.0.1", listen_port), timeout=5) as sock:
                    for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                        if stop.wait(1.0):
                            return
                        try:
                            sock.sendall(bytes([byte]))
                        except OSError:
                            return  # dropped by the daemon

            slow = threading.Thread(target=trickle)
            slow.start()
            try:
                wait_until(lambda: get(f"{url}/api/status")[0] == 200, 10, what="the page")
                d.drop_files(1)
                d.wait_done(1)
                assert d.stop(timeout=8) == 0
            finally:
                stop.set()
                slow.join()
        # The cut client's half request is no error of the daemon's: no traceback in the log.
        assert "Traceback" not in d.log_text(), d.log_text()[-3000:]
