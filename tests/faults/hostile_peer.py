"""A raw-socket DICOM peer that misbehaves on purpose, for the daemon's fault tests.

It speaks just enough of the upper layer protocol: it decodes the A-ASSOCIATE-RQ and builds its
answer with pynetdicom's PDU classes, reassembles P-DATA into commands and data sets, and then
does what its *script* says for that connection. The script is a list of :class:`Act` values,
one per connection in order (the last one repeats), so a test can make the first attempts fail
and a later one succeed::

    with HostilePeer([Act.NEVER_ANSWER, Act.STORE]) as peer:   # 1st association stalls
        ...
        assert peer.stored_uids() == {...}

Every connection has its own thread; :meth:`HostilePeer.stop` closes the listener and every
connection and joins all threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dimse_wire import ABORT as _ABORT
from dimse_wire import RELEASE_RP as _RELEASE_RP
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
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext


class Act(StrEnum):
    """What the peer does on one connection."""

    STORE = "store"  # accept; answer each C-STORE with ``status`` (after ``delay``)
    REJECT_PERMANENT = "reject-permanent"  # A-ASSOCIATE-RJ, result 1 (called AE not recognised)
    REJECT_TRANSIENT = "reject-transient"  # A-ASSOCIATE-RJ, result 2 (local limit exceeded)
    NO_CONTEXTS = "no-contexts"  # A-ASSOCIATE-AC rejecting every presentation context
    NO_AC = "no-ac"  # read the A-ASSOCIATE-RQ, answer nothing
    NEVER_ANSWER = "never-answer"  # accept, read every C-STORE, never answer
    ABORT_MID_FILE = "abort-mid-file"  # A-ABORT after the first data set fragment
    CLOSE_MID_FILE = "close-mid-file"  # close the socket (no A-ABORT) mid data set
    CLOSE_AFTER_DATA = "close-after-data"  # read the whole data set, then close (no answer)
    MALFORMED_PDU = "malformed-pdu"  # answer the data set with a PDU of unknown type 0x0A
    HUGE_PDU = "huge-pdu"  # answer with a P-DATA header claiming 0xFFFFFFF0 bytes


@dataclass
class HostilePeer:
    """A misbehaving SCP on a free 127.0.0.1 port (see the module docstring)."""

    script: Sequence[Act] = (Act.STORE,)
    status: int | Callable[[str], int] = 0x0000  # or a function of the SOP Instance UID
    error_comment: str | None = None
    delay: float = 0.0
    max_pdu: int = 16384
    port: int = 0
    connections: int = 0
    acts: list[Act] = field(default_factory=list)  # what each connection got, in order
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs answered with Success
    answered: list[tuple[str, int]] = field(default_factory=list)  # (UID, status) of answers
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)
    _base: int = 0  # connections before the last set_script()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> HostilePeer:
        listener = _listen(self.port, 16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        t = threading.Thread(target=self._accept_loop, name=f"hostile-{self.port}")
        self._threads.append(t)
        t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(10)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def __enter__(self) -> HostilePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_script(self, script: Sequence[Act]) -> None:
        """Change what the next connections get (counting starts again)."""
        with self._lock:
            self.script = tuple(script)
            self._base = self.connections

    def stored_uids(self) -> set[str]:
        with self._lock:
            return set(self.stored)

    # -- serving --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                index = self.connections - self._base
                act = self.script[min(index, len(self.script) - 1)]
                self.connections += 1
                self.acts.append(act)
                self._socks.append(sock)
                t = threading.Thread(
                    target=self._serve, args=(sock, act), name=f"hostile-{self.port}-conn"
                )
                self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, act: Act) -> None:
        sock.settimeout(0.05)
        conn = _Conn(sock, self._stop)
        try:
            self._converse(conn, act)
        except _Closed:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _converse(self, conn: _Conn, act: Act) -> None:
        prim = _read_associate_rq(conn)
        if act is Act.NO_AC:
            conn.drain()
        if act in (Act.REJECT_PERMANENT, Act.REJECT_TRANSIENT):
            conn.send(_reject(act))
            conn.drain()
        conn.send(self._accept(prim, none=act is Act.NO_CONTEXTS))
        command = bytearray()
        current: Command | None = None
        while True:
            pdu_type, body = conn.read_pdu()
            if pdu_type == 0x05:
                conn.send(_RELEASE_RP)
                raise _Closed
            if pdu_type != 0x04:
                raise _Closed  # A-ABORT or anything else
            for context_id, control, value in _pdvs(body):
                if control & 0x01:
                    command += value
                    if control & 0x02:
                        current = _decode_command(bytes(command))
                        command = bytearray()
                        if current.command_field == 0x0030:  # C-ECHO-RQ
                            conn.send(_response(context_id, current, 0x8030, 0, None))
                            current = None
                    continue
                if act is Act.ABORT_MID_FILE:
                    conn.send(_ABORT)
                    raise _Closed
                if act is Act.CLOSE_MID_FILE:
                    raise _Closed
                if not control & 0x02 or current is None:
                    continue
                # the whole data set is here
                if act is Act.NEVER_ANSWER:
                    continue
                if act is Act.CLOSE_AFTER_DATA:
                    raise _Closed
                if act is Act.MALFORMED_PDU:
                    conn.send(b"\x0a\x00\x00\x00\x00\x04\xde\xad\xbe\xef")
                    conn.drain()
                if act is Act.HUGE_PDU:
                    conn.send(b"\x04\x00\xff\xff\xff\xf0" + bytes(64))
                    conn.drain()
                if self.delay and self._stop.wait(self.delay):
                    raise _Closed
                uid = current.sop_instance_uid
                status = self.status(uid) if callable(self.status) else self.status
                conn.send(_response(context_id, current, 0x8001, status, self.error_comment))
                with self._lock:
                    self.answered.append((uid, status))
                    if status in (0x0000, 0xB000, 0xB006, 0xB007, 0x0001):
                        self.stored.append(uid)
                current = None

    def _accept(self, rq: A_ASSOCIATE, *, none: bool) -> bytes:
        def answer(proposed: PresentationContext) -> tuple[str, int]:
            # 3: abstract syntax not supported
            return proposed.transfer_syntax[0], 0x03 if none else 0x00

        return _associate_ac(
            rq, answer, max_pdu=self.max_pdu, implementation_uid="1.2.826.0.1.3680043.10.1284.66"
        )


def _reject(act: Act) -> bytes:
    if act is Act.REJECT_PERMANENT:
        return _associate_rj(0x01, 0x01, 0x07)  # called AE unknown
    return _associate_rj(0x02, 0x03, 0x02)  # local limit
