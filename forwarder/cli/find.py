"""``forwarder find``: every file of a Study, Series or SOP Instance UID or an Accession Number
the queue knows, where it is now and its state per destination (read from the queue database).

The lookup is :meth:`forwarder.queue.Queue.find`; the JSON document is
:func:`forwarder.daemon.status.find_document`, the status page's ``/api/find`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import ForwarderError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "find",
        help="where the files of a study, series, instance or accession are",
        description="Every file the queue knows (queued, or finished and not yet pruned) whose "
        "Study, Series or SOP Instance UID or Accession Number is one of KEY: where it is now "
        "(incoming, done/ or failed/) and its state per destination (pending with its next "
        "attempt, sending, stored at a time with its status, failed with the reason). Read "
        "from the queue database (works while the daemon runs). Exit status: 0 when a file was "
        "found, 1 when none was (or the queue cannot be read), 78 on a bad config.",
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "keys",
        nargs="+",
        metavar="KEY",
        help="a Study, Series or SOP Instance UID, or an Accession Number",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _, config = load_or_report(args, "find")
    if config is None:
        return EXIT_CONFIG
    from forwarder.daemon.status import find_document
    from forwarder.queue import Queue

    keys: list[str] = list(args.keys)
    found = []
    try:
        if os.path.exists(config.queue):
            # read_only: an older schema is read as it is, never upgraded under a daemon
            # of an older forwarder still running on it (until it is restarted)
            with Queue(config.queue, read_only=True) as queue:
                found = queue.find(keys)
    except ForwarderError as exc:
        print(f"forwarder find: {exc}", file=sys.stderr)
        return EXIT_FAILED
    doc = find_document(keys, found)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_text(doc)
    if not found:
        print(f"forwarder find: no file of {', '.join(keys)} in the queue", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def print_text(doc: dict[str, Any]) -> None:
    """One block per file: where it is, what it matched, its UIDs, then one line per
    destination."""
    from forwarder.daemon.status import job_summary, origin_text

    for n, f in enumerate(doc["files"]):
        if n:
            print()
        print(f"{f['rel_path']}  ({f['where']}, file {f['file_id']})")
        print(f"  path: {f['path']}")
        matched = ", ".join(f"{m['as']} {m['key']}" for m in f["matched"])
        print(f"  matched: {matched}")
        print(f"  SOP Instance UID: {f['sop_instance_uid']}")
        if f["series_instance_uid"]:
            print(f"  Series Instance UID: {f['series_instance_uid']}")
        if f["study_instance_uid"]:
            print(f"  Study Instance UID: {f['study_instance_uid']}")
        received = origin_text(f.get("origin"))
        if received:
            print(f"  {received}")
        print(f"  queued at {f['queued_at']}")
        if f["finished_at"]:
            print(f"  finished at {f['finished_at']}")
        if f["retried_as"] is not None:
            print(f"  retried: queued again as file {f['retried_as']}")
        for d in f["destinations"]:
            print(f"  {d['destination']}: {job_summary(d)}")
