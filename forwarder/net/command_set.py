"""DIMSE command sets for the sender, encoded and decoded by hand (PS3.7: implicit VR little
endian, group 0000).

C-STORE-RQ and C-ECHO-RQ out; their responses in: the command fragments gathered from P-DATA-TF
PDVs (:func:`collect_command`), split into elements (:func:`decode_command`), checked against the
request they answer (:func:`check_response`). The PDUs around them are
:mod:`forwarder.net.pdu`'s.

Every decoder here is strict and total: whatever bytes a peer sends, it either returns values
that PS3.7/PS3.8 allow or raises :class:`~forwarder.errors.ProtocolError` naming the fault, never
``IndexError``, ``struct.error`` or ``UnicodeDecodeError`` (tests/test_pdu_fuzz.py feeds them
random and mutated PDUs). Strict means on what identifies a response and what it says; layout
faults that pynetdicom and DCMTK tolerate and that change nothing (a missing or wrong Command
Group Length, elements out of order) are tolerated and reported to the caller
(:func:`decode_command`).
"""

from __future__ import annotations

import struct
from collections.abc import Container, Mapping

from forwarder.errors import ProtocolError
from forwarder.net.pdu import VERIFICATION_SOP_CLASS

PRIORITY = {"medium": 0x0000, "high": 0x0001, "low": 0x0002}

C_STORE_RSP = 0x8001
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 E.1)
PENDING = (0xFF00, 0xFF01)

