"""``forwarder retry``: put failed items back into the queue (files come back from failed/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import ForwarderError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "retry",
        help="requeue failed files",
        description="Move files that failed back from failed/ into incoming and queue them "
        "again for the destinations that failed (or only --destination NAME). Files rejected "
        "before queueing (not DICOM, no route) are not touched: fix and copy them back by hand.",
    )
    add_config_option(p)
    p.add_argument("--destination", metavar="NAME", help="only files that failed for NAME")
    p.set_defaults(func=run)


def _free(path: Path) -> Path:
    from forwarder.daemon.spool import numbered

    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(numbered(path.name, f"retry{n}"))
    return candidate


def run(args: argparse.Namespace) -> int:
    _, config = load_or_report(args, "retry")
    if config is None:
        return EXIT_CONFIG
    names = {d.name for d in config.destinations}
    if args.destination and args.destination not in names:
        print(
            f"forwarder retry: no destination {args.destination!r} in the config "
            f"(known: {', '.join(sorted(names))})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if not os.path.exists(config.queue):
        print("forwarder retry: nothing to retry (no queue database yet)", file=sys.stderr)
        return EXIT_OK
    from forwarder.daemon.spool import Spool
    from forwarder.queue import Queue

    requeued = skipped = 0
    try:
        with Queue(config.queue, create=False) as queue:
            spool = Spool(config.incoming, config.done, config.failed)
            for f in queue.failed_files(args.destination):
                source = Path(f.final_path)
                if not source.exists():
                    print(
                        f"forwarder retry: {source} is no longer in failed/; skipped",
                        file=sys.stderr,
                    )
                    skipped += 1
                    continue
                dests = (
                    [args.destination]
                    if args.destination
                    else [d for d in f.destinations if d in names]
                )
                if not dests:
                    skipped += 1
                    continue
                target = _free(config.incoming / f.rel_path)
                rel = target.relative_to(config.incoming).as_posix()
                # Queue first, then move: the watcher then sees a file that is already queued.
                queue.requeue_failed(f.file_id, str(target), rel, dests)
                spool.move(source, target)
                error_json = source.with_name(source.name + ".error.json")
                if error_json.exists():
                    error_json.unlink()
                requeued += 1
                print(f"requeued {rel} for {', '.join(dests)}")
    except ForwarderError as exc:
        print(f"forwarder retry: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"forwarder retry: {requeued} files requeued, {skipped} skipped", file=sys.stderr)
    return EXIT_OK
