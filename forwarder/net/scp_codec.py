"""The acceptor's side of the DICOM upper layer, decoded and encoded by hand.

What :mod:`forwarder.net.pdu` is for the sender, this is for the Storage SCP: the A-ASSOCIATE-RQ
in (PS3.8 9.3.2, user information per PS3.7 D.3.3), the A-ASSOCIATE-AC / -RJ, A-ABORT and
P-DATA-TF PDUs out, packed with ``struct``. The command sets those P-DATA-TF PDUs carry are
:mod:`forwarder.net.scp_command_set`'s. No pydicom, no pynetdicom. It holds no sockets and no
state: the association loop (:mod:`forwarder.net.scp_association`) calls it.

Every decoder is strict and total: whatever a peer sends, it returns values PS3.8 allows or
raises :class:`~forwarder.errors.ProtocolError` naming the fault (the caller answers A-ABORT).
Reserved fields are not tested (PS3.8 9.3.1). Unknown user information sub-items (user identity,
extended negotiation, ...) are skipped: we do not take part in those negotiations, which PS3.7
D.3.3 allows by leaving them out of the answer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from forwarder.errors import ProtocolError
from forwarder.net.pdu import (
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
)

#: A-ABORT source / reason (PS3.8 9.3.8): we abort as the service provider for PDU faults.
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_UNRECOGNISED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_INVALID_PARAMETER = 6

#: A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (1, 1, 3)
REJECT_CALLED_AE = (1, 1, 7)
REJECT_APPLICATION_CONTEXT = (1, 1, 2)
REJECT_PROTOCOL_VERSION = (1, 2, 2)
REJECT_LIMIT = (2, 3, 2)

_ITEM = struct.Struct(">BxH")


@dataclass(frozen=True, slots=True)
class RequestedContext:
    """One presentation context item of an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ says (PS3.8 9.3.2, PS3.7 D.3.3)."""

    called_ae: str
    calling_ae: str
    contexts: tuple[RequestedContext, ...]
    max_pdu: int  # the largest PDU the requestor receives; 0 = no limit
    implementation_class_uid: str
    implementation_version: str
    async_window: tuple[int, int] | None  # (invoked, performed); 0 = unlimited
    application_context: str = APPLICATION_CONTEXT
    roles: tuple[tuple[str, int, int], ...] = ()  # role selection: (SOP Class, SCU, SCP role)


def _uid(raw: bytes, what: str) -> str:
    """A UID of a PDU item: 1..64 digits and dots (a trailing NUL or space tolerated)."""
    value = raw.rstrip(b"\x00 ")
    if not value or len(value) > 64 or value.translate(None, b"0123456789."):
        raise ProtocolError(f"{what} is not a UID: {raw[:80]!r}")
    return value.decode("ascii")


def _ae_title(raw: bytes, what: str) -> str:
    if any(not 0x20 <= b <= 0x7E for b in raw) or b"\\" in raw:
        raise ProtocolError(f"{what} {raw!r} is not an AE title (printable ASCII, no backslash)")
    return raw.decode("ascii").strip(" ")


def _items(value: bytes | memoryview, start: int, what: str) -> list[tuple[int, bytes]]:
    """The items (or sub-items) from ``start``, which must exactly fill ``value``."""
    out = []
    pos, end = start, len(value)
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"{what}: an item header is cut short")
        item_type, length = _ITEM.unpack_from(value, pos)
        if length > end - pos - 4:
            raise ProtocolError(
                f"{what}: item 0x{item_type:02X} of {length} bytes runs past its end"
            )
        out.append((item_type, bytes(value[pos + 4 : pos + 4 + length])))
        pos += 4 + length
    return out


def _context(value: bytes) -> RequestedContext:
    if len(value) < 4:
        raise ProtocolError(f"presentation context item of {len(value)} bytes (at least 4)")
    cid = value[0]
    if not cid % 2:
        raise ProtocolError(f"presentation context ID {cid} is even (odd 1..255)")
    what = f"presentation context {cid}"
    abstract: list[str] = []
    syntaxes: list[str] = []
    for sub_type, sub in _items(value, 4, what):
        if sub_type == 0x30:
            abstract.append(_uid(sub, f"{what}: abstract syntax"))
        elif sub_type == 0x40:
            syntaxes.append(_uid(sub, f"{what}: transfer syntax"))
        else:
            raise ProtocolError(f"{what}: sub-item 0x{sub_type:02X} (only 0x30 and 0x40)")
    if len(abstract) != 1 or not syntaxes:
        raise ProtocolError(
            f"{what} with {len(abstract)} abstract syntaxes and {len(syntaxes)} transfer "
            "syntaxes (exactly 1, at least 1)"
        )
    return RequestedContext(cid, abstract[0], tuple(syntaxes))


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """The body of an A-ASSOCIATE-RQ PDU (after its 6-byte header).

    Checked: the fixed fields (68 bytes, protocol version 1 supported, AE titles printable);
    items and sub-items exactly fill what holds them; one application context (a UID), one or
    more presentation contexts with odd, distinct IDs, each one abstract syntax and one or more
    transfer syntaxes (UIDs); one user information item holding one maximum length (4 bytes) and
    one implementation class UID, at most one version name (1..16 bytes), asynchronous
    operations window (4 bytes), SCP/SCU role selection items (PS3.7 D.3.3.4: a UID, then the
    SCU and SCP role bytes; answered by the policy). Extended negotiation is skipped. A
    protocol version we do not speak raises ``ProtocolError`` with
    ``version`` in its message; the caller answers A-ASSOCIATE-RJ for it.
    """
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes (the fixed fields take 68)")
    (version,) = struct.unpack_from(">H", body, 0)
    if not version & 0x0001:
        raise ProtocolError(f"A-ASSOCIATE-RQ protocol version 0x{version:04X} (we speak 1)")
    called = _ae_title(body[4:20], "called AE title")
    calling = _ae_title(body[20:36], "calling AE title")
    app: list[str] = []
    contexts: dict[int, RequestedContext] = {}
    users: list[bytes] = []
    for item_type, value in _items(body, 68, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            app.append(_uid(value, "application context name"))
        elif item_type == 0x20:
            context = _context(value)
            if context.context_id in contexts:
                raise ProtocolError(f"presentation context {context.context_id} proposed twice")
            contexts[context.context_id] = context
        elif item_type == 0x50:
            users.append(value)
        else:
            raise ProtocolError(f"A-ASSOCIATE-RQ item of type 0x{item_type:02X}")
    if len(app) != 1 or not contexts or len(users) != 1:
        raise ProtocolError(
            f"A-ASSOCIATE-RQ with {len(app)} application context, {len(contexts)} presentation "
            f"context and {len(users)} user information items (1, 1 or more, 1)"
        )
    max_pdu: list[int] = []
    impl_uid: list[str] = []
    impl_version: list[str] = []
    window: list[tuple[int, int]] = []
    roles: list[tuple[str, int, int]] = []
    for sub_type, sub in _items(users[0], 0, "user information"):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise ProtocolError(f"maximum length sub-item of {len(sub)} bytes (exactly 4)")
            max_pdu.append(struct.unpack(">I", sub)[0])
        elif sub_type == 0x52:
            impl_uid.append(_uid(sub, "implementation class UID"))
        elif sub_type == 0x55:
            if not 1 <= len(sub) <= 16:
                raise ProtocolError(f"implementation version name of {len(sub)} bytes (1..16)")
            impl_version.append(sub.decode("ascii", "replace"))
        elif sub_type == 0x53:
            if len(sub) != 4:
                raise ProtocolError(f"asynchronous operations window of {len(sub)} bytes (4)")
            invoked, performed = struct.unpack(">HH", sub)
            window.append((invoked, performed))
        elif sub_type == 0x54:
            roles.append(_role(sub))
    if len(max_pdu) != 1 or len(impl_uid) != 1 or len(impl_version) > 1 or len(window) > 1:
        raise ProtocolError(
            f"user information with {len(max_pdu)} maximum length, {len(impl_uid)} "
            f"implementation class UID, {len(impl_version)} version name and {len(window)} "
            "asynchronous operations window sub-items (1, 1, at most 1, at most 1)"
        )
    return AssociateRequest(
        called_ae=called,
        calling_ae=calling,
        contexts=tuple(contexts.values()),
        max_pdu=max_pdu[0],
        implementation_class_uid=impl_uid[0],
        implementation_version=impl_version[0] if impl_version else "",
        async_window=window[0] if window else None,
        application_context=app[0],
        roles=tuple(roles),
    )


def _role(sub: bytes) -> tuple[str, int, int]:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): (SOP Class UID, SCU role, SCP role)."""
    if len(sub) < 4:
        raise ProtocolError(f"role selection sub-item of {len(sub)} bytes (at least 4)")
    (length,) = struct.unpack_from(">H", sub, 0)
    if len(sub) != 2 + length + 2:
        raise ProtocolError(f"role selection sub-item: a UID of {length} bytes in {len(sub)}")
    uid = _uid(sub[2 : 2 + length], "role selection SOP class")
    return uid, sub[2 + length], sub[3 + length]


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def encode_associate_ac(
    request_body: bytes,
    results: list[tuple[int, int, str]],
    max_pdu: int,
    async_window: tuple[int, int] | None,
    roles: Sequence[tuple[str, int, int]] = (),
) -> bytes:
    """An A-ASSOCIATE-AC PDU answering ``request_body`` (its fixed fields echoed, PS3.8 9.3.3):
    one result item per proposed context ``(id, result, transfer syntax)``, our maximum length,
    implementation class UID and version name, the asynchronous operations window we grant
    when one was proposed, and the answer to each role selection we answer
    ``(SOP Class, SCU role, SCP role)``."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cid, result, syntax in results:
        sub = _item(0x40, syntax.encode("ascii")) if syntax else b""
        items.append(_item(0x21, bytes((cid, 0, result, 0)) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    if async_window is not None:
        user += _item(0x53, struct.pack(">HH", *async_window))
    for uid, scu, scp in roles:
        raw = uid.encode("ascii")
        user += _item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp)))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode())
    items.append(_item(0x50, user))
    body = struct.pack(">H2x", 1) + request_body[4:68] + b"".join(items)
    return struct.pack(">BxI", 0x02, len(body)) + body


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BxIxBBB", 0x03, 4, result, source, reason)


def encode_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8); the reason is significant only when the provider aborts."""
    return struct.pack(">BxIxxBB", 0x07, 4, source, reason if source == 2 else 0)


def encode_pdata(
    context_id: int, command: bytes, max_pdu: int, *, is_command: bool = True
) -> bytes:
    """``command`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes (PDU length field), one PDV
    each, the last one flagged last (control 0x03 / 0x01; a data set's 0x02 / 0x00 when not
    ``is_command``)."""
    flag = 0x01 if is_command else 0x00
    room = max_pdu - 6
    out = []
    pos, end = 0, len(command)
    while True:
        chunk = command[pos : pos + room]
        pos += len(chunk)
        control = (0x02 if pos >= end else 0x00) | flag
        out.append(
            struct.pack(">BxIIBB", 0x04, len(chunk) + 6, len(chunk) + 2, context_id, control)
        )
        out.append(chunk)
        if pos >= end:
            return b"".join(out)
