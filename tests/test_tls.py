"""DICOM TLS: ``forwarder receive`` against DCMTK storescu, ``client_context`` against DCMTK
storescp, and the TLS building blocks in :mod:`forwarder.net.tls`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from peers import free_port
from pki import Pki, make_pki
from test_receive import run_receiver, run_storescu, sample, stored_path, wait_until

from forwarder.errors import TLSSetupError
from forwarder.net.tls import (
    check_private_key_permissions,
    client_context,
    describe_tls_error,
    server_context,
)

STORESCP = "/usr/bin/storescp"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def dcmtk_storescp(folder: Path, cert: Path, key: Path, *options: str) -> Iterator[int]:
    """DCMTK storescp with TLS on a free port (trusting ``options``' ``+cf``); stopped by PID."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [STORESCP, "+tls", os.fspath(key), os.fspath(cert), *options]
    cmd += ["-od", os.fspath(folder), str(port)]
    log = folder / "storescp.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    try:
        ps = psutil.Process(proc.pid)

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"storescp exited with {proc.returncode}: {log.read_text()}")
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in ps.net_connections("tcp")
            )

        wait_until(listening, 20, "storescp to listen")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def handshake(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> str:
    """Connect, handshake and wait for the peer's first word (so that a TLS 1.3 server's
    rejection of our certificate arrives); return the TLS version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        version = tls.version()
        assert version is not None
        tls.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            tls.recv(1)  # storescp waits for our A-ASSOCIATE-RQ: a timeout means accepted
        return version


def tls_args(pki: Pki, *, ca: bool = True) -> list[str]:
    args = ["--tls-cert", os.fspath(pki.server_cert), "--tls-key", os.fspath(pki.server_key)]
    return [*args, "--tls-ca", os.fspath(pki.ca_cert)] if ca else args


# -- forwarder receive with TLS ------------------------------------------------------------------


def test_receive_with_mutual_tls_accepts_storescu_with_a_client_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    source = sample("CT_small.dcm")
    with run_receiver(tmp_path, *tls_args(pki)) as proc:
        assert "TLS on, client certificates required" in proc.log_text()
        result = run_storescu(
            proc.port,
            [os.fspath(source)],
            "+tls", os.fspath(pki.client_key), os.fspath(pki.client_cert),
            "+cf", os.fspath(pki.ca_cert),
            "-R", "-aec", "FORWARDER",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert stored_path(proc.output, source).is_file()


def test_receive_with_tls_refuses_plain_tcp_storescu(pki: Pki, tmp_path: Path) -> None:
    with run_receiver(tmp_path, *tls_args(pki)) as proc:
        result = run_storescu(proc.port, [os.fspath(sample("CT_small.dcm"))], "-R", "-to", "10")
        assert result.returncode != 0
        wait_until(lambda: "TLS handshake with 127.0.0.1 failed" in proc.log_text(), 10, "log")
        assert "peer does not speak TLS" in proc.log_text()
        assert list(proc.output.rglob("*.dcm")) == []


def test_receive_with_tls_refuses_a_client_without_certificate(pki: Pki, tmp_path: Path) -> None:
    with run_receiver(tmp_path, *tls_args(pki)) as proc:
        with pytest.raises(ssl.SSLError) as caught:
            handshake(proc.port, client_context(pki.ca_cert))
        assert describe_tls_error(caught.value) == "peer required a client certificate"
        wait_until(lambda: "sent no client certificate" in proc.log_text(), 10, "the log line")


def test_receive_with_tls_refuses_a_client_certificate_from_another_ca(
    pki: Pki, tmp_path: Path
) -> None:
    with run_receiver(tmp_path, *tls_args(pki)) as proc:
        result = run_storescu(
            proc.port,
            [os.fspath(sample("CT_small.dcm"))],
            "+tls", os.fspath(pki.other_server_key), os.fspath(pki.other_server_cert),
            "+cf", os.fspath(pki.ca_cert),
            "-R",
        )  # fmt: skip
        assert result.returncode != 0
        wait_until(lambda: "untrusted issuer" in proc.log_text(), 10, "the log line")


def test_receive_with_tls_but_no_ca_accepts_a_client_without_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    with (
        run_receiver(tmp_path, *tls_args(pki, ca=False)) as proc,
        # A client that connects and never starts its handshake must not block the others.
        socket.create_connection(("127.0.0.1", proc.port), timeout=10),
    ):
        assert ", TLS on\n" in proc.log_text()
        assert handshake(proc.port, client_context(pki.ca_cert)) in ("TLSv1.2", "TLSv1.3")


def test_receive_refuses_a_world_readable_key(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "receive", "--port", "0", "--output", "out",
         "--tls-cert", os.fspath(pki.server_cert), "--tls-key", os.fspath(key)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"forwarder receive: error: key file {key} is accessible by others (mode 0644): "
        "chmod 600 it"
    ]


def test_receive_tls_options_go_together(pki: Pki, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "receive", "--port", "0", "--output", "out",
         "--tls-cert", os.fspath(pki.server_cert)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--tls-cert and --tls-key go together" in result.stderr


# -- client_context against DCMTK storescp -------------------------------------------------------


def test_client_context_against_dcmtk_storescp(pki: Pki, tmp_path: Path) -> None:
    with dcmtk_storescp(tmp_path, pki.server_cert, pki.server_key, "+cf", os.fspath(pki.ca_cert)):
        pass  # started and stopped cleanly: the helper works before we rely on it
    trusted = ("+cf", os.fspath(pki.ca_cert))
    with dcmtk_storescp(tmp_path / "ok", pki.server_cert, pki.server_key, *trusted) as port:
        ours = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
        assert handshake(port, ours) in ("TLSv1.2", "TLSv1.3")
        assert handshake(port, ours, host="localhost") in ("TLSv1.2", "TLSv1.3")

        other = client_context(pki.other_ca_cert, pki.client_cert, pki.client_key)
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            handshake(port, other)
        # storescp sends its chain with the CA it trusts: "self-signed certificate in chain"
        assert describe_tls_error(caught.value).startswith(
            "untrusted issuer (certificate verify failed: "
        )

        with pytest.raises(ssl.SSLError) as no_cert:
            handshake(port, client_context(pki.ca_cert))
        assert describe_tls_error(no_cert.value).startswith("peer required a client certificate")


def test_client_context_reports_a_name_mismatch(pki: Pki, tmp_path: Path) -> None:
    trusted = ("+cf", os.fspath(pki.ca_cert))
    with dcmtk_storescp(tmp_path, pki.wrong_name_cert, pki.wrong_name_key, *trusted) as port:
        ctx = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            handshake(port, ctx)
        assert describe_tls_error(caught.value).startswith("name mismatch (")
        lenient = client_context(
            pki.ca_cert, pki.client_cert, pki.client_key, verify_hostname=False
        )
        assert handshake(port, lenient) in ("TLSv1.2", "TLSv1.3")


def test_client_context_reports_an_expired_certificate(pki: Pki, tmp_path: Path) -> None:
    trusted = ("+cf", os.fspath(pki.ca_cert))
    with dcmtk_storescp(tmp_path, pki.expired_cert, pki.expired_key, *trusted) as port:
        ctx = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            handshake(port, ctx)
        assert describe_tls_error(caught.value).startswith("expired certificate (")


# -- the building blocks -------------------------------------------------------------------------


def test_check_private_key_permissions(pki: Pki, tmp_path: Path) -> None:
    check_private_key_permissions(pki.server_key)  # 0600
    key = tmp_path / "k.pem"
    shutil.copy(pki.server_key, key)
    for mode in (0o644, 0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(TLSSetupError) as caught:
            check_private_key_permissions(key)
        assert str(caught.value) == (
            f"key file {key} is accessible by others (mode {mode:04o}): chmod 600 it"
        )
    key.chmod(0o400)
    check_private_key_permissions(key)
    with pytest.raises(TLSSetupError, match="cannot read it: No such file"):
        check_private_key_permissions(tmp_path / "missing.key")


def test_contexts_refuse_unsafe_or_missing_material(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    shutil.copy(pki.client_key, loose)
    loose.chmod(0o644)
    with pytest.raises(TLSSetupError, match="accessible by others"):
        client_context(pki.ca_cert, pki.client_cert, loose)
    with pytest.raises(TLSSetupError, match="accessible by others"):
        server_context(pki.server_cert, loose)
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSSetupError, match=f"CA file {missing}: cannot read it: No such file"):
        client_context(missing)
    with pytest.raises(TLSSetupError, match="does not belong to the certificate"):
        server_context(pki.server_cert, pki.client_key)
    with pytest.raises(TLSSetupError, match="needs both the certificate and its key"):
        client_context(pki.ca_cert, cert=pki.client_cert)
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(TLSSetupError, match="not a PEM certificate bundle"):
        client_context(not_pem)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", os.fspath(pki.client_key), "-aes256", "-passout", "pass:x",
         "-out", os.fspath(encrypted)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    encrypted.chmod(0o600)
    with pytest.raises(TLSSetupError, match="encrypted"):
        client_context(pki.ca_cert, pki.client_cert, encrypted)


def test_contexts_follow_bcp195(pki: Pki) -> None:
    client = client_context(None)
    server = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    for ctx in (client, server):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        for cipher in ctx.get_ciphers():
            if cipher["protocol"] == "TLSv1.2":
                assert cipher["kea"] == "kx-ecdhe", cipher["name"]
                assert "GCM" in cipher["name"] or "CHACHA20" in cipher["name"], cipher["name"]
    assert client.check_hostname
    assert server_context(pki.server_cert, pki.server_key).verify_mode == ssl.CERT_NONE


def test_a_client_without_ecdhe_aead_ciphers_is_refused(pki: Pki) -> None:
    server = server_context(pki.server_cert, pki.server_key)
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.load_verify_locations(pki.ca_cert)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA256")  # RSA key exchange, CBC
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    server.wrap_socket(conn, server_side=True).close()
                except ssl.SSLError as exc:
                    errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with pytest.raises(ssl.SSLError) as caught:
                handshake(listener.getsockname()[1], weak)
        finally:
            thread.join(10)
    assert describe_tls_error(caught.value).startswith("TLS handshake failed")
    assert errors and describe_tls_error(errors[0]).startswith("no common cipher suite")


def test_describe_tls_error_finds_a_wrapped_ssl_error() -> None:
    try:
        try:
            raise ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert (_ssl.c:1)")
        except ssl.SSLError as inner:
            raise RuntimeError("association failed") from inner
    except RuntimeError as outer:
        described = describe_tls_error(outer)
    assert described == "peer required a client certificate"
    assert describe_tls_error(TimeoutError()) == "TLS handshake timed out"
    assert describe_tls_error(ConnectionResetError(104, "Connection reset by peer")) == (
        "TLS handshake failed: connection closed by peer (Connection reset by peer)"
    )


def test_check_config_checks_the_listeners_tls_material_as_run_does(
    pki: Pki, tmp_path: Path
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0o644)
    config = tmp_path / "forwarder.yaml"
    config.write_text(
        f"incoming: {tmp_path / 'in'}\ndone: {tmp_path / 'done'}\nfailed: {tmp_path / 'failed'}\n"
        f"queue: {tmp_path / 'q.sqlite'}\n"
        "destinations: [{name: pacs, ae_title: PACS, host: 127.0.0.1, port: 11112}]\n"
        f"listen: {{port: 11113, tls: {{cert: {pki.server_cert}, key: {key}}}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "check-config", "-c", os.fspath(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 78, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{config}: listen.tls: key file {key} is accessible by others (mode 0644): chmod 600 it"
    ]


def test_a_tls_client_on_a_plain_port_is_named_on_both_sides(pki: Pki, tmp_path: Path) -> None:
    """The receiver's log says the peer spoke TLS to a plain port (not only "malformed PDU"),
    and the client is not told the reverse ("plain TCP on a TLS port")."""
    with run_receiver(tmp_path) as proc:
        with pytest.raises((ssl.SSLError, OSError)) as caught:
            handshake(proc.port, client_context(pki.ca_cert))
        wait_until(lambda: "malformed PDU" in proc.log_text(), 10, "the receiver's refusal")
        assert "TLS" in proc.log_text().split("malformed PDU", 1)[1].splitlines()[0]
        said = describe_tls_error(caught.value)
        assert "on a TLS port" not in said, said
