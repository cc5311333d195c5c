"""The DICOM Conformance Statement (docs/conformance-statement.md) says what the code does.

First, the committed document must be exactly what ``forwarder.conformance`` renders from the
code now. Then what it states is checked against the running engine on the wire, reading the
values *from the document*: the identification and maximum PDU that ``send`` and ``echo`` put in
their A-ASSOCIATE-RQ (seen by pynetdicom and DCMTK), the presentation contexts ``send`` proposes
for a file, the PDU size limit it honours (DCMTK storescp logs every PDU), the treatment of the
statuses a peer answers, and the transfer syntaxes, preference order, SOP classes and
identification of ``forwarder receive``.
"""

from __future__ import annotations

import difflib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER, REPO, wait_until
from dicomgen import write_file
from dimse_wire import rejection
from peers import STORESCP, ScriptedSCP, free_port, stop_process, wait_for_port
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from forwarder import conformance

DOC = REPO / "docs" / "conformance-statement.md"
VERIFICATION = "1.2.840.10008.1.1"
PRIVATE_UID = "1.2.826.0.1.3680043.10.1284.999.1"  # under forwarder's root, never registered


# -- reading the document --------------------------------------------------------------------------


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, number: str) -> str:
    """The text of the section whose heading starts with ``number`` (up to the next heading of
    the same or a higher level)."""
    match = re.search(rf"^(#+) {re.escape(number)} .*$", text, re.MULTILINE)
    assert match, f"no section {number} in {DOC}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def cell(text: str, label: str) -> str:
    """The second cell of the table row whose first cell is ``label``."""
    match = re.search(rf"^\| {re.escape(label)} \| (.*?) \|", text, re.MULTILINE)
    assert match, f"no row {label!r}"
    return match.group(1)


def code(text: str, label: str) -> str:
    """The `code` value of the row ``label``."""
    match = re.search(r"`([^`]+)`", cell(text, label))
    assert match, f"row {label!r} has no value"
    return match.group(1)


def first_int(text: str) -> int:
    match = re.search(r"\d+", text)
    assert match, text
    return int(match.group())


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The rows of the first table whose header starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {header_start}"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split(" | ")])
            return rows
    raise AssertionError(f"no table starting {header_start!r}")


def uids(text: str) -> list[str]:
    return re.findall(r"`(\d+(?:\.\d+)+)`", text)


# -- the document is the code's --------------------------------------------------------------------


def test_committed_statement_is_what_the_code_renders() -> None:
    rendered = conformance.render()
    committed = doc()
    if rendered != committed:
        diff = "\n".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(),
                    rendered.splitlines(),
                    "docs/conformance-statement.md (committed)",
                    "rendered from the code now",
                    n=1,
                    lineterm="",
                )
            )[:60]
        )
        pytest.fail(
            "docs/conformance-statement.md no longer matches the code: "
            f"run make conformance-statement\n{diff}"
        )


