"""``forwarder status``: queue state per destination, read from the queue database."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import ForwarderError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="queue state per destination",
        description="Pending, in-flight, done and failed counts per destination, the age of "
        "the oldest pending item, the last error since a file was last stored, and whether "
        "the destination is up, down (unreachable, refusing or rejecting associations: its "
        "files stay queued), paused or outside its send window, and since when, read from the "
        "queue database (works while the daemon runs).",
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


#: What the text output says of a destination that is not up.
_STATE_TEXT = {
    "down": "files stay queued",
    "paused": "files stay queued until `forwarder resume`",
    "outside_window": "files wait for the send window",
}


def run(args: argparse.Namespace) -> int:
    _, config = load_or_report(args, "status")
    if config is None:
        return EXIT_CONFIG
    from forwarder.daemon.status import format_age, listen_status, read_status
    from forwarder.queue import Queue

    names = [d.name for d in config.destinations]
    proof = [d.name for d in config.destinations if d.storage_commitment or d.verify_by_query]
    try:
        if os.path.exists(config.queue):
            # read_only: an older schema is read as it is, never upgraded under a daemon
            # of an older forwarder still running on it (until it is restarted)
            with Queue(config.queue, read_only=True) as queue:
                status = read_status(queue, names, proof)
        else:
            status = read_status(None, names, proof)
    except ForwarderError as exc:
        print(f"forwarder status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    result = status.destinations
    listen = listen_status(config.listen, config.incoming, config.ae_title)
    if args.json:
        # The contract's shape (and "listen" when configured); the finishing problem shows in
        # the text output.
        doc = status.document()
        if listen is not None:
            doc["listen"] = listen
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"{'DESTINATION':<20} {'PENDING':>8} {'IN FLIGHT':>9} {'DONE':>8} {'FAILED':>7}  OLDEST")
    for name, r in result.items():
        oldest = r["oldest_pending_seconds"]
        age = "-" if oldest is None else format_age(oldest)
        extra = "" if name in names else "  (not in config)"
        print(
            f"{name:<20} {r['pending']:>8} {r['in_flight']:>9} {r['done']:>8} {r['failed']:>7}"
            f"  {age}{extra}"
        )
        if "awaiting_commitment" in r:
            print(
                f"  proof of delivery: {r['stored']} stored, {r['awaiting_commitment']} awaiting "
                f"commitment, {r['committed']} committed, {r['commitment_failures']} not "
                "committed (sent again or failed)"
            )
        if r["state"] in _STATE_TEXT:
            since = status.since[name]
            print(
                f"  {r['state'].upper().replace('_', ' ')} since {r['state_since']} "
                f"({format_age(max(0.0, time.time() - since))}): {_STATE_TEXT[r['state']]}"
            )
        if r["last_error"]:
            print(f"  last error: {r['last_error']}")
    if listen is not None:
        free = listen["free_space"]
        shown = "unknown" if free is None else f"{free // 2**20} MB"
        state = (
            "accepting objects"
            if listen["accepting"]
            else "REFUSING objects (0xA700, out of resources): free space below min_free_space"
        )
        print(
            f"listen: port {listen['port']}: {state} ({shown} free on {config.incoming}, "
            f"min_free_space {listen['min_free_space'] // 2**20} MB)"
        )
    if status.waiting_to_move:  # nothing waits: an old finishing error is history
        print(
            f"{status.waiting_to_move} delivered or failed files wait to be moved out of incoming"
            + (f"; last error: {status.finishing_error}" if status.finishing_error else "")
        )
    return EXIT_OK
