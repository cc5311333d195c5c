"""DICOM upper-layer PDUs for the sender, encoded and decoded by hand (PS3.8 9.3).

Only what the sender needs: A-ASSOCIATE-RQ out, A-ASSOCIATE-AC/RJ in, the fixed A-RELEASE and
A-ABORT PDUs, and the size of the P-DATA-TF PDUs we send. The DIMSE command sets those PDUs carry
are :mod:`forwarder.net.command_set`'s. The tests decode what is encoded here with pynetdicom's
PDU classes and negotiate with DCMTK, Orthanc and pynetdicom.

Every decoder here is strict and total: whatever bytes a peer sends, it either returns values
that PS3.8 allows or raises :class:`~forwarder.errors.ProtocolError` naming the fault, never
``IndexError``, ``struct.error`` or ``UnicodeDecodeError`` (tests/test_pdu_fuzz.py feeds them
random and mutated PDUs). Reserved fields are not tested, as PS3.8 9.3 asks. The SCP side's
codec lives in its own module (:mod:`forwarder.net.scp_codec`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from forwarder import __version__
from forwarder.errors import ProtocolError

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1284.1"  # forwarder's implementation UID
IMPLEMENTATION_VERSION = ("FORWARDER_" + __version__.replace(".", ""))[:16]
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
MAX_CONTEXTS = 128  # odd context IDs 1..255

PDU_ASSOCIATE_RQ = 0x01
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07
PDU_NAMES = {
    PDU_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    PDU_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    PDU_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    PDU_P_DATA: "P-DATA-TF",
    PDU_RELEASE_RQ: "A-RELEASE-RQ",
    PDU_RELEASE_RP: "A-RELEASE-RP",
    PDU_ABORT: "A-ABORT",
}
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
PDU_HEADER = struct.Struct(">BxI")
PDATA_HEADER = struct.Struct(">BxIIBB")  # PDU type, length, PDV length, context ID, control
REJECT_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}

#: Bounds on what we send: PS3.8 D.1 lets a peer say 0 ("no limit") or up to 0xFFFFFFFF; we may
#: always send smaller PDUs, so we never build one above 1 MiB (a 4 GiB buffer per store is no
#: option). Below: a PDV item has a 6-byte header (length, context ID, control header) and DCMTK
#: refuses odd fragment lengths ("Odd Fragment Length", PS3.7 Annex F), so the smallest PDU that
#: can carry anything is 6 + 2 bytes.
MAX_SEND_PDU = 1024 * 1024
MIN_SEND_PDU = 8


@dataclass(frozen=True, slots=True)
class ProposedContext:
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


# -- association PDUs -----------------------------------------------------------------------------


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


_ITEM = struct.Struct(">BxH")


def _uid_value(raw: bytes, what: str) -> str:
    """A UID from a PDU item: 1..64 digits and dots (a trailing NUL or space tolerated)."""
    value = raw.rstrip(b"\x00 ")
    if not value or len(value) > 64 or value.translate(None, b"0123456789."):
        raise ProtocolError(f"{what} is not a UID: {raw[:80]!r}")
    return value.decode("ascii")


def _sub_items(value: bytes, what: str) -> list[tuple[int, bytes]]:
    """The sub-items of an item, which must exactly fill it."""
    out = []
    pos, end = 0, len(value)
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"{what}: a sub-item header is cut short")
        sub_type, sub_len = _ITEM.unpack_from(value, pos)
        if sub_len > end - pos - 4:
            raise ProtocolError(f"{what}: sub-item 0x{sub_type:02X} runs past the item")
        out.append((sub_type, value[pos + 4 : pos + 4 + sub_len]))
        pos += 4 + sub_len
    return out


def decode_associate_ac(
    body: bytes, proposed: Mapping[int, ProposedContext] | None = None
) -> tuple[dict[int, tuple[int, str]], int]:
    """Presentation context results {id: (result, transfer syntax)} and the peer's maximum PDU
    length (0 = unlimited, or not announced) from the body of an A-ASSOCIATE-AC (PS3.8 9.3.3).

    Checked: protocol version 1 supported; items and sub-items exactly fill what holds them; one
    application context item, at least one presentation context item, one user information item;
    a presentation context result is 0..4, for an odd ID we proposed (when ``proposed`` is given),
    not repeated; an accepted one names exactly one transfer syntax, a UID, one we proposed for
    that context; the maximum length sub-item, when present, has 4 bytes. A rejected context's
    transfer syntax is not tested (PS3.8 9.3.3.2). Unknown item types are skipped. Anything else
    raises :class:`ProtocolError`.
    """
    end = len(body)
    if end < 68:
        raise ProtocolError(f"A-ASSOCIATE-AC of {end} bytes (the fixed fields alone take 68)")
    (version,) = struct.unpack_from(">H", body, 0)
    if not version & 0x0001:
        raise ProtocolError(f"A-ASSOCIATE-AC protocol version 0x{version:04X} (we speak 1)")
    results: dict[int, tuple[int, str]] = {}
    max_pdu: int | None = None
    counts = {0x10: 0, 0x21: 0, 0x50: 0}
    pos = 68
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("A-ASSOCIATE-AC ends inside an item header")
        item_type, length = _ITEM.unpack_from(body, pos)
        if length > end - pos - 4:
            raise ProtocolError(f"A-ASSOCIATE-AC item 0x{item_type:02X} runs past the PDU")
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type in counts:
            counts[item_type] += 1
        if item_type == 0x10:
            _uid_value(value, "application context name")
        elif item_type == 0x21:
            if length < 4:
                raise ProtocolError(f"presentation context item of {length} bytes (at least 4)")
            cid, result = value[0], value[2]
            if cid in results:
                raise ProtocolError(f"presentation context {cid} answered twice")
            if proposed is not None and cid not in proposed:
                raise ProtocolError(
                    f"result for presentation context {cid}, which we never proposed"
                )
            if result > 4:
                raise ProtocolError(f"presentation context {cid}: result {result} (0..4)")
            subs = _sub_items(value[4:], f"presentation context {cid}")
            syntaxes = [v for t, v in subs if t == 0x40]
            ts = ""
            if result != 0:
                if len(syntaxes) == 1:  # not significant, not tested: reported when readable
                    try:
                        ts = _uid_value(syntaxes[0], "")
                    except ProtocolError:
                        pass
            else:
                if len(syntaxes) != 1:
                    raise ProtocolError(
                        f"presentation context {cid} accepted with {len(syntaxes)} transfer "
                        "syntaxes (exactly 1)"
                    )
                ts = _uid_value(syntaxes[0], f"presentation context {cid}: transfer syntax")
                if proposed is not None and ts not in proposed[cid].transfer_syntaxes:
                    raise ProtocolError(
                        f"presentation context {cid} accepted with {ts}, which we did not propose"
                    )
            results[cid] = (result, ts)
        elif item_type == 0x50:
            for sub_type, sub in _sub_items(value, "user information"):
                if sub_type != 0x51:
                    continue
                if len(sub) != 4 or max_pdu is not None:
                    raise ProtocolError(
                        f"maximum length sub-item of {len(sub)} bytes (one, of exactly 4)"
                    )
                (max_pdu,) = struct.unpack(">I", sub)
    if counts[0x10] != 1 or counts[0x21] < 1 or counts[0x50] != 1:
        raise ProtocolError(
            f"A-ASSOCIATE-AC with {counts[0x10]} application context, {counts[0x21]} presentation "
            f"context and {counts[0x50]} user information items (1, 1 or more, 1)"
        )
    return results, max_pdu or 0


def decode_associate_rj(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ body (PS3.8 9.3.4): exactly 4 bytes, result
    1 (permanent) or 2 (transient), source 1..3. The reason is not tested (:func:`reject_reason`
    names the unknown ones)."""
    if len(body) != 4:
        raise ProtocolError(f"A-ASSOCIATE-RJ of {len(body)} bytes (exactly 4)")
    result, source, reason = body[1], body[2], body[3]
    if result not in (1, 2) or source not in (1, 2, 3):
        raise ProtocolError(f"A-ASSOCIATE-RJ with result {result}, source {source}")
    return result, source, reason


