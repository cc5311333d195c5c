"""Misbehaving peers for the sender's tests.

:class:`HostilePeer` is a raw-socket "SCP" that speaks just enough of the upper layer protocol
to accept an association (its A-ASSOCIATE-AC is built with pynetdicom's PDU classes) and then
behaves as told: well (recording every PDU, so tests can check PDU sizes and the exact data set
bytes), or badly (never answers, answers before reading the data set, closes without A-ABORT,
aborts mid-file, stops reading, sends a huge PDU length or garbage).

:class:`CapturingSCP` is :class:`peers.ScriptedSCP` that also keeps every data set's bytes, the
priority, called AE and source address of each request, association events, and can abort the
association from inside its C-STORE handler on the N-th store.

Both are stopped by their owner (context managers); their threads are joined on stop.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dimse_wire import ABORT as _ABORT
from dimse_wire import RELEASE_RP as _RELEASE_RP
from dimse_wire import RELEASE_RQ as _RELEASE_RQ
from dimse_wire import Closed as _Closed
from dimse_wire import Command
from dimse_wire import Conn as _Conn
from dimse_wire import associate_ac as _associate_ac
from dimse_wire import associate_rj as _associate_rj
from dimse_wire import decode_command as _decode_command
from dimse_wire import listen as _listen
from dimse_wire import pdvs as _pdvs
from dimse_wire import read_associate_rq as _read_associate_rq
from dimse_wire import response as _response
from peers import Received, ScriptedSCP
from pynetdicom import evt
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
_NAMES = {0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


class Behaviour(StrEnum):
    """What the hostile peer does once a C-STORE (or C-ECHO) command has arrived."""

    ACCEPT = "accept"  # read the whole data set, then answer ``status``
    NEVER_ANSWER = "never-answer"  # read everything, answer nothing
    ANSWER_EARLY = "answer-early"  # answer right after the command PDU, then read the data set
    CLOSE = "close"  # close the TCP connection (no A-ABORT) after the command
    ABORT_MID_FILE = "abort-mid-file"  # A-ABORT after the first data set fragment
    STOP_READING = "stop-reading"  # stop reading the socket after the command
    HUGE_PDU = "huge-pdu"  # answer with a PDU header claiming ~4 GB
    GARBAGE = "garbage"  # answer with bytes that are no PDU at all
    NO_AC = "no-ac"  # never answer the A-ASSOCIATE-RQ
    GARBAGE_AC = "garbage-ac"  # answer the A-ASSOCIATE-RQ with garbage
    BAD_AC = "bad-ac"  # answer with an A-ASSOCIATE-AC whose items run past its end
    REJECT = "reject"  # answer the A-ASSOCIATE-RQ with a permanent A-ASSOCIATE-RJ
    SHORT_RJ = "short-rj"  # an A-ASSOCIATE-RJ whose body has 2 bytes, not 4
    # C-STORE-RSPs that break PS3.7 (the data set is read first):
    NO_STATUS = "no-status"  # no Status element
    EMPTY_STATUS = "empty-status"  # a zero-length Status
    WRONG_MESSAGE_ID = "wrong-message-id"  # Message ID Being Responded To is not ours
    WRONG_INSTANCE = "wrong-instance"  # Affected SOP Instance UID is not the one sent
    WITH_DATA_SET = "with-data-set"  # Command Data Set Type says a data set follows
    WRONG_CLASS = "wrong-class"  # Affected SOP Class UID is not the one sent
    PENDING = "pending"  # Status 0xFF00, which a C-STORE never has
    REPEATED_STATUS = "repeated-status"  # Status twice, 0x0000 then 0xC000
    # C-STORE-RSPs with layout faults that change nothing (pynetdicom decodes them):
    NO_GROUP_LENGTH = "no-group-length"  # no Command Group Length (0000,0000)
    WRONG_GROUP_LENGTH = "wrong-group-length"  # Command Group Length 10 bytes too long
    OUT_OF_ORDER = "out-of-order"  # elements in descending order
    REPEATED_SAME = "repeated-same"  # Status twice, with the same value
    EMPTY_INSTANCE = "empty-instance"  # Affected SOP Instance UID present, zero length
    EMPTY_CLASS = "empty-class"  # Affected SOP Class UID present, zero length
    # association life:
    RELEASE_COLLISION = "release-collision"  # our A-RELEASE-RQ crosses one of theirs
    IDLE_CLOSE = "idle-close"  # after the first response, close the connection (no PDU)
    IDLE_RELEASE = "idle-release"  # after the first response, send A-RELEASE-RQ
    IDLE_ABORT = "idle-abort"  # after the first response, send A-ABORT and close
    IDLE_GARBAGE = "idle-garbage"  # after the first response, send an unsolicited P-DATA-TF


#: Behaviours that read the data set and answer it with a damaged C-STORE-RSP, and the damage.
_BAD_RESPONSES: dict[Behaviour, dict[int, bytes | None]] = {
    Behaviour.NO_STATUS: {0x0900: None},
    Behaviour.EMPTY_STATUS: {0x0900: b""},
    Behaviour.WRONG_MESSAGE_ID: {0x0120: struct.pack("<H", 0x7777)},
    Behaviour.WRONG_INSTANCE: {0x1000: b"1.2.3.4.5.6.7.8"},
    Behaviour.WITH_DATA_SET: {0x0800: struct.pack("<H", 0x0001)},
    Behaviour.WRONG_CLASS: {0x0002: b"1.2.840.10008.5.1.4.1.1.4\x00"},
    Behaviour.PENDING: {0x0900: struct.pack("<H", 0xFF00)},
    Behaviour.EMPTY_INSTANCE: {0x1000: b""},
    Behaviour.EMPTY_CLASS: {0x0002: b""},
}
#: Behaviours that answer with a command set laid out badly (dimse_wire.response's keywords).
_BAD_LAYOUTS: dict[Behaviour, dict[str, Any]] = {
    Behaviour.REPEATED_STATUS: {"repeat": {0x0900: struct.pack("<H", 0xC000)}},
    Behaviour.NO_GROUP_LENGTH: {"group_length": "missing"},
    Behaviour.WRONG_GROUP_LENGTH: {"group_length": "wrong"},
    Behaviour.OUT_OF_ORDER: {"reverse": True},
    Behaviour.REPEATED_SAME: {"repeat": {0x0900: struct.pack("<H", 0x0000)}},
}
_IDLE = (
    Behaviour.IDLE_CLOSE,
    Behaviour.IDLE_RELEASE,
    Behaviour.IDLE_ABORT,
    Behaviour.IDLE_GARBAGE,
)
_ANSWERING = (Behaviour.ACCEPT, Behaviour.RELEASE_COLLISION, *_IDLE)


@dataclass(frozen=True, slots=True)
class Pdu:
    """One PDU as received: its type and the length field of its header."""

    pdu_type: int
    length: int


@dataclass
class HostilePeer:
    """A raw-socket peer on a free 127.0.0.1 port; one connection at a time, in one thread.

    ``max_pdu`` is the maximum length it announces (0 = unlimited). ``status``,
    ``error_comment`` and ``offending`` make up its C-STORE responses. ``transfer_syntaxes``
    limits what it accepts (first proposed syntax it knows wins). ``then`` is the behaviour of
    every connection after the first (default: the same), so a test can show the sender
    recovers on a new association.
    """

    behaviour: Behaviour = Behaviour.ACCEPT
    then: Behaviour | None = None
    max_pdu: int = 16384
    status: int = 0x0000
    error_comment: str | None = None
    offending: int | None = None
    transfer_syntaxes: tuple[str, ...] = (EXPLICIT, IMPLICIT)
    port: int = 0
    pdus: list[Pdu] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    datasets: list[bytes] = field(default_factory=list)
    requested_max_pdu: list[int] = field(default_factory=list)
    calling_aets: list[str] = field(default_factory=list)
    connections: int = 0
    aborted: threading.Event = field(default_factory=threading.Event)  # we got an A-ABORT
    released: threading.Event = field(default_factory=threading.Event)  # we got an A-RELEASE-RQ
    closed_by_peer: threading.Event = field(default_factory=threading.Event)  # EOF from the SCU
    release_rp: threading.Event = field(default_factory=threading.Event)  # we got an A-RELEASE-RP
    events: list[str] = field(default_factory=list)  # association-life PDUs, in order
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> HostilePeer:
        # STOP_READING: a small receive window, so the sender's writes block soon after we stop
        # reading.
        small = self.behaviour is Behaviour.STOP_READING
        listener = _listen(self.port, 8, rcvbuf=4096 if small else None)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name=f"hostile-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> HostilePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def p_data_lengths(self) -> list[int]:
        with self._lock:
            return [p.length for p in self.pdus if p.pdu_type == 0x04]

    # -- the server ---------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.connections += 1
                if self.connections > 1 and self.then is not None:
                    self.behaviour = self.then
            try:
                conn.settimeout(0.05)
                self._converse(_Conn(conn, self._stop))
            except _Closed:
                pass
            finally:
                conn.close()

    def _idle(self) -> None:
        """Do nothing (not even read) until stopped."""
        self._stop.wait()
        raise _Closed

    def _converse(self, conn: _Conn) -> None:
        prim = _read_associate_rq(conn)
        with self._lock:
            self.calling_aets.append(str(prim.calling_ae_title))
            for item in prim.user_information:
                if isinstance(item, MaximumLengthNotification):
                    self.requested_max_pdu.append(int(item.maximum_length_received))
        if self.behaviour is Behaviour.NO_AC:
            self._drain_until_stopped(conn)
        if self.behaviour is Behaviour.GARBAGE_AC:
            conn.send(os.urandom(3) + b"\x00\x00\x00\x10" + b"\xee" * 16)
            self._drain_until_stopped(conn)
        if self.behaviour is Behaviour.BAD_AC:
            good = self._accept(prim)
            # Claim the last item is 200 bytes longer than the PDU holds.
            last_item = good.rfind(b"\x50\x00")
            (length,) = struct.unpack_from(">H", good, last_item + 2)
            bad = bytearray(good)
            struct.pack_into(">H", bad, last_item + 2, length + 200)
            conn.send(bytes(bad))
            self._drain_until_stopped(conn)
        if self.behaviour is Behaviour.SHORT_RJ:
            conn.send(b"\x03\x00\x00\x00\x00\x02\x00\x01")
            self._drain_until_stopped(conn)
        if self.behaviour is Behaviour.REJECT:
            # rejected-permanent by the service user: called AE title not recognised
            conn.send(_associate_rj(0x01, 0x01, 0x07))
            self._drain_until_stopped(conn)
        conn.send(self._accept(prim))
        command = bytearray()
        dataset = bytearray()
        current: Command | None = None
        while True:
            pdu_type, body = conn.read_pdu()
            with self._lock:
                self.pdus.append(Pdu(pdu_type, len(body)))
            if pdu_type == 0x05:
                self._event("A-RELEASE-RQ")
                self.released.set()
                if self.behaviour is Behaviour.RELEASE_COLLISION:
                    self._collide(conn)
                conn.send(_RELEASE_RP)
                raise _Closed
            if pdu_type == 0x07:
                self._event("A-ABORT")
                self.aborted.set()
                raise _Closed
            if pdu_type == 0x06:
                self._event("A-RELEASE-RP")
                self.release_rp.set()
                raise _Closed
            if pdu_type != 0x04:
                raise _Closed
            for context_id, control, value in _pdvs(body):
                if control & 0x01:
                    command += value
                    if not control & 0x02:
                        continue
                    current = _decode_command(bytes(command))
                    command = bytearray()
                    with self._lock:
                        self.commands.append(current)
                    if current.command_field == 0x0030:  # C-ECHO-RQ
                        if self.behaviour is not Behaviour.NEVER_ANSWER:
                            conn.send(_response(context_id, current, 0x8030, 0, None, None))
                        continue
                    self._after_command(conn, context_id, current)
                    continue
                dataset += value
                if self.behaviour is Behaviour.ABORT_MID_FILE:
                    conn.send(_ABORT)
                    raise _Closed
                if control & 0x02:
                    with self._lock:
                        self.datasets.append(bytes(dataset))
                    dataset = bytearray()
                    if current is None:
                        continue
                    damage = _BAD_RESPONSES.get(self.behaviour)
                    layout = _BAD_LAYOUTS.get(self.behaviour)
                    if damage is not None:
                        conn.send(self._store_response(context_id, current, damage))
                    elif layout is not None:
                        conn.send(self._store_response(context_id, current, layout=layout))
                    elif self.behaviour in _ANSWERING:
                        conn.send(self._store_response(context_id, current))
                    if self.behaviour in _IDLE:
                        self._go_idle(conn, context_id)

    def _after_command(self, conn: _Conn, context_id: int, command: Command) -> None:
        b = self.behaviour
        if b is Behaviour.ANSWER_EARLY:
            conn.send(self._store_response(context_id, command))
        elif b is Behaviour.CLOSE:
            raise _Closed
        elif b is Behaviour.STOP_READING:
            self._idle()
        elif b is Behaviour.HUGE_PDU:
            conn.send(b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 64)
            self._drain_until_stopped(conn)
        elif b is Behaviour.GARBAGE:
            conn.send(b"\xfe\xed\xfa\xce" * 16)
            self._drain_until_stopped(conn)

    def _event(self, what: str) -> None:
        with self._lock:
            self.events.append(what)

    def _collide(self, conn: _Conn) -> None:
        """Our A-RELEASE-RQ has arrived: send ours as if they crossed on the wire, and wait for
        the requestor's A-RELEASE-RP before sending ours (PS3.8 Sta10 -> Sta12 as acceptor)."""
        conn.send(_RELEASE_RQ)
        self._event("sent A-RELEASE-RQ")
        pdu_type, _ = conn.read_pdu()
        if pdu_type != 0x06:
            self._event(f"PDU 0x{pdu_type:02X}")
            raise _Closed
        self._event("A-RELEASE-RP")
        self.release_rp.set()

    def _go_idle(self, conn: _Conn, context_id: int) -> None:
        """The first file is answered; now end the association the idle way we were told to."""
        # What is sent from here is on the wire when its event is recorded: with Nagle's
        # algorithm a PDU right behind the response waited for the requestor's ACK, and a test
        # that saw "sent A-ABORT" sent its next file into an abort still in flight (a RETRY
        # the product rightly gives; the test means the abort that has arrived).
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b = self.behaviour
        if b is Behaviour.IDLE_CLOSE:
            conn.sock.close()  # before the event, so a test that waits for it sees EOF
            self._event("closed")
            raise _Closed
        if b is Behaviour.IDLE_ABORT:
            conn.send(_ABORT)
            self._event("sent A-ABORT")
            raise _Closed
        if b is Behaviour.IDLE_GARBAGE:
            conn.send(struct.pack(">BxIIBB", 0x04, 8, 4, context_id, 0x03) + b"\x00\x00")
            self._event("sent P-DATA-TF")
            self._drain_until_stopped(conn)
        conn.send(_RELEASE_RQ)
        self._event("sent A-RELEASE-RQ")
        pdu_type, _ = conn.read_pdu()
        self._event(_NAMES.get(pdu_type, f"PDU 0x{pdu_type:02X}"))
        if pdu_type == 0x06:
            self.release_rp.set()
        raise _Closed

    def _drain_until_stopped(self, conn: _Conn) -> None:
        """Read and discard until the other side goes away or we are stopped."""
        while True:
            try:
                conn.recv_some()
            except _Closed:
                self.closed_by_peer.set()
                raise

    def _accept(self, rq: A_ASSOCIATE) -> bytes:
        def answer(proposed: PresentationContext) -> tuple[str, int]:
            chosen = [ts for ts in proposed.transfer_syntax if ts in self.transfer_syntaxes]
            # 4: transfer syntaxes not supported
            return (chosen[0], 0x00) if chosen else (proposed.transfer_syntax[0], 0x04)

        return _associate_ac(
            rq, answer, max_pdu=self.max_pdu, implementation_uid="1.2.826.0.1.3680043.10.1284.99"
        )

    def _store_response(
        self,
        context_id: int,
        command: Command,
        damage: dict[int, bytes | None] | None = None,
        *,
        layout: dict[str, Any] | None = None,
    ) -> bytes:
        return _response(
            context_id,
            command,
            0x8001,
            self.status,
            self.error_comment,
            self.offending,
            replace=damage,
            **(layout or {}),
        )


