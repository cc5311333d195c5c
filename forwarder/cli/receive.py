"""``forwarder receive``: a Storage SCP writing ``DIR/<study>/<sop>.dcm`` (a storescp/dcmrcv)."""

from __future__ import annotations

import argparse
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from forwarder.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, setup_logging
from forwarder.cli._argtypes import positive, whole_number
from forwarder.daemon.signals import SignalWaiter
from forwarder.errors import ForwarderError
from forwarder.net.receiver import (
    Receiver,
    ReceiverSettings,
    parse_networks,
)
from forwarder.net.tls import server_context

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: str) -> int:
    """``500M``, ``2G``, ``1.5g``, ``300KiB`` or bytes -> bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE_RE.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: use bytes or 500K, 500M, 2G")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


_port = whole_number(0, 65535, what="a port number", hint=" (0 = any free port)")


def _ae_title(value: str) -> str:
    text = value.strip()
    if not 1 <= len(text) <= 16 or "\\" in text or any(not 32 <= ord(c) <= 126 for c in text):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an AE title: 1 to 16 printable ASCII characters, no backslash"
        )
    return text


def _network(value: str) -> Any:
    try:
        return parse_networks([value])[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (port 1..65535)")
    return host.strip("[]"), int(port)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "receive",
        help="a Storage SCP that writes what it receives under DIR",
        description=(
            "Accept C-STORE (and C-ECHO) and write each object as DIR/<StudyInstanceUID>/"
            "<SOPInstanceUID>.dcm (DIR/no-study-uid/<SOPInstanceUID>.dcm without a Study "
            "Instance UID), atomically. Success is answered only once the whole data set has "
            "been parsed and its SOP Class/Instance UIDs match the request's; anything else is "
            "answered with a failure status and an error comment, and not kept. Answers storage "
            "commitment requests (N-ACTION) for what DIR holds: an instance is committed when "
            "DIR/*/<SOPInstanceUID>.dcm exists with that SOP Class; the report goes on the same "
            "association, or with --stgcmt-peer on a new one. Runs until SIGTERM or SIGINT."
        ),
    )
    p.add_argument("--port", type=_port, required=True, help="TCP port (0 = any free port)")
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--bind", default="0.0.0.0", metavar="HOST", help="address to listen on")
    p.add_argument("--ae-title", type=_ae_title, default="FORWARDER", metavar="AET")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="our TLS certificate (PEM)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (mode 0600)")
    p.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="require client certificates from this CA"
    )
    p.add_argument(
        "--allow-calling-aet",
        type=_ae_title,
        action="append",
        default=[],
        metavar="AET",
        help="accept only these calling AE titles (repeatable)",
    )
    p.add_argument(
        "--allow-host",
        type=_network,
        action="append",
        default=[],
        metavar="ADDR_OR_CIDR",
        help="accept connections only from these addresses or networks (repeatable)",
    )
    p.add_argument(
        "--require-called-aet",
        action="store_true",
        help="reject associations whose called AE title is not --ae-title",
    )
    p.add_argument(
        "--promiscuous",
        action="store_true",
        help="accept private and unknown SOP classes too, each in the transfer syntax the "
        "caller proposes first (storescp +pm)",
    )
    p.add_argument(
        "--stgcmt-peer",
        type=_host_port,
        metavar="HOST:PORT",
        help="send storage commitment reports on a new association to HOST:PORT (called AE: "
        "the requester's calling AE title) instead of on the requester's association",
    )
    p.add_argument("--max-associations", type=positive, default=16, metavar="N")
    p.add_argument(
        "--max-object-size",
        type=parse_size,
        metavar="SIZE",
        help="answer 0xA700 for larger objects (bytes, or 500M, 2G)",
    )
    p.add_argument(
        "--max-pdu",
        type=whole_number(1, 0xFFFFFFFF),
        default=262144,
        metavar="BYTES",
        help="max PDU we receive (1..4294967295)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each stored object")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.set_defaults(func=run)


def settings_from_args(
    args: argparse.Namespace, tls: ssl.SSLContext | None = None
) -> ReceiverSettings:
    """The receiver's settings from ``forwarder receive``'s parsed command line."""
    return ReceiverSettings(
        output=args.output,
        port=args.port,
        bind=args.bind,
        ae_title=args.ae_title,
        require_called_aet=args.require_called_aet,
        allowed_calling_aets=frozenset(args.allow_calling_aet),
        allowed_networks=tuple(args.allow_host),
        max_associations=args.max_associations,
        max_object_size=args.max_object_size,
        max_pdu=args.max_pdu,
        tls=tls,
        promiscuous=args.promiscuous,
        commitment_peer=args.stgcmt_peer,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(2 if args.debug else args.verbose, args.quiet)
    if (args.tls_cert is None) != (args.tls_key is None):
        return _usage("--tls-cert and --tls-key go together")
    if args.tls_ca is not None and args.tls_cert is None:
        return _usage("--tls-ca needs --tls-cert and --tls-key")

    try:
        tls = (
            server_context(args.tls_cert, args.tls_key, args.tls_ca)
            if args.tls_cert is not None
            else None
        )
        settings = settings_from_args(args, tls)
        receiver = Receiver(settings)
        signals = SignalWaiter((signal.SIGTERM, signal.SIGINT))
        signals.__enter__()
        try:
            receiver.start()
        except BaseException:
            signals.__exit__(None, None, None)
            raise
    except ForwarderError as exc:
        print(f"forwarder receive: error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    if tls is None:
        tls_text = "TLS off"
    elif args.tls_ca is not None:
        tls_text = "TLS on, client certificates required"
    else:
        tls_text = "TLS on"
    print(
        f"forwarder receive: listening on {args.bind}:{receiver.port} as AE {args.ae_title}, "
        f"writing to {receiver.output}, {tls_text}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not signals.wait(1.0):
            pass
    finally:
        receiver.stop()
        signals.__exit__(None, None, None)
    print(
        f"forwarder receive: stopped after {receiver.received} objects", file=sys.stderr, flush=True
    )
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"forwarder receive: error: {message}", file=sys.stderr)
    return EXIT_USAGE
