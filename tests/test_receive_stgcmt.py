"""``forwarder receive`` as a storage commitment SCP for what its output folder holds, with a
second forwarder (``send --stgcmt``) as the requester: the report on the same association and,
with ``--stgcmt-peer``, on a new association; an instance removed from the folder is reported
failed; malformed requests are refused."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER, wait_until
from dicomgen import write_files
from peers import ForwarderReceive, forwarder_receive, free_port
from pydicom import dcmread
from pynetdicom import AE

from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentBook,
    Reference,
    action_dataset,
)
from forwarder.net.commitment_scu import request_commitment

CT = "1.2.840.10008.5.1.4.1.1.2"


def send(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, "send", "--calling-aet", "FWDSCU", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _files(report: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(report.read_text())
    return {f["sop_instance_uid"]: f for f in data["files"]}


def _same_as_sent(rcv: ForwarderReceive, paths: list[Path]) -> None:
    held = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in rcv.files()}
    for path in paths:
        ds = dcmread(path)
        theirs = held[str(ds.SOPInstanceUID)]
        assert theirs.PixelData == ds.PixelData and theirs.StudyInstanceUID == ds.StudyInstanceUID


def test_send_stgcmt_to_receive_on_the_same_association(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 3)
    report = tmp_path / "r.json"
    with forwarder_receive(tmp_path / "out") as rcv:
        r = send(
            "--stgcmt", "--stgcmt-timeout", "20s", "--report", report,
            f"{rcv.ae_title}@127.0.0.1:{rcv.port}", tmp_path / "in", env=forwarder_env,
        )  # fmt: skip
        _same_as_sent(rcv, paths)
    assert r.returncode == 0, r.stderr
    assert {f["commitment"] for f in _files(report).values()} == {"committed"}
    said = rcv.log.read_text()
    assert "on its association" in said, said


def test_send_stgcmt_to_receive_on_a_new_association(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 2)
    report = tmp_path / "r.json"
    port = free_port()
    extra = ["--stgcmt-peer", f"127.0.0.1:{port}"]
    with forwarder_receive(tmp_path / "out", extra=extra) as rcv:
        r = send(
            "--stgcmt", "--stgcmt-port", port, "--stgcmt-timeout", "20s", "--report", report,
            f"{rcv.ae_title}@127.0.0.1:{rcv.port}", tmp_path / "in", env=forwarder_env,
        )  # fmt: skip
        _same_as_sent(rcv, paths)
    assert r.returncode == 0, r.stderr
    assert {f["commitment"] for f in _files(report).values()} == {"committed"}
    said = rcv.log.read_text()
    assert "delivered to FWDSCU" in said, said


def test_an_instance_no_longer_in_the_folder_is_reported_failed(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 3)
    refs = [Reference(CT, str(dcmread(p).SOPInstanceUID)) for p in paths]
    stranger = Reference(CT, "1.2.826.0.1.3680043.10.1284.999.1")
    with forwarder_receive(tmp_path / "out") as rcv:
        r = send(f"{rcv.ae_title}@127.0.0.1:{rcv.port}", tmp_path / "in", env=forwarder_env)
        assert r.returncode == 0, r.stderr
        (gone,) = [p for p in rcv.files() if p.name == f"{refs[1].sop_instance}.dcm"]
        gone.unlink()
        settings = AssociationSettings(calling_ae_title="FWDSCU")
        _, report = request_commitment(
            Peer("127.0.0.1", rcv.port, rcv.ae_title),
            settings,
            [*refs, stranger],
            CommitmentBook(),
            timeout=20,
            release_at_once=False,
        )
    assert report is not None
    assert set(report.committed) == {refs[0], refs[2]}
    assert {(f.reference, f.reason) for f in report.failed} == {
        (refs[1], 0x0112),
        (stranger, 0x0112),
    }
    assert report.retrieve_ae == rcv.ae_title


@pytest.mark.parametrize(
    ("action_type", "instance", "dataset", "status"),
    [
        (2, STORAGE_COMMITMENT_INSTANCE, True, 0x0123),  # no such action
        (1, "1.2.3.4", True, 0x0112),  # not the well-known instance
        (1, STORAGE_COMMITMENT_INSTANCE, False, 0x0115),  # no Transaction UID
    ],
)
def test_malformed_requests_are_refused(
    action_type: int, instance: str, dataset: bool, status: int, tmp_path: Path
) -> None:
    with forwarder_receive(tmp_path / "out") as rcv:
        ae = AE(ae_title="FWDSCU")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate("127.0.0.1", rcv.port, ae_title=rcv.ae_title)
        assert assoc.is_established
        ds = action_dataset("1.2.3", [Reference(CT, "1.2.3.4")])
        if not dataset:
            del ds.TransactionUID
        rsp, _ = assoc.send_n_action(ds, action_type, STORAGE_COMMITMENT_PUSH, instance)
        assert int(rsp.Status) == status
        assoc.release()


def test_send_stgcmt_over_mutual_tls(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    from pki import make_pki
    from test_tls import tls_args

    pki = make_pki(tmp_path / "pki")
    paths = write_files(tmp_path / "in", 2)
    report = tmp_path / "r.json"
    client = [
        "--tls-ca", pki.ca_cert, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key,
    ]  # fmt: skip
    with forwarder_receive(tmp_path / "out", extra=tls_args(pki)) as rcv:
        r = send(
            *client, "--stgcmt", "--stgcmt-timeout", "20s", "--report", report,
            f"{rcv.ae_title}@localhost:{rcv.port}", tmp_path / "in", env=forwarder_env,
        )  # fmt: skip
        _same_as_sent(rcv, paths)
    assert r.returncode == 0, r.stderr
    assert {f["commitment"] for f in _files(report).values()} == {"committed"}


def test_sigterm_while_a_report_waits_on_a_silent_peer_exits_promptly(tmp_path: Path) -> None:
    """``--stgcmt-peer`` names a host that takes the connection and never answers the
    A-ASSOCIATE-RQ: the report's attempt must not hold SIGTERM for the ACSE timeout (10 s);
    the log says the report was not delivered."""
    silent = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: taken.append(silent.accept()[0]), daemon=True)
    accepting.start()
    extra = ["--stgcmt-peer", f"127.0.0.1:{silent.getsockname()[1]}"]
    try:
        with forwarder_receive(tmp_path / "out", extra=extra) as rcv:
            request_commitment(
                Peer("127.0.0.1", rcv.port, rcv.ae_title),
                AssociationSettings(calling_ae_title="FWDSCU"),
                [Reference(CT, "1.2.826.0.1.3680043.10.1284.999.2")],
                CommitmentBook(),
                timeout=0.1,
                release_at_once=True,  # the report goes to the silent peer once this ends
            )
            wait_until(lambda: bool(taken), 30, what="the report's connection to the silent peer")
            started = time.monotonic()
            rcv.proc.terminate()
            rcv.proc.wait(30)
            took = time.monotonic() - started
    finally:
        silent.close()
        for sock in taken:
            sock.close()
    said = rcv.log.read_text()
    assert took < 5, f"SIGTERM took {took:.1f}s\n{said}"
    assert "not delivered" in said, said


def test_no_association_for_commitment_says_why_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS whose certificate no longer verifies (renewed by another CA): the commitment
    request fails with the TLS check named, as a C-STORE would say it, and nothing else is
    logged: pynetdicom's two ERROR lines and traceback, once a minute in the daemon, are gone.
    A closed port says "Connection refused"."""
    from pki import make_pki
    from test_tls import tls_args

    from forwarder.net.commitment import CommitmentError
    from forwarder.net.tls import client_context

    pki = make_pki(tmp_path / "pki")
    other = client_context(pki.other_ca_cert, pki.client_cert, pki.client_key)
    refs = [Reference(CT, "1.2.826.0.1.3680043.10.1284.999.3")]
    caplog.set_level(logging.INFO)
    with (
        forwarder_receive(tmp_path / "out", extra=tls_args(pki)) as rcv,
        pytest.raises(CommitmentError) as raised,
    ):
        request_commitment(
            Peer("localhost", rcv.port, rcv.ae_title),
            AssociationSettings(calling_ae_title="FWDSCU", tls=other),
            refs,
            CommitmentBook(),
            timeout=5,
            release_at_once=True,
        )
    assert str(raised.value).endswith(
        "for storage commitment: untrusted issuer (certificate verify failed: "
        "self-signed certificate in certificate chain)"
    ), raised.value
    with pytest.raises(CommitmentError, match=r"for storage commitment: Connection refused$"):
        request_commitment(
            Peer("127.0.0.1", free_port(), "NOBODY"),
            AssociationSettings(calling_ae_title="FWDSCU"),
            refs,
            CommitmentBook(),
            timeout=5,
            release_at_once=True,
        )
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