MAX_COMMAND_SET = 64 * 1024  # a response command set is a few hundred bytes


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def encode_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int) -> bytes:
    """The C-STORE-RQ command set (implicit VR little endian, group 0000 with its length)."""
    body = b"".join(
        (
            _element(0x0002, _uid_bytes(sop_class)),
            _element(0x0100, b"\x01\x00"),  # CommandField: C-STORE-RQ
            _element(0x0110, struct.pack("<H", message_id)),
            _element(0x0700, struct.pack("<H", priority)),
            _element(0x0800, b"\x01\x00"),  # CommandDataSetType: a data set follows
            _element(0x1000, _uid_bytes(sop_instance)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_echo_rq(message_id: int) -> bytes:
    body = b"".join(
        (
            _element(0x0002, _uid_bytes(VERIFICATION_SOP_CLASS)),
            _element(0x0100, b"\x30\x00"),  # CommandField: C-ECHO-RQ
            _element(0x0110, struct.pack("<H", message_id)),
            _element(0x0800, b"\x01\x01"),  # no data set
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


# -- command sets in ------------------------------------------------------------------------------

_ELEMENT = struct.Struct("<HHI")


def decode_command(raw: bytes, notes: list[str] | None = None) -> dict[int, bytes]:
    """Split an implicit VR little endian group 0000 command set into element -> value.

    Rejected (:class:`ProtocolError`): an element outside group 0000, an element header or value
    running past the end, and an element repeated with a different value (two Statuses: which
    one is true?). Tolerated, as pynetdicom and DCMTK tolerate them, because they do not change
    what the response says: a missing Command Group Length (0000,0000), a wrong one, elements
    out of ascending order, an element repeated with the same value. The end of a command set
    is marked by the last-fragment bit of its PDV (PS3.8 9.3.5.1), so the group length adds
    nothing; refusing it would resend (and finally fail) every file to a PACS that gets it
    wrong, although the data set has gone out and the peer has stored it. Each tolerated
    irregularity is appended to ``notes``, when given, for the caller to log.
    """
    end = len(raw)
    out: dict[int, bytes] = {}
    pos, last = 0, -1
    out_of_order = False
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("DIMSE command set ends inside an element header")
        group, elem, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000:
            raise ProtocolError(f"DIMSE command set holds element ({group:04X},{elem:04X})")
        if length > end - pos:
            raise ProtocolError(f"DIMSE command set: element (0000,{elem:04X}) runs past its end")
        value = raw[pos : pos + length]
        pos += length
        seen = out.get(elem)
        if seen is not None:
            if seen != value:
                raise ProtocolError(
                    f"DIMSE command set: element (0000,{elem:04X}) repeated with another value"
                )
            if notes is not None:
                notes.append(f"element (0000,{elem:04X}) repeated")
            continue
        if elem < last:
            out_of_order = True
        out[elem] = value
        last = max(last, elem)
    if notes is not None:
        group_length = out.get(0x0000)
        if group_length is None:
            notes.append("no Command Group Length (0000,0000)")
        elif len(group_length) != 4:
            notes.append(f"Command Group Length (0000,0000) of {len(group_length)} bytes, not 4")
        else:
            said = int.from_bytes(group_length, "little")
            if said != end - 12:  # every other element, wherever it stands
                notes.append(f"Command Group Length says {said} bytes, {end - 12} follow")
        if out_of_order:
            notes.append("elements out of ascending order")
    return out


def _us(values: Mapping[int, bytes], elem: int, name: str) -> int:
    value = values.get(elem)
    if value is None:
        raise ProtocolError(f"DIMSE response without {name} (0000,{elem:04X})")
    if len(value) != 2:
        raise ProtocolError(
            f"DIMSE response: {name} (0000,{elem:04X}) has {len(value)} bytes, not 2"
        )
    return int.from_bytes(value, "little")


def _same_uid(value: bytes | None, ours: bytes) -> bool:
    """A UID element equals ours, or is absent; PS3.5 pads UIDs with a NUL, some peers with a
    space. An empty value counts as absent: the response's Affected SOP Class/Instance UIDs are
    U(=) in PS3.7 9.3.1.2 (may be left out), and some SCPs send the element with no value."""
    if value is None:
        return True
    value = value.rstrip(b"\x00 ")
    return not value or value == ours


def check_response(
    values: Mapping[int, bytes],
    command_field: int,
    message_id: int,
    sop_class: bytes,
    sop_instance: bytes | None = None,
) -> int:
    """Check a decoded C-STORE-RSP / C-ECHO-RSP against the request it must answer, and return its
    Status.

    PS3.7 9.3.1.2 and 9.3.5.2: Command Field is the response to ours; Message ID Being Responded
    To is our Message ID; Command Data Set Type says no data set; Status is present with 2 bytes
    and is not Pending (C-STORE and C-ECHO have no pending responses); Affected SOP Class UID and
    Affected SOP Instance UID, optional in the response, equal ours when present. ``sop_class``
    and ``sop_instance`` are our UIDs as ASCII bytes, without padding.
    """
    field = _us(values, 0x0100, "Command Field")
    if field != command_field:
        raise ProtocolError(
            f"DIMSE response with Command Field 0x{field:04X} where 0x{command_field:04X} "
            "answers our request"
        )
    responded = _us(values, 0x0120, "Message ID Being Responded To")
    if responded != message_id:
        raise ProtocolError(
            f"DIMSE response to message {responded}; our request was message {message_id}"
        )
    if _us(values, 0x0800, "Command Data Set Type") != NO_DATA_SET:
        raise ProtocolError("DIMSE response announces a data set (Command Data Set Type)")
    status = _us(values, 0x0900, "Status")
    if status in PENDING:
        raise ProtocolError(
            f"DIMSE response with Pending status 0x{status:04X}, which C-STORE and C-ECHO "
            "do not have"
        )
    if not _same_uid(values.get(0x0002), sop_class):
        raise ProtocolError("DIMSE response: Affected SOP Class UID is not the one we sent")
    if sop_instance is not None and not _same_uid(values.get(0x1000), sop_instance):
        raise ProtocolError("DIMSE response: Affected SOP Instance UID is not the one we sent")
    return status


def collect_command(body: bytes, context_ids: Container[int], command: bytearray) -> bool:
    """Append the command fragments of one P-DATA-TF PDU body to ``command``; True once the last
    fragment is in.

    PS3.8 9.3.5: one or more PDV items, each at least 2 bytes (context ID and message control
    header), together exactly filling the PDU; the context ID one we negotiated. We only ever
    wait for a response, which has no data set (PS3.7 9.3.1.2), so a data set fragment, or any
    PDV after the last command fragment, is a protocol error.
    """
    pos, end = 0, len(body)
    if end < 6:
        raise ProtocolError(f"P-DATA-TF of {end} bytes holds no PDV item")
    done = False
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("P-DATA-TF ends inside a PDV item header")
        (item_len,) = struct.unpack_from(">I", body, pos)
        if item_len < 2:
            raise ProtocolError(f"PDV item of length {item_len} (at least 2)")
        if item_len > end - pos - 4:
            raise ProtocolError("PDV item runs past the end of its P-DATA-TF")
        context_id, control = body[pos + 4], body[pos + 5]
        if context_id not in context_ids:
            raise ProtocolError(f"PDV on presentation context {context_id}, which we never agreed")
        if done:
            raise ProtocolError("PDV after the last fragment of the DIMSE response")
        if not control & 0x01:
            raise ProtocolError("data set fragment in a DIMSE response, which has none")
        command += body[pos + 6 : pos + 4 + item_len]
        if len(command) > MAX_COMMAND_SET:
            raise ProtocolError(f"DIMSE command set over {MAX_COMMAND_SET} bytes")
        done = bool(control & 0x02)
        pos += 4 + item_len
    return done


def offending_text(value: bytes | None) -> str | None:
    """Offending Element (0000,0901), AT values: ``(0010,0010)``, several comma-separated (hex
    when it is not a whole number of tags)."""
    if not value:
        return None
    if len(value) % 4:
        return value.hex()
    tags = struct.unpack(f"<{len(value) // 2}H", value)
    return ", ".join(f"({g:04X},{e:04X})" for g, e in zip(tags[::2], tags[1::2], strict=True))


def command_text(value: bytes | None) -> str | None:
    if not value:
        return None
    return value.rstrip(b"\x00 ").decode("ascii", "replace") or None
