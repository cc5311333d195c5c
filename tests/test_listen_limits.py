"""The daemon's listener has ``forwarder receive``'s TLS and limits: mutual TLS with DCMTK
storescu, plain TCP refused, ``max_object_size`` answered 0xA700, ``max_associations``
rejected transiently; and the router's ``calling_ae`` pseudo-key on its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import destination
from dimse_wire import rejection
from peers import ScriptedSCP, StoreSCP
from pki import Pki, make_pki
from test_listen import (
    GATEWAY,
    STORESCU,
    assert_same_datasets,
    associate,
    cli,
    copies,
    held,
    joined,
    listen_daemon,
    listen_port,
    pacs,  # noqa: F401 - the fixture
    pacs_destination,
    push,
    staged,
    uid_of,
)

from forwarder.config import Route
from forwarder.daemon.router import Router


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_storescu_is_forwarded_and_plain_tcp_is_refused(
    tmp_path: Path,
    pki: Pki,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 1)
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca_cert)}
    os.chmod(pki.server_key, 0o600)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], tls=tls) as d:
        port = listen_port(d)
        assert "(TLS on)" in d.log_text()
        plain = subprocess.run(
            [STORESCU, "-aet", "CT01", "-aec", GATEWAY, "-to", "10", "127.0.0.1", str(port),
             str(files[0])],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert plain.returncode != 0
        wait_until(lambda: "TLS handshake with 127.0.0.1 failed" in d.log_text(), 10, what="log")
        assert held(pacs) == {}
        secure = subprocess.run(
            [STORESCU, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert),
             "-aet", "CT01", "-aec", GATEWAY, "127.0.0.1", str(port), str(files[0])],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert secure.returncode == 0, secure.stdout + secure.stderr
        wait_until(lambda: len(held(pacs)) == 1, 30, what="the TLS push at the PACS")
        assert_same_datasets(pacs, files)
        assert d.stop() == 0


def test_max_object_size_and_max_associations(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    big = copies(tmp_path / "ct", "CT_small.dcm", 1)  # ~39 KB
    small = copies(tmp_path / "rt", "rtplan.dcm", 1)  # ~2.5 KB
    with listen_daemon(
        tmp_path / "gw", [pacs_destination(pacs)], max_object_size="16KB", max_associations=1
    ) as d:
        port = listen_port(d)
        [(status, comment)] = push(port, big)
        assert status == 0xA700 and "16384-byte limit" in comment
        first = associate(port, small)
        try:
            assert first.is_established
            # transient, service provider (presentation), local limit exceeded
            assert rejection(port, "CT01", GATEWAY) == (2, 3, 2)
            assert int(first.send_c_store(os.fspath(small[0])).Status) == 0
        finally:
            if first.is_established:
                first.release()
            joined(first)
        wait_until(lambda: len(held(pacs)) == 1, 30, what="the small one")
        assert set(held(pacs)) == {uid_of(small[0])}
        assert not [p for p in staged(d) if p.name.startswith(".receiving.")]
        assert d.stop() == 0


def test_router_calling_ae_pseudo_key() -> None:
    routes = [
        Route(name="ct", match={"calling_ae": ["CT*", "PET1"]}, to=["a"]),
        Route(name="mr", match={"calling_ae": "MR?", "Modality": "MR"}, to=["b"]),
    ]
    router = Router(routes, ["a", "b"])
    assert "calling_ae" not in router.keywords  # not read from the header
    assert router.route({"Modality": "CT"}, "CT01/x.dcm", "CT01") == ["a"]
    assert router.route({"Modality": "CT"}, "x.dcm", "PET1") == ["a"]
    assert router.route({"Modality": "MR"}, "x.dcm", "MR2") == ["b"]
    assert router.route({"Modality": "CT"}, "x.dcm", "MR2") == []
    # a file from the watch folder has no calling AE: never matches
    assert router.route({"Modality": "MR"}, "CT01/x.dcm") == []


def test_a_permanent_failure_keeps_the_origin_in_failed_and_its_report(tmp_path: Path) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 1)
    with (
        ScriptedSCP(status=0xC000) as scp,
        listen_daemon(tmp_path / "gw", [destination("pacs", scp.port)]) as d,
    ):
        assert push(listen_port(d), files, calling="CT01") == [(0, "")]
        wait_until(lambda: len(d.failed_files()) == 1, 30, what="failed/")
        [rel] = d.failed_files()
        assert rel.startswith("CT01/")
        report = json.loads((d.failed / (rel + ".error.json")).read_text())
        assert report["calling_ae"] == "CT01"
        assert "(from CT01) -> pacs: failed" in d.log_text()
        # retry: delivered, still known as received from CT01
        scp.status = 0x0000
        retried = cli(d, "retry")
        assert retried.returncode == 0, retried.stdout + retried.stderr
        wait_until(lambda: d.done_files() == [rel], 30, what="the retried file in done/")
        assert scp.uids() == {uid_of(files[0])}
        found = json.loads(cli(d, "find", "--json", uid_of(files[0])).stdout)["files"]
        assert [f["origin"]["calling_ae"] for f in found] == ["CT01", "CT01"]
        assert d.stop() == 0


def test_config_sizes() -> None:
    from forwarder.durations import parse_size

    assert parse_size("5GB") == 5 * 1024**3
    assert parse_size("500MB") == 500 * 1024**2
    assert parse_size("1.5g") == int(1.5 * 1024**3)
    assert parse_size("300KiB") == 300 * 1024
    assert parse_size(4096) == 4096
    for bad in ("5XB", "", "GB", True, -1, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)
