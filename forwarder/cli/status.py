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
        "the destination is up or down (unreachable, refusing or rejecting associations: its "
        "files stay queued) and since when, read from the queue database (works while the "
        "daemon runs).",
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _, config = load_or_report(args, "status")
    if config is None:
        return EXIT_CONFIG
    from forwarder.queue import Queue

    names = [d.name for d in config.destinations]
    result: dict[str, dict[str, Any]] = {}
    finishing: dict[str, Any] = {"waiting": 0, "last_error": None}
    states: dict[str, Any] = {}
    if os.path.exists(config.queue):
        try:
            with Queue(config.queue, create=False) as queue:
                stats = queue.stats(destinations=names)
                finishing["waiting"] = queue.waiting_to_move()
                problem = queue.problems().get("finish")
                states = queue.destination_states()
                if problem is not None:
                    finishing["last_error"] = problem[0]
        except ForwarderError as exc:
            print(f"forwarder status: {exc}", file=sys.stderr)
            return EXIT_FAILED
        for name, s in stats.items():
            result[name] = {
                "pending": s.pending,
                "in_flight": s.in_flight,
                "done": s.done,
                "failed": s.failed,
                "oldest_pending_seconds": s.oldest_pending_seconds,
                "last_error": s.last_error,
            }
    for name in names:
        result.setdefault(
            name,
            {
                "pending": 0,
                "in_flight": 0,
                "done": 0,
                "failed": 0,
                "oldest_pending_seconds": None,
                "last_error": None,
            },
        )
    for name, r in result.items():
        # Never recorded: the daemon has not needed an association yet, nothing says it is down.
        st = states.get(name)
        r["state"] = st.state if st is not None else "up"
        r["state_since"] = _iso(st.since) if st is not None else None
        if st is not None and st.state == "down" and st.error:
            r["last_error"] = st.error  # what holds every file, not one file's last failure
    if args.json:
        # Exactly the contract's shape; the finishing problem shows in the text output.
        print(json.dumps({"destinations": result}, indent=2))
        return EXIT_OK
    print(f"{'DESTINATION':<20} {'PENDING':>8} {'IN FLIGHT':>9} {'DONE':>8} {'FAILED':>7}  OLDEST")
    for name, r in result.items():
        oldest = r["oldest_pending_seconds"]
        age = "-" if oldest is None else _age(oldest)
        extra = "" if name in names else "  (not in config)"
        print(
            f"{name:<20} {r['pending']:>8} {r['in_flight']:>9} {r['done']:>8} {r['failed']:>7}"
            f"  {age}{extra}"
        )
        if r["state"] == "down":
            since = states[name].since
            print(
                f"  DOWN since {r['state_since']} ({_age(max(0.0, time.time() - since))}): "
                "files stay queued"
            )
        if r["last_error"]:
            print(f"  last error: {r['last_error']}")
    if finishing["waiting"]:  # nothing waits: an old finishing error is history
        print(
            f"{finishing['waiting']} delivered or failed files wait to be moved out of incoming"
            + (f"; last error: {finishing['last_error']}" if finishing["last_error"] else "")
        )
    return EXIT_OK


def _iso(at: float) -> str:
    """Local time with its UTC offset, to the second (ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"
