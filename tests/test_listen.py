"""The daemon as a Storage SCP (``listen:``): modalities push, the daemon forwards.

Real peers only: DCMTK storescu and a pynetdicom SCU push to ``forwarder run``'s listener, DCMTK
storescp is the PACS, and what the PACS holds is compared data set by data set with the files the
modality sent. Crash safety is proven with SIGKILL (crash points and a plain kill mid-push).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination, route, subprocess_env
from dicomgen import write_file
from dimse_wire import rejection
from peers import StoreSCP, free_port, storescp
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from test_ingest_process import site_env

STORESCU = "/usr/bin/storescu"
GATEWAY = "GATEWAY"
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")


# -- helpers -------------------------------------------------------------------------------------


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def copies(folder: Path, name: str, count: int) -> list[Path]:
    """``count`` copies of a pydicom test file, each with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        ds = pydicom.dcmread(sample(name))
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{Path(name).stem}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def generated(folder: Path, count: int) -> list[Path]:
    paths = [folder / f"img{i:03d}.dcm" for i in range(count)]
    for i, path in enumerate(paths):
        write_file(path, seed=i)
    return paths


def without_padding(ds: Dataset) -> dict[int, object]:
    return {
        int(elem.tag): elem.value
        for elem in ds
        if elem.tag != 0xFFFCFFFC and elem.tag.element != 0x0000
    }


def held(pacs: StoreSCP) -> dict[str, Path]:
    """SOP Instance UID -> the file the PACS (DCMTK storescp) wrote."""
    out = {}
    for path in pacs.files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue  # still being written
        out[str(ds.SOPInstanceUID)] = path
    return out


