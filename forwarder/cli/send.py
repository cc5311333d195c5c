"""``forwarder send``: manual C-STORE of files and directory trees (dcmsnd / storescu drop-in).

One command's flow in one module (past 400 lines on purpose): its options, the check of every
file before any association, the parallel senders, the report and the exit code. Addressing and
the options it shares with ``echo`` are :mod:`forwarder.cli._net`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forwarder.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    _stgcmt,
    setup_logging,
)
from forwarder.cli._argtypes import positive
from forwarder.cli._net import (
    Target,
    WebTarget,
    add_association_options,
    config_destination,
    resolve_or_report,
)
from forwarder.daemon.channels import SendChannel
from forwarder.dicom.check import check_file
from forwarder.dicom.part10 import FileMeta, read_meta
from forwarder.errors import InvalidFileError
from forwarder.net.channel import Channel, SendOutcome, StoreRequest
from forwarder.net.contexts import group_by_contexts
from forwarder.net.status import Outcome

if TYPE_CHECKING:
    from forwarder.dicom.edit import Editor

logger = logging.getLogger("forwarder.send")

_HELP_NOTES = """\
TARGET is AET[@host[:port]] (dcmsnd; host localhost, port 104), or HOST PORT (storescu; the called
AE from -c/--called-aet, default ANY-SCP), or --destination NAME -c CONFIG, or a DICOMweb service
root http(s)://host/dicom-web: the files go by STOW-RS (several per request, as they are on disk;
--associations parallel requests; --bearer-token-file or --user/--password-file; the --tls-*
options), with the same report and exit status.

Presentation contexts are planned from the files: one per (SOP class, transfer syntax) plus an
uncompressed fallback in a separate context; over 128 contexts take further associations. A file
the peer accepts only uncompressed is decompressed (lossy sources only with
--allow-lossy-decompress) and sent Explicit VR Little Endian.

Seed options: -connectTO/-acceptTO/-rspTO/-releaseTO take milliseconds, -sndpdulen/-rcvpdulen
KB, -async N is --associations N, -lowprior/-highprior set the priority, -bufsize KB sets how much
of a data set goes into one socket write. -pdv1 is accepted and changes nothing: forwarder always
sends one PDV per P-DATA PDU. -a ends each association with A-ABORT.

Every file is checked end to end before the first association, with the same check the daemon
applies at ingest (every element's length, every sequence closed, the data set's own SOP Class and
Instance UID, pixel data matching the transfer syntax): a broken file is refused with one line
naming the file and the fault and is never sent. --no-check sends files as they are (meta header
only; experts, for peers that must receive broken data).

--stgcmt: after storing, one N-ACTION (Storage Commitment Push Model) asks the peer to commit
every instance it stored; the report is taken on that association, or with --stgcmt-port PORT on
an association the peer opens to our calling AE title on PORT (the peer must have that address
for our AE title); what is not committed within --stgcmt-timeout (default 60s) counts as not
committed: a NOT COMMITTED line, "commitment" in --report, and exit status 1.

Directories are walked recursively, symlinked folders too (each real folder once); hidden files
and folders are skipped; a pipe, socket or device is named and not sent.

