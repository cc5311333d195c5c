"""``forwarder echo``: C-ECHO with the same addressing, timeouts and TLS as ``send``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from forwarder.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    setup_logging,
)
from forwarder.cli._argtypes import positive
from forwarder.cli._net import WebTarget, add_association_options, resolve_or_report
from forwarder.errors import AssociationError
from forwarder.net.association import Association
from forwarder.net.pdu import VERIFICATION_SOP_CLASS, ProposedContext

_VERIFICATION = ProposedContext(VERIFICATION_SOP_CLASS, ("1.2.840.10008.1.2",))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "echo",
        help="C-ECHO a peer (exit 0 when it answers Success)",
        description="Verify a peer with C-ECHO. TARGET: AET[@host[:port]], HOST PORT, or "
        "--destination NAME -c CONFIG, or a DICOMweb service root http(s)://host/dicom-web "
        "(a QIDO-RS GET {url}/studies?limit=1 proves it is reachable and takes our "
        "credentials). Exit 0 on Success (HTTP 200/204), 3 when the peer cannot be reached or "
        "refuses (HTTP 401/403), 1 when it answers with another status.",
        allow_abbrev=False,
    )
    p.add_argument("args", nargs="*", metavar="TARGET", help="AET[@host[:port]] or HOST PORT")
    add_association_options(p)
    p.add_argument("--repeat", "-r", type=positive, default=1, metavar="N", help="echo N times")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(verbose=2 if args.debug else args.verbose, quiet=args.quiet)
    target = resolve_or_report(args, "echo", needs_files=False)
    if isinstance(target, int):
        return target
    if isinstance(target, WebTarget):
        return _echo_web(target, args)
    started = time.monotonic()
    try:
        assoc = Association.request(target.peer, target.settings, [_VERIFICATION])
    except AssociationError as exc:
        print(f"forwarder echo: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        for _ in range(args.repeat):
            response = assoc.echo()
            if response.status != 0x0000:
                print(
                    f"forwarder echo: {target.peer} answered status 0x{response.status:04X}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
    except AssociationError as exc:
        # The peer took the association (no Verification context, no answer, an abort):
        # not "unreachable or refused", which is exit 3.
        print(f"forwarder echo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        assoc.release()
    if not args.quiet:
        ms = (time.monotonic() - started) * 1000
        print(f"forwarder echo: {target.peer} answered Success in {ms:.0f} ms", file=sys.stderr)
    return EXIT_OK


def _echo_web(target: WebTarget, args: argparse.Namespace) -> int:
    """QIDO-RS ``GET {url}/studies?limit=1``: reachability, TLS and auth in one request."""
    from forwarder.dicomweb.http import HttpFailure, WebClient

    client = WebClient(target.settings)
    started = time.monotonic()
    try:
        for _ in range(args.repeat):
            try:
                reply = client.get("/studies?limit=1")
            except HttpFailure as exc:
                print(f"forwarder echo: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE if not exc.connected else EXIT_FAILED
            if reply.status in (401, 403):
                print(
                    f"forwarder echo: {target.where} refused our credentials: HTTP "
                    f"{reply.status} {reply.reason} (check the token or password)",
                    file=sys.stderr,
                )
                return EXIT_UNREACHABLE
            if reply.status not in (200, 204):
                print(
                    f"forwarder echo: {target.where} answered HTTP {reply.status} "
                    f"{reply.reason}: {reply.excerpt()}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
    finally:
        client.close()
    if not args.quiet:
        ms = (time.monotonic() - started) * 1000
        print(
            f"forwarder echo: {target.where} answered HTTP {reply.status} in {ms:.0f} ms",
            file=sys.stderr,
        )
    return EXIT_OK
