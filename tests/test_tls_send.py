"""DICOM TLS on the sending side: send, echo and a daemon destination against DCMTK storescp."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination, subprocess_env
from dicomgen import PATIENT_NAME, write_files
from pki import Pki, make_pki
from test_tls import dcmtk_storescp

from forwarder.net.tls import TLS_CLOSED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _received(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.name != "storescp.log"]


def _send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, "send", *args], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )


def _client_tls(pki: Pki, ca: Path | None = None) -> list[str]:
    return [
        "--tls-ca", os.fspath(ca or pki.ca_cert),
        "--tls-cert", os.fspath(pki.client_cert),
        "--tls-key", os.fspath(pki.client_key),
    ]  # fmt: skip


def test_send_over_mutual_tls_to_dcmtk(pki: Pki, tmp_path: Path) -> None:
    files = write_files(tmp_path / "src", 3)
    out = tmp_path / "scp"
    # +cf: storescp trusts our CA; --require-peer-cert makes it mutual TLS.
    with dcmtk_storescp(
        out, pki.server_cert, pki.server_key, "+cf", os.fspath(pki.ca_cert), "-rc"
    ) as port:
        result = _send(*_client_tls(pki), f"STORESCP@127.0.0.1:{port}", *map(str, files))
        assert result.returncode == 0, result.stderr
        assert len(_received(out)) == 3
        echo = subprocess.run(
            [FORWARDER, "echo", *_client_tls(pki), f"STORESCP@127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr


def test_server_certificate_from_another_ca_is_refused_and_nothing_is_sent(
    pki: Pki, tmp_path: Path
) -> None:
    files = write_files(tmp_path / "src", 2)
    out = tmp_path / "scp"
    with dcmtk_storescp(
        out, pki.other_server_cert, pki.other_server_key, "+cf", os.fspath(pki.ca_cert)
    ) as port:
        result = _send(*_client_tls(pki), f"STORESCP@127.0.0.1:{port}", *map(str, files))
        assert result.returncode == 3, result.stderr
        assert "untrusted issuer" in result.stderr
        assert "TLS handshake" in result.stderr
        assert _received(out) == []


def test_plain_tcp_is_never_used_when_tls_is_asked_for(pki: Pki, tmp_path: Path) -> None:
    from peers import storescp

    files = write_files(tmp_path / "src", 1)
    with storescp(tmp_path / "plain") as scp:  # a plain-TCP peer
        result = _send(*_client_tls(pki), f"{scp.ae_title}@127.0.0.1:{scp.port}", str(files[0]))
        assert result.returncode == 3, result.stderr
        assert scp.files() == []


def test_world_readable_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_bytes(pki.client_key.read_bytes())
    key.chmod(0o644)
    result = _send(
        "--tls-ca", os.fspath(pki.ca_cert), "--tls-cert", os.fspath(pki.client_cert),
        "--tls-key", os.fspath(key), "X@127.0.0.1:1", str(tmp_path),
    )  # fmt: skip
    assert result.returncode != 0
    assert "0644" in result.stderr or "accessible" in result.stderr


def test_daemon_destination_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "scp"
    with dcmtk_storescp(
        out, pki.server_cert, pki.server_key, "+cf", os.fspath(pki.ca_cert), "-rc"
    ) as port:
        tls = {
            "ca": os.fspath(pki.ca_cert),
            "cert": os.fspath(pki.client_cert),
            "key": os.fspath(pki.client_key),
        }
        with Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", port, ae_title="STORESCP", tls=tls)],
        ) as d:
            d.drop_files(4)
            d.wait_done(4)
            d.stop()
            assert len(_received(out)) == 4
            assert PATIENT_NAME not in d.log_text()


def test_daemon_tls_failure_is_transient_and_visible_in_status(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "scp"
    with dcmtk_storescp(
        out, pki.other_server_cert, pki.other_server_key, "+cf", os.fspath(pki.ca_cert)
    ) as port:
        tls = {"ca": os.fspath(pki.ca_cert)}
        with Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", port, ae_title="STORESCP", tls=tls)],
            retry={"initial_delay": "200ms", "max_delay": "1s"},
        ) as d:
            d.drop_files(2)
            d.wait_log("untrusted issuer", timeout=20)
            status = d.status_json()["destinations"]["pacs"]
            assert status["pending"] + status["in_flight"] == 2
            assert "untrusted issuer" in (status["last_error"] or "")
            assert d.failed_files() == [] and d.done_files() == []
            assert _received(out) == []
            assert d.stop() == 0


def test_tls_no_verify_hostname_alone_still_means_tls(pki: Pki, tmp_path: Path) -> None:
    # `--tls-no-verify-hostname` asks for TLS (checked against the system trust store, name
    # not checked): it must never send in the clear to a plain-TCP peer.
    from peers import storescp

    files = write_files(tmp_path / "src", 1)
    with storescp(tmp_path / "plain") as scp:
        target = f"{scp.ae_title}@127.0.0.1:{scp.port}"
        result = _send("--tls-no-verify-hostname", target, str(files[0]))
        assert result.returncode == 3, result.stderr
        assert "TLS handshake" in result.stderr
        assert scp.files() == []


def test_tls_no_verify_hostname_applies_to_a_config_destination_with_tls(
    pki: Pki, tmp_path: Path
) -> None:
    # The destination's TLS (CA, client certificate) stays; the option only drops the name check.
    files = write_files(tmp_path / "src", 1)
    out = tmp_path / "scp"
    trusted = ("+cf", os.fspath(pki.ca_cert), "-rc")
    with dcmtk_storescp(out, pki.wrong_name_cert, pki.wrong_name_key, *trusted) as port:
        config = tmp_path / "forwarder.yaml"
        config.write_text(
            "incoming: in\ndone: done\nfailed: failed\nqueue: q.sqlite\n"
            "destinations:\n"
            f"  - {{name: pacs, ae_title: STORESCP, host: 127.0.0.1, port: {port},\n"
            f"     tls: {{ca: {pki.ca_cert}, cert: {pki.client_cert}, key: {pki.client_key}}}}}\n"
        )
        strict = _send("-c", str(config), "--destination", "pacs", str(files[0]))
        assert strict.returncode == 3, strict.stderr
        assert "name mismatch" in strict.stderr
        lenient = _send(
            "-c", str(config), "--destination", "pacs", "--tls-no-verify-hostname", str(files[0])
        )
        assert lenient.returncode == 0, lenient.stderr
        assert len(_received(out)) == 1


def test_stow_over_https_honours_verify_hostname_false(pki: Pki, tmp_path: Path) -> None:
    from stowserver import StowServer

    from forwarder.net.tls import server_context

    files = write_files(tmp_path / "src", 1)
    with StowServer(tls=server_context(pki.wrong_name_cert, pki.wrong_name_key)) as server:
        strict = _send(server.url, "--tls-ca", os.fspath(pki.ca_cert), str(files[0]))
        assert strict.returncode == 3, strict.stderr
        assert "name mismatch" in strict.stderr
        lenient = _send(
            server.url, "--tls-ca", os.fspath(pki.ca_cert), "--tls-no-verify-hostname",
            str(files[0]),
        )  # fmt: skip
        assert lenient.returncode == 0, lenient.stderr
        assert len(server.uids()) == 1


def test_a_peer_that_requires_our_certificate_is_named_as_the_reason(
    pki: Pki, tmp_path: Path
) -> None:
    # TLS 1.3: the server checks our certificate after our side of the handshake ended, so
    # its refusal arrives as an alert at the first read; the operator must still be told why.
    from test_receive import run_receiver
    from test_tls import tls_args

    files = write_files(tmp_path / "src", 1)
    with run_receiver(tmp_path / "rcv", *tls_args(pki)) as rcv:
        target = f"FORWARDER@127.0.0.1:{rcv.port}"
        result = _send("--tls-ca", os.fspath(pki.ca_cert), target, str(files[0]))
        assert result.returncode == 3, result.stderr
        # The alert read ("peer required a client certificate"), or, when our request reached
        # the server after it closed, the reset that discarded the alert unread (then the
        # hint: test_a_tls_peer_resetting_before_it_answers_... below makes that case certain).
        assert (
            "peer required a client certificate" in result.stderr
            or "may require a client certificate" in result.stderr
        ), result.stderr
        assert "_ssl.c" not in result.stderr
        assert list(rcv.output.rglob("*.dcm")) == []


def test_a_tls_peer_resetting_before_it_answers_is_said_to_perhaps_want_our_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    """A TLS peer that ends the connection with a reset once our A-ASSOCIATE-RQ arrives (what
    a TLS 1.3 server refusing us looks like when the reset discards its alert unread): the
    one line says it may require a client certificate, not only "connection reset"."""
    import socket
    import struct
    import threading

    from forwarder.net.tls import server_context

    ctx = server_context(pki.server_cert, pki.server_key, None)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(6)  # the A-ASSOCIATE-RQ has arrived
            # SO_LINGER 0: close with a reset, as a peer closing with unread data does
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        files = write_files(tmp_path / "src", 1)
        result = _send("--tls-ca", os.fspath(pki.ca_cert), f"X@127.0.0.1:{port}", str(files[0]))
    finally:
        server.join(10)
        listener.close()
    assert result.returncode == 3, result.stderr
    assert "may require a client certificate, or have refused ours" in result.stderr
    assert "_ssl.c" not in result.stderr


def test_verify_by_query_over_mutual_tls_to_orthanc(pki: Pki, tmp_path: Path) -> None:
    # The proof of delivery goes over the destination's TLS too (pynetdicom's C-FIND SCU).
    from peers import orthanc

    extra = {
        "DicomAlwaysAllowFind": True,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": os.fspath(pki.server_cert),
        "DicomTlsPrivateKey": os.fspath(pki.server_key),
        "DicomTlsTrustedCertificates": os.fspath(pki.ca_cert),
        "DicomTlsRemoteCertificateRequired": True,
    }
    tls = {
        "ca": os.fspath(pki.ca_cert),
        "cert": os.fspath(pki.client_cert),
        "key": os.fspath(pki.client_key),
    }
    with orthanc(tmp_path / "orthanc", extra=extra) as pacs:
        dest = destination(
            "pacs",
            pacs.port,
            ae_title=pacs.ae_title,
            tls=tls,
            verify_by_query={"after": "1s", "max_resends": 1},
        )
        with Daemon(tmp_path / "d", destinations=[dest]) as d:
            d.drop_files(2)
            d.wait_done(2, timeout=60)
            status = d.status_json()["destinations"]["pacs"]
            assert (status["committed"], status["commitment_failures"]) == (2, 0)
            assert d.stop() == 0
        assert pacs.instance_count() == 2


def test_proof_of_delivery_to_a_peer_refusing_our_certificate_says_why_in_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    """A PACS that stored what we sent, then stopped trusting our client certificate (its CA
    list changed): each proof round that cannot get an association says so in one line,
    naming the destination and the TLS refusal as C-STORE words it; not pynetdicom's
    "Connection closed" lines, its traceback and "Association Aborted", then "aborted"."""
    from commitment_peer import CommitmentSCP

    from forwarder.net.tls import server_context

    tls = {
        "ca": os.fspath(pki.ca_cert),
        "cert": os.fspath(pki.client_cert),
        "key": os.fspath(pki.client_key),
    }
    trusting = server_context(pki.server_cert, pki.server_key, ca=pki.ca_cert)
    # The trust changes as the second store is answered: before any proof round, however slow
    # the machine.
    distrusting = server_context(pki.server_cert, pki.server_key, ca=pki.other_ca_cert)
    with CommitmentSCP(ssl_context=trusting, tls_after_stores=(2, distrusting)) as scp:
        proofs = {
            "sc": {"storage_commitment": {"settle": "1500ms"}},
            "vq": {"verify_by_query": {"after": "1500ms"}},
        }
        dests = [
            destination(n, scp.port, ae_title=scp.ae_title, tls=tls, **p) for n, p in proofs.items()
        ]
        with Daemon(tmp_path / "d", destinations=dests) as d:
            d.drop_files(1)
            wait_until(lambda: len(scp.stores) == 2, 20, what="stored at both destinations")
            peer = re.escape(f"{scp.ae_title}@127.0.0.1:{scp.port}")
            # The peer's alert, or, when our request reached it after it closed (TLS 1.3: it
            # checks our certificate after the handshake), the reset that lost the alert.
            refused = "|".join(
                [
                    re.escape("peer rejected our certificate (tlsv1 alert unknown ca)"),
                    r"(Connection reset by peer|aborted) " + re.escape(f"({TLS_CLOSED})"),
                ]
            )
            d.wait_log(
                rf"sc: storage commitment of 1 instance\(s\) not requested: no association with "
                rf"{peer} for storage commitment: ({refused}); asking again in 30s",
                timeout=20,
                regex=True,
            )
            d.wait_log(
                rf"vq: verification by query of 1 instance\(s\) not done: no association with "
                rf"{peer} for C-FIND: ({refused}); asking again in 30s",
                timeout=20,
                regex=True,
            )
            assert d.stop() == 0
    said = d.log_text()
    for noise in ("Traceback", "_ssl.c", "Connection closed", "Association Aborted", ": aborted;"):
        assert noise not in said, said
    assert d.done_files() == [] and d.failed_files() == []
