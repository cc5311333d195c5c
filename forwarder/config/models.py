"""The configuration's pydantic models: destinations (C-STORE or STOW-RS), routes, retry,
watching, metrics, and the value types they share (durations, AE titles, ports, URLs).

Reading the YAML file and turning validation errors into one line per problem with its line
number is :mod:`forwarder.config.load`; :mod:`forwarder.config` exports both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from forwarder.config.flow import Window, parse_rate, parse_window
from forwarder.config.routing import Modify, Route
from forwarder.durations import parse_duration, parse_size
from forwarder.urls import check_url

DEFAULT_CONFIG_PATH = "/etc/forwarder/forwarder.yaml"

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"},
            ],
            "description": "a duration: 250ms, 5s, 10m, 2h, 7d, or seconds",
        }
    ),
]


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]?)(i?[bB])?\s*$"},
            ],
            "description": "a size: 500MB, 5GB (powers of 1024), or bytes",
        }
    ),
]


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16:
        raise ValueError("an AE title must be 1 to 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError("an AE title may hold printable ASCII only, without backslash")
    return value.strip()


AETitle = Annotated[str, BeforeValidator(lambda v: _check_ae_title(str(v)))]


def _check_window(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a window is a string: DAYS [HH:MM-HH:MM], e.g. 'Mon-Fri 19:00-07:00'")
    parse_window(value)
    return value


WindowText = Annotated[
    str,
    BeforeValidator(_check_window),
    WithJsonSchema(
        {"type": "string", "description": "DAYS [HH:MM-HH:MM]: 'Mon-Fri 19:00-07:00', 'Sat-Sun'"}
    ),
]


Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 1024},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*[kKmMgGtT]?(i?[bB])?\s*(/\s*s)?$"},
            ],
            "description": "bytes per second: 20MB/s, 500KB/s (K/M/G: powers of 1024)",
        }
    ),
]


def _check_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("must be 1..65535")
    return value


Port = Annotated[int, BeforeValidator(_check_port), WithJsonSchema({"type": "integer"})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    """DICOM TLS for one destination. Never falls back to plain TCP."""

    ca: Path | None = Field(None, description="verify the peer against this CA bundle")
    cert: Path | None = Field(None, description="our certificate, for mutual TLS")
    key: Path | None = Field(None, description="the private key of `cert`")
    verify_hostname: bool = Field(True, description="check the peer's name or IP against host")


class WebAuth(_Model):
    """How a DICOMweb destination authenticates: a bearer token or HTTP basic auth. The secrets
    stay in files (mode 0600, checked when they are read), never in the config or the logs."""

    bearer_token_file: Path | None = Field(None, description="a file holding the bearer token")
    username: str | None = Field(None, min_length=1, description="HTTP basic auth user name")
    password_file: Path | None = Field(None, description="a file holding the basic auth password")

    @model_validator(mode="after")
    def _one_scheme(self) -> WebAuth:
        basic = self.username is not None or self.password_file is not None
        if self.bearer_token_file is not None and basic:
            raise ValueError("give bearer_token_file or username/password_file, not both")
        if self.bearer_token_file is None and not basic:
            raise ValueError("give bearer_token_file, or username and password_file")
        if basic and (self.username is None or self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


WebURL = Annotated[str, BeforeValidator(check_url), WithJsonSchema({"type": "string"})]

#: Keys that only a DIMSE (C-STORE) destination takes.
_DIMSE_ONLY = (
    "ae_title",
    "host",
    "port",
    "calling_ae_title",
    "max_pdu",
    "release_timeout",
    "storage_commitment",
    "verify_by_query",
)


class StorageCommitment(_Model):
    """Proof of delivery by DICOM Storage Commitment (Push Model, PS3.4 Annex J): files go to
    done/ only once this destination has committed them."""

    timeout: Duration = Field(3600.0, gt=0, description="wait this long for the report")
    max_resends: int = Field(
        3, ge=0, le=100, description="send an uncommitted instance again at most this often"
    )
    settle: Duration = Field(
        10.0,
        ge=0,
        description="request commitment for a study once nothing was stored for it this long",
    )
    max_instances: int = Field(
        500, ge=1, le=10000, description="or once this many of its instances are stored"
    )
    port: Port | None = Field(
        None,
        description="accept reports on associations the peer opens to us on this port "
        "(the peer must have our AE title at this address); omitted: on the same association",
    )
    ae_title: AETitle | None = Field(
        None, description="the AE title those reports are sent to (default: our calling AE)"
    )
    bind: str = Field("0.0.0.0", min_length=1, description="the address the port listens on")
    wait_on_association: Duration = Field(
        10.0, ge=0, description="how long to keep the requesting association open for a report"
    )


class VerifyByQuery(_Model):
    """Proof of delivery by C-FIND (IMAGE level) where the peer has no storage commitment."""

    after: Duration = Field(600.0, ge=0, description="ask this long after storing")
    max_resends: int = Field(
        3, ge=0, le=100, description="send an instance the peer lacks again at most this often"
    )


class Destination(_Model):
    """A peer that receives the files: by C-STORE (``ae_title``/``host``/``port``) or by
    DICOMweb STOW-RS (``url``). Which keys go together is checked in ``_cross_check`` (on the
    YAML, to name each key and line) and again here for destinations built in code."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)
    ae_title: AETitle | None = Field(None, description="the peer's AE title (DIMSE: required)")
    host: str | None = Field(None, min_length=1, description="DIMSE: required")
    port: Port | None = Field(None, description="DIMSE: required")
    url: WebURL | None = Field(
        None, description="a DICOMweb (STOW-RS) service root instead of ae_title/host/port"
    )
    auth: WebAuth | None = Field(None, description="DICOMweb only: bearer token or basic auth")
    associations: int = Field(
        1, ge=1, le=32, description="parallel associations (DICOMweb: parallel requests)"
    )
    connect_timeout: Duration = Field(10.0, description="TCP connect + association negotiation")
    response_timeout: Duration = Field(
        60.0, description="wait for a C-STORE response (DICOMweb: for the HTTP response)"
    )
    release_timeout: Duration = Field(10.0, description="wait for an A-RELEASE response")
    idle_timeout: Duration = Field(30.0, description="release an association idle this long")
    max_pdu: int = Field(
        262144, ge=0, description="max PDU we receive (0 = unlimited); we send what the peer asks"
    )
    calling_ae_title: AETitle | None = Field(None, description="overrides the global ae_title")
    allow_lossy_decompress: bool = Field(
        False, description="decompress lossy JPEG when the peer only accepts uncompressed"
    )
    tls: TLSConfig | None = None
    storage_commitment: StorageCommitment | None = Field(
        None, description="require storage commitment before a file is done (omitted = off)"
    )
    verify_by_query: VerifyByQuery | None = Field(
        None, description="check with C-FIND that the peer holds what it stored (omitted = off)"
    )
    modify: Modify | None = Field(
        None, description="changes made to what is sent here, after the routes' own"
    )
    window: list[WindowText] | None = Field(
        None,
        description="send windows in local time, e.g. ['Mon-Fri 19:00-07:00', 'Sat-Sun'] "
        "(a range ending before it starts crosses midnight); omitted = always",
    )
    urgent_bypasses_window: bool = Field(
        False, description="urgent files are sent outside the window too"
    )
    outside_window_rate: Rate | None = Field(
        None, description="outside the window, send at this rate instead of not at all"
    )
    max_rate: Rate | None = Field(
        None, description="cap across all associations of this destination; omitted = unlimited"
    )

    @field_validator("window")
    @classmethod
    def _some_window(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one window, or leave window out (always)")
        return value

    @property
    def windows(self) -> list[Window]:
        """``window`` parsed (empty: always open)."""
        return [parse_window(w) for w in self.window or []]

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        problem = _shape_problem(
            self.url is not None,
            [k for k in ("ae_title", "host", "port") if getattr(self, k) is None],
            self.auth is not None,
        )
        if problem is not None:
            # Reported by _cross_check with key and line when the config comes from YAML.
            raise PydanticCustomError("destination_shape", problem)
        if self.url is not None and (self.storage_commitment or self.verify_by_query):
            raise PydanticCustomError(
                "destination_shape",
                "storage_commitment and verify_by_query need a DIMSE destination, not url",
            )
        return self

    @property
    def is_dicomweb(self) -> bool:
        return self.url is not None

    @property
    def target(self) -> str:
        """Where it sends, for logs: the URL, or AE@host:port."""
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


def _shape_problem(url: bool, dimse_missing: list[str], auth: bool) -> str | None:
    if url and len(dimse_missing) < 3:
        return "give url (DICOMweb) or ae_title, host and port (DIMSE), not both"
    if not url and len(dimse_missing) == 3:
        return "needs ae_title, host and port (DIMSE C-STORE) or url (DICOMweb STOW-RS)"
    if not url and dimse_missing:
        return f"{', '.join(dimse_missing)}: required key is missing"
    if not url and auth:
        return "auth applies to DICOMweb destinations (url) only"
    return None


class RetryPolicy(_Model):
    """Exponential backoff with jitter for transient failures."""

    initial_delay: Duration = 5.0
    max_delay: Duration = 600.0
    max_attempts: int | None = Field(None, ge=1, description="null = no limit")
    give_up_after: Duration = Field(7 * 86400.0, description="then the file goes to failed/")


class WatchConfig(_Model):
    """How the incoming folder is watched."""

    polling: bool = Field(False, description="poll instead of inotify (NFS/SMB/CIFS mounts)")
    settle: Duration = Field(
        1.0,
        description="a file written in place must be unchanged this long (one renamed into "
        "incoming is taken at once)",
    )
    rescan_interval: Duration = Field(60.0, description="full rescan to catch missed events")


class MetricsConfig(_Model):
    """Prometheus text format at /metrics, and the read-only status page at / and /api/status."""

    listen: str = Field(
        pattern=r"^([^\s:\[\]]*|\[[0-9A-Fa-f:.]+\]):\d{1,5}$", description="host:port, [v6]:port"
    )

    @field_validator("listen")
    @classmethod
    def _port_fits(cls, value: str) -> str:
        if int(value.rpartition(":")[2]) > 65535:
            raise ValueError("the port must be 0..65535 (host:port, e.g. 127.0.0.1:9750)")
        return value


class ListenTLS(_Model):
    """DICOM TLS for the listener: our certificate and key, and optionally the CA whose client
    certificates are required (as ``forwarder receive --tls-cert/--tls-key/--tls-ca``)."""

    cert: Path = Field(description="our certificate (PEM)")
    key: Path = Field(description="its private key (PEM, mode 0600)")
    ca: Path | None = Field(None, description="require client certificates from this CA")


def _check_network(value: Any) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return str(value).strip()


Network = Annotated[str, BeforeValidator(_check_network)]


class ListenConfig(_Model):
    """The daemon as a Storage SCP: what a modality sends is written under incoming and queued
    before Success is answered (the engine and the checks of ``forwarder receive``)."""

    port: Port
    ae_title: AETitle | None = Field(None, description="our AE title (default: the global one)")
    bind: str = Field("0.0.0.0", min_length=1, description="address to listen on")
    require_called_aet: bool = Field(
        False, description="reject associations whose called AE title is not ae_title"
    )
    allow_calling_aet: list[AETitle] = Field(
        default_factory=list, description="accept only these calling AE titles (empty: any)"
    )
    allow_host: list[Network] = Field(
        default_factory=list, description="accept only these addresses or networks (empty: any)"
    )
    max_associations: int = Field(16, ge=1, le=1024, description="associations at once")
    max_object_size: Size | None = Field(
        None, description="larger objects are answered 0xA700 (null: no limit)"
    )
    max_pdu: int = Field(262144, ge=1, le=0xFFFFFFFF, description="max PDU we receive")
    promiscuous: bool = Field(
        False, description="accept private and unknown SOP classes too (storescp +pm)"
    )
    tls: ListenTLS | None = None
    min_free_space: Size = Field(
        1024**3,
        description="below this much free space on the incoming filesystem, objects are "
        "answered 0xA700 (out of resources) instead of accepted",
    )
    separate_process: bool = Field(
        True,
        description="receive in a process of its own, on another core (Linux; false: in the "
        "daemon's own process)",
    )


class Config(_Model):
    """The whole configuration file."""

    ae_title: AETitle = "FORWARDER"
    incoming: Path
    done: Path
    failed: Path
    queue: Path
    destinations: list[Destination] = Field(min_length=1)
    routes: list[Route] | None = None
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    metrics: MetricsConfig | None = None
    listen: ListenConfig | None = Field(
        None, description="the daemon is also a Storage SCP (a modality gateway)"
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_phi: bool = Field(
        False, description="debug only: allow patient names and IDs in logs (says so when on)"
    )

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)
