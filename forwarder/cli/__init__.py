"""The ``forwarder`` command: one sub-module per sub-command.

Each sub-module defines ``add_parser(subparsers)`` (registering its parser with
``set_defaults(func=run)``) and ``run(args) -> int``. Only this package prints or exits.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from forwarder import __version__

# Exit codes (CONTRACT.md).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CONFIG = 78  # EX_CONFIG: the systemd unit does not restart on it

_COMMANDS = (
    "run",
    "send",
    "echo",
    "receive",
    "check_config",
    "status",
    "retry",
    "find",
    "explain",
    "pause",
    "resume",
)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage, which is the contract's code; keep the message one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(
    only: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The full parser; with ``only``, just that sub-command's module is imported (start-up
    time matters for ``send`` in scripts: ``receive`` would import pynetdicom and pydicom)."""
    parser = _Parser(
        prog="forwarder",
        description="DICOM forwarding daemon and C-STORE/C-ECHO/Storage SCP tools.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMANDS if only is None else [only]:
        try:
            module = importlib.import_module(f"forwarder.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"forwarder.cli.{name}":
                raise
            continue  # a command not built into this installation
        module.add_parser(sub)
    for command in sub.choices.values():
        # dcmsnd and storescu take -V after the command too (forwarder send -V).
        command.add_argument(
            "-V", "--version", action="version", version=f"forwarder {__version__}"
        )
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    wanted = args_list[0].replace("-", "_") if args_list else None
    parser, commands = build_parser(wanted if wanted in _COMMANDS else None)
    if args_list and args_list[0] in commands:
        # Options may follow the files (storescu: HOST PORT FILE... -aec X): argparse only
        # handles that with parse_intermixed_args, which does not support sub-parsers, so
        # the sub-command's own parser does the parsing.
        args = commands[args_list[0]].parse_intermixed_args(args_list[1:])
    else:
        args = parser.parse_args(args_list)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


def setup_logging(verbose: int = 0, quiet: bool = False, level: str | None = None) -> None:
    """Plain-text logging to stderr for the interactive tools (the daemon uses logsetup)."""
    if level is not None:
        lvl = getattr(logging, level.upper(), logging.INFO)
    elif quiet:
        lvl = logging.ERROR
    elif verbose >= 2:
        lvl = logging.DEBUG
    elif verbose == 1:
        lvl = logging.INFO
    else:
        lvl = logging.WARNING
    logging.basicConfig(
        level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # pynetdicom is chatty at INFO; keep it one level quieter than ours.
    logging.getLogger("pynetdicom").setLevel(max(lvl, logging.WARNING) if lvl > 10 else lvl)
