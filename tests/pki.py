"""A throw-away PKI for TLS tests, made with ``openssl`` subprocesses.

Usage (plain function, no fixture magic)::

    from pki import make_pki
    pki = make_pki(tmp_path / "pki")
    server_context(pki.server_cert, pki.server_key, ca=pki.ca_cert)

What it makes (RSA 2048, SHA-256, PEM; keys unencrypted with mode 0600):

- ``ca_cert``/``ca_key``: the test CA;
- ``server_cert``/``server_key``: signed by the CA, SAN ``IP:127.0.0.1`` and ``DNS:localhost``,
  extended key usage serverAuth and clientAuth (DCMTK peers use one certificate both ways);
- ``client_cert``/``client_key``: signed by the CA, CN ``forwarder-test-client``, clientAuth;
- ``other_ca_cert``/``other_ca_key`` and ``other_server_cert``/``other_server_key``: an unrelated
  CA and a server certificate (same SANs) signed by it, for "untrusted issuer";
- ``expired_cert``/``expired_key``: signed by the CA, same SANs, valid only in January 2020;
- ``wrong_name_cert``/``wrong_name_key``: signed by the CA, SAN ``DNS:elsewhere.invalid`` only,
  for "name mismatch" when connecting to 127.0.0.1 or localhost.

Making one costs about a second; share it with a session- or module-scoped fixture.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"

_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth,clientAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)
_WRONG_NAME_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth,clientAuth\n"
    "subjectAltName=DNS:elsewhere.invalid\n"
)
# `openssl x509 -days` cannot put notAfter in the past; `openssl ca` takes explicit dates.
_CA_CONFIG = """\
[ca]
default_ca = test_ca
[test_ca]
database = {folder}/index.txt
new_certs_dir = {folder}
serial = {folder}/serial
default_md = sha256
policy = any_name
unique_subject = no
[any_name]
commonName = supplied
"""


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of the PEM files :func:`make_pki` wrote into ``folder``."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    other_server_cert: Path
    other_server_key: Path
    expired_cert: Path
    expired_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path


def make_pki(folder: Path) -> Pki:
    """Create the CA, certificates and keys described in the module docstring in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder
    _make_ca(f / "ca.pem", f / "ca.key", "forwarder test CA")
    _make_ca(f / "other-ca.pem", f / "other-ca.key", "unrelated test CA")
    _make_leaf(f, "server", "localhost", _SERVER_EXT, f / "ca.pem", f / "ca.key", serial=2)
    _make_leaf(f, "client", "forwarder-test-client", _CLIENT_EXT, f / "ca.pem", f / "ca.key", 3)
    _make_leaf(f, "wrong-name", "elsewhere.invalid", _WRONG_NAME_EXT, f / "ca.pem", f / "ca.key", 4)
    _make_leaf(
        f, "other-server", "localhost", _SERVER_EXT, f / "other-ca.pem", f / "other-ca.key", 2
    )
    _make_expired(f)
    return Pki(
        folder=folder,
        ca_cert=f / "ca.pem",
        ca_key=f / "ca.key",
        server_cert=f / "server.pem",
        server_key=f / "server.key",
        client_cert=f / "client.pem",
        client_key=f / "client.key",
        other_ca_cert=f / "other-ca.pem",
        other_ca_key=f / "other-ca.key",
        other_server_cert=f / "other-server.pem",
        other_server_key=f / "other-server.key",
        expired_cert=f / "expired.pem",
        expired_key=f / "expired.key",
        wrong_name_cert=f / "wrong-name.pem",
        wrong_name_key=f / "wrong-name.key",
    )


def _openssl(*args: str | Path, cwd: Path | None = None) -> None:
    cmd = [OPENSSL, *(os.fspath(a) for a in args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _new_key(key: Path) -> None:
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key)
    key.chmod(0o600)


def _make_ca(cert: Path, key: Path, name: str) -> None:
    _new_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", "3650", "-sha256",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _make_csr(folder: Path, stem: str, common_name: str) -> Path:
    key = folder / f"{stem}.key"
    csr = folder / f"{stem}.csr"
    _new_key(key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={common_name}")
    return csr


def _make_leaf(
    folder: Path, stem: str, common_name: str, ext: str, ca: Path, ca_key: Path, serial: int
) -> None:
    csr = _make_csr(folder, stem, common_name)
    ext_file = folder / f"{stem}.ext"
    ext_file.write_text(ext)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", str(serial),
        "-days", "365", "-sha256", "-extfile", ext_file, "-out", folder / f"{stem}.pem",
    )  # fmt: skip


def _make_expired(folder: Path) -> None:
    csr = _make_csr(folder, "expired", "localhost")
    ext_file = folder / "expired.ext"
    ext_file.write_text(_SERVER_EXT)
    ca_dir = folder / "ca-db"
    ca_dir.mkdir(exist_ok=True)
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "serial").write_text("1000\n")
    config = ca_dir / "ca.cnf"
    config.write_text(_CA_CONFIG.format(folder=ca_dir))
    _openssl(
        "ca", "-batch", "-notext", "-config", config,
        "-cert", folder / "ca.pem", "-keyfile", folder / "ca.key", "-in", csr,
        "-startdate", "20200101000000Z", "-enddate", "20200131000000Z",
        "-extfile", ext_file, "-out", folder / "expired.pem",
    )  # fmt: skip