Exit status: 0 every file stored (Success or Warning); 1 at least one file not stored (or, with
--stgcmt, not committed); 2 bad
command line, or no file found to send; 3 the peer could not be reached or refused the
association and nothing was stored; 78 invalid config file. A timeout of 0 means none.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="C-STORE files and directory trees to a peer",
        description="Store DICOM files at a peer (C-STORE), like dcmsnd or storescu.",
        epilog=_HELP_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("args", nargs="*", metavar="TARGET FILE|DIR", help="where, then what")
    add_association_options(p)
    g = p.add_argument_group("sending")
    g.add_argument(
        "--associations",
        "-async",
        dest="associations",
        type=positive,
        metavar="N",
        help="parallel associations (default 1; dcmsnd -async)",
    )
    g.add_argument("--priority", choices=("low", "medium", "high"), help="default medium")
    g.add_argument(
        "-lowprior", dest="priority", action="store_const", const="low", help=argparse.SUPPRESS
    )
    g.add_argument(
        "-highprior", dest="priority", action="store_const", const="high", help=argparse.SUPPRESS
    )
    g.add_argument(
        "--repeat", "-r", type=positive, default=1, metavar="N", help="send everything N times"
    )
    g.add_argument(
        "--abort", "-a", action="store_true", help="end with A-ABORT instead of A-RELEASE"
    )
    g.add_argument(
        "--allow-lossy-decompress",
        action="store_true",
        help="decompress lossy files for peers that accept only uncompressed",
    )
    g.add_argument(
        "--buffer-size",
        "-bufsize",
        dest="buffer_size",
        type=positive,
        metavar="KB",
        help="data set bytes per socket write (default 1024)",
    )
    g.add_argument("-pdv1", action="store_true", help=argparse.SUPPRESS)
    g.add_argument(
        "--no-check",
        action="store_true",
        help="send files as they are, without the end-to-end data set check (experts only)",
    )
    g.add_argument("--report", metavar="FILE.json", help="write one JSON record per file")
    _stgcmt.add_options(p)
    o = p.add_argument_group("output")
    o.add_argument("-v", "--verbose", action="count", default=0, help="one line per file")
    o.add_argument("-d", "--debug", action="store_true", help="debug logging")
    o.add_argument("-q", "--quiet", action="store_true", help="errors only, no summary")
    o.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=run)


@dataclass(slots=True)
class _Stats:
    files_total: int
    bytes_total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    bytes_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_NOT_REGULAR = "not a regular file (a pipe, socket or device), not sent"


def collect_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand directories recursively (hidden files and folders skipped), in sorted order.
    Symlinked folders are followed, as storescu ``+sd +r`` and dcmsnd do; each real folder is
    walked once, so a link back up the tree ends there.

    Returns the files and (path, reason) for what cannot be sent: arguments that do not exist,
    folders that cannot be listed (os.walk would drop them without a word), and pipes, sockets
    and devices (opening a pipe would wait for a writer for ever).
    """
    files: list[str] = []
    missing: list[tuple[str, str]] = []
    for arg in paths:
        if os.path.isdir(arg):
            _walk(arg, set(), files, missing)
        elif os.path.isfile(arg):
            files.append(arg)
        elif os.path.exists(arg):
            missing.append((arg, _NOT_REGULAR))
        else:
            missing.append((arg, "no such file or directory"))
    return files, missing


def _walk(folder: str, walked: set[str], files: list[str], missing: list[tuple[str, str]]) -> None:
    """``folder``'s files in name order, then its folders' in name order, as ``os.walk`` top
    down would give them, but classified by the type the listing gives (no ``stat`` for a plain
    file: 2000 files are 2000 system calls fewer). Links are followed (``is_file``/``is_dir``
    stat what a link points to); a folder already walked under another name is not again."""
    real = os.path.realpath(folder)
    if real in walked:
        return
    walked.add(real)
    try:
        with os.scandir(folder) as listing:
            entries = sorted(
                (e for e in listing if not e.name.startswith(".")), key=lambda e: e.name
            )
    except OSError as exc:
        missing.append((folder, f"cannot read the folder: {exc.strerror or exc}"))
        return
    folders = []
    for entry in entries:
        try:
            if entry.is_dir():
                folders.append(entry.path)
                continue
            regular = entry.is_file()
        except OSError:
            regular = False
        # A broken link goes on: the check names it ("No such file...").
        if regular or not os.path.exists(entry.path):
            files.append(entry.path)
        else:
            missing.append((entry.path, _NOT_REGULAR))
    for path in folders:
        _walk(path, walked, files, missing)


def destination_edits(args: argparse.Namespace) -> tuple[Editor, ...]:
    """With ``--destination NAME``, the destination's own ``modify`` (what the daemon applies
    after the routes' changes; routes do not apply to a manual send); else none."""
    if not args.destination:
        return ()
    modify = config_destination(args).modify
    if modify is None or modify.empty:
        return ()
    from forwarder.dicom.edit import Modification  # pydicom: only when there are changes

    return (Modification.from_config(modify),)


