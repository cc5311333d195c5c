"""Just enough of the DICOM upper layer and DIMSE for the raw-socket test peers (``hostile.py``,
``faults/hostile_peer.py``): listen, read PDUs with a stop flag, decode the A-ASSOCIATE-RQ and
encode the A-ASSOCIATE-AC/RJ with pynetdicom's PDU classes, split a P-DATA-TF into its PDVs,
decode a request's command set and encode a C-STORE-RSP / C-ECHO-RSP by hand."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

PDU_HEADER = struct.Struct(">BxI")
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class Closed(Exception):
    """The conversation is over (EOF, stop requested, or the script ends it)."""


@dataclass(frozen=True, slots=True)
class Command:
    """A DIMSE command set received, decoded just enough to answer it."""

    command_field: int
    message_id: int
    priority: int | None
    sop_class_uid: str
    sop_instance_uid: str


class Conn:
    """A blocking socket read in short timeouts, so that a stop request is noticed."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.buf = bytearray()

    def recv_some(self) -> None:
        while True:
            if self.stop.is_set():
                raise Closed
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                raise Closed from None
            if not chunk:
                raise Closed
            self.buf += chunk
            return

    def drain(self) -> None:
        """Read and discard until the other side goes away (or we are stopped)."""
        while True:
            self.recv_some()
            self.buf.clear()

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.recv_some()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = PDU_HEADER.unpack(self.read_exactly(6))
        return pdu_type, self.read_exactly(length)

    def send(self, data: bytes) -> None:
        deadline = time.monotonic() + 5.0
        view = memoryview(data)
        while view:
            if self.stop.is_set() or time.monotonic() > deadline:
                raise Closed
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError:
                raise Closed from None
            view = view[sent:]


def listen(port: int, backlog: int, *, rcvbuf: int | None = None) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: a free port) whose ``accept`` times out
    every 50 ms, so that the accepting loop notices a stop request."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", port))
    listener.listen(backlog)
    listener.settimeout(0.05)
    return listener


def read_associate_rq(conn: Conn) -> A_ASSOCIATE:
    """The first PDU of a connection, an A-ASSOCIATE-RQ, as pynetdicom's primitive (anything
    else ends the conversation)."""
    pdu_type, body = conn.read_pdu()
    if pdu_type != 0x01:
        raise Closed
    rq = A_ASSOCIATE_RQ()
    rq.decode(PDU_HEADER.pack(pdu_type, len(body)) + body)
    primitive: A_ASSOCIATE = rq.to_primitive()
    return primitive


