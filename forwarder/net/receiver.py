"""A Storage SCP that writes what it receives under a folder (``forwarder receive``).

A storescp/dcmrcv replacement for demos, tests and gateways that ingest from modalities. Every
object lands as ``output/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (Part 10, the bytes as
received, never decoded and re-encoded) and appears atomically: it is written and fsynced
elsewhere, then renamed into place, so a daemon watching ``output`` never sees half a file.
UIDs are sanitised so that nothing a peer sends can name a path outside ``output``, and no
symlink inside ``output`` is followed. An object whose data set has no Study Instance UID lands
as ``output/no-study-uid/<SOPInstanceUID>.dcm``, so a resend replaces it.

Success is answered only for an object whose whole data set was walked by the shared scanner
(:func:`forwarder.dicom.part10.scan_file`) and whose own SOP Class and Instance UIDs are the ones
the C-STORE request names, sent on a presentation context negotiated for that SOP Class. Any
other object gets a failure status with an Error Comment (0000,0902) saying why, and is deleted,
never placed under ``output``: the sender still holds it and has been told it was not stored.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import stat
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from forwarder.dicom.check import scan_file
from forwarder.dicom.part10 import FileMeta
from forwarder.errors import ForwarderError, InvalidFileError, UnreadableFileError
from forwarder.net.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from forwarder.net.tls import describe_tls_error

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # the C-STORE names a SOP Class its context is not for
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, write failed, object too big: the sender may retry
STATUS_DATA_SET_MISMATCH = 0xA900  # the data set's own SOP Class/Instance UID is not the request's
STATUS_CANNOT_UNDERSTAND = 0xC000  # the data set could not be parsed to its end

#: The folder for objects whose data set has no Study Instance UID (not a UID, so it cannot
#: clash with one; fixed, so a resend replaces the object instead of adding a copy).
NO_STUDY_FOLDER = "no-study-uid"

# When a requestor offers several transfer syntaxes in one presentation context, pynetdicom picks
# the first of *ours* that it offers. Keep what the sender has where that loses nothing:
# lossless compressed syntaxes first, then uncompressed, and lossy ones last, so that we never
# make a sender compress lossily an image it holds uncompressed.
_PREFERRED_FIRST = (
    "RLELossless",
    "JPEGLossless",
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEG2000Lossless",
    "JPEG2000MCLossless",
    "HTJ2KLossless",
    "HTJ2KLosslessRPCL",
    "JPEGXLLossless",
    "JPEGXLJPEGRecompression",
    "DeflatedImageFrameCompression",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "ExplicitVRBigEndian",
)

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_MAX_UID_LENGTH = 64
_HANDSHAKE_TIMEOUT = 30.0
_JOIN_TIMEOUT = 10.0
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_UID = 0x0020000D
# What the one walk over a received data set collects (top level, all UI).
_WANTED = {_SOP_CLASS_UID: "SOPClassUID", _SOP_INSTANCE_UID: "SOPInstanceUID"}
_WANTED[_STUDY_UID] = "StudyInstanceUID"
_WANTED_VRS = dict.fromkeys(_WANTED, "UI")
_MAX_COMMENT = 64  # Error Comment is an LO


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


def enable_streamed_receive() -> None:
    """Process-wide switch: stream received C-STORE datasets to temporary files, not memory.

    With
    ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming dataset into a Part 10 file in
    ``$TMPDIR`` as it arrives, so multi-gigabyte objects never sit in RAM; the receiver then
    renames that file into place (same filesystem) or copies it. It changes how *every*
    pynetdicom SCP in the process buffers C-STORE requests (``event.encoded_dataset()`` stops
    working), so it is not done on import: call it once at process start, as the ``receive``
    command does. Without it, :class:`Receiver` works the same from memory.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True