def uid_of(path: Path) -> str:
    """The data set's own SOP Instance UID (rtplan.dcm's meta header names another)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_same_datasets(pacs: StoreSCP, originals: Sequence[Path]) -> None:
    """Every original is at the PACS, data set equal element by element."""
    stored = held(pacs)
    for original in originals:
        uid = uid_of(original)
        assert uid in stored, f"{original.name} ({uid}) is not at the PACS"
        want = pydicom.dcmread(original)
        got = pydicom.dcmread(stored[uid])
        assert without_padding(got) == without_padding(want), original.name


def listen_daemon(
    root: Path,
    destinations: list[dict[str, Any]],
    *,
    routes: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    **listen: Any,
) -> Daemon:
    config = {
        "port": free_port(),
        "ae_title": GATEWAY,
        "bind": "127.0.0.1",
        "min_free_space": "1MB",
        **listen,
    }
    return Daemon(
        root,
        destinations=destinations,
        routes=routes,
        env=env,
        extra={"listen": config, **(extra or {})},
    )


def listen_port(d: Daemon) -> int:
    return int(d.config["listen"]["port"])


def associate(
    port: int, files: Sequence[Path], calling: str = "CT01", dimse_timeout: float = 10
) -> Association:
    ae = AE(ae_title=calling)
    # A send racing the gateway's death waits this long for its answer: pynetdicom queues the
    # request after its DUL thread saw the connection reset, and only the timeout ends it. So
    # does the wait for the answer to a request the gateway died handling.
    ae.dimse_timeout = dimse_timeout
    for meta in {
        (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
        for m in map(read_file_meta_info, files)
    }:
        ae.add_requested_context(meta[0], [meta[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY)
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        _RAW[id(assoc)] = raw
    return assoc


_RAW: dict[int, socket.socket] = {}  # id(association) -> its TCP socket


def joined(assoc: Association) -> None:
    """Wait for a refused or ended association's thread, then close its TCP socket (pynetdicom
    drops it without closing when the peer aborted or vanished)."""
    if assoc.ident is not None:
        assoc.join(10)
    raw = _RAW.pop(id(assoc), None)
    if raw is not None:
        raw.close()


# For a push the gateway dies in the middle of: how long the modality waits for an answer that
# never comes (see associate), instead of 10 s; the gateway's answers come within milliseconds.
DYING_GATEWAY_TIMEOUT = 3.0


def push(
    port: int, files: Sequence[Path], calling: str = "CT01", dimse_timeout: float = 10
) -> list[tuple[int, str]]:
    """Send ``files`` on one association: (status, error comment) each; (-1, "") when no
    response came (association refused or aborted, or none within ``dimse_timeout``)."""
    assoc = associate(port, files, calling, dimse_timeout)
    out: list[tuple[int, str]] = []
    try:
        for path in files:
            if not assoc.is_established:
                out.append((-1, ""))
                continue
            rsp = assoc.send_c_store(os.fspath(path))
            if "Status" in rsp:
                out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            else:
                out.append((-1, ""))
    finally:
        if assoc.is_established:
            assoc.release()
        joined(assoc)
    return out


def pushing(
    port: int,
    files: Sequence[Path],
    answered: list[str],
    dozen: threading.Event,
    go_on: threading.Event,
    dimse_timeout: float = 10,
) -> threading.Thread:
    """A modality pushing ``files`` on one association in a thread, adding the UID of each
    answered Success to ``answered``; after 12 it sets ``dozen`` and waits for ``go_on`` (the
    test kills something meanwhile: mid-push for sure). It ends when the association does."""

    def modality() -> None:
        assoc = associate(port, files[:1], calling="CT01", dimse_timeout=dimse_timeout)
        try:
            for path in files:
                if not assoc.is_established:
                    return
                rsp = assoc.send_c_store(os.fspath(path))
                if "Status" in rsp and int(rsp.Status) == 0:
                    answered.append(uid_of(path))
                if len(answered) == 12 and not dozen.is_set():
                    dozen.set()
                    go_on.wait(30)
        finally:
            if assoc.is_established:
                assoc.release()
            joined(assoc)

    sender = threading.Thread(target=modality)
    sender.start()
    return sender


def storescu(port: int, files: Sequence[Path], calling: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-aet", calling, "-aec", GATEWAY, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, *args, "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=subprocess_env(),
    )


def staged(d: Daemon) -> list[Path]:
    folder = d.incoming / ".listen"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp(tmp_path / "pacs", ae_title="PACS") as scp:
        yield scp


def pacs_destination(scp: StoreSCP, name: str = "pacs") -> dict[str, Any]:
    return destination(name, scp.port, ae_title=scp.ae_title)


# -- delivery ------------------------------------------------------------------------------------


def test_storescu_and_pynetdicom_pushes_reach_the_pacs_with_their_origin(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    dcmtk = [sample(n) for n in SAMPLES]
    pynet = copies(tmp_path / "modality", "CT_small.dcm", 2) + copies(
        tmp_path / "modality", "MR_small.dcm", 2
    )
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        port = listen_port(d)
        result = storescu(port, dcmtk, "CT01")
        assert result.returncode == 0, result.stderr
        assert push(port, pynet, calling="MR02") == [(0, "")] * len(pynet)
        wait_until(lambda: len(held(pacs)) == len(dcmtk) + len(pynet), 30, what="all at the PACS")
        assert_same_datasets(pacs, dcmtk + pynet)
        wait_until(lambda: len(d.done_files()) == len(dcmtk) + len(pynet), 15, what="done/")
        # done/<CALLING_AE>/<Study>/<SOP>.dcm, nothing left staged, nothing visible in incoming
        ct = pydicom.dcmread(sample("CT_small.dcm"), stop_before_pixels=True)
        assert f"CT01/{ct.StudyInstanceUID}/{ct.SOPInstanceUID}.dcm" in d.done_files()
        assert {f.split("/")[0] for f in d.done_files()} == {"CT01", "MR02"}
        assert staged(d) == []
        # the finished studies' folders are pruned as they empty; the AE folders stay
        listen = d.incoming / ".listen"
        wait_until(
            lambda: not [p for p in listen.glob("*/*") if p.is_dir()], 10, what="studies pruned"
        )
        assert sorted(p.name for p in listen.iterdir()) == ["CT01", "MR02"]
        # the journal line of each sent file names its origin
        log = d.log_text()
        assert f"(from CT01) -> pacs: stored {ct.SOPInstanceUID}" in log
        assert "received" in log and "from MR02 (127.0.0.1:" in log
        assert "not feeding systemd's watchdog" not in log  # the listener counts as healthy
        # find shows where it came from
        found = cli(d, "find", "--json", str(ct.SOPInstanceUID))
        assert found.returncode == 0, found.stderr
        origin = json.loads(found.stdout)["files"][0]["origin"]
        assert origin["calling_ae"] == "CT01" and origin["called_ae"] == GATEWAY
        assert origin["peer"].startswith("127.0.0.1:") and origin["association"]
        text = cli(d, "find", str(ct.SOPInstanceUID)).stdout
        assert "received from CT01 (127.0.0.1:" in text
        assert d.stop() == 0
        d.assert_no_phi()


def test_routes_match_the_calling_ae_title(tmp_path: Path) -> None:
    ct_files = copies(tmp_path / "ct", "CT_small.dcm", 2)
    mr_files = copies(tmp_path / "mr", "MR_small.dcm", 2)
    with (
        storescp(tmp_path / "a", ae_title="A") as a,
        storescp(tmp_path / "b", ae_title="B") as b,
        listen_daemon(
            tmp_path / "gw",
            [pacs_destination(a, "a"), pacs_destination(b, "b")],
            routes=[
                route("ct-rooms", ["a"], calling_ae="CT*"),
                route("mr", ["b"], calling_ae=["MR02", "MR03"]),
            ],
        ) as d,
    ):
        port = listen_port(d)
        assert push(port, ct_files, calling="CT07") == [(0, "")] * 2
        assert push(port, mr_files, calling="MR02") == [(0, "")] * 2
        # an unrouted modality: held in failed/ (Success: the gateway holds it), reason says so
        stray = copies(tmp_path / "stray", "CT_small.dcm", 1)
        assert push(port, stray, calling="XA01") == [(0, "")]
        # a file from the watch folder has no calling AE: no calling_ae route matches it
        d.drop("watched/one.dcm")
        wait_until(lambda: len(held(a)) == 2 and len(held(b)) == 2, 30, what="routed")
        assert_same_datasets(a, ct_files)
        assert_same_datasets(b, mr_files)
        wait_until(lambda: len(d.failed_files()) == 2, 15, what="two unrouted files")
        assert set(held(a)) == {uid_of(p) for p in ct_files}
        assert set(held(b)) == {uid_of(p) for p in mr_files}
        failed = sorted(d.failed_files())
        assert failed[0].startswith("XA01/") and failed[1] == "watched/one.dcm"
        report = json.loads((d.failed / (failed[0] + ".error.json")).read_text())
        assert "calling_ae='XA01'" in report["reason"] and report["calling_ae"] == "XA01"
        assert d.stop() == 0


def test_allow_lists_refuse_and_nothing_is_kept(tmp_path: Path, pacs: StoreSCP) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 1)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], allow_calling_aet=["CT01"]) as d:
        port = listen_port(d)
        refused = storescu(port, files, "INTRUDER")
        assert refused.returncode != 0
        assert rejection(port, "MR99", GATEWAY) == (1, 1, 3)  # calling AE not recognised
        assert push(port, files, calling="CT01") == [(0, "")]
        wait_until(lambda: len(held(pacs)) == 1, 20, what="the allowed one")
        assert "INTRUDER" in d.log_text() and "MR99" in d.log_text()
        assert d.stop() == 0
    with listen_daemon(
        tmp_path / "gw2", [pacs_destination(pacs)], allow_host=["192.0.2.0/24"]
    ) as d2:
        # the connection is closed without a word
        with (
            socket.create_connection(("127.0.0.1", listen_port(d2)), timeout=10) as conn,
            contextlib.suppress(ConnectionResetError),
        ):
            assert conn.recv(1) == b""
        assert staged(d2) == [] and d2.done_files() == []
        assert "not in the allowed networks" in d2.log_text()
        assert d2.stop() == 0
    assert set(held(pacs)) == {uid_of(files[0])}


def test_config_errors_name_the_listen_key_and_line(tmp_path: Path) -> None:
    d = listen_daemon(tmp_path, [destination("a", 1)], min_free_space="5XB", max_associations=0)
    result = cli(d, "check-config")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "listen.min_free_space (line" in out
    assert "listen.max_associations (line" in out


# -- free space ----------------------------------------------------------------------------------


def metric_value(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_below_the_watermark_objects_get_a700_and_status_says_so(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    metrics = free_port()
    with listen_daemon(
        tmp_path / "gw",
        [pacs_destination(pacs)],
        min_free_space="1000TB",
        extra={"metrics": {"listen": f"127.0.0.1:{metrics}"}},
    ) as d:
        answers = push(listen_port(d), files)
        assert [s for s, _ in answers] == [0xA700] * 3
        assert all("low on disk space" in c for _, c in answers)
        assert staged(d) == [] and held(pacs) == {}
        # one line when the state changed, not one per object
        assert d.log_text().count("below min_free_space") == 1
        doc = json.loads(cli(d, "status", "--json").stdout)
        assert doc["listen"]["accepting"] is False
        assert doc["listen"]["min_free_space"] == 1000 * 1024**4
        assert "REFUSING objects" in cli(d, "status").stdout
        assert metric_value(metrics, "forwarder_listen_accepting") == 0
        assert metric_value(metrics, 'forwarder_listen_objects_total{outcome="refused"}') == 3
        api = f"http://127.0.0.1:{metrics}/api/status"
        with urllib.request.urlopen(api, timeout=10) as r:
            assert json.loads(r.read())["listen"]["accepting"] is False
        assert d.stop() == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs mounted under tmp_path (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_small_filesystem_filling_up_and_freed(
    tmp_path: Path, small_fs: Path, pacs: StoreSCP
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 4)
    with listen_daemon(small_fs, [pacs_destination(pacs)], min_free_space="12MB") as d:
        port = listen_port(d)
        assert push(port, files[:1]) == [(0, "")]
        filler = small_fs / "filler.bin"
        filler.write_bytes(b"\0" * (14 * 2**20))  # free space now ~10 MB of 24
        assert [s for s, _ in push(port, files[1:3])] == [0xA700, 0xA700]
        assert json.loads(cli(d, "status", "--json").stdout)["listen"]["accepting"] is False
        filler.unlink()
        d.wait_log("accepting objects", timeout=10)  # said once by the daemon's own check
        assert push(port, files[3:]) == [(0, "")]
        wait_until(lambda: len(held(pacs)) == 2, 20, what="the two accepted")
        assert set(held(pacs)) == {uid_of(files[0]), uid_of(files[3])}
        assert_same_datasets(pacs, [files[0], files[3]])
        assert d.log_text().count("below min_free_space") == 1
        assert d.stop() == 0


# -- crashes and stopping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point", ["listen-after-place", "listen-before-commit", "listen-before-answer"]
)
def test_kill_9_at_each_step_loses_nothing_answered_and_a_resend_is_harmless(
    tmp_path: Path, pacs: StoreSCP, point: str
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    d = listen_daemon(
        tmp_path / "gw", [pacs_destination(pacs)], env={"FORWARDER_CRASH_AT": f"{point}:2"}
    )
    with d:
        # the second's answer never comes: the gateway dies handling it
        answers = push(listen_port(d), files, calling="CT01", dimse_timeout=DYING_GATEWAY_TIMEOUT)
        assert d.wait_exit(15) == -signal.SIGKILL
    # the first was answered Success; the second died before its answer; the third never went
    assert answers[0] == (0, "") and answers[1][0] != 0 and answers[2][0] != 0
    d.env.pop("FORWARDER_CRASH_AT")
    with d:
        # answered Success: delivered after the restart, without the modality doing anything
        wait_until(lambda: uid_of(files[0]) in held(pacs), 30, what="the answered object")
        # the second was durable (placed) before the crash: the restart queues it too (with its
        # calling AE read back from its folder when the queue never heard of it)
        wait_until(lambda: uid_of(files[1]) in held(pacs), 30, what="the durable object")
        recovered = "durable but not queued when forwarder stopped" in d.log_text()
        assert recovered == (point != "listen-before-answer")
        # the modality sends what was not answered again: harmless
        assert push(listen_port(d), files[1:], calling="CT01") == [(0, "")] * 2
        wait_until(lambda: len(held(pacs)) == 3, 30, what="all three")
        wait_until(lambda: staged(d) == [], 15, what="nothing left staged")
        assert_same_datasets(pacs, files)
        found = json.loads(cli(d, "find", "--json", uid_of(files[1])).stdout)["files"]
        assert found and all(f["origin"]["calling_ae"] == "CT01" for f in found)
        assert all(f.startswith("CT01/") for f in d.done_files())
        assert d.stop() == 0


def test_kill_9_mid_push_every_object_answered_success_is_delivered(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    files = generated(tmp_path / "m", 40)
    answered: list[str] = []
    dozen, killed = threading.Event(), threading.Event()
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        sender = pushing(
            listen_port(d), files, answered, dozen, killed, dimse_timeout=DYING_GATEWAY_TIMEOUT
        )
        assert dozen.wait(30), "a dozen answered"
        d.kill()
        killed.set()
        sender.join(30)
        assert not sender.is_alive()
        success = list(answered)
        assert 12 <= len(success) < len(files)
        d.start()
        wait_until(lambda: set(success) <= set(held(pacs)), 30, what="every answered object")
        assert_same_datasets(pacs, [p for p in files if uid_of(p) in success])
        assert not [p for p in staged(d) if p.name.startswith(".receiving.")]
        assert d.stop() == 0
        d.assert_no_phi()


SHORT_DRAIN = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    import forwarder.daemon.service_loop

    forwarder.daemon.service_loop._LISTEN_DRAIN = 1.0
"""


