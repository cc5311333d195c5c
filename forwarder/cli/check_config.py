"""``forwarder check-config``: validate a config file and print every problem."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from forwarder.cli import EXIT_CONFIG, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import TLSSetupError

if TYPE_CHECKING:
    from forwarder.config import Config


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: every problem on its own line with the key path "
        "and YAML line. Exit 0 when valid, 78 when not.",
    )
    add_config_option(p)
    p.add_argument("--schema", action="store_true", help="print the config's JSON Schema")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.schema:
        import json

        from forwarder.config import json_schema

        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    path, config = load_or_report(args, "check-config")
    if config is None:
        return EXIT_CONFIG
    from forwarder.daemon.service import association_settings

    problems = []
    for i, dest in enumerate(config.destinations):
        try:
            association_settings(dest, config)
        except TLSSetupError as exc:
            problems.append(f"destinations[{i}].tls: {exc}")
        except OSError as exc:
            problems.append(f"destinations[{i}].tls: {exc}")
    problems += _literal_problems(config)
    if config.listen is not None and config.listen.tls is not None:
        from forwarder.net.tls import server_context

        tls = config.listen.tls
        try:
            server_context(tls.cert, tls.key, tls.ca)  # as the listener loads it at start
        except TLSSetupError as exc:
            problems.append(f"listen.tls: {exc}")
    if problems:
        for p in problems:
            print(f"{path}: {p}", file=sys.stderr)
        return EXIT_CONFIG
    routes = (
        "every file to every destination"
        if config.routes is None
        else (f"{len(config.routes)} routes")
    )
    from forwarder.config.routing import bracket_notes

    for note in bracket_notes(config.routes):
        print(f"{path}: note: {note}")
    print(f"{path}: OK ({len(config.destinations)} destinations, {routes})")
    return EXIT_OK


def _literal_problems(config: Config) -> list[str]:
    """``set`` values no object can hold (they would fail every file at send time)."""
    from forwarder.dicom.edit import literal_problem

    blocks = [(f"destinations[{i}]", d.modify) for i, d in enumerate(config.destinations)]
    blocks += [(f"routes[{i}]", r.modify) for i, r in enumerate(config.routes or ())]
    out = []
    for where, modify in blocks:
        for keyword, template in (modify.set if modify is not None else {}).items():
            problem = literal_problem(keyword, template)
            if problem is not None:
                out.append(f"{where}.modify.set.{keyword}: {problem}")
    return out