def accept_unknown_sop_classes() -> None:
    """Process-wide switch (storescp ``+pm``): accept every storage context proposed,
    private and unknown SOP classes too (a vendor's raw data or CSA objects), each in the first
    transfer syntax the caller proposes; objects are written as received. pynetdicom's
    ``UNRESTRICTED_STORAGE_SERVICE``: like :func:`enable_streamed_receive`, call it once at
    process start, as ``forwarder receive --promiscuous`` does."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True


def safe_uid_name(value: str | None) -> str:
    """A file-name-safe stand-in for a UID received from a peer.

    A UID made of digits separated by single dots (at most 64 characters, trailing space/NUL
    padding removed) is used as it is: such a name cannot be empty, ``.``, ``..`` or hold a
    ``/``. Anything else is replaced by a ``2.25.<decimal>`` UID: derived from a hash of the
    value (the same bad value always maps to the same name, so a resend overwrites) or random
    when the value is empty.
    """
    text = (value or "").strip(" \x00")
    if len(text) <= _MAX_UID_LENGTH and _UID_RE.fullmatch(text):
        return text
    if not text:
        return f"2.25.{uuid.uuid4().int}"
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


@dataclass(frozen=True, slots=True)
class _Incoming:
    """What the C-STORE request and its presentation context say about the object."""

    calling: str  # the peer's AE title
    sop_uid: str  # Affected SOP Instance UID, as sent (untrusted)
    sop_class: str  # Affected SOP Class UID, as sent (untrusted)
    context_class: str  # the abstract syntax negotiated for the presentation context
    context_id: int
    transfer_syntax: UID

    @property
    def shown_uid(self) -> str:
        return _shown(self.sop_uid)


@dataclass(frozen=True, slots=True)
class _Answer:
    """The status of a C-STORE-RSP, and the Error Comment that says why it is not Success."""

    status: int
    comment: str | None = None

    def response(self) -> int | Dataset:
        if self.comment is None:
            return self.status
        rsp = Dataset()
        rsp.Status = self.status
        # LO: printable ASCII without backslash (a value delimiter), at most 64 characters.
        comment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in self.comment)
        if len(comment) > _MAX_COMMENT:
            comment = comment[: _MAX_COMMENT - 3] + "..."
        rsp.ErrorComment = comment
        return rsp


class _StoreAssociation(Association):
    """pynetdicom's acceptor with one change: a C-STORE request always goes to the Storage
    service, whatever SOP Class UID it names.

    pynetdicom picks the service class from the request's Affected SOP Class UID, so a C-STORE
    naming an unknown or a query SOP Class aborted the association, and one naming Verification
    went to the Verification service. Here every C-STORE reaches our handler, which answers a
    failure status (0x0122) when its SOP Class is not the one negotiated for its presentation
    context; the association carries on, as with DCMTK's storescp. A C-STORE-RQ lacking a
    required field, which pynetdicom would ignore, is aborted. Everything else (other messages,
    requests during release or on a context not accepted) is left to pynetdicom. And when the
    association ends in the middle of a streamed data set, the partial temporary file is
    deleted.
    """

    def _run_reactor(self) -> None:
        try:
            super()._run_reactor()
        finally:
            # The association ended (aborted, dropped) in the middle of a data set: its
            # temporary file would otherwise stay in $TMPDIR for good.
            _discard_partial(self.dimse.message)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        if (
            isinstance(msg, C_STORE)
            and msg.MessageIDBeingRespondedTo is None
            and not msg.is_valid_request
            and not self._sent_release
        ):
            # pynetdicom ignores it, and the peer would wait for an answer until its timeout.
            missing = [k for k in msg.REQUEST_KEYWORDS if getattr(msg, k) is None]
            logger.warning(
                "C-STORE-RQ from %s without %s (PS3.7 9.3.1.1); aborting the association",
                self.requestor.ae_title,
                ", ".join(missing),
            )
            self.abort()
            return
        if (
            not isinstance(msg, C_STORE)
            or context is None
            or self._sent_release
            or not msg.is_valid_request
        ):
            super()._serve_request(msg, context_id)
            return
        # What pynetdicom's _serve_request does once it has chosen the service class.
        try:
            self.dimse.cancel_req = {}
            self._is_paused = True
            StorageServiceClass(self).SCP(msg, context)
            self._is_paused = False
            self.dimse.cancel_req = {}
        except Exception:
            logger.exception("serving a C-STORE request failed; aborting the association")
            self.abort()


class _GuardedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, except that a message it cannot decode aborts the
    association, as pynetdicom does for other invalid DIMSE messages.

    Streaming a C-STORE data set to a file, pynetdicom reads the command set's UIDs and the
    presentation context unchecked, so a C-STORE-RQ without its Affected SOP Instance UID, or
    on a context that was not accepted, raised in the thread reading the socket: that thread
    died and the peer waited for an answer until its own timeout. Here the peer gets an
    A-ABORT at once and the partial temporary file is deleted.
    """

    def receive_primitive(self, primitive: Any) -> None:
        try:
            super().receive_primitive(primitive)
        except Exception as exc:
            message, self.message = self.message, None
            _discard_partial(message)
            logger.warning(
                "invalid DIMSE message from %s (%s: %s); aborting the association",
                self.assoc.requestor.ae_title or self.assoc.requestor.address,
                type(exc).__name__,
                exc,
            )
            self.dul.event_queue.put("Evt19")  # an invalid PDU: A-ABORT (PS3.8 9.2, AA-8)


