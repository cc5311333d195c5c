"""``forwarder resume [-c CONFIG] DESTINATION`` (see :mod:`forwarder.cli._control`)."""

from __future__ import annotations

import argparse
from typing import Any

from forwarder.cli._control import add_control_parser, run_control


def add_parser(sub: Any) -> None:
    add_control_parser(sub, "resume")


def run(args: argparse.Namespace) -> int:
    return run_control(args)