def associate_ac(
    rq: A_ASSOCIATE,
    answer: Callable[[PresentationContext], tuple[str, int]],
    *,
    max_pdu: int,
    implementation_uid: str,
) -> bytes:
    """An A-ASSOCIATE-AC for ``rq``: ``answer`` gives each proposed context's (transfer syntax,
    result), 0 accepting it."""
    ac = A_ASSOCIATE()
    ac.application_context_name = rq.application_context_name
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    results = []
    for proposed in rq.presentation_context_definition_list:
        result = PresentationContext()
        result.context_id = proposed.context_id
        result.abstract_syntax = proposed.abstract_syntax
        syntax, outcome = answer(proposed)
        result.transfer_syntax = [syntax]
        result.result = outcome
        results.append(result)
    ac.presentation_context_definition_results_list = results
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = implementation_uid
    ac.user_information = [max_len, impl]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return bytes(pdu.encode())


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4: result 1 permanent, 2 transient)."""
    prim = A_ASSOCIATE()
    prim.result, prim.result_source, prim.diagnostic = result, source, diagnostic
    rj = A_ASSOCIATE_RJ()
    rj.from_primitive(prim)
    return bytes(rj.encode())


APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    max_pdu: int = 16384,
    window: tuple[int, int] | None = None,
    called: str = "FORWARDER",
    calling: str = "RAW",
    version: int = 1,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU, byte by byte (PS3.8 9.3.2), proposing ``contexts`` as (ID,
    abstract syntax, transfer syntaxes)."""
    items = [_item(0x10, APP_CONTEXT.encode())]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in syntaxes)
        items.append(_item(0x20, bytes((cid, 0, 0, 0)) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4")
    if window is not None:
        user += _item(0x53, struct.pack(">HH", *window))
    items.append(_item(0x50, user))
    body = struct.pack(">H2x", version) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + b"".join(items)
    return PDU_HEADER.pack(0x01, len(body)) + body


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise Closed(f"connection closed with {len(data)} of {n} bytes read")
        data += chunk
    return data


def rejection(
    port: int,
    calling: str = "RAW",
    called: str = "FORWARDER",
    contexts: list[tuple[int, str, list[str]]] | None = None,
) -> tuple[int, int, int] | None:
    """How the SCP at 127.0.0.1:``port`` answers an A-ASSOCIATE-RQ, read off a plain socket:
    the (result, source, reason) of its A-ASSOCIATE-RJ, or None for an A-ASSOCIATE-AC (the
    association is then released). Anything else (an A-ABORT, the connection closed) fails.

    pynetdicom's requestor (3.0.4) cannot be asked this: when the A-ASSOCIATE-RJ arrives, and
    its reactor thread closes the connection, before the calling thread has looked at the
    socket, ``acse._negotiate_as_requestor`` finds it not connected and reports the
    association aborted, with the rejection unread in its queue (seen 5 times in 100 on two
    loaded cores)."""
    rq = associate_rq(
        contexts or [(1, VERIFICATION, [IMPLICIT_LE])], called=called, calling=calling
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq)
        pdu_type, length = PDU_HEADER.unpack(_read_exactly(sock, 6))
        body = _read_exactly(sock, length)
        if pdu_type == 0x03:
            return body[1], body[2], body[3]
        if pdu_type != 0x02:
            raise AssertionError(f"answered an A-ASSOCIATE-RQ with PDU type 0x{pdu_type:02X}")
        sock.sendall(RELEASE_RQ)
        assert _read_exactly(sock, 10) == RELEASE_RP
        return None


def pdvs(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The (presentation context ID, message control header, value) of each PDV item of a
    P-DATA-TF body, in order."""
    pos = 0
    while pos + 6 <= len(body):
        (item_len,) = struct.unpack_from(">I", body, pos)
        context_id, control = body[pos + 4], body[pos + 5]
        value = body[pos + 6 : pos + 4 + item_len]
        pos += 4 + item_len
        yield context_id, control, value


def uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def text_value(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def elem(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def decode_command(raw: bytes) -> Command:
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        _, element, length = struct.unpack_from("<HHI", raw, pos)
        values[element] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length

    def us(element: int) -> int | None:
        return int(struct.unpack("<H", values[element][:2])[0]) if element in values else None

    def uid(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    return Command(
        command_field=us(0x0100) or 0,
        message_id=us(0x0110) or 0,
        priority=us(0x0700),
        sop_class_uid=uid(0x0002),
        sop_instance_uid=uid(0x1000),
    )


def response(
    context_id: int,
    command: Command,
    command_field: int,
    status: int,
    error_comment: str | None = None,
    offending: int | None = None,
    *,
    replace: Mapping[int, bytes | None] | None = None,
    group_length: str = "right",
    reverse: bool = False,
    repeat: Mapping[int, bytes] | None = None,
) -> bytes:
    """A one-PDV P-DATA PDU holding a C-STORE-RSP / C-ECHO-RSP command set. ``replace`` maps
    an element number of group 0000 to the value to send instead, or None to leave it out
    (hostile peers: a missing or empty Status, a wrong Message ID...).

    Layout faults (PS3.7 E.1), which pynetdicom's decoder tolerates: ``group_length`` "right",
    "missing" (no (0000,0000)) or "wrong" (says 10 bytes more than follow); ``reverse`` puts the
    elements in descending order; ``repeat`` maps an element to a second value sent again after
    the first (the same value, or another)."""
    values = {
        0x0002: uid_value(command.sop_class_uid or "1.2.840.10008.1.1"),
        0x0100: struct.pack("<H", command_field),
        0x0120: struct.pack("<H", command.message_id),
        0x0800: struct.pack("<H", 0x0101),
        0x0900: struct.pack("<H", status),
    }
    if offending is not None:
        values[0x0901] = struct.pack("<HH", offending >> 16, offending & 0xFFFF)
    if error_comment is not None:
        values[0x0902] = text_value(error_comment)
    if command.sop_instance_uid:
        values[0x1000] = uid_value(command.sop_instance_uid)
    for element, value in (replace or {}).items():
        if value is None:
            values.pop(element, None)
        else:
            values[element] = value
    body = b"".join(elem(e, values[e]) for e in sorted(values, reverse=reverse))
    body += b"".join(elem(e, v) for e, v in (repeat or {}).items())
    if group_length == "missing":
        cmd = body
    else:
        said = len(body) + (10 if group_length == "wrong" else 0)
        cmd = elem(0x0000, struct.pack("<I", said)) + body
    return struct.pack(">BxIIBB", 0x04, len(cmd) + 6, len(cmd) + 2, context_id, 0x03) + cmd