# -- a pynetdicom SCP that keeps everything ----------------------------------------------------


@dataclass
class CapturingSCP(ScriptedSCP):
    """:class:`ScriptedSCP` that keeps each data set's bytes (``event.request.DataSet``) by SOP
    Instance UID, each request's priority, called AE title and source address, and the
    association events; ``abort_on=N`` aborts the association in the N-th C-STORE handler
    (counted over the SCP's life), so that file is not stored."""

    abort_on: int | None = None
    datasets: dict[str, bytes] = field(default_factory=dict)
    priorities: list[int] = field(default_factory=list)
    called_aets: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    associations: int = 0
    aborts: int = 0
    releases: int = 0
    stores: int = 0

    def _handle(self, event: Any) -> int:
        with self._lock:
            self.stores += 1
            n = self.stores
            self.priorities.append(int(event.request.Priority))
            self.called_aets.append(str(event.assoc.requestor.primitive.called_ae_title))
            self.addresses.append(str(event.assoc.requestor.address))
        if self.abort_on == n:
            event.assoc.abort()
            return 0xC000
        status = super()._handle(event)
        if status in (0x0000, 0xB000, 0xB006, 0xB007):
            with self._lock:
                self.datasets[str(event.request.AffectedSOPInstanceUID)] = bytes(
                    event.request.DataSet.getvalue()
                )
        return status

    def _count(self, attribute: str) -> None:
        with self._lock:
            setattr(self, attribute, getattr(self, attribute) + 1)

    def start(self) -> CapturingSCP:
        super().start()
        self._server.bind(evt.EVT_ACCEPTED, lambda event: self._count("associations"))
        self._server.bind(evt.EVT_ABORTED, lambda event: self._count("aborts"))
        self._server.bind(evt.EVT_RELEASED, lambda event: self._count("releases"))
        return self

    def __enter__(self) -> CapturingSCP:
        return self.start()

    def received_uids(self) -> list[str]:
        with self._lock:
            return [r.sop_instance_uid for r in self.received]

    def received_list(self) -> list[Received]:
        with self._lock:
            return list(self.received)
