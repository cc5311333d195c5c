"""Property-based fuzzing of every decoder a peer's bytes reach (issue 12: "no byte sequence from
a peer escapes as an unexpected exception").

Random bytes and mutated valid PDUs (bytes flipped, cut, inserted; built by pynetdicom) go
through ``decode_associate_ac``, ``decode_associate_rj``, ``check_fixed_pdu``,
``collect_command``, ``decode_command`` and ``check_response``, and through a whole
:class:`~forwarder.net.association.Association` on a real 127.0.0.1 connection: each either returns
what PS3.7/PS3.8 allow or raises :class:`ProtocolError` (an :class:`AssociationError` on the socket
path). Runs are bounded (``max_examples``, no deadline) so the file takes seconds.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from forwarder.errors import AssociationError, ProtocolError
from forwarder.net.association import Association, AssociationSettings, Peer
from forwarder.net.command_set import (
    C_STORE_RSP as STORE_RSP_FIELD,
)
from forwarder.net.command_set import (
    PENDING,
    check_response,
    collect_command,
    decode_command,
)
from forwarder.net.pdu import (
    MAX_SEND_PDU,
    MIN_SEND_PDU,
    ProposedContext,
    check_fixed_pdu,
    decode_associate_ac,
    decode_associate_rj,
    send_pdu_limit,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
PROPOSED = {
    1: ProposedContext(CT, (EXPLICIT, IMPLICIT)),
    3: ProposedContext("1.2.840.10008.5.1.4.1.1.4", (EXPLICIT,)),
}
INSTANCE = "1.2.3.4.5.6.7"


def valid_ac(max_pdu: int = 16384) -> bytes:
    ac = A_ASSOCIATE()
    ac.application_context_name = "1.2.840.10008.3.1.1.1"
    ac.calling_ae_title = "FORWARDER"
    ac.called_ae_title = "FUZZ"
    ac.result = 0
    pcs = []
    for cid, result, ts in ((1, 0, EXPLICIT), (3, 4, EXPLICIT)):
        pc = PresentationContext()
        pc.context_id, pc.result, pc.transfer_syntax = cid, result, [ts]
        pcs.append(pc)
    ac.presentation_context_definition_results_list = pcs
    item = MaximumLengthNotification()
    item.maximum_length_received = max_pdu
    ac.user_information = [item]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return bytes(pdu.encode())


def valid_response(message_id: int = 1, status: int = 0, max_pdu: int = 0) -> bytes:
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = message_id
    prim.AffectedSOPClassUID = CT
    prim.AffectedSOPInstanceUID = INSTANCE
    prim.Status = status
    prim.ErrorComment = "fuzz"
    message = C_STORE_RSP()
    message.primitive_to_message(prim)
    out = b""
    for p in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        out += bytes(pdu.encode())
    return out


AC = valid_ac()
RESPONSE = valid_response()
RESPONSE_FRAGMENTED = valid_response(max_pdu=40)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes replaced, cut, inserted or deleted."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "set", "cut", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def pdu_bodies(original: bytes) -> st.SearchStrategy[bytes]:
    """Random bodies and mutated real ones (header stripped)."""
    return st.one_of(st.binary(max_size=512), mutated(original[6:]))


# -- association PDUs -----------------------------------------------------------------------------


@FUZZ
@given(body=pdu_bodies(AC), strict=st.booleans())
def test_decode_associate_ac_raises_only_protocol_error(body: bytes, strict: bool) -> None:
    proposed = PROPOSED if strict else None
    try:
        results, max_pdu = decode_associate_ac(body, proposed)
    except ProtocolError:
        return
    assert 0 <= max_pdu <= 0xFFFFFFFF
    for cid, (result, ts) in results.items():
        assert 0 <= result <= 4
        if strict:
            assert cid in PROPOSED
            if result == 0:
                assert ts in PROPOSED[cid].transfer_syntaxes


@FUZZ
@given(body=st.binary(max_size=16))
def test_decode_associate_rj_raises_only_protocol_error(body: bytes) -> None:
    try:
        result, source, _ = decode_associate_rj(body)
    except ProtocolError:
        assert len(body) != 4 or body[1] not in (1, 2) or body[2] not in (1, 2, 3)
        return
    assert len(body) == 4 and result in (1, 2) and source in (1, 2, 3)


@FUZZ
@given(pdu_type=st.sampled_from([5, 6, 7]), body=st.binary(max_size=12))
def test_check_fixed_pdu_raises_only_protocol_error(pdu_type: int, body: bytes) -> None:
    try:
        check_fixed_pdu(pdu_type, body)
    except ProtocolError:
        assert len(body) != 4


@FUZZ
@given(peer=st.integers(0, 0xFFFFFFFF), ours=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
def test_send_pdu_limit_is_bounded_and_even(peer: int, ours: int | None) -> None:
    try:
        limit = send_pdu_limit(peer, ours)
    except ProtocolError:
        assert 0 < peer < MIN_SEND_PDU
        return
    assert MIN_SEND_PDU <= limit <= MAX_SEND_PDU and limit % 2 == 0
    assert peer == 0 or limit <= peer


# -- P-DATA-TF and command sets -------------------------------------------------------------------


def decode_response(bodies: list[bytes]) -> int | None:
    """collect_command -> decode_command -> check_response, as _read_response chains them."""
    command = bytearray()
    for body in bodies:
        if collect_command(body, {1, 3}, command):
            values = decode_command(bytes(command))
            return check_response(values, STORE_RSP_FIELD, 1, CT.encode(), INSTANCE.encode())
    return None


def split_pdus(raw: bytes) -> Iterator[bytes]:
    pos = 0
    while pos + 6 <= len(raw):
        (length,) = struct.unpack_from(">I", raw, pos + 2)
        yield raw[pos + 6 : pos + 6 + length]
        pos += 6 + length


@FUZZ
@given(
    bodies=st.one_of(
        st.lists(st.binary(max_size=300), min_size=1, max_size=4),
        mutated(RESPONSE[6:]).map(lambda b: [b]),
        st.lists(mutated(RESPONSE_FRAGMENTED), min_size=1, max_size=1).map(
            lambda raws: list(split_pdus(raws[0]))
        ),
    )
)
def test_the_response_path_raises_only_protocol_error(bodies: list[bytes]) -> None:
    try:
        status = decode_response(bodies)
    except ProtocolError:
        return
    assert status is None or status not in PENDING


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), mutated(RESPONSE[12:])))
def test_decode_command_raises_only_protocol_error(raw: bytes) -> None:
    try:
        values = decode_command(raw)
    except ProtocolError:
        return
    assert all(isinstance(v, bytes) for v in values.values())


@FUZZ
@given(
    values=st.dictionaries(
        st.sampled_from([0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0901, 0x0902, 0x1000]),
        st.one_of(st.binary(max_size=6), st.sampled_from([b"\x01\x80", b"\x01\x00", b"\x01\x01"])),
    )
)
def test_check_response_raises_only_protocol_error(values: dict[int, bytes]) -> None:
    try:
        status = check_response(values, STORE_RSP_FIELD, 1, CT.encode(), INSTANCE.encode())
    except ProtocolError:
        return
    assert status not in PENDING
    assert values[0x0100] == b"\x01\x80" and values[0x0120] == b"\x01\x00"


def test_the_valid_inputs_decode() -> None:
    """The originals the mutations start from are valid (or the fuzzing proves little)."""
    assert decode_associate_ac(AC[6:], PROPOSED)[0] == {1: (0, EXPLICIT), 3: (4, EXPLICIT)}
    assert decode_response([RESPONSE[6:]]) == 0
    assert decode_response(list(split_pdus(RESPONSE_FRAGMENTED))) == 0
    assert len(list(split_pdus(RESPONSE_FRAGMENTED))) > 2


# -- the whole engine on a real connection --------------------------------------------------------


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


SHORT = AssociationSettings(
    connect_timeout=0.5, response_timeout=0.5, release_timeout=0.5, max_pdu_receive=16384
)


def converse(listener: socket.socket, script: bytes) -> Association | AssociationError:
    """Connect an Association to a 'peer' that has already said ``script`` and hung up
    (the A-ASSOCIATE-AC, then whatever answers our C-STORE), negotiate, store 10 bytes."""
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    try:
        theirs.sendall(script)
        theirs.shutdown(socket.SHUT_WR)
        assoc = Association(Peer("127.0.0.1", 1, "FUZZ"), SHORT, ours)
        try:
            assoc._negotiate(list(PROPOSED.values()))  # request() minus the connect
            ctx = assoc.context_for(CT, EXPLICIT)
            if ctx is not None:  # a mutation may have hidden the accepted context
                assoc.store_bytes(CT, INSTANCE, b"\x08\x00\x18\x00\x00\x00", ctx)
            assoc.release()
            return assoc
        except AssociationError as exc:
            assert assoc.closed
            return exc
    finally:
        ours.close()
        theirs.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    answer=st.one_of(
        st.binary(max_size=200),
        mutated(RESPONSE),
        mutated(RESPONSE_FRAGMENTED),
        st.binary(min_size=1, max_size=40).map(lambda b: RESPONSE + b),
    ),
    ac=st.one_of(st.just(AC), mutated(AC)),
)
def test_whatever_the_peer_sends_the_engine_raises_only_association_errors(
    listener: socket.socket, answer: bytes, ac: bytes
) -> None:
    assume(answer != RESPONSE)
    converse(listener, ac + answer)  # anything but AssociationError fails the test


def test_the_unmutated_conversation_stores(listener: socket.socket) -> None:
    for answer in (RESPONSE, RESPONSE_FRAGMENTED):
        assoc = converse(listener, AC + answer)
        assert isinstance(assoc, Association)
        assert assoc.context_for(CT, EXPLICIT) is not None
    assert isinstance(converse(listener, AC + RESPONSE[:-1]), AssociationError)