def test_module_prints_and_writes_the_statement(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "forwarder.conformance"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    out = tmp_path / "cs.md"
    subprocess.run(
        [sys.executable, "-m", "forwarder.conformance", str(out)], timeout=60, check=True
    )
    assert printed == out.read_text(encoding="utf-8") == conformance.render()


# -- the SCUs, on the wire -------------------------------------------------------------------------


@contextmanager
def capturing_scp(**kwargs: Any) -> Iterator[tuple[ScriptedSCP, list[dict[str, Any]]]]:
    """A pynetdicom Storage SCP that records every A-ASSOCIATE-RQ it receives."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def requested(event: Any) -> None:
        rq = event.assoc.requestor
        with lock:
            seen.append(
                {
                    "implementation_class_uid": str(rq.implementation_class_uid),
                    "implementation_version_name": rq.implementation_version_name,
                    "maximum_length": rq.maximum_length,
                    "contexts": [
                        (str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
                        for c in rq.requested_contexts
                    ],
                    "async_ops": rq.asynchronous_operations,
                    "user_identity": rq.user_identity,
                }
            )

    scp = ScriptedSCP(**kwargs)
    scp.start()
    scp._server.bind(evt.EVT_REQUESTED, requested)
    try:
        yield scp, seen
    finally:
        scp.stop()


def run_forwarder(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, *map(str, args)], capture_output=True, text=True, timeout=60, env=env
    )


def planned_contexts(text: str, sop_class: str, syntax: str) -> list[tuple[str, list[str]]]:
    """The contexts the statement (3.2.1.3) says are proposed for a file in ``syntax``."""
    rows = table_rows(section(text, "3.2.1.3"), "File's transfer syntax")
    row = next((r for r in rows if f"`{syntax}`" in r[0]), None)
    row = row or next(r for r in rows if r[0].startswith("Every other"))
    planned = []
    for part in row[1].split("<br>"):
        offered = part.split(":", 1)[1]
        listed = [syntax] if "the file's own" in offered else []
        planned.append((sop_class, listed + uids(offered)))
    return planned


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_send_proposes_and_identifies_itself_as_stated(
    tmp_path: Path, forwarder_env: dict[str, str], syntax: str
) -> None:
    text = doc()
    policies = section(text, "3.2.2.1")
    path = tmp_path / "ct.dcm"
    write_file(path, transfer_syntax=syntax)
    with capturing_scp() as (scp, seen):
        result = run_forwarder("send", f"SCP@127.0.0.1:{scp.port}", path, env=forwarder_env)
        assert result.returncode == 0, result.stderr
    assert len(seen) == 1
    rq = seen[0]
    assert rq["implementation_class_uid"] == code(policies, "Implementation Class UID")
    assert rq["implementation_version_name"] == code(policies, "Implementation Version Name")
    assert rq["maximum_length"] == first_int(cell(policies, "Maximum Length (0x51)"))
    assert cell(policies, "Asynchronous Operations Window (0x53)") == "not sent"
    assert rq["async_ops"] == (1, 1)  # pynetdicom's value when none was proposed
    assert cell(policies, "User Identity (0x58)") == "not sent"
    assert rq["user_identity"] is None
    assert rq["contexts"] == planned_contexts(text, CTImageStorage, syntax)


def test_echo_proposes_and_identifies_itself_as_stated(forwarder_env: dict[str, str]) -> None:
    text = doc()
    echo = section(text, "3.2.3")
    policies = section(text, "3.2.1.2")  # "the same identifying information" as the daemon
    with capturing_scp() as (scp, seen):
        result = run_forwarder("echo", f"SCP@127.0.0.1:{scp.port}", env=forwarder_env)
        assert result.returncode == 0, result.stderr
    rq = seen[0]
    assert rq["implementation_class_uid"] == code(policies, "Implementation Class UID")
    assert rq["implementation_version_name"] == code(policies, "Implementation Version Name")
    row = table_rows(echo, "Abstract Syntax")[0]
    assert rq["contexts"] == [(uids(row[0])[0], uids(row[1]))]
    assert rq["contexts"][0][0] == VERIFICATION


def test_dcmtk_sees_the_stated_identification_and_pdu_limit(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """DCMTK storescp (max PDU 16384, trace log) receives a file bigger than one PDU: it sees the
    stated implementation UID, version name and maximum length, and no P-DATA-TF PDU above
    what the statement's PDU table says we send to a peer announcing 16384."""
    text = doc()
    policies = section(text, "3.2.2.1")
    pdu_rows = table_rows(section(text, "3.2.1.3"), "Peer's Maximum Length")
    limit = next(first_int(r[1]) for r in pdu_rows if first_int(r[0]) == 16384)
    path = tmp_path / "big.dcm"
    write_file(path, rows=256, columns=256)  # 128 KiB of pixels: several PDUs
    out, log = tmp_path / "out", tmp_path / "storescp.log"
    out.mkdir()
    port = free_port()
    env = {**forwarder_env, "TCP_NODELAY": "1"}
    with log.open("wb") as fh:
        cmd = [STORESCP, "-ll", "trace", "--max-pdu", "16384", "-aet", "DCMTK", "-od", str(out)]
        cmd.append(str(port))
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, proc=proc)
        result = run_forwarder("send", f"DCMTK@127.0.0.1:{port}", path, env=forwarder_env)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: list(out.iterdir()), what="storescp to write the file")
    finally:
        stop_process(proc)
    dump = log.read_text(errors="replace")
    uid = re.escape(code(policies, "Implementation Class UID"))
    assert re.search(rf"Their Implementation Class UID: +{uid}$", dump, re.MULTILINE), dump[:2000]
    version = code(policies, "Implementation Version Name")
    assert re.search(rf"Their Implementation Version Name: +{version}$", dump, re.MULTILINE)
    stated_max = first_int(cell(policies, "Maximum Length (0x51)"))
    assert re.search(rf"Their Max PDU Receive Size: +{stated_max}$", dump, re.MULTILINE)
    data_pdus = [int(n) for n in re.findall(r"Read PDU HEAD TCP: type: 04, length: (\d+)", dump)]
    assert len(data_pdus) > 2, "storescp logged no P-DATA-TF PDUs"
    assert max(data_pdus) <= limit == 16384