def _discard_partial(message: Any) -> None:
    """Delete the temporary file of a data set pynetdicom was streaming, if any (pynetdicom
    creates it with delete=False and removes it only once the C-STORE was handled)."""
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        with contextlib.suppress(OSError):
            partial.close()
        with contextlib.suppress(OSError):
            os.unlink(partial.name)


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, making :class:`_StoreAssociation` acceptors."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Made and configured by pynetdicom (sockets, handlers, contexts); the subclasses add
        # no state, only the routing and the guard above.
        assoc.__class__ = _StoreAssociation
        assoc.dimse.__class__ = _GuardedDIMSE
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus: source-address filter, TCP_NODELAY, and the TLS
    handshake moved off the accept loop (a silent client must not block every other one)."""

    def __init__(
        self,
        *args: Any,
        allowed_networks: tuple[IPNetwork, ...] = (),
        **kwargs: Any,
    ) -> None:
        self.allowed_networks = allowed_networks
        self._handshaking: set[ssl.SSLSocket] = set()
        self._handshaking_lock = threading.Lock()
        self._closing = False
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        try:
            # The peer's PDUs and ours are small writes that wait for an answer: never Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            logger.debug("cannot set TCP_NODELAY for %s: %s", address[0], exc)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        host = str(client_address[0])
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            logger.warning("refused connection from %s: not an IP address", host)
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed_networks):
            return True
        logger.warning("refused connection from %s: not in the allowed networks", host)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        with self._handshaking_lock:
            if self._closing:
                return False
            self._handshaking.add(sock)
        previous = sock.gettimeout()
        try:
            sock.settimeout(_HANDSHAKE_TIMEOUT)
            sock.do_handshake()
            sock.settimeout(previous)
        except (OSError, ValueError) as exc:
            if self._closing:  # abort_handshakes() cut it short
                logger.debug("TLS handshake with %s cut short: stopping", client_address[0])
            else:
                logger.warning(
                    "TLS handshake with %s failed: %s", client_address[0], describe_tls_error(exc)
                )
            return False
        finally:
            with self._handshaking_lock:
                self._handshaking.discard(sock)
        return True

    def abort_handshakes(self) -> None:
        """Wake every thread blocked in a TLS handshake, and refuse new ones (we are stopping)."""
        with self._handshaking_lock:
            self._closing = True
            pending = list(self._handshaking)
        for sock in pending:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Receiver:
    """A Storage SCP writing to ``settings.output``; :meth:`start` returns at once."""

    def __init__(self, settings: ReceiverSettings) -> None:
        self._settings = settings
        self._output = Path(os.path.abspath(settings.output))
        self._lock = threading.Lock()
        self._received = 0
        self._file_mode = 0o644
        self._ae: AE | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def received(self) -> int:
        """How many objects have been stored since :meth:`start`."""
        with self._lock:
            return self._received

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when ``settings.port`` was 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return int(self._server.server_address[1])

    @property
    def output(self) -> Path:
        """The absolute output folder."""
        return self._output

    def start(self) -> None:
        """Check the output folder, bind the port and serve in a background thread.

        Raises :class:`~forwarder.errors.ForwarderError` when the output folder cannot be
        written or the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the receiver is already started")
        self._check_output()
        self._file_mode = 0o666 & ~_current_umask()
        ae = self._make_ae()
        host = _resolve_bind(self._settings.bind)
        try:
            server = ae.make_server(
                (host, self._settings.port),
                ssl_context=self._settings.tls,
                evt_handlers=self._handlers(),
                server_class=_Server,
                allowed_networks=self._settings.allowed_networks,
                request_handler=_RequestHandler,
            )
        except OSError as exc:
            raise ForwarderError(
                f"cannot listen on {self._settings.bind}:{self._settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        assert isinstance(server, _Server)
        ae._servers.append(server)
        self._ae = ae
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="receiver-accept"
        )
        self._thread.daemon = True
        self._thread.start()
        logger.info(
            "listening on %s:%d as %s, writing to %s, TLS %s",
            host,
            self.port,
            self._settings.ae_title,
            self._output,
            "on" if self._settings.tls is not None else "off",
        )

    def stop(self) -> None:
        """Stop accepting, abort open associations and join every thread we started."""
        server, ae, thread = self._server, self._ae, self._thread
        if server is None or ae is None:
            return
        server.abort_handshakes()
        server.shutdown()  # stops serve_forever, closes the socket, joins handshake threads
        associations = list(ae.active_associations)
        for assoc in associations:
            with contextlib.suppress(Exception):
                assoc.abort()
            if not assoc.is_established:
                # An acceptor still waiting for its A-ASSOCIATE-RQ (a peer that connected and
                # went quiet, or closed) only wakes after the ACSE timeout; None is what its
                # queue yields on that timeout, so hand it over now.
                cast(Any, assoc.dul.to_user_queue).put(None)
        for assoc in associations:
            assoc.join(_JOIN_TIMEOUT)
            if assoc.is_alive():
                logger.warning("association thread %s did not stop", assoc.name)
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        self._server = None
        self._ae = None
        self._thread = None
        logger.info("stopped after %d objects", self.received)

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

    def _make_ae(self) -> AE:
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        # forwarder's own identity, the one the sender announces: a PACS administrator reading
        # a peer's log sees which product and version answered, not the library beneath it.
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = s.require_called_aet
        ae.require_calling_aet = sorted(s.allowed_calling_aets)
        transfer_syntaxes = _preferred_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, context.abstract_syntax), transfer_syntaxes)
        ae.add_supported_context(Verification)
        return ae

    def _handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_ACCEPTED, _on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, _on_aborted),
        ]

    # -- event handlers (run on pynetdicom's association threads) -------------------------------

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.ae_title
        request = event.assoc.requestor.primitive
        called = request.called_ae_title if request is not None else ""
        s = self._settings
        if s.allowed_calling_aets and calling not in s.allowed_calling_aets:
            why = "calling AE not recognised"
        elif s.require_called_aet and called != s.ae_title:
            why = "called AE not recognised"
        else:
            why = f"too many associations (max {s.max_associations})"
        logger.warning(
            "rejected association from %s (calling AE %r, called AE %r): %s",
            requestor.address,
            calling,
            called,
            why,
        )

    def _on_store(self, event: Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        context = event.context
        incoming = _Incoming(
            calling=event.assoc.requestor.ae_title,
            sop_uid=str(request.AffectedSOPInstanceUID or ""),
            sop_class=str(request.AffectedSOPClassUID or ""),
            context_class=str(context.abstract_syntax),
            context_id=int(context.context_id),
            transfer_syntax=UID(context.transfer_syntax),
        )
        try:
            answer = self._store(event, incoming)
        except Exception:
            logger.exception(
                "storing SOP Instance %s from %s failed", incoming.shown_uid, incoming.calling
            )
            answer = _Answer(STATUS_CANNOT_UNDERSTAND, "internal error in the receiver")
        return answer.response()

    def _store(self, event: Event, incoming: _Incoming) -> _Answer:
        if _unpadded(incoming.sop_class) != _unpadded(incoming.context_class):
            # A presentation context carries one abstract syntax (PS3.8 7.1.1.13): a C-STORE on
            # it is for that SOP Class. Nothing is read; the association goes on (0x0122, as
            # PS3.7 C.5 defines it: "SOP Class not supported").
            return self._refuse(
                incoming,
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                "SOP Class not negotiated on this presentation context",
                f"the request names SOP Class {_shown(incoming.sop_class)} on presentation "
                f"context {incoming.context_id}, negotiated for "
                f"{_shown(incoming.context_class)}",
            )
        try:
            source, owned = self._materialise(event)
        except OSError as exc:
            logger.error(
                "cannot buffer SOP Instance %s from %s in %s: %s; answering 0x%04X",
                incoming.shown_uid,
                incoming.calling,
                self._output,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            return _Answer(STATUS_OUT_OF_RESOURCES, "cannot buffer the object")
        try:
            return self._store_file(source, incoming)
        finally:
            # An object we did not place is not kept anywhere (pynetdicom deletes its own
            # temporary file in streamed mode; a placed file has been renamed away).
            if owned:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(source)

    def _refuse(self, incoming: _Incoming, status: int, comment: str, detail: str) -> _Answer:
        logger.warning(
            "refused SOP Instance %s from %s (%s): %s; answering 0x%04X",
            incoming.shown_uid,
            incoming.calling,
            incoming.transfer_syntax.name,
            detail,
            status,
        )
        return _Answer(status, comment)

    def _materialise(self, event: Event) -> tuple[Path, bool]:
        """The received object as a Part 10 file, and whether we must delete it afterwards.

        In streamed mode that is pynetdicom's temporary file (pynetdicom deletes it). Otherwise
        the in-memory dataset is written to a dot-file in the output folder, so that placing
        it is a same-filesystem rename.
        """
        streamed = event.dataset_path
        if streamed is not None:
            return Path(streamed), False
        part = self._output / f".receiving.{secrets.token_hex(8)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(part, flags, 0o666)
        try:
            with open(fd, "wb") as fh:
                fh.write(b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta))
                buffer = cast(BytesIO, cast(C_STORE, event.request).DataSet)
                with buffer.getbuffer() as view:
                    fh.write(view)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        return part, True

    def _check(self, source: Path, size: int, incoming: _Incoming) -> tuple[str, _Answer | None]:
        """Walk the whole received data set once: the Study Instance UID it holds ("" when
        none), and the refusal to answer when it is broken or is not what the request says."""
        try:
            meta = FileMeta(
                sop_class_uid=incoming.sop_class,
                sop_instance_uid=incoming.sop_uid,
                transfer_syntax=str(incoming.transfer_syntax),
                dataset_offset=_dataset_offset(source),
                size=size,
            )
            if meta.dataset_length <= 0:  # Command Data Set Type said "none" (0x0101)
                comment = "the C-STORE request carries no data set"
                return "", self._refuse(incoming, STATUS_CANNOT_UNDERSTAND, comment, comment)
            found = scan_file(source, meta, _WANTED, _WANTED_VRS)
        except UnreadableFileError as exc:  # our own temporary file: not the sender's fault
            logger.error(
                "cannot read back SOP Instance %s from %s: %s; answering 0x%04X",
                incoming.shown_uid,
                incoming.calling,
                exc.reason,
                STATUS_OUT_OF_RESOURCES,
            )
            return "", _Answer(STATUS_OUT_OF_RESOURCES, "cannot read back the object")
        except InvalidFileError as exc:
            return "", self._refuse(
                incoming, STATUS_CANNOT_UNDERSTAND, exc.reason, f"cannot parse: {exc.reason}"
            )
        sop_class = _unpadded(found.get("SOPClassUID", ""))
        sop_instance = _unpadded(found.get("SOPInstanceUID", ""))
        for value, keyword, tag in (
            (sop_class, "SOPClassUID", "(0008,0016)"),
            (sop_instance, "SOPInstanceUID", "(0008,0018)"),
        ):
            if not value:
                comment = f"the data set has no {keyword} {tag}"
                return "", self._refuse(incoming, STATUS_CANNOT_UNDERSTAND, comment, comment)
        if sop_class != _unpadded(incoming.sop_class):
            return "", self._refuse(
                incoming,
                STATUS_DATA_SET_MISMATCH,
                "SOP Class UID of the data set differs from the request's",
                f"the data set's SOP Class UID {_shown(sop_class)} is not the request's "
                f"{_shown(incoming.sop_class)}",
            )
        if sop_instance != _unpadded(incoming.sop_uid):
            return "", self._refuse(
                incoming,
                STATUS_DATA_SET_MISMATCH,
                "SOP Instance UID of the data set differs from the request's",
                f"the data set's SOP Instance UID {_shown(sop_instance)} is not the request's",
            )
        return _unpadded(found.get("StudyInstanceUID", "")), None

    def _store_file(self, source: Path, incoming: _Incoming) -> _Answer:
        shown, calling = incoming.shown_uid, incoming.calling
        try:
            size = os.stat(source).st_size
        except OSError as exc:
            logger.error("received SOP Instance %s vanished: %s", shown, exc)
            return _Answer(STATUS_OUT_OF_RESOURCES, "the received object vanished")
        limit = self._settings.max_object_size
        if limit is not None and size > limit:
            logger.warning(
                "refused SOP Instance %s from %s: %d bytes exceed the %d-byte limit; "
                "answering 0x%04X",
                shown,
                calling,
                size,
                limit,
                STATUS_OUT_OF_RESOURCES,
            )
            return _Answer(STATUS_OUT_OF_RESOURCES, f"larger than the {limit}-byte limit")
        study_value, refusal = self._check(source, size, incoming)
        if refusal is not None:
            return refusal
        study = safe_uid_name(study_value) if study_value else NO_STUDY_FOLDER
        name = safe_uid_name(incoming.sop_uid) + ".dcm"
        target = self._output / study / name
        try:
            self._place(source, study, name)
        except OSError as exc:
            reason = (
                "disk full"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "refusing to follow a symlink"
                if exc.errno == errno.ELOOP
                else "write failed"
            )
            logger.error(
                "cannot store SOP Instance %s from %s at %s: %s (%s); answering 0x%04X",
                shown,
                calling,
                target,
                reason,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            return _Answer(STATUS_OUT_OF_RESOURCES, f"cannot store: {reason}")
        with self._lock:
            self._received += 1
        logger.info(
            "stored %s from %s at %s (%s, %d bytes)",
            shown,
            calling,
            target,
            incoming.transfer_syntax.name,
            size,
        )
        return _Answer(STATUS_SUCCESS)

    # -- atomic placement ------------------------------------------------------------------------

    def _place(self, source: Path, study: str, name: str) -> None:
        """Make ``source`` appear atomically as ``output/study/name`` (fsynced, no symlinks)."""
        out_fd = os.open(self._output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            created = False
            try:
                os.mkdir(study, 0o777, dir_fd=out_fd)
                created = True
            except FileExistsError:
                pass
            if stat.S_ISLNK(os.stat(study, dir_fd=out_fd, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, "the study folder is a symlink", study)
            # O_NOFOLLOW still guards the window between that check and this open.
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            study_fd = os.open(study, flags, dir_fd=out_fd)
            try:
                if created:
                    os.fsync(out_fd)  # the new study folder survives a crash
                if not self._move(source, study_fd, name):
                    self._copy(source, study_fd, name)
                os.fsync(study_fd)  # the rename survives a crash
            finally:
                os.close(study_fd)
        finally:
            os.close(out_fd)

    def _move(self, source: Path, study_fd: int, name: str) -> bool:
        """Rename pynetdicom's temporary file into place when it is on the same filesystem.

        pynetdicom's later attempt to delete its temporary file then fails quietly, by design.
        """
        src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(src_fd).st_dev != os.fstat(study_fd).st_dev:
                return False
            os.fchmod(src_fd, self._file_mode)
            os.fsync(src_fd)
            try:
                os.rename(source, name, dst_dir_fd=study_fd)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    return False
                raise
        finally:
            os.close(src_fd)
        return True

    def _copy(self, source: Path, study_fd: int, name: str) -> None:
        """Copy into a dot-file beside the target, fsync it, then rename it over the target."""
        part = f".{name}.{secrets.token_hex(4)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(part, flags, 0o666, dir_fd=study_fd)
        try:
            with open(source, "rb") as src, open(dst_fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst_fd)
            os.close(dst_fd)
            dst_fd = -1
            os.rename(part, name, src_dir_fd=study_fd, dst_dir_fd=study_fd)
        except BaseException:
            if dst_fd >= 0:
                os.close(dst_fd)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=study_fd)
            raise


def _unpadded(uid: str) -> str:
    return uid.strip(" \x00")


def _dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file we wrote (or pynetdicom wrote): after the
    preamble, 'DICM' and the file meta group, whose group length (0002,0000) comes first."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if (
        len(head) < 144
        or head[128:136] != b"DICM\x02\x00\x00\x00"
        or head[136:140] != b"UL\x04\x00"
    ):
        raise InvalidFileError(os.fspath(path), "the file meta group has no group length first")
    return 144 + int.from_bytes(head[140:144], "little")


def _shown(uid: str) -> str:
    """A peer's UID fit for a log line: as is when well-formed, else quoted and escaped."""
    text = uid.strip(" \x00")
    return text if _UID_RE.fullmatch(text) else repr(uid)


def _on_echo(event: Event) -> int:
    logger.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return STATUS_SUCCESS


def _on_accepted(event: Event) -> None:
    requestor = event.assoc.requestor
    logger.info(
        "association from %s at %s:%d accepted",
        requestor.ae_title,
        requestor.address,
        requestor.port,
    )
    refused = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
    if refused:
        # The caller learns only "context rejected"; say here what and why, once per association.
        unknown = any(UID(uid).name == uid for uid in refused)  # pydicom has no name for it
        logger.warning(
            "association from %s: refused the presentation contexts of %d SOP class(es): %s%s",
            requestor.ae_title,
            len(refused),
            ", ".join(refused[:10]) + (" ..." if len(refused) > 10 else ""),
            " (private or unknown ones are accepted with --promiscuous)" if unknown else "",
        )


def _on_aborted(event: Event) -> None:
    requestor = event.assoc.requestor
    logger.info("association from %s at %s aborted", requestor.ae_title or "?", requestor.address)


def _preferred_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, in the order of :data:`_PREFERRED_FIRST`."""
    rank = {keyword: i for i, keyword in enumerate(_PREFERRED_FIRST)}
    known = [str(uid) for uid in ALL_TRANSFER_SYNTAXES]
    return sorted(known, key=lambda uid: rank.get(UID(uid).keyword, len(rank)))


def _resolve_bind(host: str) -> str:
    """An IP address for ``host`` (pynetdicom binds addresses, not names)."""
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


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """``10.0.0.5``, ``10.0.0.0/8``, ``::1`` -> networks; raises ValueError naming a bad one."""
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return tuple(networks)