def test_sigterm_stops_accepting_and_drains_open_associations(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        port = listen_port(d)
        assoc = associate(port, files, calling="CT01")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(os.fspath(files[0])).Status) == 0
            d.signal(signal.SIGTERM)
            d.wait_log("listen: no longer accepting", timeout=10)
            # no new association while draining
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            # the open one is still served until it ends
            assert int(assoc.send_c_store(os.fspath(files[1])).Status) == 0
        finally:
            if assoc.is_established:
                assoc.release()
            joined(assoc)
        started = time.monotonic()
        assert d.wait_exit(20) == 0
        assert time.monotonic() - started < 5
    # an association that never ends is aborted at the end of the drain, and nothing partial
    # is left anywhere (the drain 1 s from now on, not 5 s: the end of the drain, whatever its
    # length, is what aborts the association)
    d.env.update(site_env(tmp_path, SHORT_DRAIN)[1])
    with d:
        idle = associate(listen_port(d), files, calling="CT01")
        assert idle.is_established
        try:
            d.signal(signal.SIGTERM)
            assert d.wait_exit(20) == 0
            wait_until(lambda: idle.is_aborted or not idle.is_established, 10, what="abort")
        finally:
            joined(idle)
        # an orderly stop is no fault: no ERROR for the listener not accepting while it drains
        assert "no longer accepts connections" not in d.log_text(current_run=True)
    assert not [p for p in staged(d) if p.name.startswith(".")]
    with d:
        wait_until(lambda: len(held(pacs)) == 2, 30, what="both answered objects")
        assert_same_datasets(pacs, files[:2])
        assert d.stop() == 0