def check_fixed_pdu(pdu_type: int, body: bytes) -> None:
    """A-RELEASE-RQ, A-RELEASE-RP and A-ABORT have a 4-byte body (PS3.8 9.3.6-9.3.8)."""
    if len(body) != 4:
        raise ProtocolError(f"{PDU_NAMES[pdu_type]} of {len(body)} bytes (exactly 4)")


def send_pdu_limit(peer_max: int, our_cap: int | None = None) -> int:
    """The largest P-DATA-TF PDU (its length field) we send, from the peer's announced maximum
    (0 = no limit) and our own optional cap (``--max-pdu-send``).

    Smaller PDUs are always legal (PS3.8 D.1 only bounds them from above), so "no limit" and
    anything above :data:`MAX_SEND_PDU` become 1 MiB: a peer announcing 0xFFFFFFFF must not make
    us allocate 4 GiB. A peer announcing less than :data:`MIN_SEND_PDU` (8) cannot receive a
    single even-length fragment: no data set could ever be sent, so the association is refused
    with a :class:`ProtocolError` (retried later) rather than looping or dividing by zero. From 8
    up the peer's limit is honoured, however small: slow, but legal and bounded (our batch
    buffer, not the fragment count, sets the memory used). The result is even, so every fragment
    we cut is even (DCMTK refuses odd ones).
    """
    if 0 < peer_max < MIN_SEND_PDU:
        raise ProtocolError(
            f"the peer's maximum PDU length {peer_max} cannot carry a PDV "
            f"(at least {MIN_SEND_PDU} bytes)"
        )
    limit = min(peer_max or MAX_SEND_PDU, MAX_SEND_PDU)
    if our_cap:
        limit = min(limit, max(our_cap, MIN_SEND_PDU))
    return limit & ~1


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
