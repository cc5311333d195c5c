"""DICOM TLS building blocks: hardened ``ssl`` contexts and readable handshake errors.

The contexts follow BCP 195 / RFC 8996 as DCMTK's default profile does: TLS 1.2 at least
(TLS 1.3 whenever the peer has it), for TLS 1.2 only ECDHE key exchange with AES-GCM or
ChaCha20-Poly1305, no compression, no renegotiation. Peer certificates are always verified:
there is no "encrypt but do not check" mode.

Everything here raises :class:`~forwarder.errors.TLSSetupError` for missing, unreadable or
unsafe material, with the path and the reason.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
from pathlib import Path

from forwarder.errors import TLSSetupError

# TLS 1.2 cipher suites (TLS 1.3 suites are all AEAD and are configured separately by OpenSSL).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"

_REASON_RE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")

# OpenSSL X509_V_ERR_* codes, grouped by what an operator has to fix.
_UNTRUSTED = frozenset({2, 7, 18, 19, 20, 21, 24, 27, 28})
_EXPIRED = frozenset({10})
_NOT_YET_VALID = frozenset({9})
_NAME_MISMATCH = frozenset({62, 63, 64})
_REVOKED = frozenset({23})
_WRONG_PURPOSE = frozenset({26})

# OpenSSL reason codes from the peer's alerts or our own checks.
_PEER_WANTS_CERT = frozenset({"TLSV13_ALERT_CERTIFICATE_REQUIRED"})
_PEER_REJECTED_CERT = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)
_NO_CLIENT_CERT = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE"})
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"})
_VERSION = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "VERSION_TOO_LOW",
    }
)
_NO_CIPHER = frozenset({"NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE"})


def client_context(
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    verify_hostname: bool = True,
) -> ssl.SSLContext:
    """A context for connecting to a DICOM TLS peer.

    ``ca`` is the CA bundle the peer's certificate must chain to; ``None`` uses the system trust
    store. The peer certificate is always required and verified; ``verify_hostname`` also checks
    its name or IP address against the host we connect to. ``cert`` and ``key`` (together) are
    our certificate for mutual TLS.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(ctx, ca)
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise TLSSetupError(
                "a TLS client certificate needs both the certificate and its key "
                f"(got cert={cert}, key={key})"
            )
        _load_cert_chain(ctx, cert, key)
    return ctx


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A context for accepting DICOM TLS connections with our ``cert`` and ``key``.

    With ``ca``, clients must present a certificate that chains to it (mutual TLS);
    without, any client may connect (the connection is still encrypted).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_cert_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_private_key_permissions(path: Path) -> None:
    """Refuse a private key that group or others may read or write (as ssh does)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TLSSetupError(f"key file {path}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise TLSSetupError(f"key file {path} is not a regular file")
    if mode & 0o077:
        raise TLSSetupError(
            f"key file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )


def describe_tls_error(exc: BaseException) -> str:
    """One line naming the check that failed, for logs and error reports.

    Looks through ``__cause__``/``__context__`` so a wrapped ``ssl.SSLError`` is found.
    """
    found = _find_tls_cause(exc)
    if isinstance(found, ssl.SSLCertVerificationError):
        return _describe_verify_error(found)
    if isinstance(found, ssl.SSLError):
        return _describe_ssl_error(found)
    if isinstance(found, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    if isinstance(found, ConnectionError):
        return f"TLS handshake failed: connection closed by peer ({_strip(found)})"
    return f"TLS handshake failed: {_strip(exc)}"


#: Said when a TLS peer ends the connection before it answers the A-ASSOCIATE-RQ: a TLS 1.3
#: server checks our certificate after our side of the handshake ended and sends its refusal
#: as an alert; when our request reaches it after it closed, the reset discards that alert
#: unread, and only "closed" or "reset" is left to say.
TLS_CLOSED = (
    "a TLS peer that closes before answering may require a client certificate, or have refused ours"
)


def describe_tls_alert(exc: ssl.SSLError) -> str:
    """One line for a TLS error on an established connection. A TLS 1.3 server checks our
    certificate after our side of the handshake ended: its refusal comes as an alert at our
    first read or write, and is worded as :func:`describe_tls_error` words it."""
    if _ssl_reason(exc) in _PEER_WANTS_CERT | _PEER_REJECTED_CERT:
        return _describe_ssl_error(exc)
    return f"TLS error: {_strip(exc)}"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_SINGLE_ECDH_USE


def _readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise TLSSetupError(f"{what} {path}: cannot read it: {exc.strerror}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    _readable(ca, "CA file")
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except ssl.SSLError as exc:
        raise TLSSetupError(f"CA file {ca}: not a PEM certificate bundle ({_strip(exc)})") from None


def _refuse_password() -> str:
    raise TLSSetupError("the private key is encrypted; use an unencrypted key with mode 0600")


def _load_cert_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    _readable(cert, "certificate file")
    _readable(key, "key file")
    check_private_key_permissions(key)
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key), password=_refuse_password)
    except TLSSetupError as exc:
        raise TLSSetupError(f"key file {key}: {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            reason = "the key does not belong to the certificate"
        else:
            reason = f"not a PEM certificate and private key ({_strip(exc)})"
        raise TLSSetupError(f"certificate {cert} with key {key}: {reason}") from None


def _find_tls_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    current: BaseException | None = exc
    first_os_error: BaseException | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        if first_os_error is None and isinstance(current, OSError):
            first_os_error = current
        current = current.__cause__ or current.__context__
    return first_os_error or exc


def _describe_verify_error(exc: ssl.SSLCertVerificationError) -> str:
    code = exc.verify_code
    detail = f"certificate verify failed: {exc.verify_message}"
    if code in _UNTRUSTED:
        label = "untrusted issuer"
    elif code in _EXPIRED:
        label = "expired certificate"
    elif code in _NOT_YET_VALID:
        label = "certificate not yet valid"
    elif code in _NAME_MISMATCH:
        label = "name mismatch"
    elif code in _REVOKED:
        label = "revoked certificate"
    elif code in _WRONG_PURPOSE:
        label = "certificate not meant for this use (extended key usage)"
    else:
        label = "certificate rejected"
    return f"{label} ({detail})"


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = str(getattr(exc, "reason", None) or "")
    if not reason and (match := _REASON_RE.search(str(exc))):
        reason = match.group(1)  # a re-raised or hand-made error carries only the text
    return reason


def _describe_ssl_error(exc: ssl.SSLError) -> str:
    reason = _ssl_reason(exc)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "TLS handshake failed: connection closed by peer during the handshake"
    if reason in _PEER_WANTS_CERT:
        return "peer required a client certificate"
    if reason in _PEER_REJECTED_CERT:
        return f"peer rejected our certificate ({_strip(exc)})"
    if reason in _NO_CLIENT_CERT:
        return "peer sent no client certificate (one is required)"
    if reason in _NOT_TLS:
        return f"peer does not speak TLS: is only one side configured for TLS? ({_strip(exc)})"
    if reason in _VERSION:
        return f"no common TLS version: TLS 1.2 or later is required ({_strip(exc)})"
    if reason in _NO_CIPHER:
        return f"no common cipher suite ({_strip(exc)})"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return f"certificate rejected ({_strip(exc)})"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        return (
            "TLS handshake failed: the peer refused the handshake (no client certificate, "
            f"or no common cipher) ({_strip(exc)})"
        )
    return f"TLS handshake failed: {_strip(exc)}"


def _strip(exc: BaseException) -> str:
    """The message without OpenSSL's ``[SSL: X]`` prefix and ``(_ssl.c:NNN)`` suffix."""
    text = str(exc.args[1]) if isinstance(exc, OSError) and len(exc.args) > 1 else str(exc)
    if text.startswith("[SSL: ") and "] " in text:
        text = text.split("] ", 1)[1]
    if text.endswith(")") and "(_ssl.c:" in text:
        text = text[: text.rindex("(_ssl.c:")].rstrip()
    return text or type(exc).__name__
