"""``-c CONFIG`` handling shared by run, check-config, status and retry."""

from __future__ import annotations

import argparse
import sys

from forwarder.config import Config, config_path_from_env, load_config
from forwarder.errors import ConfigError
from forwarder.logsetup import journal_prefix


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="config file (default $FORWARDER_CONFIG, else /etc/forwarder/forwarder.yaml)",
    )


def load_or_report(args: argparse.Namespace, command: str) -> tuple[str, Config | None]:
    """Load the config; on errors print one line per problem to stderr and return None."""
    path = config_path_from_env(args.config)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        prefix = journal_prefix()  # under systemd: journal priority err, not info
        for problem in exc.problems:
            print(f"{prefix}{exc.source}: {problem}", file=sys.stderr)
        print(f"{prefix}forwarder {command}: invalid config file {path}", file=sys.stderr)
        return path, None
