"""Just enough of the DICOM upper layer and DIMSE, by hand, for the raw-socket test peers
(``hostile.py``, ``faults/hostile_peer.py``): read PDUs with a stop flag, decode a request's
command set, encode a C-STORE-RSP / C-ECHO-RSP."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

PDU_HEADER = struct.Struct(">BxI")


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
