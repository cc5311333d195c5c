"""``forwarder retry``: put failed items back into the queue (files come back from failed/)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.crashpoints import crash_point
from forwarder.errors import ForwarderError, PathQueuedError

if TYPE_CHECKING:
    from forwarder.daemon.spool import Spool
    from forwarder.queue import Queue


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


def _free(path: Path, skip: frozenset[Path] = frozenset()) -> Path:
    """``path``, or ``a.retryN.dcm`` beside it, whichever is free: nothing there, not even a
    symlink pointing nowhere (a file a modality is about to write through it), and not in
    ``skip``. Free now: the move never replaces what is put there meanwhile
    (:func:`_place`)."""
    from forwarder.daemon.spool import numbered

    candidate, n = path, 0
    while os.path.lexists(candidate) or candidate in skip:
        n += 1
        candidate = path.with_name(numbered(path.name, f"retry{n}"))
    return candidate


def _place(
    queue: Queue, spool: Spool, file_id: int, source: Path, target: Path, incoming: Path
) -> Path | None:
    """Move ``source`` back to ``target``, the path ``file_id`` is queued under. When another
    file was put there after the name was chosen (a modality writing into incoming), it is
    not replaced: the row moves to another free name first, and the file goes there. Returns
    where it went; None when a daemon had already taken that other file for this row's (it
    sends that one): this file stays in failed/ with its report, listed for the next retry.
    Raises SpoolError (the file stays in failed/, queued: the next retry moves it)."""
    from forwarder.daemon.spool import TAKEN_TRIES, TargetTakenError

    first, tried = target, set[Path]()
    for _ in range(TAKEN_TRIES):
        try:
            _move_back(spool, source, target)
            return target
        except TargetTakenError as exc:
            print(f"forwarder retry: {exc}", file=sys.stderr)
        tried.add(target)
        while True:
            new = _free(first, frozenset(tried))
            rel = new.relative_to(incoming).as_posix()
            try:
                if not queue.rename_requeued(file_id, str(new), rel):
                    return None
            except PathQueuedError:
                tried.add(new)
                continue
            break
        target = new
    from forwarder.daemon.spool import SpoolError

    raise SpoolError(f"cannot move {source} back: every name tried was taken; it stays queued")


def _left_behind(queue: Queue, file_id: int) -> Path | None:
    """The file an interrupted ``forwarder retry`` left in failed/: still at the final path of
    a file ``file_id`` was retried from (None when there is none). A name freed in failed/ may
    have been given to another file since, even one with the same SOP Instance UID (the same
    object sent again, changed): only one with the UID, size and mtime recorded is it (a move
    keeps the size and mtime)."""
    from forwarder.dicom.part10 import read_meta
    from forwarder.errors import InvalidFileError

    for path, uid, size, mtime_ns in queue.retried_from(file_id):
        if not _as_recorded(Path(path), size, mtime_ns):
            continue
        try:
            if read_meta(path).sop_instance_uid == uid:
                return Path(path)
        except InvalidFileError:  # gone, unreadable, or not DICOM: not the file left there
            continue
    return None


def _as_recorded(path: Path, size: int, mtime_ns: int) -> bool:
    """Whether the file at ``path`` has the size and mtime recorded (False when it is gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


def _drop_error_json(path: Path) -> None:
    """Remove ``path``'s ``NAME.error.json``, if any (SpoolError when it cannot be)."""
    from forwarder.daemon.spool import SpoolError

    error_json = path.with_name(path.name + ".error.json")
    try:
        error_json.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpoolError(f"cannot remove {error_json}: {exc.strerror or exc}") from None


def _move_back(spool: Spool, source: Path, target: Path) -> None:
    """Move ``source`` (in failed/) to ``target``, its ``.error.json`` removed first: a kill
    between the two leaves the file in failed/ and queued, which the next retry finishes; the
    other way round, the file, delivered later, would keep a report in failed/ saying it
    failed. A move that fails puts the report back (the file stays in failed/, queued), whole
    or not at all: a kill or a full disk while it is written leaves no report, never a cut
    one (the next retry finishes the move)."""
    from forwarder.daemon.spool import SpoolError, write_whole

    error_json = source.with_name(source.name + ".error.json")
    try:
        report: bytes | None = error_json.read_bytes()
    except OSError:
        report = None
    _drop_error_json(source)
    try:
        spool.move(source, target)
    except ForwarderError:
        if report is not None and os.path.lexists(source):
            try:
                write_whole(error_json, report, sync_dir=True)
            except SpoolError as exc:
                print(
                    f"forwarder retry: {exc}: the report is not put back (the file stays "
                    "queued: the next `forwarder retry` moves it)",
                    file=sys.stderr,
                )
        raise


def _taken_over(source: Path, target: Path) -> str:
    return (
        f"forwarder retry: {source}: left in failed/ as it is: another file was put at "
        f"{target} meanwhile, and the daemon queued that one in its place; run `forwarder "
        "retry` again to requeue this one"
    )


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
    from forwarder.cli._queue import open_to_write
    from forwarder.daemon.noreplace import same_file
    from forwarder.daemon.spool import Spool, SpoolError

    requeued = skipped = left_failed = 0
    try:
        with open_to_write(config.queue) as queue:
            spool = Spool(config.incoming, config.done, config.failed)
            # A retry killed between queueing a file and moving it back left it in failed/:
            # the move is finished now, before the daemon (started or running) fails the file
            # as gone from incoming.
            for file_id, path, rel, size, mtime_ns in queue.retried_queued():
                # A file at the path may be another one, put there after that retry chose
                # the name: the file retried is then still in failed/.
                left = _left_behind(queue, file_id)
                if left is None:
                    continue
                if same_file(left, path):  # a move killed half way: the file is at both
                    with contextlib.suppress(OSError):
                        left.unlink()
                    continue
                if _as_recorded(Path(path), size, mtime_ns):
                    # Its own version is at its path (moved back): what is in failed/ is
                    # another file, left alone with its report.
                    continue
                try:
                    placed = _place(queue, spool, file_id, left, Path(path), config.incoming)
                except SpoolError as exc:  # this file only: it stays queued in failed/
                    print(f"forwarder retry: {exc}", file=sys.stderr)
                    left_failed += 1
                    continue
                if placed is None:  # listed as failed again: requeued afresh below
                    print(
                        f"forwarder retry: {left}: another file was put at {path} meanwhile, "
                        "and the daemon queued that one in its place; this one is requeued "
                        "afresh",
                        file=sys.stderr,
                    )
                    continue
                requeued += 1
                rel = placed.relative_to(config.incoming).as_posix()
                print(f"requeued {rel} (an interrupted retry finished)")
            for f in queue.failed_files(args.destination):
                source = Path(f.final_path)
                if not source.exists():
                    # Never there: that retry was killed before its move, and the daemon then
                    # failed the copy it could not find. The file is where it was left.
                    left = _left_behind(queue, f.file_id)
                    if left is not None:
                        try:
                            _drop_error_json(source)
                        except SpoolError as exc:  # this file only: queued, left behind
                            print(f"forwarder retry: {exc}", file=sys.stderr)
                            left_failed += 1
                            continue
                        source = left
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
                # The failures not retried now stand: the file is not delivered until those
                # destinations store it too (a later `retry --destination`).
                kept = [d for d in f.destinations if d in names and d not in dests]
                try:
                    new_id = queue.requeue_failed(
                        f.file_id, str(target), rel, dests, still_failed=kept
                    )
                except PathQueuedError:
                    # Not on disk, yet queued: a file dropped again under this name, which the
                    # daemon has not finished (or a daemon killed while moving it out).
                    print(
                        f"forwarder retry: {source}: left in failed/ as it is: the queue still "
                        f"holds an unfinished file under {target}; run `forwarder retry` again "
                        "once the daemon has finished that one",
                        file=sys.stderr,
                    )
                    left_failed += 1
                    continue
                crash_point("retry-before-move")
                try:
                    placed = _place(queue, spool, new_id, source, target, config.incoming)
                except SpoolError as exc:  # this file only: queued, the next retry moves it
                    print(f"forwarder retry: {exc}", file=sys.stderr)
                    left_failed += 1
                    continue
                if placed is None:
                    print(_taken_over(source, target), file=sys.stderr)
                    left_failed += 1
                    continue
                rel = placed.relative_to(config.incoming).as_posix()
                crash_point("retry-after-move")
                requeued += 1
                print(f"requeued {rel} for {', '.join(dests)}")
    except ForwarderError as exc:
        print(f"forwarder retry: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = f"{requeued} files requeued, {skipped} skipped"
    if left_failed:
        summary += f", {left_failed} left in failed/ (see above)"
    print(f"forwarder retry: {summary}", file=sys.stderr)
    return EXIT_FAILED if left_failed else EXIT_OK
