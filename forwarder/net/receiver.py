"""A Storage SCP that writes what it receives under a folder (``forwarder receive``).

A storescp/dcmrcv replacement for demos, tests and gateways that ingest from modalities. Every
object lands as ``output/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (Part 10, the bytes as
received, never decoded and re-encoded) and appears atomically: it is written and fsynced
elsewhere, then renamed into place, so a daemon watching ``output`` never sees half a file.
UIDs are sanitised so that nothing a peer sends can name a path outside ``output``, and no
symlink inside ``output`` is followed. An object whose data set has no Study Instance UID lands
as ``output/no-study-uid/<SOPInstanceUID>.dcm``, so a resend replaces it
(:mod:`forwarder.net.placement`).

Success is answered only for an object whose whole data set was walked by the shared scanner
(:func:`forwarder.dicom.check.scan_file`) and whose own SOP Class and Instance UIDs are the ones
the C-STORE request names, sent on a presentation context negotiated for that SOP Class. Any
other object gets a failure status with an Error Comment (0000,0902) saying why, and is deleted,
never placed under ``output``: the sender still holds it and has been told it was not stored
(:mod:`forwarder.net.scp_object`).

This module wires forwarder's own SCP engine (:mod:`forwarder.net.scp_server`: a blocking
thread per association, PDUs handled by hand) to the folder writer, with the allow lists
(calling AE titles, source networks), the called AE check, TLS and the limits.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from forwarder.dicom.check import scan_file  # noqa: F401 - the check Success waits for
from forwarder.errors import ForwarderError
from forwarder.net.commitment import Reference
from forwarder.net.commitment_scp import CommitmentResponder, FolderHoldings
from forwarder.net.placement import NO_STUDY_FOLDER, FolderSink, safe_uid_name
from forwarder.net.scp_codec import REJECT_CALLED_AE, REJECT_CALLING_AE, AssociateRequest
from forwarder.net.scp_commitment import ReportSink
from forwarder.net.scp_object import ObjectSink, Origin
from forwarder.net.scp_policy import (
    ASSOCIATE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_ASYNC_WINDOW,
    RELEASE_TIMEOUT,
    EngineSettings,
    ScpProfile,
    context_policy,
    scp_profile,
)
from forwarder.net.scp_server import ScpServer, listening_socket

__all__ = [
    "NO_STUDY_FOLDER",
    "Receiver",
    "ReceiverSettings",
    "ScpProfile",
    "parse_networks",
    "profile",
    "safe_uid_name",
]

logger = logging.getLogger(__name__)

#: Seconds a partial object may go unwritten before a starting receiver takes it for a dead
#: one's (a live transfer touches its file with every fragment).
STALE_PARTIAL = 600.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HANDSHAKE_TIMEOUT = HANDSHAKE_TIMEOUT


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """What :class:`Receiver` listens on, whom it accepts, and where it writes."""

    output: Path
    port: int
    bind: str = "0.0.0.0"
    ae_title: str = "FORWARDER"
    require_called_aet: bool = False  # reject associations whose called AE != ae_title
    allowed_calling_aets: frozenset[str] = frozenset()  # empty = any
    allowed_networks: tuple[IPNetwork, ...] = ()  # empty = any source address
    max_associations: int = 16
    max_object_size: int | None = None  # bytes of the Part 10 file; larger get 0xA700
    max_pdu: int = 262144
    tls: ssl.SSLContext | None = None
    promiscuous: bool = False  # storescp +pm: private and unknown SOP classes too
    commitment: bool = True  # answer storage commitment requests for what output holds
    commitment_peer: tuple[str, int] | None = None  # send reports on a new association here
    reports: bool = False  # take storage commitment reports (N-EVENT-REPORT, the peer as SCP)


def profile(settings: ReceiverSettings) -> ScpProfile:
    """What a receiver with ``settings`` accepts and announces (SOP classes, transfer syntaxes
    in order of preference, limits, identity, timeouts): the conformance statement's tables."""
    return scp_profile(
        max_pdu=settings.max_pdu,
        max_associations=settings.max_associations,
        require_called_aet=settings.require_called_aet,
        promiscuous=settings.promiscuous,
        commitment=settings.commitment,
        reports=settings.reports,
    )


