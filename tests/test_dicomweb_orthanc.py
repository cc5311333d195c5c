"""STOW-RS to Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb), over HTTP and HTTPS, with
basic auth: through ``forwarder send``/``echo`` and through the daemon; what Orthanc holds is
compared with the originals."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FORWARDER
from daemon import Daemon
from dicomgen import write_files
from peers import ORTHANC_DICOMWEB_PLUGIN, OrthancPeer, orthanc, orthanc_dicomweb_url, tls_proxy
from pki import Pki, make_pki
from pydicom import dcmread, examples

pytestmark = pytest.mark.skipif(
    not Path(ORTHANC_DICOMWEB_PLUGIN).exists() or shutil.which("Orthanc") is None,
    reason="Orthanc's DICOMweb plugin is not installed (make system-deps)",
)

EXAMPLES = ["ct", "mr", "rgb_color", "jpeg2k", "palette_color", "overlay", "rt_dose", "rt_plan"]
EXAMPLES += ["waveform", "ybr_color"]  # rt_ss: no Part 10 preamble, refused by send
USERS = {"alice": "wonderland"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "orthanc.password"
    path.parent.mkdir()
    path.write_text(USERS["alice"] + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def originals(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "originals"
    folder.mkdir()
    paths = []
    for name in EXAMPLES:
        src = Path(examples._get_path(name))  # pydicom's real files
        paths.append(Path(shutil.copy(src, folder / f"{name}.dcm")))
    return paths + write_files(folder / "generated", 5)


@pytest.fixture
def web_orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    with orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as peer:
        yield peer


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def assert_holds_the_originals(peer: OrthancPeer, originals: list[Path], into: Path) -> None:
    """Every original's data set is in Orthanc, element for element (pixel data included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's remarks on the example files' UIDs
        _compare(peer, originals, into)


def _compare(peer: OrthancPeer, originals: list[Path], into: Path) -> None:
    stored = {}
    for path in peer.take_all(into):
        ds = dcmread(path)
        stored[str(ds.SOPInstanceUID)] = ds
    assert len(stored) == len(originals), sorted(stored)
    for path in originals:
        original = dcmread(path)
        held = stored[str(original.SOPInstanceUID)]
        assert held == original, path.name  # every data set element, by value
        assert held.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_send_to_orthanc_over_http_with_basic_auth(
    web_orthanc: OrthancPeer,
    originals: list[Path],
    password: Path,
    tmp_path: Path,
    forwarder_env: dict[str, str],
) -> None:
    url = orthanc_dicomweb_url(web_orthanc)
    report = tmp_path / "report.json"
    result = run(
        "send", url, str(originals[0].parent), "--user", "alice", "--password-file",
        str(password), "--associations", "2", "--report", str(report), env=forwarder_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(originals)} stored" in result.stderr
    records = json.loads(report.read_text())
    assert records["peer"] == {"url": url}
    assert {r["outcome"] for r in records["files"]} == {"stored"}
    assert_holds_the_originals(web_orthanc, originals, tmp_path / "held")


def test_echo_proves_reachability_and_auth(
    web_orthanc: OrthancPeer, password: Path, tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    url = orthanc_dicomweb_url(web_orthanc)
    ok = run("echo", url, "--user", "alice", "--password-file", str(password), env=forwarder_env)
    assert ok.returncode == 0, ok.stderr
    assert "answered HTTP 200" in ok.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    refused = run("echo", url, "--user", "alice", "--password-file", str(wrong), env=forwarder_env)
    assert refused.returncode == 3, refused.stderr
    assert "refused our credentials: HTTP 401" in refused.stderr
    assert "not-the-password" not in refused.stderr
    web_orthanc.proc.terminate()
    web_orthanc.proc.wait(15)
    down = run("echo", url, "--connect-timeout", "2s", env=forwarder_env)
    assert down.returncode == 3, down.stderr
    assert "cannot connect" in down.stderr


def test_send_with_a_wrong_password_stores_nothing_and_exits_3(
    web_orthanc: OrthancPeer, originals: list[Path], tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    wrong.chmod(0o600)
    url = orthanc_dicomweb_url(web_orthanc)
    result = run(
        "send", url, *map(str, originals[:3]), "--user", "alice", "--password-file", str(wrong),
        env=forwarder_env,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "HTTP 401" in result.stderr and "check auth" in result.stderr
    assert web_orthanc.instance_count() == 0


def test_send_to_orthanc_over_https(
    tmp_path: Path,
    pki: Pki,
    originals: list[Path],
    password: Path,
    forwarder_env: dict[str, str],
) -> None:
    with (
        orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as peer,
        tls_proxy(peer.http_port, pki.server_cert, pki.server_key) as port,
    ):
        url = f"https://127.0.0.1:{port}/dicom-web"
        auth = ["--user", "alice", "--password-file", str(password)]
        result = run("send", url, *map(str, originals), *auth, "--tls-ca", str(pki.ca_cert),
                     env=forwarder_env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_holds_the_originals(peer, originals, tmp_path / "held")
        # Not trusted: refused at the handshake, never sent in the clear.
        untrusted = run("send", url, *map(str, originals[:1]), *auth,
                        "--tls-ca", str(pki.other_ca_cert), env=forwarder_env)  # fmt: skip
        assert untrusted.returncode == 3, untrusted.stderr
        assert "untrusted issuer" in untrusted.stderr
        assert peer.instance_count() == 0
        # http:// to the TLS port: no response, nothing stored (there is no fallback either way)
        plain = run("send", url.replace("https:", "http:"), *map(str, originals[:1]), *auth,
                    "--connect-timeout", "3s", "--response-timeout", "3s",
                    env=forwarder_env)  # fmt: skip
        assert plain.returncode != 0
        assert peer.instance_count() == 0


def test_the_daemon_delivers_to_orthanc_over_https(
    tmp_path: Path, pki: Pki, password: Path
) -> None:
    with (
        orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as peer,
        tls_proxy(peer.http_port, pki.server_cert, pki.server_key) as port,
    ):
        dest = {
            "name": "cloud",
            "url": f"https://127.0.0.1:{port}/dicom-web",
            "auth": {"username": "alice", "password_file": str(password)},
            "tls": {"ca": str(pki.ca_cert)},
            "associations": 2,
            "connect_timeout": "2s",
            "response_timeout": "20s",
        }
        with Daemon(tmp_path / "d", destinations=[dest]) as daemon:
            dropped = daemon.drop_files(12, rows=128, columns=128)
            daemon.wait_done(12, timeout=60)
            status = daemon.status_json()["destinations"]["cloud"]
            assert status["done"] == 12 and status["failed"] == 0, status
            log = daemon.log_text()
            assert "wonderland" not in log
            assert "cloud=https://127.0.0.1" in log
        originals = [daemon.done / d.rel_path for d in dropped]
        assert_holds_the_originals(peer, originals, tmp_path / "held")