def run(args: argparse.Namespace) -> int:
    setup_logging(verbose=2 if args.debug else 1 if args.verbose else 0, quiet=args.quiet)
    target = resolve_or_report(args, "send", needs_files=True)
    if isinstance(target, int):
        return target
    problem = _stgcmt.usage_problem(args, target)
    if problem is None and args.report:
        problem = _report_problem(args.report)
    if problem is not None:
        print(f"forwarder send: {problem}", file=sys.stderr)
        return EXIT_USAGE
    files, missing = collect_files(target.files)
    if not files and not missing:  # as storescu and dcmsnd: nothing found is not success
        print(
            f"forwarder send: no files to send in {' '.join(target.files)} "
            "(hidden files and folders are skipped)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    edits = destination_edits(args)
    records: list[dict[str, Any]] = []
    bad: list[SendOutcome] = []
    good: list[StoreRequest] = []
    check = read_meta if args.no_check else check_file
    for i, path in enumerate(files):
        try:
            good.append(StoreRequest(path, i, check(path), edits=edits))
        except InvalidFileError as exc:
            bad.append(_bad(StoreRequest(path, i), f"refused, not sent: {exc.reason}"))
    bad.extend(_bad(StoreRequest(path, -1), reason) for path, reason in missing)
    for outcome in bad:  # refused before any association: no peer involved
        print(f"forwarder send: FAILED {outcome.request.path}: {outcome.error}", file=sys.stderr)
    stats = _Stats(
        len(good) * args.repeat, sum(_meta(r).dataset_length for r in good) * args.repeat
    )
    progress = _Progress(
        stats, enabled=sys.stderr.isatty() and not args.quiet and not args.no_progress
    )
    outcomes: list[SendOutcome] = list(bad)
    opened = 0
    refused = False  # the peer could not be reached or rejected the association
    try:
        for _ in range(args.repeat):
            results, n, down = _send_all(target, good, stats, progress, abort=args.abort)
            refused = refused or down
            outcomes.extend(results)
            opened += n
    finally:
        progress.finish()
    verdicts = None
    if args.stgcmt:
        assert isinstance(target, Target)
        verdicts = _stgcmt.request(args, target, outcomes)
    already_printed = {id(o) for o in bad}
    for o in outcomes:
        if id(o) not in already_printed:
            if not o.outcome.stored:
                _print_failure(o, target)
            elif o.outcome is Outcome.WARNING:
                logger.warning("%s: stored with warning %s", o.request.path, o.error)
            else:
                logger.info(
                    "%s: stored %s (status 0x%04X)",
                    o.request.path,
                    o.sop_instance_uid,
                    o.status or 0,
                )
        records.append(_record(o))
        if verdicts is not None:
            _stgcmt.annotate(records[-1], verdicts, o)
    counts = Counter(o.outcome for o in outcomes)
    stored = counts[Outcome.STORED] + counts[Outcome.WARNING]
    # Against what was asked, not what came back: a file without an outcome is not stored.
    failed = len(bad) + len(good) * args.repeat - stored
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    mb = stats.bytes_done / 1e6
    if not args.quiet:
        print(
            f"forwarder send: {stored} stored ({counts[Outcome.WARNING]} with warnings), "
            f"{failed} failed, {mb:.1f} MB in {elapsed:.2f}s ({mb / elapsed:.1f} MB/s) "
            f"to {_where(target)}",
            file=sys.stderr,
        )
    not_committed = 0
    if verdicts is not None:
        _stgcmt.print_outcome(verdicts, outcomes, quiet=args.quiet)
        not_committed = verdicts.counts()[1]
    if args.report:
        extra = {"storage_commitment": _stgcmt.summary(verdicts)} if verdicts else {}
        _write_report(args.report, target, records, stored, failed, extra)
    if not_committed:
        return EXIT_FAILED
    if failed == 0:
        return EXIT_OK
    if stored == 0 and opened == 0 and refused:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def _meta(request: StoreRequest) -> FileMeta:
    assert request.meta is not None
    return request.meta


def _where(target: Target | WebTarget) -> str:
    return target.where if isinstance(target, WebTarget) else str(target.peer)


def _channels(target: Target | WebTarget, count: int) -> list[SendChannel]:
    if isinstance(target, WebTarget):
        from forwarder.dicomweb.channel import StowChannel  # urllib3: only for DICOMweb

        return [StowChannel(target.settings, name=f"{target.where}#{i + 1}") for i in range(count)]
    return [
        Channel(
            target.peer,
            target.settings,
            allow_lossy_decompress=target.allow_lossy_decompress,
            name=f"{target.peer}#{i + 1}",
        )
        for i in range(count)
    ]


def _send_all(
    target: Target | WebTarget,
    requests: list[StoreRequest],
    stats: _Stats,
    progress: _Progress,
    *,
    abort: bool,
) -> tuple[list[SendOutcome], int, bool]:
    """Send every request over up to ``target.associations`` parallel channels."""
    results: list[SendOutcome] = []
    results_lock = threading.Lock()
    needs = Counter((_meta(r).sop_class_uid, _meta(r).transfer_syntax) for r in requests)
    ordered_needs = [n for n, _ in needs.most_common()]
    groups = group_by_contexts(ordered_needs) if requests else []
    if isinstance(target, WebTarget) and requests:
        groups = [set(ordered_needs)]  # STOW-RS has no presentation contexts to plan
    channels = _channels(target, max(1, min(target.associations, len(requests) or 1)))
    for group in groups:
        work: queue.SimpleQueue[StoreRequest | None] = queue.SimpleQueue()
        for r in requests:
            if (_meta(r).sop_class_uid, _meta(r).transfer_syntax) in group:
                work.put(r)
        for _ in channels:
            work.put(None)
        hint = [n for n in ordered_needs if n in group]
        # The spares ask for their associations once the first one is open (or has answered a
        # file): asked all at once, a peer that counts the associations being negotiated
        # against its limit (pynetdicom's maximum_associations) refuses every one. When the
        # first fails, the spares stay out: a down peer costs one connect, not one a channel.
        first_answered = threading.Event()

        def drain(
            channel: SendChannel,
            work: queue.SimpleQueue[StoreRequest | None],
            hint: list[tuple[str, str]],
            first_answered: threading.Event,
        ) -> None:
            def pull() -> Iterator[StoreRequest]:
                while (item := work.get()) is not None:
                    yield item

            first = channels[0]
            if channel is not first:
                while not (first_answered.wait(0.01) or first.is_open or first.down):
                    pass
                if first.down is not None:
                    return  # the first could not associate: it answers every file with why
            try:
                for outcome in channel.send(pull(), hint=hint):
                    if channel is first:
                        first_answered.set()
                    if _spare_unavailable(channel, outcome, channels):
                        # An extra association the peer would not open (many SCPs, storescp
                        # among them, serve one at a time): hand the file back and bow out.
                        work.put(outcome.request)
                        break
                    with results_lock:
                        results.append(outcome)
                    progress.advance(outcome)
            except Exception:
                # Files left without an outcome are reported not sent (below): never exit 0.
                logger.exception(
                    "%s: internal error; the files not yet sent are not sent", channel.name
                )
            finally:
                first_answered.set()
            # Release as soon as the work runs out, so a peer that serves one association at a
            # time can take the next one.
            try:
                if abort:
                    channel.abort()
                else:
                    channel.release()
            except Exception:
                logger.exception("%s: internal error while ending the association", channel.name)

        threads = [
            threading.Thread(
                target=drain, args=(c, work, hint, first_answered), name=c.name, daemon=True
            )
            for c in channels
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        leftover: list[StoreRequest] = []
        while not work.empty():
            item = work.get()
            if item is not None:
                leftover.append(item)
        if leftover:  # handed back after every other channel had finished
            leftover_queue: queue.SimpleQueue[StoreRequest | None] = queue.SimpleQueue()
            for pending in [*leftover, None]:
                leftover_queue.put(pending)
            drain(channels[0], leftover_queue, hint, first_answered)
    answered = {o.request.key for o in results}
    for r in requests:
        if r.key not in answered:
            results.append(
                _bad(r, "not sent: internal error (see the log above)", meta=r.meta, retry=True)
            )
    results.sort(key=lambda o: o.request.key)
    opened = sum(c.associations_opened for c in channels)
    return results, opened, any(c.down is not None for c in channels)


def _spare_unavailable(
    channel: SendChannel, outcome: SendOutcome, channels: list[SendChannel]
) -> bool:
    """True when this outcome is ``channel`` failing to associate (not the file failing) while
    another channel has an association: the file is handed back, not charged to the peer."""
    return (
        outcome.outcome is Outcome.RETRY
        and outcome.association_failed
        and channel.associations_opened == 0
        and any(c.associations_opened for c in channels if c is not channel)
    )


def _bad(
    request: StoreRequest, reason: str, *, meta: FileMeta | None = None, retry: bool = False
) -> SendOutcome:
    return SendOutcome(
        request,
        Outcome.RETRY if retry else Outcome.FAILED,
        None,
        reason,
        meta.sop_class_uid if meta else None,
        meta.sop_instance_uid if meta else None,
        meta.transfer_syntax if meta else None,
        None,
        None,
        0,
        0.0,
    )


def _print_failure(o: SendOutcome, target: Target | WebTarget) -> None:
    uid = f" SOP Instance {o.sop_instance_uid}" if o.sop_instance_uid else ""
    print(
        f"forwarder send: FAILED {o.request.path}{uid} -> {_where(target)}: {o.error}",
        file=sys.stderr,
    )


def _record(o: SendOutcome) -> dict[str, Any]:
    return {
        "path": o.request.path,
        "sop_class_uid": o.sop_class_uid,
        "sop_instance_uid": o.sop_instance_uid,
        "transfer_syntax": o.transfer_syntax,
        "sent_transfer_syntax": o.sent_transfer_syntax,
        "status": f"0x{o.status:04X}" if o.status is not None else None,
        "outcome": o.outcome.value,
        "error": o.error,
        "association": o.association,
        "bytes": o.nbytes,
    }


def _report_problem(path: str) -> str | None:
    """Why ``--report`` cannot be written at ``path``, found before anything is sent (not in a
    traceback once every file went), or None."""
    if os.path.isdir(path):
        return f"cannot write the report {path}: it is a directory"
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot write the report {path}: {exc.strerror or exc}"
    return None


def _write_report(
    path: str,
    target: Target | WebTarget,
    records: list[dict[str, Any]],
    stored: int,
    failed: int,
    extra: dict[str, Any],
) -> None:
    peer: dict[str, Any]
    if isinstance(target, WebTarget):
        peer, calling = {"url": target.where}, None
    else:
        peer = {
            "ae_title": target.peer.ae_title,
            "host": target.peer.host,
            "port": target.peer.port,
        }
        calling = target.settings.calling_ae_title
    report = {
        "peer": peer,
        "calling_ae_title": calling,
        "stored": stored,
        "failed": failed,
        **extra,
        "files": records,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    # Replacing on purpose: --report FILE names the report to write, a previous one included.
    os.replace(tmp, path)


class _Progress:
    """A one-line progress bar on stderr: files, MB, MB/s, ETA. Off when not a terminal."""

    def __init__(self, stats: _Stats, *, enabled: bool) -> None:
        self.stats = stats
        self.enabled = enabled
        self._last = 0.0

    def advance(self, outcome: SendOutcome) -> None:
        s = self.stats
        with s.lock:
            s.done += 1
            s.bytes_done += outcome.nbytes
            now = time.monotonic()
            if not self.enabled or (now - self._last < 0.1 and s.done < s.files_total):
                return
            self._last = now
            elapsed = max(now - s.started, 1e-6)
            rate = s.bytes_done / elapsed
            left = max(s.bytes_total - s.bytes_done, 0)
            eta = left / rate if rate > 0 else 0.0
            width = 24
            filled = int(width * s.done / max(s.files_total, 1))
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(
                f"\r[{bar}] {s.done}/{s.files_total} files  {s.bytes_done / 1e6:.1f}/"
                f"{s.bytes_total / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d} "
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
