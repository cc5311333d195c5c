"""The hand-written PDU and command-set codecs (forwarder/net/pdu.py and command_set.py) against
pynetdicom's, both ways.

What forwarder encodes (A-ASSOCIATE-RQ, C-STORE-RQ, C-ECHO-RQ) decodes in pynetdicom to the same
values; what pynetdicom encodes (A-ASSOCIATE-AC/RJ with every kind of result and user item,
C-STORE-RSP and C-ECHO-RSP fragmented at any PDU size, A-RELEASE and A-ABORT) decodes in
forwarder to the same values. Hypothesis generates the variants (bounded: seconds, not minutes).
"""

from __future__ import annotations

import string
from io import BytesIO

import pytest
from dimse_wire import Command
from dimse_wire import response as wire_response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode as pynetdicom_decode
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from forwarder.errors import ProtocolError
from forwarder.net.command_set import (
    C_ECHO_RSP as ECHO_RSP_FIELD,
)
from forwarder.net.command_set import (
    C_STORE_RSP as STORE_RSP_FIELD,
)
from forwarder.net.command_set import (
    check_response,
    collect_command,
    command_text,
    decode_command,
    encode_echo_rq,
    encode_store_rq,
    offending_text,
)
from forwarder.net.pdu import (
    ABORT,
    APPLICATION_CONTEXT,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION_SOP_CLASS,
    ProposedContext,
    check_fixed_pdu,
    decode_associate_ac,
    decode_associate_rj,
    encode_associate_rq,
    send_pdu_limit,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

uids = st.lists(st.integers(0, 999_999), min_size=2, max_size=9).map(
    lambda parts: ".".join(str(p) for p in parts)
)
ae_titles = st.text(string.ascii_uppercase + string.digits + "_-", min_size=1, max_size=16)
message_ids = st.integers(1, 0xFFFF)
statuses = st.integers(0, 0xFFFF).filter(lambda s: s not in (0xFF00, 0xFF01))
comments = st.text(string.ascii_letters + string.digits + " .:-", min_size=1, max_size=64).map(
    str.strip
)


# -- forwarder encodes, pynetdicom decodes --------------------------------------------------------


@FAST
@given(
    called=ae_titles,
    calling=ae_titles,
    contexts=st.lists(
        st.tuples(uids, st.lists(uids, min_size=1, max_size=5, unique=True)),
        min_size=1,
        max_size=128,
    ),
    max_pdu=st.integers(0, 0xFFFFFFFF),
)
def test_our_associate_rq_decodes_in_pynetdicom(
    called: str, calling: str, contexts: list[tuple[str, list[str]]], max_pdu: int
) -> None:
    proposed = {2 * i + 1: ProposedContext(a, tuple(ts)) for i, (a, ts) in enumerate(contexts)}
    rq = A_ASSOCIATE_RQ()
    rq.decode(encode_associate_rq(called, calling, proposed, max_pdu))
    prim = rq.to_primitive()
    assert prim.called_ae_title == called
    assert prim.calling_ae_title == calling
    assert prim.application_context_name == APPLICATION_CONTEXT
    got = {
        pc.context_id: ProposedContext(str(pc.abstract_syntax), tuple(pc.transfer_syntax))
        for pc in prim.presentation_context_definition_list
    }
    assert got == proposed
    (max_len,) = [i for i in prim.user_information if isinstance(i, MaximumLengthNotification)]
    assert max_len.maximum_length_received == max_pdu


@FAST
@given(
    message_id=message_ids,
    sop_class=uids,
    sop_instance=uids,
    priority=st.sampled_from([0, 1, 2]),
)
def test_our_c_store_rq_decodes_in_pynetdicom(
    message_id: int, sop_class: str, sop_instance: str, priority: int
) -> None:
    raw = encode_store_rq(message_id, sop_class, sop_instance, priority)
    ds = pynetdicom_decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x0001
    assert ds.MessageID == message_id
    assert ds.AffectedSOPClassUID == sop_class
    assert ds.AffectedSOPInstanceUID == sop_instance
    assert ds.Priority == priority
    assert ds.CommandDataSetType != 0x0101  # a data set follows
    # ... and our own decoder reads back what we wrote.
    values = decode_command(raw)
    assert values[0x0110] == message_id.to_bytes(2, "little")


@pytest.mark.parametrize("message_id", [1, 2, 0x7FFF, 0xFFFF])
def test_our_c_echo_rq_decodes_in_pynetdicom(message_id: int) -> None:
    raw = encode_echo_rq(message_id)
    ds = pynetdicom_decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x0030
    assert ds.MessageID == message_id
    assert ds.AffectedSOPClassUID == VERIFICATION_SOP_CLASS
    assert ds.CommandDataSetType == 0x0101


def test_our_fixed_pdus_decode_in_pynetdicom() -> None:
    for cls, raw in ((A_RELEASE_RQ, RELEASE_RQ), (A_RELEASE_RP, RELEASE_RP), (A_ABORT_RQ, ABORT)):
        pdu = cls()
        pdu.decode(raw)
        assert bytes(pdu.encode()) == raw
        check_fixed_pdu(raw[0], raw[6:])


# -- pynetdicom encodes, forwarder decodes --------------------------------------------------------

results = st.sampled_from([0, 0, 1, 2, 3, 4])


def pynetdicom_ac(
    answers: list[tuple[int, str]], max_pdu: int | None, extras: list[str]
) -> tuple[bytes, dict[int, ProposedContext]]:
    """An A-ASSOCIATE-AC encoded by pynetdicom answering contexts 1, 3, 5... and what we must
    have proposed for it to be valid."""
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT
    ac.calling_ae_title = "CALLING"
    ac.called_ae_title = "CALLED"
    ac.result = 0
    pcs = []
    proposed = {}
    for i, (result, ts) in enumerate(answers):
        pc = PresentationContext()
        pc.context_id = 2 * i + 1
        pc.result = result
        pc.transfer_syntax = [ts]
        pcs.append(pc)
        proposed[2 * i + 1] = ProposedContext("1.2.840.10008.5.1.4.1.1.2", ("1.2.3", ts))
    ac.presentation_context_definition_results_list = pcs
    user: list[object] = []
    if max_pdu is not None:
        item = MaximumLengthNotification()
        item.maximum_length_received = max_pdu
        user.append(item)
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.0"
    user.append(impl)
    if "version" in extras:
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = "PYNETDICOM_200"
        user.append(version)
    if "async" in extras:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        user.append(window)
    if "role" in extras:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2"
        role.scu_role = True
        role.scp_role = False
        user.append(role)
    ac.user_information = user
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return bytes(pdu.encode()), proposed


@FAST
@given(
    answers=st.lists(st.tuples(results, uids), min_size=1, max_size=128),
    max_pdu=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    extras=st.lists(st.sampled_from(["version", "async", "role"]), unique=True),
)
def test_pynetdicom_associate_ac_decodes_in_ours(
    answers: list[tuple[int, str]], max_pdu: int | None, extras: list[str]
) -> None:
    raw, proposed = pynetdicom_ac(answers, max_pdu, extras)
    ours, peer_max = decode_associate_ac(raw[6:], proposed)
    assert ours == {2 * i + 1: answer for i, answer in enumerate(answers)}
    assert peer_max == (max_pdu or 0)
    # pynetdicom reads the same bytes the same way.
    theirs = A_ASSOCIATE_AC()
    theirs.decode(raw)
    prim = theirs.to_primitive()
    assert {
        pc.context_id: (pc.result, str(pc.transfer_syntax[0]))
        for pc in prim.presentation_context_definition_results_list
    } == ours


@pytest.mark.parametrize(
    ("result", "source", "reason"),
    [(r, 1, d) for r in (1, 2) for d in (1, 2, 3, 7)]
    + [(r, 2, d) for r in (1, 2) for d in (1, 2)]
    + [(r, 3, d) for r in (1, 2) for d in (1, 2)],
)
def test_pynetdicom_associate_rj_decodes_in_ours(result: int, source: int, reason: int) -> None:
    prim = A_ASSOCIATE()
    prim.result, prim.result_source, prim.diagnostic = result, source, reason
    rj = A_ASSOCIATE_RJ()
    rj.from_primitive(prim)
    raw = bytes(rj.encode())
    assert decode_associate_rj(raw[6:]) == (result, source, reason)


@pytest.mark.parametrize("pdu", [A_RELEASE_RQ, A_RELEASE_RP])
def test_pynetdicom_release_pdus_pass_our_check(pdu: type) -> None:
    raw = bytes(pdu().encode())
    check_fixed_pdu(raw[0], raw[6:])


@pytest.mark.parametrize(("source", "reason"), [(0, 0), (2, 0), (2, 1), (2, 6)])
def test_pynetdicom_abort_passes_our_check(source: int, reason: int) -> None:
    prim = A_ABORT()
    prim.abort_source = source
    pdu = A_ABORT_RQ()
    pdu.from_primitive(prim)
    pdu.reason_diagnostic = reason
    raw = bytes(pdu.encode())
    check_fixed_pdu(raw[0], raw[6:])


def pynetdicom_response_pdus(
    message: C_STORE_RSP | C_ECHO_RSP, context_id: int, max_pdu: int
) -> list[bytes]:
    out = []
    for prim in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        out.append(bytes(pdu.encode()))
    return out


def read_response(pdus: list[bytes], context_id: int) -> dict[int, bytes]:
    """What Association._read_response does with P-DATA-TF bodies, minus the socket."""
    command = bytearray()
    done = False
    for i, raw in enumerate(pdus):
        assert raw[0] == 0x04
        done = collect_command(raw[6:], {context_id}, command)
        assert done == (i == len(pdus) - 1)
    assert done
    return decode_command(bytes(command))


@FAST
@given(
    message_id=message_ids,
    status=statuses,
    sop_class=uids,
    sop_instance=uids,
    comment=st.one_of(st.none(), comments),
    offending=st.one_of(st.none(), st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=3)),
    context_id=st.integers(0, 127).map(lambda i: 2 * i + 1),
    max_pdu=st.one_of(st.just(0), st.integers(16, 400)),
)
def test_pynetdicom_c_store_rsp_decodes_in_ours(
    message_id: int,
    status: int,
    sop_class: str,
    sop_instance: str,
    comment: str | None,
    offending: list[int] | None,
    context_id: int,
    max_pdu: int,
) -> None:
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = message_id
    prim.AffectedSOPClassUID = sop_class
    prim.AffectedSOPInstanceUID = sop_instance
    prim.Status = status
    if comment:
        prim.ErrorComment = comment
    if offending:
        prim.OffendingElement = offending
    message = C_STORE_RSP()
    message.primitive_to_message(prim)
    values = read_response(pynetdicom_response_pdus(message, context_id, max_pdu), context_id)
    got = check_response(
        values, STORE_RSP_FIELD, message_id, sop_class.encode(), sop_instance.encode()
    )
    assert got == status
    assert command_text(values.get(0x0902)) == (comment or None)
    expected_tags = None
    if offending:
        expected_tags = ", ".join(f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in offending)
    assert offending_text(values.get(0x0901)) == expected_tags
    # Answering another message, or another instance, is not an answer.
    with pytest.raises(ProtocolError, match="our request was message"):
        check_response(values, STORE_RSP_FIELD, message_id % 0xFFFF + 1, sop_class.encode())
    with pytest.raises(ProtocolError, match="Affected SOP Instance UID"):
        check_response(values, STORE_RSP_FIELD, message_id, sop_class.encode(), b"1.2.3.999")


