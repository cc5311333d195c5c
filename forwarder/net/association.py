"""A lean, synchronous DICOM association for the C-STORE hot path.

pynetdicom's own SCU costs about 3 ms per C-STORE (a reactor thread, queues, 1 ms polling sleeps,
command sets encoded through pydicom) and decodes/re-encodes every file; importing it also costs
~0.7 s (it pulls in pydicom and numpy), more than storescu needs to send 2,000 files. So the
three association PDUs are encoded by hand (:mod:`forwarder.net.pdu`; the tests decode them with
pynetdicom's PDU classes and negotiate with DCMTK, Orthanc and pynetdicom peers), and the
per-file work is done on a blocking socket:

* the C-STORE-RQ command set is packed with ``struct`` (implicit VR little endian);
* the data set is streamed from the file in PDU-sized fragments, several PDUs per ``sendall``,
  through one reused buffer, so memory stays flat whatever the file size;
* ``TCP_NODELAY`` is always on, ``TCP_QUICKACK`` re-armed after every read (a peer with Nagle's
  algorithm on never stalls on our delayed ACKs), and plain TCP runs on kernel timeouts, without a
  ``poll()`` a call (:mod:`forwarder.net.transport`);
* every PDU and response is checked against PS3.7/PS3.8 by the strict decoders of
  :mod:`forwarder.net.pdu` and :mod:`forwarder.net.command_set` (a few comparisons a response, no
  pydicom): Message ID Being Responded To, Affected SOP Class/Instance UID, a 2-byte non-Pending
  Status... A violation aborts the association and
  raises :class:`~forwarder.errors.ProtocolError` (the file is retried); a stalled peer hits the
  socket timeout and is aborted. A missing or wrong Command Group Length, elements out of order
  or repeated with the same value change nothing and are tolerated, as by pynetdicom and DCMTK
  (a warning once per association); an empty Affected SOP Class/Instance UID counts as absent;
* the peer's maximum PDU is clamped (``pdu.send_pdu_limit``), fragments are even and an odd data
  set is padded with one 0x00;
* release collisions are answered (PS3.8 Sta9/Sta11, :mod:`forwarder.net.acse`), and an idle
  association is checked before reuse (:meth:`Association.peer_gone`).

There is no reactor thread, hence no race over who reads the C-STORE-RSP. This module holds the
:class:`Association` (establishment, its negotiated contexts, release and abort) and the records
that configure it; its DIMSE messages (C-STORE, C-ECHO and their responses) are
:mod:`forwarder.net.association_dimse`'s, the socket is :mod:`forwarder.net.transport`'s,
negotiation and release are :mod:`forwarder.net.acse`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.errors import ConnectInterrupted
from forwarder.net import acse
from forwarder.net.acse import AcceptedContext, Negotiated
from forwarder.net.association_dimse import DimseExchange
from forwarder.net.command_set import PRIORITY
from forwarder.net.interrupt import STOPPING, StopEvent
from forwarder.net.pacing import Pacer
from forwarder.net.pdu import MAX_CONTEXTS, ProposedContext
from forwarder.net.transport import Transport, connect

if TYPE_CHECKING:
    import socket
    import ssl

logger = logging.getLogger(__name__)

_NOTHING_YET = Negotiated({}, {}, frozenset(), 0)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to connect, and the called AE title."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AssociationSettings:
    """Everything about how we associate, from the config or the ``send`` command line."""

    calling_ae_title: str = "FORWARDER"
    bind_host: str | None = None
    connect_timeout: float = 10.0  # TCP connect, and the A-ASSOCIATE-AC unless accept_timeout
    accept_timeout: float | None = None
    response_timeout: float = 60.0  # DIMSE response
    release_timeout: float = 10.0
    max_pdu_receive: int = 262144  # what we tell the peer we accept (0 = unlimited)
    max_pdu_send: int | None = None  # our own cap on PDUs we send (dcmsnd -sndpdulen)
    tcp_nodelay: bool = True
    so_sndbuf: int | None = None
    so_rcvbuf: int | None = None
    priority: int = PRIORITY["medium"]
    tls: ssl.SSLContext | None = None  # ssl is imported only when TLS is used
    tls_server_name: str | None = None  # defaults to the peer's host
    batch_bytes: int = 1024 * 1024  # data set bytes per sendall (dcmsnd -bufsize)
    # The destination's rate cap, shared by all its associations (None: unlimited).
    pacer: Pacer | None = None
    # The sending threads' stop: once set, an association being set up (TCP connect, TLS
    # handshake, A-ASSOCIATE-AC wait) is interrupted; one established is not touched.
    stop: StopEvent | None = None


class Association(DimseExchange):
    """One association to a peer, used by one thread at a time.

    Raises :class:`AssociationError` (``retryable`` says whether trying later may help) when the
    association cannot be made or breaks; after such an error the object is closed.
    """

    def __init__(self, peer: Peer, settings: AssociationSettings, sock: socket.socket) -> None:
        self.peer = peer
        self.settings = settings
        self._transport = Transport(sock, peer, settings)
        self._message_id = 0
        self._negotiated = _NOTHING_YET
        self.max_pdu_send = 0  # the largest P-DATA-TF we send (pdu.send_pdu_limit)
        self._frag = 0  # data bytes per PDV: max_pdu_send - 6, even
        self._context_ids: frozenset[int] = frozenset()  # accepted presentation context IDs
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self._layout_noted = False  # a tolerated command set layout fault was logged

    # -- establishment ------------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        peer: Peer,
        settings: AssociationSettings,
        contexts: Sequence[ProposedContext],
    ) -> Association:
        """Connect and negotiate ``contexts`` (at most 128)."""
        if not contexts:
            raise ValueError("at least one presentation context is needed")
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts; at most {MAX_CONTEXTS}")
        sock = connect(peer, settings)
        assoc = cls(peer, settings, sock)
        try:
            if settings.stop is None:
                assoc._negotiate(contexts)
            else:
                # A peer that takes the connection and never answers: the stop ends the wait.
                with settings.stop.watching(sock):
                    assoc._negotiate(contexts)
        except ConnectInterrupted:
            assoc._transport.close()
            raise ConnectInterrupted(
                f"association with {peer} not established: {STOPPING}"
            ) from None
        except BaseException:
            assoc._transport.close()
            raise
        return assoc

    def _negotiate(self, contexts: Sequence[ProposedContext]) -> None:
        neg = acse.negotiate(self._transport, contexts)
        self._negotiated = neg
        self.max_pdu_send = neg.max_pdu_send
        self._frag = neg.max_pdu_send - 6
        self._context_ids = neg.context_ids
        if self.settings.tls is None:
            self._transport.use_kernel_timeouts(self.settings.response_timeout)
        else:
            self._transport.sock.settimeout(self.settings.response_timeout)

    @property
    def closed(self) -> bool:
        """True once the association is released, aborted or broken."""
        return self._transport.closed

    @property
    def last_progress(self) -> float:
        """When a byte was last sent or received (monotonic; watchdog health)."""
        return self._transport.last_progress

    # -- negotiated contexts ------------------------------------------------------------------

    def context_for(self, sop_class: str, transfer_syntax: str) -> AcceptedContext | None:
        """The accepted context for exactly this SOP class and transfer syntax, if any."""
        return self._negotiated.accepted.get((sop_class, transfer_syntax))

    def accepted_for(self, sop_class: str) -> list[AcceptedContext]:
        """Every accepted context for ``sop_class``, whatever its transfer syntax (in proposal
        order)."""
        return self._negotiated.by_abstract.get(sop_class, [])

    @property
    def accepted_contexts(self) -> list[AcceptedContext]:
        return [c for cs in self._negotiated.by_abstract.values() for c in cs]

    # -- release / abort ----------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE (:func:`forwarder.net.acse.release`); aborts if the peer does not answer
        within ``release_timeout``."""
        acse.release(self._transport)

    def peer_gone(self) -> bool:
        """True when this association, idle between requests, can no longer be used: the peer
        closed the connection, the socket failed, or the peer sent something while we had no
        request outstanding. A non-blocking look (one ``recv`` with MSG_PEEK|MSG_DONTWAIT on
        plain TCP); call it only between requests.

        What arrived is answered as PS3.8 says (:func:`forwarder.net.acse.answer_idle`). Either
        way the association is closed when this returns True, so the caller opens a new one for
        the next file instead of losing an attempt to a dead one.
        """
        transport = self._transport
        if transport.closed:
            return True
        waiting = transport.poll_idle()
        if waiting is None:
            return False
        if not waiting:
            logger.debug("%s: the peer closed the idle association", self.peer)
            transport.close()
            return True
        acse.answer_idle(transport)
        return True

    def abort(self) -> None:
        self._transport.abort()