class Receiver:
    """A Storage SCP writing to ``settings.output``; :meth:`start` returns at once.

    ``sink``: who takes the checked objects instead of the folder writer (the daemon's listener);
    its :attr:`~forwarder.net.scp_object.ObjectSink.spool` must be ``settings.output``.
    ``reports``: who takes the storage commitment reports peers send (``settings.reports``);
    ``holdings``: what commitment requests are answered from (default: the output folder)."""

    def __init__(
        self,
        settings: ReceiverSettings,
        sink: ObjectSink | None = None,
        reports: ReportSink | None = None,
        holdings: Callable[[Reference], int | None] | None = None,
    ) -> None:
        self._settings = settings
        # What a storage commitment request is answered from (settings.commitment): the
        # output folder, unless the caller says otherwise (the daemon: its queue).
        self._holdings = holdings
        self._reports = reports if settings.reports else None
        self._output = Path(os.path.abspath(settings.output))
        self._folder = FolderSink(self._output)
        self._sink: ObjectSink = self._folder if sink is None else sink
        self._server: ScpServer | None = None

    @property
    def received(self) -> int:
        """How many objects the folder writer has stored since :meth:`start`."""
        return self._folder.received

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when ``settings.port`` was 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return self._server.port

    @property
    def healthy(self) -> bool:
        """Whether it is started and still accepting connections."""
        return self._server is not None and self._server.healthy

    @property
    def output(self) -> Path:
        """The absolute output folder."""
        return self._output

    def start(self, listener: socket.socket | None = None) -> None:
        """Check the output folder, bind the port and serve in background threads.

        Raises :class:`~forwarder.errors.ForwarderError` when the output folder cannot be
        written or the address cannot be bound. ``listener``: a socket already bound and
        listening (see :func:`bind`), used instead of binding one.
        """
        if self._server is not None:
            raise RuntimeError("the receiver is already started")
        self._check_output()
        s = self._settings
        host = _resolve_bind(s.bind)
        server = ScpServer(
            host,
            s.port,
            settings=EngineSettings(
                max_pdu=s.max_pdu,
                max_object_size=s.max_object_size,
                async_window=MAX_ASYNC_WINDOW,
                associate_timeout=ASSOCIATE_TIMEOUT,
                idle_timeout=IDLE_TIMEOUT,
                release_timeout=RELEASE_TIMEOUT,
            ),
            policy=context_policy(profile(s)),
            sink=self._sink,
            admit=self._admit,
            allow_host=self._allow_host,
            max_associations=s.max_associations,
            tls=s.tls,
            commitment=(
                CommitmentResponder(
                    self._holdings or FolderHoldings(self._output).failure,
                    ae_title=s.ae_title,
                    report_to=s.commitment_peer,
                )
                if s.commitment
                else None
            ),
            reports=self._reports,
        )
        if listener is None:
            listener = bind(s.bind, s.port)
        server.start(listener)
        self._server = server
        logger.info(
            "listening on %s:%d as %s, writing to %s, TLS %s",
            host,
            self.port,
            s.ae_title,
            self._output,
            "on" if s.tls is not None else "off",
        )

    def stop_accepting(self) -> int:
        """Refuse new connections from now on; returns how many associations are open."""
        if self._server is None:
            return 0
        self._server.stop_accepting()
        return self._server.open_associations

    def stop(self, drain: float = 0.0) -> None:
        """Stop accepting, give open associations ``drain`` seconds to end, abort the rest and
        join every thread we started."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(drain)
        if self._sink is self._folder:
            logger.info("stopped after %d objects", self.received)

    # -- who may associate -----------------------------------------------------------------------

    def _admit(
        self, request: AssociateRequest, origin: Origin
    ) -> tuple[tuple[int, int, int], str] | None:
        s = self._settings
        if s.allowed_calling_aets and request.calling_ae not in s.allowed_calling_aets:
            return REJECT_CALLING_AE, "calling AE not recognised"
        if s.require_called_aet and request.called_ae != s.ae_title:
            return REJECT_CALLED_AE, "called AE not recognised"
        return None

    def _allow_host(self, host: str) -> bool:
        networks = self._settings.allowed_networks
        if not networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            logger.warning("refused connection from %s: not an IP address", host)
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in networks):
            return True
        logger.warning("refused connection from %s: not in the allowed networks", host)
        return False

    # -- setup ---------------------------------------------------------------------------------

    def _check_output(self) -> None:
        try:
            self._output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ForwarderError(
                f"output folder {self._output} cannot be created: {exc.strerror}"
            ) from None
        probe = f".forwarder-write-test.{secrets.token_hex(4)}"
        try:
            fd = os.open(self._output / probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(self._output / probe)
        except OSError as exc:
            raise ForwarderError(
                f"output folder {self._output} is not writable: {exc.strerror}"
            ) from None
        self._sweep_partials()

    def _sweep_partials(self) -> None:
        """Delete the partial objects a receiver killed mid-object left in the output (dot-files
        the watcher ignores, so nothing else ever would). Only those untouched for
        :data:`STALE_PARTIAL` seconds: another receiver writing into the same folder keeps its."""
        cutoff = time.time() - STALE_PARTIAL
        removed = 0
        try:
            with os.scandir(self._output) as entries:
                for entry in entries:
                    name = entry.name
                    if not (name.startswith(".receiving.") and name.endswith(".part")):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                            continue
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            logger.warning("cannot look for partial objects in %s: %s", self._output, exc)
        if removed:
            logger.info(
                "removed %d partial objects an earlier run left in %s", removed, self._output
            )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (a name or an address) and ``port``; raises
    :class:`~forwarder.errors.ForwarderError` naming the address when it cannot be bound."""
    try:
        return listening_socket(_resolve_bind(host), port)
    except OSError as exc:
        raise ForwarderError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _resolve_bind(host: str) -> str:
    """An IP address for ``host``."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ForwarderError(f"cannot resolve bind address {host!r}: {exc}") from None
    return str(infos[0][4][0])


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """``10.0.0.5``, ``10.0.0.0/8``, ``::1`` -> networks; raises ValueError naming a bad one."""
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return tuple(networks)
