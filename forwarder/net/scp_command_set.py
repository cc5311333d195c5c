"""The acceptor's side of DIMSE: command sets decoded and encoded by hand (PS3.7, implicit VR
little endian, group 0000).

What :mod:`forwarder.net.command_set` is for the sender, this is for the Storage SCP: C-STORE-RQ,
C-ECHO-RQ, C-CANCEL-RQ, N-ACTION-RQ and N-EVENT-REPORT-RQ command sets in (PS3.7 9.3.1.1,
9.3.5.1, 10.3.4.1, 10.3.1.1) with the N-EVENT-REPORT-RSP answering a report we sent, and their
responses out; the N-EVENT-REPORT-RQ of a storage commitment report we send. Packed with
``struct``, no pydicom, no pynetdicom, no state. The PDUs around them are
:mod:`forwarder.net.scp_codec`'s.

Every decoder is strict and total: whatever a peer sends, it returns values PS3.7 allows or
raises :class:`~forwarder.errors.ProtocolError` naming the fault (the caller answers A-ABORT).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from forwarder.errors import ProtocolError
from forwarder.net.command_set import NO_DATA_SET, decode_command

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
N_ACTION_RQ = 0x0130  # storage commitment requests (PS3.7 10.3.4.1)
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100  # the answer to a storage commitment report we sent

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<HHIH")  # one US element of the command group


@dataclass(frozen=True, slots=True)
class DimseRequest:
    """A C-STORE-RQ, C-ECHO-RQ or N-ACTION-RQ command set, or the N-EVENT-REPORT-RSP answering
    our report (values as sent, padding removed). For N-ACTION the SOP Class and Instance are the
    Requested ones; for the N-EVENT-REPORT-RSP ``message_id`` is the Message ID Being Responded
    To."""

    command_field: int
    message_id: int
    sop_class: str
    sop_instance: str  # "" for C-ECHO
    has_data_set: bool
    priority: int = 0
    action_type: int = 0  # N-ACTION's Action Type ID; N-EVENT-REPORT's Event Type ID
    status: int | None = None  # N-EVENT-REPORT-RSP's Status


def _us(values: dict[int, bytes], elem: int, name: str) -> int:
    value = values.get(elem)
    if value is None:
        raise ProtocolError(f"DIMSE request without {name} (0000,{elem:04X})")
    if len(value) != 2:
        raise ProtocolError(f"DIMSE request: {name} (0000,{elem:04X}) has {len(value)} bytes")
    return int.from_bytes(value, "little")


def _text_uid(values: dict[int, bytes], elem: int, name: str) -> str:
    value = values.get(elem)
    if value is None or not value.rstrip(b"\x00 "):
        raise ProtocolError(f"DIMSE request without {name} (0000,{elem:04X})")
    # Kept as sent (the receiver checks it against the data set and the context), but it must
    # be text a log line and an Error Comment can carry.
    return value.rstrip(b"\x00 ").decode("ascii", "backslashreplace")


def decode_request(raw: bytes) -> DimseRequest:
    """A C-STORE-RQ, C-ECHO-RQ or C-CANCEL-RQ command set (implicit VR little endian).

    Required (PS3.7 9.3.1.1, 9.3.5.1): Command Field, Message ID, Command Data Set Type,
    Affected SOP Class UID; for C-STORE also Priority and Affected SOP Instance UID. C-ECHO
    carries no data set. Any other command is refused (we only serve storage and
    verification). The layout faults :func:`command_set.decode_command` tolerates are tolerated.
    """
    values = decode_command(raw)
    field = _us(values, 0x0100, "Command Field")
    if field == C_CANCEL_RQ:
        return DimseRequest(
            field, _us(values, 0x0120, "Message ID Being Responded To"), "", "", False
        )
    if field == N_EVENT_REPORT_RSP:
        answered = _us(values, 0x0120, "Message ID Being Responded To")
        status = _us(values, 0x0900, "Status")
        has_data = _us(values, 0x0800, "Command Data Set Type") != NO_DATA_SET
        return DimseRequest(field, answered, "", "", has_data, status=status)
    if field == N_EVENT_REPORT_RQ:
        return DimseRequest(
            field,
            _us(values, 0x0110, "Message ID"),
            _text_uid(values, 0x0002, "Affected SOP Class UID"),
            _text_uid(values, 0x1000, "Affected SOP Instance UID"),
            _us(values, 0x0800, "Command Data Set Type") != NO_DATA_SET,
            action_type=_us(values, 0x1002, "Event Type ID"),
        )
    if field == N_ACTION_RQ:
        return DimseRequest(
            field,
            _us(values, 0x0110, "Message ID"),
            _text_uid(values, 0x0003, "Requested SOP Class UID"),
            _text_uid(values, 0x1001, "Requested SOP Instance UID"),
            _us(values, 0x0800, "Command Data Set Type") != NO_DATA_SET,
            action_type=_us(values, 0x1008, "Action Type ID"),
        )
    if field not in (C_STORE_RQ, C_ECHO_RQ):
        raise ProtocolError(
            f"DIMSE command 0x{field:04X} (we serve C-STORE, C-ECHO, N-ACTION and "
            "N-EVENT-REPORT only)"
        )
    message_id = _us(values, 0x0110, "Message ID")
    has_data = _us(values, 0x0800, "Command Data Set Type") != NO_DATA_SET
    sop_class = _text_uid(values, 0x0002, "Affected SOP Class UID")
    if field == C_ECHO_RQ:
        if has_data:
            raise ProtocolError("C-ECHO-RQ announces a data set")
        return DimseRequest(field, message_id, sop_class, "", False)
    priority = _us(values, 0x0700, "Priority")
    sop_instance = _text_uid(values, 0x1000, "Affected SOP Instance UID")
    return DimseRequest(field, message_id, sop_class, sop_instance, has_data, priority)


def _uid_bytes(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _lo(text: str) -> bytes:
    """An LO value: printable ASCII without backslash, at most 64 characters, even length."""
    clean = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)
    if len(clean) > 64:
        clean = clean[:61] + "..."
    raw = clean.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_response(
    request: DimseRequest,
    status: int,
    comment: str | None = None,
    *,
    type_id: tuple[int, int] | None = None,
) -> bytes:
    """The response command set answering ``request`` (C-STORE-RSP, C-ECHO-RSP: PS3.7 9.3.1.2,
    9.3.5.2; N-ACTION-RSP, N-EVENT-REPORT-RSP with ``type_id``): Affected SOP Class (and
    Instance) UID echoed, Message ID Being Responded To, no data set, Status, an Error Comment
    (0000,0902) when given, and ``type_id`` (tag, value): the Action or Event Type ID."""
    sop_class = _uid_bytes(request.sop_class)
    parts = [
        _ELEMENT.pack(0, 0x0002, len(sop_class)),
        sop_class,
        _US.pack(0, 0x0100, 2, request.command_field | 0x8000),
        _US.pack(0, 0x0120, 2, request.message_id),
        _US.pack(0, 0x0800, 2, NO_DATA_SET),
        _US.pack(0, 0x0900, 2, status),
    ]
    if comment is not None:
        value = _lo(comment)
        parts += [_ELEMENT.pack(0, 0x0902, len(value)), value]
    if request.sop_instance:
        uid = _uid_bytes(request.sop_instance)
        parts += [_ELEMENT.pack(0, 0x1000, len(uid)), uid]
    if type_id is not None:
        parts.append(_US.pack(0, type_id[0], 2, type_id[1]))
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


def encode_action_response(request: DimseRequest, status: int) -> bytes:
    """The N-ACTION-RSP command set answering ``request`` (PS3.7 10.3.4.1.2): Affected SOP
    Class/Instance UID (the Requested ones), Message ID Being Responded To, Status, Action Type
    ID, no data set (storage commitment's reply carries none)."""
    return encode_response(request, status, type_id=(0x1008, request.action_type))


def encode_event_report_response(request: DimseRequest, status: int) -> bytes:
    """The N-EVENT-REPORT-RSP command set answering ``request`` (PS3.7 10.3.1.1.2): Affected
    SOP Class/Instance UID, Message ID Being Responded To, Status, Event Type ID, no data set."""
    return encode_response(request, status, type_id=(0x1002, request.action_type))


def encode_event_report(
    message_id: int, sop_class: str, sop_instance: str, event_type: int
) -> bytes:
    """An N-EVENT-REPORT-RQ command set (PS3.7 10.3.1.1.1) announcing a data set."""
    cls = _uid_bytes(sop_class)
    uid = _uid_bytes(sop_instance)
    body = b"".join(
        (
            _ELEMENT.pack(0, 0x0002, len(cls)),
            cls,
            _US.pack(0, 0x0100, 2, N_EVENT_REPORT_RQ),
            _US.pack(0, 0x0110, 2, message_id),
            _US.pack(0, 0x0800, 2, 0x0000),  # a data set follows
            _ELEMENT.pack(0, 0x1000, len(uid)),
            uid,
            _US.pack(0, 0x1002, 2, event_type),
        )
    )
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body
