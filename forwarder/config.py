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

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

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


class Destination(_Model):
    """A peer that receives C-STORE requests."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    associations: int = Field(1, ge=1, le=32, description="parallel associations")
    connect_timeout: Duration = Field(10.0, description="TCP connect + association negotiation")
    response_timeout: Duration = Field(60.0, description="wait for a C-STORE response")
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
    problems: list[str] = []
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_render(err, lines) for err in exc.errors()]
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


def _render(err: Any, lines: dict[tuple[Any, ...], int]) -> str:
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
    return _problem(loc, message, lines)


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