def test_a_calling_ae_route_modifies_what_it_sends_and_a_discard_route_holds_back(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    """Routing at send time sees the calling AE title too: a route matched on it changes what
    reaches the PACS (and only that); a discard route matched on it keeps the object out of
    every destination, in done/ (the modality was answered Success)."""
    ct_files = copies(tmp_path / "ct", "CT_small.dcm", 1)
    qa_files = copies(tmp_path / "qa", "MR_small.dcm", 1)
    routes = [
        {
            "name": "ct-rooms",
            "match": {"calling_ae": "CT*"},
            "to": ["pacs"],
            "modify": {"set": {"InstitutionName": "Gateway Hospital"}},
        },
        {"name": "qa", "match": {"calling_ae": "QA01"}, "action": "discard"},
        {"name": "all", "match": {"calling_ae": {"not": "CT*"}}, "to": ["pacs"]},
    ]
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], routes=routes) as d:
        port = listen_port(d)
        assert push(port, ct_files, calling="CT01") == [(0, "")]
        assert push(port, qa_files, calling="QA01") == [(0, "")]
        wait_until(lambda: len(held(pacs)) == 1 and len(d.done_files()) == 2, 30, what="done")
        stored = held(pacs)
        assert set(stored) == {uid_of(ct_files[0])}  # the QA object went nowhere
        got = pydicom.dcmread(stored[uid_of(ct_files[0])])
        want = pydicom.dcmread(ct_files[0])
        assert got.InstitutionName == "Gateway Hospital"
        del got.InstitutionName
        if "InstitutionName" in want:
            del want.InstitutionName
        assert without_padding(got) == without_padding(want)
        assert sorted(d.done_files()) == sorted(
            [f"CT01/{p}" for p in _study_paths(ct_files)]
            + [f"QA01/{p}" for p in _study_paths(qa_files)]
        )
        assert d.stop() == 0


def _study_paths(files: Sequence[Path]) -> list[str]:
    """Where the listener files an object: <StudyInstanceUID>/<SOPInstanceUID>.dcm."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append(f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm")
    return out