# -- status handling -------------------------------------------------------------------------------

_OUTCOME_OF_BEHAVIOR = {
    "stored": "stored",
    "stored, warning logged": "warning",
    "retried": "retry",
    "failed": "failed",
    "protocol error": "retry",
}


def stated_behavior(text: str, status: int) -> str:
    for row in table_rows(section(text, "3.2.1.5"), "Service Status"):
        first, _, last = row[2].partition("-")
        if int(first, 16) <= status <= int(last or first, 16):
            return row[3]
    raise AssertionError(f"status 0x{status:04X} is not in the statement's table")


def test_statuses_are_treated_as_stated(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    """One file per status (the last one Pending, a protocol error that aborts the association);
    ``send --report`` says what became of each, which must be what the statement's row says."""
    text = doc()
    statuses = [0x0000, 0xB000, 0x0001, 0x0110, 0x0213, 0xA700, 0xA7FF, 0xA900, 0xC000, 0x0122]
    statuses += [0xD000, 0xFE00, 0xFF00]
    answer: dict[str, int] = {}
    for i, status in enumerate(statuses):
        ds = write_file(tmp_path / "in" / f"f{i:02d}.dcm")
        answer[str(ds.SOPInstanceUID)] = status
    report = tmp_path / "report.json"
    with capturing_scp(status=lambda rec: answer[rec.sop_instance_uid]) as (scp, _):
        run_forwarder(
            "send",
            f"SCP@127.0.0.1:{scp.port}",
            tmp_path / "in",
            "--report",
            report,
            env=forwarder_env,
        )
    records = json.loads(report.read_text())["files"]
    assert len(records) == len(statuses)
    got = {r["sop_instance_uid"]: r["outcome"] for r in records}
    expected = {
        uid: _OUTCOME_OF_BEHAVIOR[stated_behavior(text, status)] for uid, status in answer.items()
    }
    assert got == expected


# -- the receiver ----------------------------------------------------------------------------------


@contextmanager
def forwarder_receive(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[int]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log, out = tmp_path / "receive.log", str(tmp_path / "received")
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                FORWARDER,
                "receive",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--output",
                out,
                *args,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        # Wait for its "listening" line rather than probing the port: a probe connection would
        # count against --max-associations until the receiver notices it closed.
        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"forwarder receive exited: {log.read_text(errors='replace')}")
            return "listening on" in log.read_text(errors="replace")

        wait_until(listening, 30, what="forwarder receive to listen")
        try:
            yield port
        except AssertionError as exc:  # what the receiver said explains most failures
            said = log.read_text(errors="replace")
            raise AssertionError(f"{exc}\nreceiver log:\n{said}") from exc
    finally:
        stop_process(proc, timeout=10)


def associate(port: int, contexts: list[Any]) -> Any:
    ae = AE(ae_title="PROBE")
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title="FORWARDER")
    assert assoc.is_established
    return assoc


