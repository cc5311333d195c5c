"""The configuration's pydantic models: destinations (C-STORE or STOW-RS), routes, retry,
watching, metrics, and the value types they share (durations, AE titles, ports, URLs).

Reading the YAML file and turning validation errors into one line per problem with its line
number is :mod:`forwarder.config.load`; :mod:`forwarder.config` exports both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

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

from forwarder.durations import parse_duration

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


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16:
        raise ValueError("an AE title must be 1 to 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError("an AE title may hold printable ASCII only, without backslash")
    return value.strip()


AETitle = Annotated[str, BeforeValidator(lambda v: _check_ae_title(str(v)))]


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


def check_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an http:// or https:// URL")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. https://pacs.example.org/dicom-web"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            "must not hold a query, a fragment or credentials (credentials go under auth:)"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("has a bad port number") from None
    return value.strip().rstrip("/")


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


class Route(_Model):
    """Files whose header (and sub-folder) match go to the listed destinations."""

    name: str = Field(min_length=1)
    match: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="DICOM keyword (or `folder`) -> value, list of values, * ? wildcards",
    )
    to: list[str] = Field(min_length=1)

    @field_validator("match", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        """YAML reads ``SeriesNumber: 1`` as a number; header values are matched as text."""

        def text(v: Any) -> Any:
            return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

        if isinstance(value, dict):
            return {
                k: [text(x) for x in v] if isinstance(v, list) else text(v)
                for k, v in value.items()
            }
        return value

    @field_validator("match")
    @classmethod
    def _keywords_exist(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        # The one place config reaches into pydicom: its data dictionary, to reject typos.
        from pydicom.datadict import tag_for_keyword

        for key in value:
            if key != "folder" and tag_for_keyword(key) is None:
                raise ValueError(f"{key!r} is not a DICOM keyword (e.g. Modality, StationName)")
        return value


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

    listen: str = Field(pattern=r"^[^\s:]*:\d{1,5}$", description="host:port")


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
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_phi: bool = Field(
        False, description="debug only: allow patient names and IDs in logs (says so when on)"
    )

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)