@pytest.mark.parametrize("status", [0xFF00, 0xFF01])
def test_a_pending_c_store_rsp_from_pynetdicom_is_a_protocol_error(status: int) -> None:
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = 3
    prim.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    prim.AffectedSOPInstanceUID = "1.2.3"
    prim.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(prim)
    values = read_response(pynetdicom_response_pdus(message, 1, 0), 1)
    with pytest.raises(ProtocolError, match="Pending"):
        check_response(values, STORE_RSP_FIELD, 3, b"1.2.840.10008.5.1.4.1.1.2", b"1.2.3")


_CT = "1.2.840.10008.5.1.4.1.1.7"
_INSTANCE = "1.2.826.0.1.3680043.2.1125.1"


def _rsp_command_set(status: int = 0x0000, **layout: object) -> bytes:
    """The command set of a C-STORE-RSP to message 5, laid out as ``layout`` says
    (dimse_wire.response's keywords: group_length, reverse, repeat, replace)."""
    command = Command(0x0001, 5, 0, _CT, _INSTANCE)
    raw = wire_response(1, command, STORE_RSP_FIELD, status, **layout)  # type: ignore[arg-type]
    return raw[12:]  # P-DATA-TF header (6), PDV length (4), context ID, control header


@pytest.mark.parametrize(
    ("layout", "note"),
    [
        ({"group_length": "missing"}, "no Command Group Length (0000,0000)"),
        ({"group_length": "wrong"}, "Command Group Length says"),
        ({"reverse": True}, "elements out of ascending order"),
        ({"reverse": True, "group_length": "missing"}, "elements out of ascending order"),
        ({"repeat": {0x0900: b"\x00\xb0"}}, "element (0000,0900) repeated"),
    ],
    ids=["no-group-length", "wrong-group-length", "out-of-order", "both", "repeated-same"],
)
def test_layout_faults_pynetdicom_tolerates_are_tolerated_and_noted(
    layout: dict[str, object], note: str
) -> None:
    """They used to be protocol errors: the data set had gone out, the peer had stored it, and
    the file was resent until max_attempts sent it to failed/. pynetdicom decodes all of them;
    the end of a command set is the last-fragment bit (PS3.8 9.3.5.1), not its group length."""
    raw = _rsp_command_set(0xB000, **layout)
    theirs = pynetdicom_decode(BytesIO(raw), True, True)
    assert theirs.Status == 0xB000 and theirs.MessageIDBeingRespondedTo == 5
    notes: list[str] = []
    values = decode_command(raw, notes)
    assert check_response(values, STORE_RSP_FIELD, 5, _CT.encode(), _INSTANCE.encode()) == 0xB000
    assert any(note in n for n in notes), notes
    # a well-formed one has nothing to note
    clean: list[str] = []
    decode_command(_rsp_command_set(0xB000), clean)
    assert clean == []