def test_receive_accepts_what_the_statement_lists(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """One context per stated transfer syntax (all accepted), a private syntax and a private SOP
    class (both refused), Verification; then one context offering every stated syntax in
    reverse order, answered in the statement's preferred one; identification as stated."""
    text = doc()
    receive = section(text, "3.2.4")
    listed = [r[2].strip("`") for r in table_rows(section(text, "3.2.4.3"), "Preference")]
    sop_rows = table_rows(section(text, "3.2.4.1"), "SOP Class Name")
    sop_classes = [r[1].strip("`") for r in sop_rows]
    assert VERIFICATION in sop_classes and CTImageStorage in sop_classes
    with forwarder_receive(tmp_path, forwarder_env) as port:
        contexts = [build_context(CTImageStorage, [ts]) for ts in listed]
        contexts += [build_context(CTImageStorage, [PRIVATE_UID])]
        contexts += [build_context(PRIVATE_UID, [ExplicitVRLittleEndian])]
        contexts += [build_context(sop_classes[-1], [ExplicitVRLittleEndian])]
        contexts += [build_context(VERIFICATION)]
        assoc = associate(port, contexts)
        try:
            accepted = {
                (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
            }
            acceptor = assoc.acceptor
            assert str(acceptor.implementation_class_uid) == code(
                receive, "Implementation Class UID"
            )
            assert acceptor.implementation_version_name == code(
                receive, "Implementation Version Name"
            )
            general = section(text, "3.2.4.2")
            assert acceptor.maximum_length == first_int(general.split("Maximum PDU announced")[1])
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert {ts for sop, ts in accepted if sop == CTImageStorage} == set(listed)
        assert (PRIVATE_UID, ExplicitVRLittleEndian) not in accepted
        assert (sop_classes[-1], ExplicitVRLittleEndian) in accepted

        assoc = associate(port, [build_context(CTImageStorage, list(reversed(listed)))])
        try:
            chosen = str(assoc.accepted_contexts[0].transfer_syntax[0])
        finally:
            assoc.release()
        assert chosen == listed[0]


#: The rejections the statement names, as (result, source, reason) of PS3.8 9.3.4.
_REJECTIONS = {
    "A-ASSOCIATE-RJ permanent, calling AE title not recognised": (1, 1, 3),
    "A-ASSOCIATE-RJ permanent, called AE title not recognised": (1, 1, 7),
    "A-ASSOCIATE-RJ transient, local limit exceeded": (2, 3, 2),
}


def test_receive_association_checks_as_stated(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """The association level checks of 6.2 and the association limit of 3.2.4.2 reject with
    the result and reason the statement names; an address not allowed gets no PDU at all."""
    text = doc()
    checks = {r[0]: r[2] for r in table_rows(section(text, "6.2"), "Check (forwarder receive)")}
    calling_rj = _REJECTIONS[checks["`--allow-calling-aet AET` (repeatable)"]]
    called_rj = _REJECTIONS[checks["`--require-called-aet`"]]
    limit_rj = _REJECTIONS[
        next(t for t in _REJECTIONS if t in section(text, "3.2.4.2").replace("\n", " "))
    ]
    args = ["--allow-calling-aet", "GOOD", "--require-called-aet", "--ae-title", "RECV"]
    with forwarder_receive(tmp_path / "a", forwarder_env, *args, "--max-associations", "1") as port:
        assert rejection(port, "BAD", "RECV") == calling_rj
        assert rejection(port, "GOOD", "ELSEWHERE") == called_rj
        assert rejection(port, "GOOD", "RECV") is None
        first = AE(ae_title="GOOD")
        first.add_requested_context(VERIFICATION)
        held = first.associate("127.0.0.1", port, ae_title="RECV")
        try:
            assert held.is_established
            assert rejection(port, "GOOD", "RECV") == limit_rj
        finally:
            held.release()
    assert checks["`--allow-host ADDR_OR_CIDR` (repeatable)"] == "connection closed before any PDU"
    only_elsewhere = ("--allow-host", "192.0.2.1")
    with (
        forwarder_receive(tmp_path / "b", forwarder_env, *only_elsewhere) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        assert sock.recv(64) == b""


def test_receive_answers_only_stated_statuses(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """A whole file is answered Success; a truncated one (pydicom's MR_truncated.dcm, sent as it
    is by ``forwarder send --no-check``) a failure status the statement lists for the receiver."""
    from pydicom.data import get_testdata_file

    rows = table_rows(section(doc(), "3.2.4.4"), "Status | Category")
    stated = {int(r[0], 16): r[1] for r in rows}
    truncated = get_testdata_file("MR_truncated.dcm")
    assert truncated is not None
    (tmp_path / "in").mkdir()
    write_file(tmp_path / "in" / "a-whole.dcm")
    (tmp_path / "in" / "b-truncated.dcm").write_bytes(Path(truncated).read_bytes())
    report = tmp_path / "report.json"
    with forwarder_receive(tmp_path, forwarder_env) as port:
        args = ("send", "--no-check", "--report", report, f"FORWARDER@127.0.0.1:{port}")
        result = run_forwarder(*args, tmp_path / "in", env=forwarder_env)
    assert result.returncode == 1, result.stderr
    whole, cut = json.loads(report.read_text())["files"]
    assert whole["status"] == "0x0000" and stated[0x0000] == "Success"
    assert stated.get(int(cut["status"], 16)) == "Failure", cut
