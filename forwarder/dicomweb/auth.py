"""DICOMweb credentials: a bearer token or basic auth, read from files with safe permissions.

A secret file must be a regular file that neither group nor others may read or write (as ssh
insists for keys and :func:`forwarder.net.tls.check_private_key_permissions` for TLS keys). It
is read again when it changes (a rotated token is used without a restart). The secret itself
never appears in an error message, a log line or a ``repr``: what is kept is only the ready
``Authorization`` header value, in an object whose ``repr`` hides it.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.errors import TLSSetupError


class SecretError(TLSSetupError):
    """A secret file is missing, unreadable, empty or readable by others. A kind of
    TLSSetupError (unusable credentials material), so that ``forwarder run`` refuses it at
    start (exit 78) and a reload refuses it, exactly as an unusable TLS key."""


@dataclass(frozen=True, slots=True)
class AuthSpec:
    """Where the credentials are: a bearer token file, or a user name and a password file."""

    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None

    def describe(self) -> str:
        """For logs: the scheme and the file, never the secret."""
        if self.bearer_token_file is not None:
            return f"bearer token from {self.bearer_token_file}"
        return f"basic auth as {self.username!r}, password from {self.password_file}"


def read_secret(path: Path, what: str) -> str:
    """The secret in ``path`` without surrounding whitespace; :class:`SecretError` when the file
    is unsafe (group/world accessible), not a regular file, unreadable or empty."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretError(f"{what} {path}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretError(
            f"{what} {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "chmod 600 it"
        )
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"{what} {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what} {path}: not UTF-8 text") from None
    if not text:
        raise SecretError(f"{what} {path} is empty")
    if "\n" in text or "\r" in text:
        raise SecretError(f"{what} {path} holds more than one line")
    return text


@dataclass(slots=True)
class Authorization:
    """The ``Authorization`` header for :class:`AuthSpec`, re-read when a file changes."""

    spec: AuthSpec | None
    _value: str | None = field(default=None, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def header(self) -> str | None:
        """The header value (None without auth); :class:`SecretError` when a file is unusable."""
        spec = self.spec
        if spec is None:
            return None
        source = spec.bearer_token_file or spec.password_file
        assert source is not None
        try:
            st = os.stat(source)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None  # read_secret says why
        with self._lock:
            if self._value is not None and stamp is not None and stamp == self._stamp:
                return self._value
            if spec.bearer_token_file is not None:
                token = read_secret(spec.bearer_token_file, "bearer token file")
                value = f"Bearer {token}"
            else:
                assert spec.password_file is not None and spec.username is not None
                if ":" in spec.username:
                    raise SecretError("a basic auth user name cannot hold ':'")
                password = read_secret(spec.password_file, "password file")
                pair = f"{spec.username}:{password}".encode()
                value = f"Basic {base64.b64encode(pair).decode('ascii')}"
            self._value, self._stamp = value, stamp
            return value
