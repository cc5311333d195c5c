"""DICOM upper-layer PDUs and DIMSE command sets, encoded and decoded by hand.

PS3.8 9.3 for the association PDUs, PS3.7 for the command sets (implicit VR little endian,
group 0000). Only what the sender needs: A-ASSOCIATE-RQ out, A-ASSOCIATE-AC/RJ in, C-STORE-RQ and
C-ECHO-RQ out, their responses in, and the fixed A-RELEASE and A-ABORT PDUs. The tests decode what
is encoded here with pynetdicom's PDU classes and negotiate with DCMTK, Orthanc and pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from forwarder import __version__
from forwarder.errors import AssociationError

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1284.1"  # forwarder's implementation UID
IMPLEMENTATION_VERSION = ("FORWARDER_" + __version__.replace(".", ""))[:16]
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
MAX_CONTEXTS = 128  # odd context IDs 1..255

PRIORITY = {"medium": 0x0000, "high": 0x0001, "low": 0x0002}

PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
PDU_HEADER = struct.Struct(">BxI")
PDATA_HEADER = struct.Struct(">BxIIBB")  # PDU type, length, PDV length, context ID, control
REJECT_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}


@dataclass(frozen=True, slots=True)
class ProposedContext:
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


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


def decode_command(raw: bytes) -> dict[int, bytes]:
    """Split an implicit VR little endian group 0000 command set into element -> value."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise AssociationError("malformed DIMSE command set from the peer", retryable=True)
        out[elem] = raw[pos : pos + length]
        pos += length
    return out


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def encode_associate_rq(
    called: str, calling: str, contexts: Mapping[int, ProposedContext], max_pdu: int
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2): application context, presentation contexts keyed by
    their odd IDs, and user information (max length, implementation UID and version)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, ctx in contexts.items():
        sub = _item(0x30, ctx.abstract_syntax.encode()) + b"".join(
            _item(0x40, ts.encode()) for ts in ctx.transfer_syntaxes
        )
        items.append(_item(0x20, bytes((cid, 0, 0, 0)) + sub))
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
        + _item(0x55, IMPLEMENTATION_VERSION.encode())
    )
    items.append(_item(0x50, user))
    body = struct.pack(">H2x", 1) + _ae(called) + _ae(calling) + bytes(32) + b"".join(items)
    return struct.pack(">BxI", 0x01, len(body)) + body


def decode_associate_ac(body: bytes) -> tuple[dict[int, tuple[int, str]], int]:
    """Presentation context results {id: (result, transfer syntax)} and the peer's maximum PDU
    length (0 = unlimited) from the body of an A-ASSOCIATE-AC. Raises ValueError if malformed."""
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    pos, end = 68, len(body)
    if end < pos:
        raise ValueError("too short")
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated item")
        item_type, length = struct.unpack_from(">BxH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise ValueError(f"item 0x{item_type:02X} runs past the PDU")
        pos += 4 + length
        if item_type == 0x21:
            if length < 4:
                raise ValueError("presentation context item too short")
            ts = ""
            sub = 4
            while sub + 4 <= length:
                sub_type, sub_len = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x40:
                    ts = (
                        value[sub + 4 : sub + 4 + sub_len]
                        .rstrip(b"\x00 ")
                        .decode("ascii", "replace")
                    )
                sub += 4 + sub_len
            results[value[0]] = (value[2], ts)
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= length:
                sub_type, sub_len = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x51 and sub_len == 4:
                    (max_pdu,) = struct.unpack_from(">I", value, sub + 4)
                sub += 4 + sub_len
    return results, max_pdu


_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_REJECT_SOURCES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}


def reject_reason(source: int, reason: int) -> str:
    """``service user: called AE title not recognised``, from an A-ASSOCIATE-RJ."""
    text = _REJECT_REASONS.get((source, reason), f"reason {reason}")
    return f"{_REJECT_SOURCES.get(source, f'source {source}')}: {text}"


def command_text(value: bytes | None) -> str | None:
    if not value:
        return None
    return value.rstrip(b"\x00 ").decode("ascii", "replace") or None