def test_a_status_repeated_with_another_value_is_a_protocol_error() -> None:
    raw = _rsp_command_set(0x0000, repeat={0x0900: b"\x00\xc0"})
    with pytest.raises(ProtocolError, match=r"\(0000,0900\) repeated with another value"):
        decode_command(raw)


@pytest.mark.parametrize("element", [0x0002, 0x1000], ids=["class", "instance"])
@pytest.mark.parametrize("empty", [b"", b"\x00\x00", b"  "], ids=["0", "nul", "space"])
def test_an_empty_affected_sop_uid_counts_as_absent(element: int, empty: bytes) -> None:
    """U(=) in PS3.7 9.3.1.2: some SCPs send the element with no value; it was a mismatch."""
    values = decode_command(_rsp_command_set(0x0000, replace={element: empty}))
    assert values[element] == empty
    assert check_response(values, STORE_RSP_FIELD, 5, _CT.encode(), _INSTANCE.encode()) == 0
    # still checked when there is a value
    values[element] = b"1.2.3.4\x00"
    with pytest.raises(ProtocolError, match="is not the one we sent"):
        check_response(values, STORE_RSP_FIELD, 5, _CT.encode(), _INSTANCE.encode())


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ({"replace": {0x0120: b"\x06\x00"}, "group_length": "missing"}, "our request was"),
        ({"replace": {0x0900: b"\x00"}, "reverse": True}, "has 1 bytes, not 2"),
        ({"replace": {0x0100: None}, "group_length": "wrong"}, "without Command Field"),
        ({"replace": {0x0800: b"\x01\x00"}, "reverse": True}, "announces a data set"),
        ({"replace": {0x0900: b"\x00\xff"}, "group_length": "missing"}, "Pending"),
        ({"replace": {0x1000: b"1.2.3\x00"}, "reverse": True}, "Affected SOP Instance UID"),
    ],
)
def test_what_identifies_a_response_is_still_checked_whatever_the_layout(
    layout: dict[str, object], words: str
) -> None:
    values = decode_command(_rsp_command_set(0x0000, **layout), [])
    with pytest.raises(ProtocolError, match=words):
        check_response(values, STORE_RSP_FIELD, 5, _CT.encode(), _INSTANCE.encode())


