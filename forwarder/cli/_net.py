"""Addressing and association options shared by ``send`` and ``echo``.

Both seeds' spellings are accepted: dcm4che dcmsnd (``AET@host:port``, ``-L``, ``-connectTO``
in milliseconds, ``-sndpdulen`` in KB ...) and DCMTK storescu (``HOST PORT``, ``-aet``/``-t``,
``-aec``/``-c``, ``-b`` bytes ...).

Past 400 lines since DICOMweb targets joined the DIMSE ones: both kinds of address, their
options and their resolution from a config's destinations belong together.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_USAGE
from forwarder.cli._argtypes import ae_title, non_negative, whole_number
from forwarder.durations import parse_duration
from forwarder.errors import ConfigError, ForwarderError, TLSSetupError
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.command_set import PRIORITY

if TYPE_CHECKING:
    from forwarder.config import Destination
    from forwarder.dicomweb.http import WebSettings


class UsageError(ForwarderError):
    """A bad command line (exit 2)."""


@dataclass(frozen=True, slots=True)
class WebTarget:
    """A DICOMweb (STOW-RS) service: ``send URL FILE...``, ``echo URL``, or a destination with
    ``url``."""

    settings: WebSettings
    files: list[str]
    associations: int

    @property
    def where(self) -> str:
        return self.settings.url


@dataclass(frozen=True, slots=True)
class Target:
    peer: Peer
    settings: AssociationSettings
    allow_lossy_decompress: bool
    files: list[str]
    associations: int


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_milliseconds = whole_number(0, what="a number of milliseconds")

# A timeout of 0 is "no timeout", as dcm4che's -connectTO 0 and -rspTO 0 are; it stands for
# about 31 years, which every socket call takes (socket.settimeout refuses float("inf")).
NO_TIMEOUT = 1e9


def _timeout(text: str) -> float:
    """A timeout option: a duration, 0 for none."""
    return _duration(text) or NO_TIMEOUT


def _millis(text: str) -> float:
    """The seeds' timeouts: whole milliseconds, returned as seconds; 0 for none."""
    return _milliseconds(text) / 1000.0 or NO_TIMEOUT


def add_association_options(parser: argparse.ArgumentParser) -> None:
    """Options for calling AE, called AE, timeouts, PDU sizes, sockets, TLS, config."""
    g = parser.add_argument_group("addressing")
    g.add_argument(
        "--calling-aet",
        "-aet",
        "-t",
        dest="calling_aet",
        metavar="AET",
        help="our calling AE title (default FORWARDER; storescu -aet/-t)",
    )
    g.add_argument(
        "-L",
        dest="local",
        metavar="AET[@host]",
        help="dcmsnd: calling AE title, optionally with the local address to bind",
    )
    g.add_argument("--bind", metavar="HOST", help="local address to connect from")
    g.add_argument(
        "--called-aet",
        "-aec",
        dest="called_aet",
        metavar="AET",
        help="called AE title in the storescu form HOST PORT (default ANY-SCP)",
    )
    g.add_argument(
        "-c",
        dest="c_option",
        metavar="AET|CONFIG",
        help="storescu: called AE title; with --destination: the config file",
    )
    g.add_argument(
        "--config", dest="config", metavar="CONFIG", help="config file for --destination"
    )
    g.add_argument(
        "--destination",
        metavar="NAME",
        help="send to a destination of the config (its address, timeouts and TLS)",
    )
    t = parser.add_argument_group("timeouts (durations: 500ms, 5s, 2m; seed options: ms; 0: none)")
    for name, seed, default_help in (
        ("connect", "-connectTO", "TCP connect (default 10s)"),
        ("accept", "-acceptTO", "wait for A-ASSOCIATE-AC (default: the connect timeout)"),
        ("response", "-rspTO", "wait for each C-STORE/C-ECHO response (default 60s)"),
        ("release", "-releaseTO", "wait for A-RELEASE-RP (default 10s)"),
    ):
        t.add_argument(
            f"--{name}-timeout", dest=f"{name}_timeout", type=_timeout, help=default_help
        )
        t.add_argument(seed, dest=f"{name}_timeout", type=_millis, help=argparse.SUPPRESS)
    p = parser.add_argument_group("PDU and socket")
    p.add_argument(
        "--max-pdu-send", type=non_negative, metavar="BYTES", help="cap the PDUs we send"
    )
    p.add_argument("-sndpdulen", dest="max_pdu_send_kb", type=non_negative, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-pdu-receive",
        "-b",
        dest="max_pdu_receive",
        type=non_negative,
        metavar="BYTES",
        help="the largest PDU we accept (default 262144; 0 = unlimited; storescu -b)",
    )
    p.add_argument(
        "-rcvpdulen", dest="max_pdu_receive_kb", type=non_negative, help=argparse.SUPPRESS
    )
    p.add_argument(
        "--tcp-delay",
        "-tcpdelay",
        dest="tcp_delay",
        action="store_true",
        help="leave Nagle's algorithm on (default: TCP_NODELAY)",
    )
    p.add_argument("--so-sndbuf", "-sosndbuf", dest="so_sndbuf", type=non_negative, metavar="KB")
    p.add_argument("--so-rcvbuf", "-sorcvbuf", dest="so_rcvbuf", type=non_negative, metavar="KB")
    w = parser.add_argument_group("DICOMweb (TARGET http(s)://host/dicom-web)")
    w.add_argument("--bearer-token-file", metavar="FILE", help="send this bearer token (mode 0600)")
    w.add_argument("--user", metavar="NAME", help="HTTP basic auth user name")
    w.add_argument("--password-file", metavar="FILE", help="the basic auth password (mode 0600)")
    s = parser.add_argument_group("TLS (never falls back to plain TCP)")
    s.add_argument("--tls-ca", metavar="FILE", help="verify the peer against this CA bundle")
    s.add_argument("--tls-cert", metavar="FILE", help="our certificate (mutual TLS)")
    s.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert")
    s.add_argument(
        "--tls-no-verify-hostname",
        action="store_true",
        help="do not check the peer certificate's name against the host (the CA is still checked)",
    )


