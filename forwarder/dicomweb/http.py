"""One pooled HTTP(S) connection to a DICOMweb service, on urllib3, and its errors.

:class:`WebClient` keeps one keep-alive connection (a urllib3 pool of size one: each sending
thread has its own, so ``associations`` are parallel requests), sends a STOW-RS POST with a
streamed :class:`~forwarder.dicomweb.multipart.MultipartBody` and a ``Content-Length``, and
reads the reply (capped in size). urllib3 never retries and never follows a redirect here: the
channel decides what a failure means, and an ``https`` URL never falls back to plain HTTP.

Errors are :class:`HttpFailure`; ``connected`` tells "could not reach the server at all"
(refused, DNS, connect timeout, TLS handshake) from a failure once the request was on its way.
The TCP connect goes through :func:`forwarder.net.interrupt.open_connection`: the sending
threads' stop (``WebSettings.stop``) interrupts it, and the https TLS handshake after it
(:class:`~forwarder.errors.ConnectInterrupted` goes through urllib3 and :class:`WebClient` as
it is).
The ``Authorization`` header is never logged (no header dumps, urllib3's own logger is quiet at
INFO).
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
import urllib3.connection
from urllib3.exceptions import ConnectTimeoutError as _ConnectTimeout
from urllib3.exceptions import (
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from forwarder.dicomweb.auth import Authorization, AuthSpec
from forwarder.dicomweb.multipart import MultipartBody
from forwarder.errors import ForwarderError
from forwarder.net.interrupt import StopEvent, open_connection
from forwarder.net.pacing import Pacer

if TYPE_CHECKING:  # pydantic is not imported by `send URL`
    from forwarder.config import Destination

logger = logging.getLogger(__name__)

MAX_REPLY = 16 * 1024 * 1024  # bytes of a response body we read; a STOW-RS response is small
USER_AGENT = "forwarder (DICOMweb STOW-RS)"


@dataclass(frozen=True, slots=True)
class WebSettings:
    """Everything about how we talk to one DICOMweb service."""

    url: str  # the service root, without a trailing slash
    auth: AuthSpec | None = None
    tls: ssl.SSLContext | None = None  # for https; None = the system trust store
    connect_timeout: float = 10.0
    response_timeout: float = 60.0
    # Instances per STOW-RS request: small ones go 128 at a time (each request costs the server
    # its HTTP and multipart handling and a response to build: measured against Orthanc, 128
    # small files a request instead of 32 gave 6-8% more), big ones up to 16 MiB a request
    # (32 CT images: a failed request resends no more than that).
    max_instances: int = 128
    max_bytes: int = 16 * 1024 * 1024  # no more instances are added once a request holds this
    pacer: Pacer | None = None  # the destination's rate cap, shared by its requests
    stop: StopEvent | None = None  # the sending threads' stop: interrupts a connect under way


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str
    headers: dict[str, str] = field(repr=False)  # lower-case names
    body: bytes = field(repr=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def excerpt(self, limit: int = 200) -> str:
        """The start of the body as one line, for error messages."""
        text = self.body[:limit].decode("utf-8", "replace")
        text = " ".join(text.split())
        return text + ("..." if len(self.body) > limit else "")

    def retry_after(self, now: float | None = None) -> float | None:
        """Seconds asked by ``Retry-After`` (delta-seconds or an HTTP date), capped at a day."""
        value = self.headers.get("retry-after", "").strip()
        if not value:
            return None
        if value.isdigit():
            return min(float(value), 86400.0)
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        return min(max(when - (time.time() if now is None else now), 0.0), 86400.0)


class HttpFailure(ForwarderError):
    """No HTTP response. ``connected`` is False when the server was never reached."""

    def __init__(self, message: str, *, connected: bool) -> None:
        self.connected = connected
        super().__init__(message)


def scheme_host(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname or "", port


class WebClient:
    """One keep-alive connection to ``settings.url``; driven by one thread."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.authorization = Authorization(settings.auth)
        self._path = urlsplit(settings.url).path.rstrip("/")
        scheme, host, port = scheme_host(settings.url)
        timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.response_timeout)
        # One connection, no retries of urllib3's own; the stop reaches the connection class.
        common: dict[str, Any] = {
            "maxsize": 1,
            "block": False,
            "timeout": timeout,
            "retries": False,
            "stop": settings.stop,
        }
        self._pool: urllib3.HTTPConnectionPool
        if scheme == "https":
            from forwarder.net.tls import client_context

            context = settings.tls or client_context(None)
            if not context.check_hostname:
                # `verify_hostname: false`: urllib3 would match the name itself otherwise.
                common["assert_hostname"] = False
            self._pool = urllib3.HTTPSConnectionPool(host, port, ssl_context=context, **common)
            self._pool.ConnectionCls = _HTTPSConnection
        else:
            self._pool = urllib3.HTTPConnectionPool(host, port, **common)
            self._pool.ConnectionCls = _HTTPConnection

    def close(self) -> None:
        self._pool.close()

    def headers(self, accept: str) -> dict[str, str]:
        """Request headers, with ``Authorization`` (raises auth.SecretError when unusable)."""
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        value = self.authorization.header()
        if value is not None:
            headers["Authorization"] = value
        return headers

    def post_stow(self, body: MultipartBody, *, urgent: bool = False) -> Reply:
        """``POST {url}/studies`` with ``body``; the multipart body streams while it is sent
        (``urgent``: urgent files only, which may bypass a closed window's tighter rate)."""
        headers = self.headers("application/dicom+json, application/dicom+xml;q=0.5")
        headers["Content-Type"] = body.content_type
        headers["Content-Length"] = str(body.length)
        return self._request("POST", f"{self._path}/studies", headers, body, urgent)

    def get(self, path: str, accept: str = "application/dicom+json") -> Reply:
        return self._request("GET", f"{self._path}{path}", self.headers(accept), None)

    def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: MultipartBody | None,
        urgent: bool = False,
    ) -> Reply:
        where = f"{method} {self.settings.url}"
        pacer = self.settings.pacer
        try:
            response = self._pool.urlopen(
                method,
                path,
                body=body if body is None or pacer is None else _paced(body, pacer, urgent),
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                chunked=False,
            )
        except SSLError as exc:
            from forwarder.net.tls import describe_tls_error

            raise HttpFailure(f"{where}: {describe_tls_error(exc)}", connected=False) from None
        except (NewConnectionError, _ConnectTimeout) as exc:
            raise HttpFailure(f"{where}: cannot connect: {_reason(exc)}", connected=False) from None
        except ReadTimeoutError:
            raise HttpFailure(
                f"{where}: no response within {self.settings.response_timeout:g}s",
                connected=True,
            ) from None
        except ProtocolError as exc:
            raise HttpFailure(
                f"{where}: the connection broke: {_reason(exc)}", connected=True
            ) from None
        except (HTTPError, OSError) as exc:
            raise HttpFailure(f"{where}: {_reason(exc)}", connected=True) from None
        try:
            data = response.read(MAX_REPLY + 1, decode_content=True)
            if len(data) > MAX_REPLY:
                response.close()  # not drained: the connection is dropped, not reused
                raise HttpFailure(
                    f"{where}: the response is larger than {MAX_REPLY} bytes", connected=True
                )
        except ReadTimeoutError:
            raise HttpFailure(
                f"{where}: the response stalled for {self.settings.response_timeout:g}s",
                connected=True,
            ) from None
        except (HTTPError, OSError) as exc:
            raise HttpFailure(
                f"{where}: the connection broke while reading the response: {_reason(exc)}",
                connected=True,
            ) from None
        finally:
            response.release_conn()
        return Reply(
            status=response.status,
            reason=response.reason or "",
            headers={k.lower(): v for k, v in response.headers.items()},
            body=bytes(data),
        )


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """urllib3's connection, whose TCP connect ``stop`` interrupts (``stop`` comes from the
    pool's connection keywords)."""

    def __init__(self, *args: Any, stop: StopEvent | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def _new_conn(self) -> socket.socket:
        return _new_socket(self, self.stop)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    """The same for https, and ``stop`` interrupts the TLS handshake that follows the connect
    too. urllib3 wraps the socket in place (the plain socket object gives its descriptor to the
    TLS one), so what the stop watches is a duplicate of it: shutdown() acts on the connection,
    whichever descriptor names it."""

    def __init__(self, *args: Any, stop: StopEvent | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop
        self._setting_up: contextlib.ExitStack | None = None

    def connect(self) -> None:
        if self.stop is None:
            super().connect()
            return
        with contextlib.ExitStack() as self._setting_up:
            try:
                super().connect()
            finally:
                self._setting_up = None

    def _new_conn(self) -> socket.socket:
        sock = _new_socket(self, self.stop)
        if self.stop is not None and self._setting_up is not None:
            watched = sock.dup()
            self._setting_up.callback(watched.close)
            try:
                self._setting_up.enter_context(self.stop.watching(watched))
            except BaseException:
                sock.close()
                raise
        return sock


def _new_socket(conn: urllib3.connection.HTTPConnection, stop: StopEvent | None) -> socket.socket:
    """urllib3's ``HTTPConnection._new_conn`` (its errors too) through
    :func:`~forwarder.net.interrupt.open_connection`: once ``stop`` is set, a connect under way
    raises :class:`~forwarder.errors.ConnectInterrupted`, which urllib3 lets through."""
    timeout = conn.timeout if isinstance(conn.timeout, (int, float)) else None
    try:
        return open_connection(
            (conn._dns_host, conn.port or 80),
            timeout,
            source=conn.source_address,
            stop=stop,
            options=conn.socket_options or (),
        )
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    except TimeoutError as exc:
        raise _ConnectTimeout(
            conn, f"Connection to {conn.host} timed out. (connect timeout={timeout})"
        ) from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"Failed to establish a new connection: {exc}") from exc


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a urllib3 error (no object reprs)."""
    inner: BaseException = exc
    seen = 0
    while seen < 5:
        nxt = inner.__cause__ or inner.__context__
        if nxt is None and inner.args and isinstance(inner.args[-1], BaseException):
            nxt = inner.args[-1]
        if nxt is None:
            break
        inner, seen = nxt, seen + 1
    text = str(inner) or type(inner).__name__
    if isinstance(inner, OSError) and inner.strerror:
        text = inner.strerror
    return text.split(": ", 1)[-1] if text.startswith("<") else text


def _paced(body: Iterable[bytes], pacer: Pacer, urgent: bool = False) -> Iterator[bytes]:
    """``body`` in slices, each charged to the destination's token bucket before it goes
    (``urgent``: as an urgent file's bytes, see :meth:`Pacer.take`)."""
    for chunk in body:
        view = memoryview(chunk)
        step = pacer.slice_size(urgent=urgent)
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            pacer.take(len(piece), urgent=urgent)
            yield bytes(piece)


def web_settings(
    destination: Destination,
    tls: ssl.SSLContext | None,
    pacer: Pacer | None = None,
    stop: StopEvent | None = None,
) -> WebSettings:
    """The settings of a DICOMweb destination of the config (``tls``: its built context;
    ``pacer``: its rate cap; ``stop``: the sending threads' stop)."""
    assert destination.url is not None
    auth = None
    if destination.auth is not None:
        a = destination.auth
        auth = AuthSpec(a.bearer_token_file, a.username, a.password_file)
    return WebSettings(
        url=destination.url,
        auth=auth,
        tls=tls,
        connect_timeout=destination.connect_timeout,
        response_timeout=destination.response_timeout,
        pacer=pacer,
        stop=stop,
    )


def check_credentials(destination: Destination) -> None:
    """Read a DICOMweb destination's secret files now: :class:`~forwarder.dicomweb.auth.
    SecretError` (a TLSSetupError) when one is missing, empty or readable by others."""
    a = destination.auth
    if a is not None:
        Authorization(AuthSpec(a.bearer_token_file, a.username, a.password_file)).header()
