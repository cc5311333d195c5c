"""The YAML configuration: pydantic models, durations, and errors that name key and line.

Load once at start with :func:`load_config`; pass the resulting :class:`Config` into
constructors. Every problem is reported at once, one line each, as
``destinations[0].port (line 14): must be 1..65535``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from forwarder.durations import parse_duration
from forwarder.errors import ConfigError

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
_DIMSE_ONLY = ("ae_title", "host", "port", "calling_ae_title", "max_pdu", "release_timeout")


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
    """Prometheus text format at /metrics."""

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


def config_path_from_env(explicit: str | None) -> str:
    """``-c`` if given, else ``$FORWARDER_CONFIG``, else the packaged default."""
    return explicit or os.environ.get("FORWARDER_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the config at ``path``; raise :class:`ConfigError` listing
    every problem. Relative folder paths are resolved against the config file's folder."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the config file: {exc.strerror}"]) from None
    return parse_config(text, source=source, base_dir=Path(source).resolve().parent)


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate YAML ``text``; see :func:`load_config`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"not valid YAML{where}: {problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping of keys (ae_title, ...)"])
    lines = dict(_node_lines(node, ())) if node is not None else {}
    found: list[tuple[tuple[Any, ...], str]] = []
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # destination_shape: reported by _check_kind below, with the key and its line
        found = [_render(err) for err in exc.errors() if err["type"] != "destination_shape"]
    found = _with_destination_kinds(found, data)
    problems = [_problem(loc, message, lines) for loc, message in found]
    problems += _cross_check(data, lines)
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _node_lines(node: yaml.Node, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], int]]:
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            yield (*path, key), key_node.start_mark.line + 1
            for sub_path, line in _node_lines(value_node, (*path, key)):
                if sub_path != (*path, key):
                    yield sub_path, line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _node_lines(item, (*path, i))


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _problem(loc: tuple[Any, ...], message: str, lines: dict[tuple[Any, ...], int]) -> str:
    line = _line_for(loc, lines)
    where = f" (line {line})" if line is not None else ""
    return f"{_format_loc(loc)}{where}: {message}"


def _render(err: Any) -> tuple[tuple[Any, ...], str]:
    # Drop pydantic's union/type tags ("str", "list[str]", "function-before[...]") from the loc.
    loc = tuple(
        p for p in err["loc"] if isinstance(p, int) or not re.match(r"^[a-z_-]+\[|^(str|int)$", p)
    )
    kind = err["type"]
    if kind == "extra_forbidden":
        message = (
            "unknown key (check the spelling; `forwarder check-config --schema` lists every key)"
        )
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = str(err["msg"])
        message = message.removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
    return loc, message


def _cross_check(data: dict[str, Any], lines: dict[tuple[Any, ...], int]) -> list[str]:
    """Checks across keys, on the raw YAML so they run even when fields are invalid too:
    every problem is reported at once."""
    problems = []
    seen: dict[str, int] = {}
    dests = data.get("destinations")
    for i, dest in enumerate(dests if isinstance(dests, list) else []):
        if not isinstance(dest, dict):
            continue
        name = dest.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    _problem(
                        ("destinations", i, "name"),
                        f"duplicate destination name {name!r} (also destinations[{seen[name]}])",
                        lines,
                    )
                )
            seen.setdefault(name, i)
        tls = dest.get("tls")
        if isinstance(tls, dict):
            if tls.get("key") and not tls.get("cert"):
                problems.append(
                    _problem(("destinations", i, "tls", "key"), "needs tls.cert", lines)
                )
            if tls.get("cert") and not tls.get("key"):
                problems.append(
                    _problem(("destinations", i, "tls", "cert"), "needs tls.key", lines)
                )
    routes = data.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) and seen else []):
        targets = route.get("to") if isinstance(route, dict) else None
        for j, target in enumerate(targets if isinstance(targets, list) else []):
            if isinstance(target, str) and target not in seen:
                known = ", ".join(sorted(seen))
                problems.append(
                    _problem(
                        ("routes", i, "to", j),
                        f"unknown destination {target!r} (known: {known})",
                        lines,
                    )
                )
    retry = data.get("retry")
    if isinstance(retry, dict) and "initial_delay" in retry and "max_delay" in retry:
        try:
            if parse_duration(retry["initial_delay"]) > parse_duration(retry["max_delay"]):
                problems.append(
                    _problem(("retry", "initial_delay"), "must not exceed retry.max_delay", lines)
                )
        except ValueError:
            pass  # reported by the field validation
    return problems


def _check_kind(dest: dict[str, Any], at: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str]]:
    """A destination is DIMSE (ae_title, host, port) or DICOMweb (url), never both."""
    if dest.get("url") is not None:
        given = [k for k in _DIMSE_ONLY if k in dest]
        problems = [
            ((*at, k), "a DICOMweb destination (url) does not take this key") for k in given
        ]
        tls = dest.get("tls")
        url = dest.get("url")
        if isinstance(tls, dict) and isinstance(url, str) and url.startswith("http://"):
            problems.append(((*at, "tls"), "needs an https:// url"))
        return problems
    missing = [k for k in ("ae_title", "host", "port") if k not in dest]
    problem = _shape_problem(False, missing, "auth" in dest)
    if problem is None:
        return []
    if len(missing) == 3:
        return [(at, problem)]
    if missing:
        return [((*at, k), "required key is missing") for k in missing]
    return [((*at, "auth"), problem)]


def _with_destination_kinds(
    found: list[tuple[tuple[Any, ...], str]], data: dict[str, Any]
) -> list[tuple[tuple[Any, ...], str]]:
    """``found`` (pydantic's problems) with :func:`_check_kind`'s, each destination's problems
    in field order (unknown keys last) where pydantic reports destinations: the order
    pydantic itself used when ae_title, host and port were plain required fields."""
    dests = data.get("destinations")
    kinds = [
        problem
        for i, dest in enumerate(dests if isinstance(dests, list) else [])
        if isinstance(dest, dict)
        for problem in _check_kind(dest, ("destinations", i))
    ]
    if not kinds:
        return found

    def is_dest(loc: tuple[Any, ...]) -> bool:
        return len(loc) >= 2 and loc[0] == "destinations" and isinstance(loc[1], int)

    fields = list(Destination.model_fields)
    top = list(Config.model_fields)
    later = top[top.index("destinations") + 1 :]
    block = [p for p in found if is_dest(p[0])] + kinds
    rest = [p for p in found if not is_dest(p[0])]
    first = next((n for n, p in enumerate(found) if is_dest(p[0])), None)
    if first is not None:  # where pydantic put destinations' problems
        at = first
    else:  # before the first problem of a later top-level key (or an unknown one)
        at = next(
            (n for n, p in enumerate(rest) if not p[0] or p[0][0] in later or p[0][0] not in top),
            len(rest),
        )

    def order(problem: tuple[tuple[Any, ...], str]) -> tuple[int, int]:
        loc = problem[0]
        key = loc[2] if len(loc) > 2 else None
        return loc[1], (fields.index(key) if key in fields else -1 if key is None else len(fields))

    return rest[:at] + sorted(block, key=order) + rest[at:]


def _resolve_paths(config: Config, base: Path) -> Config:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    dests = []
    for d in config.destinations:
        if d.tls is not None:
            tls = d.tls.model_copy(
                update={"ca": fix(d.tls.ca), "cert": fix(d.tls.cert), "key": fix(d.tls.key)}
            )
            d = d.model_copy(update={"tls": tls})
        if d.auth is not None:
            auth = d.auth.model_copy(
                update={
                    "bearer_token_file": fix(d.auth.bearer_token_file),
                    "password_file": fix(d.auth.password_file),
                }
            )
            d = d.model_copy(update={"auth": auth})
        dests.append(d)
    return config.model_copy(
        update={
            "incoming": fix(config.incoming),
            "done": fix(config.done),
            "failed": fix(config.failed),
            "queue": fix(config.queue),
            "destinations": dests,
        }
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors (``config/forwarder.schema.json``)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "forwarder configuration"
    return schema