@FAST
@given(message_id=message_ids, status=statuses, max_pdu=st.one_of(st.just(0), st.integers(16, 64)))
def test_pynetdicom_c_echo_rsp_decodes_in_ours(message_id: int, status: int, max_pdu: int) -> None:
    prim = C_ECHO()
    prim.MessageIDBeingRespondedTo = message_id
    prim.AffectedSOPClassUID = VERIFICATION_SOP_CLASS
    prim.Status = status
    message = C_ECHO_RSP()
    message.primitive_to_message(prim)
    values = read_response(pynetdicom_response_pdus(message, 1, max_pdu), 1)
    assert check_response(values, ECHO_RSP_FIELD, message_id, VERIFICATION_SOP_CLASS.encode()) == (
        status
    )
    with pytest.raises(ProtocolError, match="Command Field"):
        check_response(values, STORE_RSP_FIELD, message_id, VERIFICATION_SOP_CLASS.encode())


# -- the max PDU clamp ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "ours", "limit"),
    [
        (0, None, 1024 * 1024),
        (0xFFFFFFFF, None, 1024 * 1024),
        (16384, None, 16384),
        (65535, None, 65534),
        (8, None, 8),
        (9, None, 8),
        (0, 4096, 4096),
        (4096, 65536, 4096),
        (0xFFFFFFFF, 1, 8),
    ],
)
def test_send_pdu_limit(peer: int, ours: int | None, limit: int) -> None:
    assert send_pdu_limit(peer, ours) == limit


@pytest.mark.parametrize("peer", [1, 2, 6, 7])
def test_a_peer_max_below_one_even_fragment_is_refused(peer: int) -> None:
    with pytest.raises(ProtocolError, match="cannot carry a PDV"):
        send_pdu_limit(peer)
