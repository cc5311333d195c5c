"""``forwarder explain [-c CONFIG] [--json] FILE...``: what the daemon would do with each file.

Every route, matched or the condition that failed (key, expected, the file's value); the
destinations with their priority; the attribute changes each would receive (old -> new). No
network, no queue: the document is :func:`forwarder.daemon.explain.explain_file`'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="what the routes would do with files (no network, no queue)",
        description="For each FILE: every route, whether it matches and if not which condition "
        "fails (key, expected, the file's value); the destinations and their priority; the "
        "attribute changes (modify, deidentify) each destination would receive, old -> new. "
        "Nothing is sent and nothing is written. `folder` conditions see the path under "
        "incoming when FILE is there, else its name. Exit status: 0 when every file would be "
        "sent or discarded, 1 when one would go to failed/ (not usable DICOM, no route, "
        "conflicting changes), 78 on a bad config, 2 on a bad command line.",
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _, config = load_or_report(args, "explain")
    if config is None:
        return EXIT_CONFIG
    from forwarder.daemon.explain import explain_file, router_for

    router = router_for(config)
    docs = [explain_file(Path(f), config, router) for f in args.files]
    if args.json:
        print(json.dumps({"files": docs}, indent=2))
    else:
        for n, doc in enumerate(docs):
            if n:
                print()
            print_text(doc)
    ok = all(d["outcome"] in ("send", "discard") for d in docs)
    return EXIT_OK if ok else EXIT_FAILED


def _value(value: str | None) -> str:
    return "(absent)" if value is None else repr(value.strip(" \x00"))


def print_text(doc: dict[str, Any]) -> None:
    origin = f", from {doc['calling_ae']}" if "calling_ae" in doc else ""
    print(f"{doc['file']}  (as {doc['rel_path']}{origin})")
    if doc["outcome"] == "error":
        print(f"  => failed/: {doc['error']}")
        return
    for r in doc["routes"]:
        kind = " (discard)" if r["action"] == "discard" else ""
        if r["matched"]:
            where = "" if r["action"] == "discard" else f" -> {', '.join(r['to'])}"
            print(f"  route {r['route']}{kind}: matched{where}")
        else:
            f = r["failed"]
            print(
                f"  route {r['route']}{kind}: not matched: {f['key']} is {_value(f['actual'])}, "
                f"expected {f['expected']}"
            )
    if doc["outcome"] == "discard":
        print(f"  => done/, nothing sent: discarded by route {', '.join(doc['discarded_by'])}")
        return
    if doc["outcome"] == "no route":
        print("  => failed/: no route matches this file")
        return
    for d in doc["destinations"]:
        print(f"  => {d['destination']} (priority {d['priority']})")
        if d["conflict"]:
            print(f"       failed/: conflicting changes: {d['conflict']}")
        elif d["error"]:
            print(f"       failed/: {d['error']}")
        elif not d["changes"]:
            print("       sent unchanged")
        else:
            print(f"       changes ({'; '.join(d['steps'])}):")
            for c in d["changes"]:
                old = "(absent)" if c["old"] is None else repr(c["old"])
                new = "(removed)" if c["new"] is None else repr(c["new"])
                print(f"         {c['tag']} {c['keyword']}: {old} -> {new}")
