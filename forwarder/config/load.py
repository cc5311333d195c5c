"""Reading the YAML configuration: validation errors that name key and line, checks across
keys (routes naming destinations that exist, a destination's kind), and paths resolved
against the config file's folder.

Load once at start with :func:`load_config`; pass the resulting :class:`Config` into
constructors. Every problem is reported at once, one line each, as
``destinations[0].port (line 14): must be 1..65535``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from forwarder.config.models import (
    _DIMSE_ONLY,
    DEFAULT_CONFIG_PATH,
    Config,
    Destination,
    _shape_problem,
)
from forwarder.config.routing import modify_problems, route_problems
from forwarder.durations import parse_duration
from forwarder.errors import ConfigError


def config_path_from_env(explicit: str | None) -> str:
    """``-c`` if given, else ``$FORWARDER_CONFIG``, else the packaged default."""
    return explicit or os.environ.get("FORWARDER_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the config at ``path``; raise :class:`ConfigError` listing
    every problem. Relative folder paths are resolved against the config file's folder."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the config file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            source,
            [f"(line {line}): not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"],
        ) from None
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
    duplicates = list(_duplicate_keys(node, ()))
    if duplicates:  # YAML keeps the last silently: the file does not say one thing
        raise ConfigError(source, duplicates)
    _keep_written_values(data, node)
    lines = dict(_node_lines(node, ())) if node is not None else {}
    found: list[tuple[tuple[Any, ...], str]] = []
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # destination_shape: reported by _check_kind below, with the key and its line
        # destination_shape, route_shape: reported by the cross checks below, with key and line
        found = [
            _render(err)
            for err in exc.errors()
            if err["type"] not in ("destination_shape", "route_shape", "modify_shape")
        ]
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


def _duplicate_keys(node: yaml.Node | None, path: tuple[Any, ...]) -> Iterator[str]:
    """One problem per key given twice in a mapping (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key_node.tag != "tag:yaml.org,2002:merge" and key in seen:
                where = f"{_format_loc((*path, key))} (line {line})"
                yield f"{where}: given twice (also line {seen[key]}); give each key once"
            seen.setdefault(key, line)
            yield from _duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, i))


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _as_written(node: yaml.Node | None, value: Any) -> Any:
    """``value`` with every unquoted number in it as the text ``node`` has for it: a header
    value is text, and YAML reads 00123 as 83 (octal), 1.50 as 1.5, 12:30:00 as 45000."""
    if isinstance(node, yaml.ScalarNode):
        written = node.style is None and node.tag in _NUMBER_TAGS
        return node.value if written and not isinstance(value, bool) else value
    if isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        if len(node.value) != len(value):
            return value
        return [_as_written(n, v) for n, v in zip(node.value, value, strict=True)]
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        out = dict(value)
        for key_node, value_node in node.value:
            if key_node.value in out:
                out[key_node.value] = _as_written(value_node, out[key_node.value])
        return out
    return value


def _child(node: yaml.Node | None, key: Any) -> yaml.Node | None:
    found: yaml.Node | None = None
    if isinstance(node, yaml.MappingNode):
        found = next((v for k, v in node.value if k.value == key), None)
    elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        found = node.value[key]
    return found


def _keep_written_values(data: dict[str, Any], node: yaml.Node | None) -> None:
    """Route conditions and ``modify.set`` values as written (:func:`_as_written`)."""
    for section in ("routes", "destinations"):
        entries = data.get(section)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, dict):
                continue
            entry_node = _child(_child(node, section), i)
            if section == "routes" and isinstance(entry.get("match"), dict):
                entry["match"] = _as_written(_child(entry_node, "match"), entry["match"])
            modify = entry.get("modify")
            if isinstance(modify, dict) and isinstance(modify.get("set"), dict):
                set_node = _child(_child(entry_node, "modify"), "set")
                entry["modify"] = {**modify, "set": _as_written(set_node, modify["set"])}


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
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if isinstance(route, dict):
            for loc, message in route_problems(route):
                problems.append(_problem(("routes", i, *loc), message, lines))
    for section in ("destinations", "routes"):
        entries = data.get(section)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            modify = entry.get("modify") if isinstance(entry, dict) else None
            for loc, message in modify_problems(modify) if isinstance(modify, dict) else ():
                problems.append(_problem((section, i, "modify", *loc), message, lines))
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
    problems += _edit_conflicts(routes if isinstance(routes, list) else [], lines)
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


def _edit_conflicts(routes: list[Any], lines: dict[tuple[Any, ...], int]) -> list[str]:
    """Two routes that send the same file to the same destination with different changes
    (``modify``, ``deidentify``) would leave forwarder to pick one: refused where it is
    certain they match the same files (one matches everything, or both match alike); other
    overlaps are a per-file failure when a file meets them."""
    problems = []
    seen: list[tuple[int, dict[str, Any]]] = []
    for i, route in enumerate(routes):
        if not isinstance(route, dict) or route.get("action", "send") != "send":
            continue
        edits = {k: route.get(k) for k in ("modify", "deidentify") if route.get(k)}
        for j, other in seen:
            other_edits = {k: other.get(k) for k in ("modify", "deidentify") if other.get(k)}
            if edits == other_edits:
                continue
            shared = [
                d
                for d in route.get("to") or []
                if isinstance(d, str) and d in (other.get("to") or [])
            ]
            match, other_match = route.get("match") or {}, other.get("match") or {}
            if shared and (not match or not other_match or match == other_match):
                problems.append(
                    _problem(
                        ("routes", i, "to"),
                        f"routes[{j}] ({other.get('name')}) sends the same files to "
                        f"{', '.join(shared)} with other changes (modify/deidentify): give "
                        "them the same changes, or put the changes on the destination",
                        lines,
                    )
                )
        seen.append((i, route))
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
    listen = config.listen
    if listen is not None and listen.tls is not None:
        tls_listen = listen.tls.model_copy(
            update={
                "ca": fix(listen.tls.ca),
                "cert": fix(listen.tls.cert),
                "key": fix(listen.tls.key),
            }
        )
        listen = listen.model_copy(update={"tls": tls_listen})
    return config.model_copy(
        update={
            "listen": listen,
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