def parse_dcmsnd_target(text: str) -> tuple[str, str, int]:
    """``AET[@host[:port]]`` -> (aet, host, port); host localhost and port 104 by default."""
    aet, _, address = text.partition("@")
    host, port = address or "localhost", 104
    if address.startswith("["):  # [IPv6]:port
        inner, _, rest = address[1:].partition("]")
        host = inner
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif address.count(":") == 1:
        host, _, p = address.partition(":")
        port = _port(p, text)
    if not aet or not host:
        raise UsageError(f"bad target {text!r}: expected AET[@host[:port]]")
    return aet, host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"bad port in {whole!r}: must be 1..65535")
    return int(text)


def resolve_or_report(
    args: argparse.Namespace, command: str, *, needs_files: bool
) -> Target | WebTarget | int:
    """:func:`resolve`, printing a one-line reason and returning the exit code on failure
    (2 bad command line, 78 invalid config, 1 unusable TLS material)."""
    try:
        return resolve_target(args, list(args.args), needs_files=needs_files)
    except UsageError as exc:
        print(f"forwarder {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except TLSSetupError as exc:  # also dicomweb.auth.SecretError
        print(f"forwarder {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def resolve_target(
    args: argparse.Namespace, positionals: list[str], *, needs_files: bool
) -> Target | WebTarget:
    """:func:`resolve`, or a :class:`WebTarget` for an ``http(s)://`` TARGET or a destination
    with ``url``."""
    if not args.destination and positionals and _is_url(positionals[0]):
        return _resolve_web(args, positionals[0], positionals[1:], None, needs_files=needs_files)
    if args.destination:
        dest = config_destination(args)
        if dest.url is not None:
            return _resolve_web(args, dest.url, positionals, dest, needs_files=needs_files)
    return resolve(args, positionals, needs_files=needs_files)


def config_destination(args: argparse.Namespace) -> Destination:
    config_path = args.config or args.c_option or os.environ.get("FORWARDER_CONFIG")
    if not config_path:
        raise UsageError("--destination needs -c CONFIG (or $FORWARDER_CONFIG)")
    from forwarder.config import load_config  # pydantic: only when a config is used

    config = load_config(config_path)
    try:
        return config.destination(args.destination)
    except KeyError:
        names = ", ".join(d.name for d in config.destinations)
        raise UsageError(
            f"no destination {args.destination!r} in {config_path} (known: {names})"
        ) from None


def resolve(args: argparse.Namespace, positionals: list[str], *, needs_files: bool) -> Target:
    """Turn the parsed command line into a peer, settings and the file arguments."""
    lossy = bool(getattr(args, "allow_lossy_decompress", False))
    associations = int(getattr(args, "associations", None) or 1)
    if args.destination:
        config_path = args.config or args.c_option or os.environ.get("FORWARDER_CONFIG")
        if not config_path:
            raise UsageError("--destination needs -c CONFIG (or $FORWARDER_CONFIG)")
        from forwarder.config import load_config  # pydantic: only when a config is used

        config = load_config(config_path)
        try:
            dest = config.destination(args.destination)
        except KeyError:
            names = ", ".join(d.name for d in config.destinations)
            raise UsageError(
                f"no destination {args.destination!r} in {config_path} (known: {names})"
            ) from None
        if dest.url is not None:
            raise UsageError(f"destination {dest.name!r} is a DICOMweb destination (url)")
        assert dest.host is not None and dest.port is not None and dest.ae_title is not None
        peer = Peer(dest.host, dest.port, dest.ae_title)
        calling = dest.calling_ae_title or config.ae_title
        defaults = {
            "connect_timeout": dest.connect_timeout,
            "response_timeout": dest.response_timeout,
            "release_timeout": dest.release_timeout,
            "max_pdu_receive": dest.max_pdu,
        }
        tls_paths = (
            (dest.tls.ca, dest.tls.cert, dest.tls.key, dest.tls.verify_hostname)
            if dest.tls
            else None
        )
        lossy = lossy or dest.allow_lossy_decompress
        if getattr(args, "associations", None) is None:
            associations = dest.associations
        files = positionals
    else:
        if not positionals:
            raise UsageError("missing TARGET (AET@host:port, or HOST PORT)")
        first = positionals[0]
        second = positionals[1] if len(positionals) > 1 else None
        if (
            "@" not in first
            and second is not None
            and second.isdigit()
            and not os.path.exists(second)
        ):
            called = args.called_aet or args.c_option or "ANY-SCP"
            peer = Peer(first, _port(second, second), called)
            files = positionals[2:]
        elif "@" in first or not needs_files or not os.path.exists(first):
            aet, host, port = parse_dcmsnd_target(first)
            peer = Peer(host, port, args.called_aet or aet)
            files = positionals[1:]
        else:
            raise UsageError(f"bad target {first!r}: expected AET[@host[:port]] or HOST PORT")
        calling = None
        defaults = {}
        tls_paths = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls_paths = (
            Path(args.tls_ca) if args.tls_ca else None,
            Path(args.tls_cert) if args.tls_cert else None,
            Path(args.tls_key) if args.tls_key else None,
            not args.tls_no_verify_hostname,
        )
    elif args.tls_no_verify_hostname:  # TLS too (never plain TCP), the name check dropped
        ca, cert, key, _ = tls_paths or (None, None, None, True)
        tls_paths = (ca, cert, key, False)
    if needs_files and not files:
        raise UsageError("no FILE or DIR to send")
    if not needs_files and files:
        raise UsageError(f"unexpected arguments: {' '.join(files)}")
    bind = args.bind
    if args.local:
        local_aet, _, local_host = args.local.partition("@")
        calling = local_aet or calling
        bind = local_host or bind
    calling = args.calling_aet or calling or "FORWARDER"
    try:  # what goes on the wire is what the summary and the report name, or nothing is sent
        peer = Peer(peer.host, peer.port, ae_title(peer.ae_title))
        calling = ae_title(calling)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None
    tls_context = None
    if tls_paths is not None:
        from forwarder.net.tls import check_private_key_permissions, client_context

        ca, cert, key, verify_hostname = tls_paths
        if (cert is None) != (key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if key is not None:
            check_private_key_permissions(key)
        tls_context = client_context(ca, cert, key, verify_hostname=verify_hostname)
    max_send = args.max_pdu_send
    if args.max_pdu_send_kb is not None:
        max_send = args.max_pdu_send_kb * 1024
    max_recv = args.max_pdu_receive
    if args.max_pdu_receive_kb is not None:
        max_recv = args.max_pdu_receive_kb * 1024
    priority = PRIORITY[getattr(args, "priority", None) or "medium"]
    connect_timeout = (
        args.connect_timeout
        if args.connect_timeout is not None
        else defaults.get("connect_timeout", 10.0)
    )
    settings = AssociationSettings(
        calling_ae_title=calling,
        bind_host=bind,
        connect_timeout=connect_timeout,
        accept_timeout=args.accept_timeout,
        response_timeout=(
            args.response_timeout
            if args.response_timeout is not None
            else defaults.get("response_timeout", 60.0)
        ),
        release_timeout=(
            args.release_timeout
            if args.release_timeout is not None
            else defaults.get("release_timeout", 10.0)
        ),
        max_pdu_receive=int(
            max_recv if max_recv is not None else defaults.get("max_pdu_receive", 262144)
        ),
        max_pdu_send=max_send or None,
        tcp_nodelay=not args.tcp_delay,
        so_sndbuf=args.so_sndbuf * 1024 if args.so_sndbuf else None,
        so_rcvbuf=args.so_rcvbuf * 1024 if args.so_rcvbuf else None,
        priority=priority,
        tls=tls_context,
        batch_bytes=(getattr(args, "buffer_size", None) or 1024) * 1024,
    )
    return Target(peer, settings, lossy, files, associations)


def _resolve_web(
    args: argparse.Namespace,
    url: str,
    files: list[str],
    dest: Destination | None,
    *,
    needs_files: bool,
) -> WebTarget:
    """A DICOMweb target: the URL from the command line or ``dest``, auth and TLS from the
    options (which win) or ``dest``; the secrets are read now, so a bad file stops here."""
    from forwarder.dicomweb.auth import Authorization, AuthSpec
    from forwarder.dicomweb.http import WebSettings
    from forwarder.urls import check_url

    try:
        url = check_url(url)
    except ValueError as exc:
        raise UsageError(f"bad URL {url!r}: {exc}") from None
    if needs_files and not files:
        raise UsageError("no FILE or DIR to send")
    if not needs_files and files:
        raise UsageError(f"unexpected arguments: {' '.join(files)}")
    auth: AuthSpec | None = None
    if dest is not None and dest.auth is not None:
        a = dest.auth
        auth = AuthSpec(a.bearer_token_file, a.username, a.password_file)
    if args.bearer_token_file and (args.user or args.password_file):
        raise UsageError("--bearer-token-file or --user/--password-file, not both")
    if args.bearer_token_file:
        auth = AuthSpec(bearer_token_file=Path(args.bearer_token_file))
    elif args.user or args.password_file:
        if not (args.user and args.password_file):
            raise UsageError("--user and --password-file go together")
        auth = AuthSpec(username=args.user, password_file=Path(args.password_file))
    Authorization(auth).header()  # SecretError now rather than at the first request
    tls_paths = None
    if dest is not None and dest.tls is not None:
        tls_paths = (dest.tls.ca, dest.tls.cert, dest.tls.key, dest.tls.verify_hostname)
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls_paths = (
            Path(args.tls_ca) if args.tls_ca else None,
            Path(args.tls_cert) if args.tls_cert else None,
            Path(args.tls_key) if args.tls_key else None,
            not args.tls_no_verify_hostname,
        )
    elif args.tls_no_verify_hostname:
        ca, cert, key, _ = tls_paths or (None, None, None, True)
        tls_paths = (ca, cert, key, False)
    https = url.lower().startswith("https:")
    if tls_paths is not None and not https:
        raise UsageError("TLS options need an https:// URL (there is no plaintext fallback)")
    tls_context = None
    if https:
        from forwarder.net.tls import check_private_key_permissions, client_context

        ca, cert, key, verify_hostname = tls_paths or (None, None, None, True)
        if (cert is None) != (key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if key is not None:
            check_private_key_permissions(key)
        tls_context = client_context(ca, cert, key, verify_hostname=verify_hostname)
    connect = args.connect_timeout
    if connect is None:
        connect = dest.connect_timeout if dest is not None else 10.0
    response = args.response_timeout
    if response is None:
        response = dest.response_timeout if dest is not None else 60.0
    associations = getattr(args, "associations", None)
    if associations is None:
        associations = dest.associations if dest is not None else 1
    settings = WebSettings(
        url=url, auth=auth, tls=tls_context, connect_timeout=connect, response_timeout=response
    )
    return WebTarget(settings, files, int(associations))
