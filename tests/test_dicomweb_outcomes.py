"""StowChannel against a scripted STOW-RS server: every answer a server can give, per file.

Real sockets on 127.0.0.1, real files; the server is tests/stowserver.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import write_file, write_files
from stowserver import Answer, Seen, StowServer, stow_json

from forwarder.dicom.part10 import read_meta
from forwarder.dicomweb.auth import AuthSpec
from forwarder.dicomweb.channel import StowChannel
from forwarder.dicomweb.http import WebSettings
from forwarder.net.channel import SendOutcome, StoreRequest
from forwarder.net.status import Outcome


def requests(paths: list[Path]) -> list[StoreRequest]:
    return [StoreRequest(str(p), i) for i, p in enumerate(paths)]


def uid(path: Path) -> str:
    return read_meta(str(path)).sop_instance_uid


def send(server: StowServer, paths: list[Path], **settings: object) -> list[SendOutcome]:
    channel = StowChannel(WebSettings(url=server.url, **settings))  # type: ignore[arg-type]
    try:
        return list(channel.send(requests(paths)))
    finally:
        channel.release()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_files(tmp_path / "in", 4)


def test_all_stored_in_one_request_with_the_files_bytes_as_they_are(files: list[Path]) -> None:
    with StowServer() as server:
        outcomes = send(server, files)
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 4
    assert [o.status for o in outcomes] == [0] * 4
    (post,) = server.posts()
    assert post.path == "/dicom-web/studies"
    assert post.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert post.parts == [p.read_bytes() for p in files]  # Part 10, byte for byte
    assert all(o.nbytes == p.stat().st_size for o, p in zip(outcomes, files, strict=True))


def test_requests_are_bounded_by_count_and_bytes(files: list[Path]) -> None:
    with StowServer() as server:
        assert all(o.outcome is Outcome.STORED for o in send(server, files, max_instances=3))
        assert [len(p.uids) for p in server.posts()] == [3, 1]
    with StowServer() as server:
        assert all(o.outcome is Outcome.STORED for o in send(server, files, max_bytes=1))
        assert [len(p.uids) for p in server.posts()] == [1, 1, 1, 1]


def test_partial_failure_in_one_response_is_per_instance(files: list[Path]) -> None:
    failed = {uid(files[0]): 0xA900, uid(files[1]): 0xA700, uid(files[2]): 0xC000}
    answer = Answer(status=202, failed=failed, warnings={uid(files[3]): 0xB000})
    with StowServer(answer) as server:
        a, b, c, d = send(server, files)
    assert (a.outcome, a.status) == (Outcome.FAILED, 0xA900)  # does not match the SOP class
    assert (b.outcome, b.status) == (Outcome.RETRY, 0xA700)  # out of resources
    assert (c.outcome, c.status) == (Outcome.FAILED, 0xC000)  # cannot understand
    assert (d.outcome, d.status) == (Outcome.WARNING, 0xB000)  # stored, with a warning
    assert a.error is not None and "0xA900" in a.error and "HTTP 202" in a.error
    assert d.error is not None and "Warning Reason" in d.error


def test_409_with_a_failed_sop_sequence_is_per_instance(files: list[Path]) -> None:
    answer = Answer(status=409, failed={uid(f): 0x0122 for f in files[:2]})
    with StowServer(answer) as server:
        outcomes = send(server, files[:2])
    assert [(o.outcome, o.status) for o in outcomes] == [(Outcome.FAILED, 0x0122)] * 2


def test_400_with_a_response_naming_the_instances_is_per_instance(files: list[Path]) -> None:
    """Orthanc's DICOMweb plugin answers 400 when any instance of a request failed, with a
    response data set that lists the others as stored (Referenced SOP Sequence): they are
    stored, and reported so; only the failed one fails."""
    with StowServer(Answer(status=400, failed={uid(files[0]): 0xC000})) as server:
        outcomes = send(server, files)
    assert [(o.outcome, o.status) for o in outcomes] == [
        (Outcome.FAILED, 0xC000),
        *[(Outcome.STORED, 0)] * 3,
    ]


def test_a_400_response_naming_none_of_the_instances_fails_the_batch(files: list[Path]) -> None:
    body = stow_json({}, {"1.2.3.4": 0xC000})
    with StowServer(Answer(status=400, body=body)) as server:
        outcomes = send(server, files[:2])
    assert {o.outcome for o in outcomes} == {Outcome.FAILED}
    assert all("HTTP 400" in (o.error or "") for o in outcomes)


def test_a_processing_failure_reason_is_retried(files: list[Path]) -> None:
    with StowServer(Answer(status=409, failed={uid(files[0]): 0x0110})) as server:
        (o,) = send(server, files[:1])
    assert (o.outcome, o.status) == (Outcome.RETRY, 0x0110)


def test_a_response_missing_instances_retries_those_and_says_so(files: list[Path]) -> None:
    with StowServer(Answer(omit={uid(files[1])})) as server:
        outcomes = send(server, files)
    assert [o.outcome for o in outcomes] == [
        Outcome.STORED,
        Outcome.RETRY,
        Outcome.STORED,
        Outcome.STORED,
    ]
    assert outcomes[1].error is not None and "does not account for" in outcomes[1].error


def test_an_unreadable_200_body_retries_everything(files: list[Path]) -> None:
    with StowServer(Answer(body=b"OK")) as server:
        outcomes = send(server, files[:2])
    assert {o.outcome for o in outcomes} == {Outcome.RETRY}
    assert all("not valid JSON" in (o.error or "") for o in outcomes)


def test_an_xml_response_is_read(files: list[Path]) -> None:
    u = uid(files[0])
    xml = (
        '<?xml version="1.0"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
        'NativeDICOM"><DicomAttribute tag="00081198" vr="SQ"><Item number="1">'
        f'<DicomAttribute tag="00081155" vr="UI"><Value number="1">{u}</Value></DicomAttribute>'
        '<DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute>'
        "</Item></DicomAttribute></NativeDicomModel>"
    ).encode()
    headers = {"Content-Type": "application/dicom+xml"}
    with StowServer(Answer(status=409, body=xml, headers=headers)) as server:
        (o,) = send(server, files[:1])
    assert (o.outcome, o.status) == (Outcome.FAILED, 0xA900)  # 43264


@pytest.mark.parametrize("status", [500, 502, 408])
def test_server_errors_and_408_retry_the_batch(files: list[Path], status: int) -> None:
    with StowServer(Answer(status=status, body=b"busy")) as server:
        outcomes = send(server, files[:2])
    assert {o.outcome for o in outcomes} == {Outcome.RETRY}
    assert all(o.attempted and f"HTTP {status}" in (o.error or "") for o in outcomes)


@pytest.mark.parametrize("status", [400, 415])
def test_other_client_errors_fail_the_batch(files: list[Path], status: int) -> None:
    with StowServer(Answer(status=status, body=b"no")) as server:
        outcomes = send(server, files[:2])
    assert {o.outcome for o in outcomes} == {Outcome.FAILED}


def test_413_with_several_files_retries_and_then_sends_one_per_request(files: list[Path]) -> None:
    def answer(seen: Seen) -> Answer:
        return Answer(status=413, body=b"too big") if len(seen.uids) > 1 else Answer()

    with StowServer(answer) as server:
        channel = StowChannel(WebSettings(url=server.url))
        first = list(channel.send(requests(files[:2])))
        second = list(channel.send(requests(files[:2])))
        channel.release()
    assert {o.outcome for o in first} == {Outcome.RETRY}
    assert {o.outcome for o in second} == {Outcome.STORED}


def test_503_and_429_honour_retry_after_and_mark_the_server_down(files: list[Path]) -> None:
    with StowServer(Answer(status=429, headers={"Retry-After": "30"})) as server:
        channel = StowChannel(WebSettings(url=server.url))
        first = list(channel.send(requests(files[:2])))
        again = list(channel.send(requests(files[2:])))
        channel.release()
    assert {(o.outcome, o.attempted, o.association_failed) for o in first} == {
        (Outcome.RETRY, True, True)
    }
    assert "retry after 30s" in (first[0].error or "")
    # Within Retry-After nothing is sent; the files are not charged.
    assert len(server.posts()) == 1
    assert {(o.outcome, o.attempted) for o in again} == {(Outcome.RETRY, False)}
    assert channel.down is not None and channel.down.retryable
    with StowServer(Answer(status=503)) as server:
        (o,) = send(server, files[:1])
    assert (o.outcome, o.association_failed) == (Outcome.RETRY, True)


def test_a_stalled_response_times_out_and_is_retried(files: list[Path]) -> None:
    with StowServer(Answer(stall=True)) as server:
        started = time.monotonic()
        outcomes = send(server, files[:2], response_timeout=0.5)
        took = time.monotonic() - started
    assert {o.outcome for o in outcomes} == {Outcome.RETRY}
    assert "no response within 0.5s" in (outcomes[0].error or "")
    assert took < 5


def test_a_connection_dropped_mid_body_is_retried(tmp_path: Path) -> None:
    big = write_files(tmp_path / "big", 2, rows=1024, columns=1024)  # 2 MB each
    with StowServer(Answer(drop=True)) as server:
        outcomes = send(server, big)
    assert {o.outcome for o in outcomes} == {Outcome.RETRY}
    assert all(o.attempted and not o.association_failed for o in outcomes)
    assert "connection" in (outcomes[0].error or "")


def test_an_unreachable_server_charges_only_the_first_file(files: list[Path]) -> None:
    with StowServer() as server:
        url = server.url
    channel = StowChannel(WebSettings(url=url, connect_timeout=2))
    outcomes = list(channel.send(requests(files)))
    assert [o.attempted for o in outcomes] == [True, False, False, False]
    assert {o.outcome for o in outcomes} == {Outcome.RETRY}
    assert all(o.association_failed for o in outcomes)
    assert channel.down is not None and channel.down.retryable
    assert "cannot connect" in str(channel.down)
    assert channel.associations_opened == 0


@pytest.mark.parametrize("status", [401, 403, 404])
def test_wrong_auth_or_url_holds_the_destination_and_charges_nothing(
    files: list[Path], status: int
) -> None:
    with StowServer(Answer(status=status, body=b"go away")) as server:
        channel = StowChannel(WebSettings(url=server.url))
        outcomes = list(channel.send(requests(files)))
        channel.release()
    assert {(o.outcome, o.attempted, o.association_failed) for o in outcomes} == {
        (Outcome.FAILED, False, True)
    }
    assert channel.down is not None and not channel.down.retryable  # held, like a rejection
    assert f"HTTP {status}" in str(channel.down)
    assert len(server.posts()) == 1  # the rest of the batch is not sent


def test_bearer_token_and_basic_auth_headers_are_sent(tmp_path: Path, files: list[Path]) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    password = tmp_path / "password"
    password.write_text("pw")
    password.chmod(0o600)
    with StowServer() as server:
        send(server, files[:1], auth=AuthSpec(bearer_token_file=token))
        send(server, files[:1], auth=AuthSpec(username="alice", password_file=password))
    first, second = server.posts()
    assert first.headers["authorization"] == "Bearer s3cret-token"
    assert second.headers["authorization"] == "Basic YWxpY2U6cHc="  # alice:pw


def test_a_secret_readable_by_others_is_refused_and_holds(
    tmp_path: Path, files: list[Path]
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    token.chmod(0o644)
    with StowServer() as server:
        channel = StowChannel(WebSettings(url=server.url, auth=AuthSpec(bearer_token_file=token)))
        outcomes = list(channel.send(requests(files[:2])))
        channel.release()
    assert server.posts() == []
    assert {(o.outcome, o.attempted) for o in outcomes} == {(Outcome.FAILED, False)}
    assert channel.down is not None and "chmod 600" in str(channel.down)
    assert "s3cret" not in str(channel.down)


def test_a_file_that_changes_while_sent_is_retried_not_sent_short(
    tmp_path: Path, files: list[Path]
) -> None:
    reqs = requests(files[:1])
    with StowServer() as server:
        channel = StowChannel(WebSettings(url=server.url))
        item = channel._prepare(reqs[0])
        with open(files[0], "ab") as f:
            f.write(b"\0" * 10)
        outcomes = channel._send_batch([item])
        channel.release()
    assert [o.outcome for o in outcomes] == [Outcome.RETRY]
    assert "changed" in (outcomes[0].error or "")
    assert all(p.nbytes < os.path.getsize(files[0]) + 1000 for p in server.posts())


def test_a_file_unreadable_as_planned_is_charged_alone(files: list[Path]) -> None:
    """A file that cannot be read as planned (here it shrank after the batch was planned; EIO
    acts alike) ends its whole request: it is retried and charged, the others go back
    uncharged, so that they are not taken to failed/ with a file that keeps failing."""

    def planned_then_cut() -> Iterator[StoreRequest]:
        yield from requests(files[:3])
        with open(files[1], "r+b") as f:  # after the batch was planned, before it is sent
            f.truncate(100)

    with StowServer() as server:
        channel = StowChannel(WebSettings(url=server.url))
        try:
            outcomes = list(channel.send(planned_then_cut()))
        finally:
            channel.release()
    by_path = {o.request.path: o for o in outcomes}
    assert all(o.outcome is Outcome.RETRY for o in outcomes)
    assert by_path[str(files[1])].attempted
    assert "changed" in (by_path[str(files[1])].error or "")
    for other in (files[0], files[2]):
        assert not by_path[str(other)].attempted, by_path[str(other)]


def test_the_response_json_helper_round_trips() -> None:
    from forwarder.dicomweb.response import parse_response

    parsed = parse_response(stow_json({"1.2": 0xB000, "1.3": None}, {"1.4": 0xA700}), "")
    assert parsed.stored == {"1.2": 0xB000, "1.3": None}
    assert parsed.failed == {"1.4": 0xA700}


def test_files_that_are_not_dicom_or_gone_fail_alone(tmp_path: Path, files: list[Path]) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom" * 100)
    gone = tmp_path / "gone.dcm"
    with StowServer() as server:
        outcomes = send(server, [garbage, files[0], gone])
    by_key = sorted(outcomes, key=lambda o: o.request.key)  # unusable files answer at once
    assert [o.outcome for o in by_key] == [Outcome.FAILED, Outcome.STORED, Outcome.FAILED]
    assert server.uids() == [uid(files[0])]


def test_https_with_mutual_tls_and_no_plaintext_fallback(tmp_path: Path, files: list[Path]) -> None:
    from pki import make_pki

    from forwarder.net.tls import client_context, server_context

    pki = make_pki(tmp_path / "pki")
    tls = server_context(pki.server_cert, pki.server_key, ca=pki.ca_cert)  # client certs required
    with StowServer(tls=tls) as server:
        assert server.url.startswith("https://")
        mutual = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
        stored = send(server, files[:2], tls=mutual)
        anonymous = send(server, files[2:3], tls=client_context(pki.ca_cert))
        untrusted = send(server, files[3:], tls=client_context(pki.other_ca_cert))
    assert {o.outcome for o in stored} == {Outcome.STORED}
    assert len(server.posts()) == 1  # the refused ones never got to send a byte of HTTP
    # Without our certificate the server refuses (TLS 1.3: seen at the first read or write).
    assert anonymous[0].outcome is Outcome.RETRY
    assert (untrusted[0].outcome, untrusted[0].association_failed) == (Outcome.RETRY, True)
    assert "untrusted issuer" in (untrusted[0].error or "")


def test_two_files_with_one_sop_instance_uid_never_share_a_request(tmp_path: Path) -> None:
    # A modality exporting an image twice (a correction keeps its UID): the response can name
    # the UID only once, so one Referenced item would be taken as proof for both files.
    first = tmp_path / "first.dcm"
    again = tmp_path / "again.dcm"
    write_file(first, seed=1)
    write_file(again, seed=2, sop_instance_uid=uid(first))
    assert first.read_bytes() != again.read_bytes()
    with StowServer() as server:  # stores by UID: its response names each UID once
        outcomes = send(server, [first, files_one(tmp_path), again])
    assert [o.outcome for o in outcomes] == [Outcome.STORED] * 3
    for post in server.posts():
        assert len(set(post.uids)) == len(post.uids), post.uids  # each file its own answer
    assert sorted(server.uids()).count(uid(first)) == 2


def files_one(tmp_path: Path) -> Path:
    (other,) = write_files(tmp_path / "other", 1)
    return other


def test_a_referenced_item_of_another_sop_class_is_not_proof(files: list[Path]) -> None:
    # C-STORE refuses a response whose Affected SOP Class UID is not ours (a protocol error,
    # retried); a STOW-RS Referenced SOP item naming our instance under another class is the
    # server speaking of another object.
    u0, u1 = uid(files[0]), uid(files[1])
    body = stow_json({u0: None, u1: None}, {})
    body = body.replace(b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.5.1.4.1.1.4", 1)  # MR
    headers = {"Content-Type": "application/dicom+json"}
    with StowServer(Answer(body=body, headers=headers)) as server:
        a, b = send(server, files[:2])
    assert a.outcome is Outcome.RETRY, a
    assert a.error is not None and "SOP Class" in a.error
    assert b.outcome is Outcome.STORED


def test_a_pending_failure_reason_is_retried_and_the_rest_judged(files: list[Path]) -> None:
    with StowServer(Answer(status=202, failed={uid(files[0]): 0xFF00})) as server:
        a, b = send(server, files[:2])
    assert (a.outcome, a.status) == (Outcome.RETRY, 0xFF00)
    assert a.error is not None and "internal error" not in a.error
    assert b.outcome is Outcome.STORED  # stored: not sent again because of its neighbour


def test_a_2xx_answered_before_the_body_was_sent_whole_stores_nothing_unsent(
    tmp_path: Path,
) -> None:
    # The server (or a proxy) answers after 1 MiB and closes: urllib3 ignores the broken pipe
    # and reads the answer. Instances whose bytes never left are not stored, whatever it says.
    big = write_files(tmp_path / "big", 3, rows=2048, columns=2048)  # 8 MiB each
    body = stow_json({uid(p): None for p in big}, {})
    answer = Answer(early=1 << 20, body=body, headers={"Content-Type": "application/dicom+json"})
    with StowServer(answer) as server:
        outcomes = send(server, big, max_bytes=1 << 30)
    assert len(server.posts()) == 1
    assert outcomes[-1].outcome is Outcome.RETRY, outcomes[-1]
    assert outcomes[-1].error is not None and "sent whole" in outcomes[-1].error
    assert all(o.attempted for o in outcomes)
