"""``forwarder pause`` and ``forwarder resume``: stop and restart sending to one destination.

The pause is a row in the queue database (:mod:`forwarder.queue.control`), so it is kept across
restarts and a running daemon sees it within a second (its workers poll it; no signal is
needed). A file being sent when it is paused finishes; nothing more is claimed until resume.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import ForwarderError


def add_control_parser(sub: Any, command: str) -> None:
    pausing = command == "pause"
    p = sub.add_parser(
        command,
        help="stop sending to a destination" if pausing else "send to a paused destination again",
        description=(
            "Stop sending to DESTINATION: its files stay queued (a file being sent finishes). "
            "Kept across restarts until `forwarder resume`; a running daemon stops within a "
            "second."
            if pausing
            else "Resume sending to DESTINATION after `forwarder pause`; a running daemon "
            "starts again within a second."
        ),
    )
    add_config_option(p)
    p.add_argument("destination", metavar="DESTINATION", help="a destination name of the config")
    p.set_defaults(func=run_control, control=command)


def run_control(args: argparse.Namespace) -> int:
    command = str(args.control)
    _, config = load_or_report(args, command)
    if config is None:
        return EXIT_CONFIG
    names = [d.name for d in config.destinations]
    if args.destination not in names:
        print(
            f"forwarder {command}: no destination {args.destination!r} in the config "
            f"(known: {', '.join(names)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from forwarder.cli._queue import open_to_write

    try:
        config.queue.parent.mkdir(parents=True, exist_ok=True)
        with open_to_write(config.queue, create=True) as queue:
            if command == "pause":
                changed = queue.pause(args.destination)
            else:
                changed = queue.resume(args.destination)
    except (ForwarderError, OSError) as exc:
        print(f"forwarder {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if command == "pause":
        said = "paused" if changed else "was already paused"
    else:
        said = "resumed" if changed else "was not paused"
    print(f"forwarder {command}: {args.destination} {said}", file=sys.stderr)
    return EXIT_OK
