"""``forwarder send`` as a new user runs it: a subprocess against DCMTK storescp, scripted
pynetdicom peers, the hostile raw-socket peer and ``forwarder receive``, on loopback.

Exit codes, what the output names, the ``--report`` records, both addressing forms and both
seeds' option spellings; context planning over many SOP classes; decompression fallback; flat
memory on a 300 MB file (peak RSS from ``os.wait4``, a memory bound, not a timing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER, wait_until
from dicomgen import PATIENT_ID, PATIENT_NAME, make_dataset, write_file, write_files
from hostile import EXPLICIT, IMPLICIT, Behaviour, CapturingSCP, HostilePeer
from peers import free_port, stop_process, storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, RLELossless
from pynetdicom import AllStoragePresentationContexts

from forwarder.dicom.part10 import read_meta

RLE = str(RLELossless)
UNCOMPRESSED = [EXPLICIT, IMPLICIT]
ALL_THREE = [EXPLICIT, IMPLICIT, RLE]  # explicit first: files are sent as they are
REPORT_KEYS = {
    "path",
    "sop_class_uid",
    "sop_instance_uid",
    "transfer_syntax",
    "sent_transfer_syntax",
    "status",
    "error",
    "association",
}


def send(
    *args: str | Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, "send", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def gen(path: Path, **kwargs: object) -> Path:
    write_file(path, **kwargs)
    return path


def report_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def uid_of(path: Path) -> str:
    return read_meta(path).sop_instance_uid


def dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[read_meta(path).dataset_offset :]


def target(scp: CapturingSCP | HostilePeer, aet: str = "SCP") -> str:
    return f"{aet}@127.0.0.1:{scp.port}"


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_files(tmp_path / "in", 4, rows=16, columns=16)


# -- addressing ---------------------------------------------------------------------------------


def test_dcmsnd_form_directory_tree_to_dcmtk_storescp(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    tree = tmp_path / "tree"
    paths = write_files(tree, 2)
    paths += write_files(tree / "a" / "b", 2, prefix="deep", modality="MR")
    paths += write_files(tree / "c", 1, prefix="imp", transfer_syntax=IMPLICIT)
    write_files(tree / ".hidden", 1)  # skipped, like any hidden file or folder
    write_file(tree / "a" / ".dotfile.dcm")
    with storescp(tmp_path / "out") as scp:
        r = send(f"{scp.ae_title}@127.0.0.1:{scp.port}", tree, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert "5 stored" in r.stderr and "0 failed" in r.stderr
        wait_until(lambda: len(scp.files()) == 5, what="storescp to write 5 files")
        stored = {dcmread(f).SOPInstanceUID for f in scp.files()}
    assert stored == {uid_of(p) for p in paths}


def test_storescu_form_with_options_after_the_files(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with CapturingSCP() as scp:
        r = send(
            "127.0.0.1", scp.port, *files, "-c", "CALLED_AE", "-t", "STORESCU", env=forwarder_env
        )
        assert r.returncode == 0, r.stderr
        assert set(scp.called_aets) == {"CALLED_AE"}
        assert {rec.calling_ae for rec in scp.received_list()} == {"STORESCU"}
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in files)


def test_storescu_form_default_called_aet(files: list[Path], forwarder_env: dict[str, str]) -> None:
    with CapturingSCP() as scp:
        r = send("127.0.0.1", scp.port, files[0], env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert scp.called_aets == ["ANY-SCP"]


def test_storescu_form_to_dcmtk_storescp(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with storescp(tmp_path / "out") as scp:
        r = send("127.0.0.1", scp.port, *files, "-aec", scp.ae_title, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: len(scp.files()) == len(files), what="storescp to write the files")


def test_destination_from_config(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with CapturingSCP(ae_title="CFGPEER", delay=0.05) as scp:  # slow enough for both channels
        config = tmp_path / "forwarder.yaml"
        config.write_text(
            f"""\
ae_title: CFGCALLER
incoming: {tmp_path}/incoming
done: {tmp_path}/done
failed: {tmp_path}/failed
queue: {tmp_path}/queue.sqlite
destinations:
  - name: pacs
    ae_title: CFGPEER
    host: 127.0.0.1
    port: {scp.port}
    associations: 2
"""
        )
        r = send("--destination", "pacs", "-c", config, *files, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert {rec.calling_ae for rec in scp.received_list()} == {"CFGCALLER"}
        assert set(scp.called_aets) == {"CFGPEER"}
        assert scp.associations == 2  # the destination's parallel associations
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in files)
        r = send("--destination", "nope", "-c", config, *files, env=forwarder_env)
        assert r.returncode == 2 and "pacs" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("ae_title: X\nunknown_key: 1\n")
    r = send("--destination", "pacs", "-c", bad, *files, env=forwarder_env)
    assert r.returncode == 78, r.stderr
    assert "unknown_key" in r.stderr


# -- dcmsnd / storescu option spellings -------------------------------------------------------


def test_dash_L_sets_calling_aet_and_bind_address(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with CapturingSCP() as scp:
        r = send("-L", "ME@127.0.0.2", target(scp), files[0], env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert scp.received_list()[0].calling_ae == "ME"
        assert scp.addresses == ["127.0.0.2"]
        r = send(
            "--calling-aet",
            "LONGFORM",
            "--bind",
            "127.0.0.3",
            target(scp),
            files[1],
            env=forwarder_env,
        )
        assert r.returncode == 0, r.stderr
        assert scp.received_list()[1].calling_ae == "LONGFORM"
        assert scp.addresses[1] == "127.0.0.3"


@pytest.mark.parametrize(
    ("options", "send_limit", "receive_max"),
    [
        (["-sndpdulen", "4", "-rcvpdulen", "8"], 4096, 8192),
        (["--max-pdu-send", "5000", "--max-pdu-receive", "65536"], 5000, 65536),
        (["-b", "32768"], 1024 * 1024, 32768),
        ([], 1024 * 1024, 262144),
    ],
    ids=["dcmsnd-kb", "long-bytes", "storescu-b", "defaults"],
)
def test_pdu_size_options(
    tmp_path: Path,
    forwarder_env: dict[str, str],
    options: list[str],
    send_limit: int,
    receive_max: int,
) -> None:
    path = gen(tmp_path / "big.dcm", rows=1100, columns=512)  # > 1 MB
    with HostilePeer(max_pdu=0) as peer:  # the peer sets no limit: ours applies
        r = send(target(peer), path, *options, env=forwarder_env)
        assert r.returncode == 0, r.stderr
    lengths = peer.p_data_lengths()
    assert max(lengths) == send_limit
    assert peer.requested_max_pdu == [receive_max]
    assert peer.datasets == [dataset_bytes(path)]


def test_seed_spellings_are_accepted_and_work(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with CapturingSCP() as scp:
        r = send(
            target(scp),
            *files,
            "-connectTO", "2000",
            "-acceptTO", "2000",
            "-rspTO", "5000",
            "-releaseTO", "2000",
            "-tcpdelay",
            "-pdv1",
            "-bufsize", "64",
            "-sosndbuf", "64",
            "-sorcvbuf", "64",
            env=forwarder_env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in files)


@pytest.mark.parametrize(
    ("options", "priority"),
    [([], 0), (["--priority", "high"], 1), (["-highprior"], 1), (["-lowprior"], 2),
     (["--priority", "low"], 2), (["--priority", "medium"], 0)],
    ids=["default", "long-high", "highprior", "lowprior", "long-low", "long-medium"],
)  # fmt: skip
def test_priority_spellings(
    files: list[Path], forwarder_env: dict[str, str], options: list[str], priority: int
) -> None:
    with HostilePeer() as peer:
        r = send(target(peer), files[0], *options, env=forwarder_env)
        assert r.returncode == 0, r.stderr
    assert [c.priority for c in peer.commands] == [priority]


def test_connect_timeout_in_milliseconds_exits_3(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with HostilePeer(Behaviour.NO_AC) as peer:
        r = send(target(peer), *files, "-connectTO", "300", env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "within 0.3s" in r.stderr


def test_response_timeout_in_milliseconds(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    report = tmp_path / "report.json"
    with HostilePeer(Behaviour.NEVER_ANSWER) as peer:
        r = send(target(peer), files[0], "-rspTO", "300", "--report", report, env=forwarder_env)
        wait_until(peer.aborted.is_set, timeout=5, what="the stalled peer to be aborted")
    assert r.returncode == 1, r.stderr
    (record,) = report_of(report)["files"]
    assert record["status"] is None
    assert "within 0.3s" in record["error"]


@pytest.mark.parametrize(
    "option",
    ["-connectTO", "-acceptTO", "-rspTO", "-releaseTO", "--connect-timeout", "--response-timeout"],
)
def test_a_zero_timeout_means_no_timeout_as_in_dcmsnd(
    files: list[Path], forwarder_env: dict[str, str], option: str
) -> None:
    """dcm4che's 0 is "no timeout": -rspTO 0 was a 1 ms response timeout (every file failed
    against a peer slower than that), -connectTO 0 failed every connect with "operation now
    in progress" and exit 3."""
    with CapturingSCP(delay=0.2) as scp:
        r = send(target(scp), *files[:2], option, "0", env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in files[:2])
        wait_until(lambda: scp.releases == 1, timeout=5, what="the association's release")
        assert scp.aborts == 0, r.stderr


def test_repeat(tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]) -> None:
    report = tmp_path / "report.json"
    with CapturingSCP() as scp:
        r = send(target(scp), *files[:2], "-r", "3", "--report", report, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert len(scp.received_list()) == 6
        assert sorted(scp.received_uids()) == sorted([uid_of(p) for p in files[:2]] * 3)
    assert len(report_of(report)["files"]) == 6
    r = send(target(scp), files[0], "--repeat", "0", env=forwarder_env)
    assert r.returncode == 2


@pytest.mark.parametrize("flag", ["-a", "--abort"])
def test_abort_ends_with_a_abort(
    files: list[Path], forwarder_env: dict[str, str], flag: str
) -> None:
    with CapturingSCP() as scp:
        r = send(target(scp), *files, flag, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: scp.aborts == 1, what="the SCP to see the A-ABORT")
        assert scp.releases == 0
        assert len(scp.received_list()) == len(files)


def test_release_by_default(files: list[Path], forwarder_env: dict[str, str]) -> None:
    with CapturingSCP() as scp:
        r = send(target(scp), *files, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: scp.releases == 1, what="the SCP to see the A-RELEASE")
        assert scp.aborts == 0


@pytest.mark.parametrize("flag", ["-async", "--associations"])
def test_parallel_associations(tmp_path: Path, forwarder_env: dict[str, str], flag: str) -> None:
    paths = write_files(tmp_path / "in", 12, rows=8, columns=8)
    report = tmp_path / "report.json"
    with CapturingSCP(delay=0.02) as scp:
        r = send(target(scp), *paths, flag, "2", "--report", report, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert scp.associations == 2
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in paths)
    assert len({rec["association"] for rec in report_of(report)["files"]}) == 2


def test_parallel_associations_to_a_one_at_a_time_storescp(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 6, rows=8, columns=8)
    with storescp(tmp_path / "out") as scp:
        r = send(
            f"{scp.ae_title}@127.0.0.1:{scp.port}", *paths, "-async", "3", "-connectTO", "500",
            env=forwarder_env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        wait_until(lambda: len(scp.files()) == 6, what="storescp to write 6 files")


# -- outcomes, exit codes and the report --------------------------------------------------------


def test_report_has_one_record_per_file(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    report = tmp_path / "report.json"
    with CapturingSCP(transfer_syntaxes=ALL_THREE) as scp:
        r = send(target(scp), *files, "--report", report, env=forwarder_env)
        assert r.returncode == 0, r.stderr
    data = report_of(report)
    assert data["stored"] == len(files) and data["failed"] == 0
    assert len(data["files"]) == len(files)
    for path, record in zip(files, data["files"], strict=True):
        assert set(record) >= REPORT_KEYS
        meta = read_meta(path)
        assert record["path"] == str(path)
        assert record["sop_class_uid"] == meta.sop_class_uid
        assert record["sop_instance_uid"] == meta.sop_instance_uid
        assert record["transfer_syntax"] == record["sent_transfer_syntax"] == EXPLICIT
        assert record["status"] == "0x0000"
        assert record["error"] is None
        assert record["association"] == data["files"][0]["association"]
        assert isinstance(record["association"], int)


def test_failure_statuses_exit_1_and_every_file_is_listed(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 5, rows=8, columns=8)
    statuses = dict(
        zip([uid_of(p) for p in paths], [0x0000, 0xC000, 0xA700, 0xB000, 0x0122], strict=True)
    )
    report = tmp_path / "report.json"
    with CapturingSCP(status=lambda rec: statuses[rec.sop_instance_uid]) as scp:
        r = send(target(scp), *paths, "--report", report, "-d", env=forwarder_env)
    assert r.returncode == 1, r.stderr
    records = report_of(report)["files"]
    assert [rec["status"] for rec in records] == ["0x0000", "0xC000", "0xA700", "0xB000", "0x0122"]
    assert [rec["outcome"] for rec in records] == ["stored", "failed", "retry", "warning", "failed"]
    for path, code in zip(paths[1:3], ["0xC000", "0xA700"], strict=True):
        line = next(ln for ln in r.stderr.splitlines() if "FAILED" in ln and str(path) in ln)
        assert code in line
    assert str(paths[4]) in r.stderr and "0x0122" in r.stderr
    assert "2 stored (1 with warnings), 3 failed" in r.stderr
    # Debug logging names UIDs and paths, never the patient.
    assert PATIENT_NAME not in r.stderr + r.stdout
    assert PATIENT_ID not in r.stderr + r.stdout


def test_warning_status_is_stored_exit_0(files: list[Path], forwarder_env: dict[str, str]) -> None:
    with CapturingSCP(status=0xB007) as scp:
        r = send(target(scp), *files, env=forwarder_env)
    assert r.returncode == 0, r.stderr
    assert f"{len(files)} stored ({len(files)} with warnings)" in r.stderr


def test_unreachable_peer_exits_3(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    report = tmp_path / "report.json"
    r = send(f"SCP@127.0.0.1:{free_port()}", *files, "--report", report, env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "cannot connect" in r.stderr
    records = report_of(report)["files"]
    assert len(records) == len(files)
    assert all(rec["status"] is None and "cannot connect" in rec["error"] for rec in records)


def test_transiently_rejected_association_exits_3(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with HostilePeer(Behaviour.NO_AC) as peer:
        r = send(target(peer), *files, "--accept-timeout", "300ms", env=forwarder_env)
    assert r.returncode == 3, r.stderr


def test_permanently_rejected_association_exits_3(
    files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with HostilePeer(Behaviour.REJECT) as peer:
        r = send(target(peer), *files, env=forwarder_env)
    assert "rejected-permanent" in r.stderr
    assert r.returncode == 3, r.stderr


def test_junk_file_among_good_ones(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    junk = files[0].parent / "junk.dcm"
    junk.write_bytes(b"MZ this is no DICOM file" * 50)
    empty = files[0].parent / "empty.dcm"
    empty.write_bytes(b"")
    missing = tmp_path / "no-such-file.dcm"
    report = tmp_path / "report.json"
    with CapturingSCP() as scp:
        r = send(target(scp), files[0].parent, missing, "--report", report, env=forwarder_env)
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in files)
    assert r.returncode == 1, r.stderr
    for bad in (junk, empty, missing):
        assert any("FAILED" in ln and str(bad) in ln for ln in r.stderr.splitlines()), bad
    records = {rec["path"]: rec for rec in report_of(report)["files"]}
    assert "DICM" in records[str(junk)]["error"]
    assert records[str(missing)]["error"]
    assert f"{len(files)} stored" in r.stderr and "3 failed" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["SCP@127.0.0.1:11112"],
        ["SCP@127.0.0.1:0", "x.dcm"],
        ["--bogus"],
        ["-r", "x", "A@b:1", "f"],
    ],
    ids=["nothing", "no-files", "bad-port", "unknown-option", "bad-repeat"],
)
def test_bad_command_line_exits_2(argv: list[str], forwarder_env: dict[str, str]) -> None:
    r = send(*argv, env=forwarder_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip()


# -- resilience -------------------------------------------------------------------------------


def test_peer_aborting_mid_run_the_rest_arrive_on_a_new_association(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 6, rows=8, columns=8)
    report = tmp_path / "report.json"
    with CapturingSCP(abort_on=3) as scp:
        r = send(target(scp), *paths, "--report", report, env=forwarder_env)
        uids = [uid_of(p) for p in paths]
        assert sorted(scp.received_uids()) == sorted(uids[:2] + uids[3:])
        assert scp.associations == 2
    assert r.returncode == 1, r.stderr
    records = report_of(report)["files"]
    assert [rec["outcome"] for rec in records] == ["stored"] * 2 + ["retry"] + ["stored"] * 3
    assert "aborted" in records[2]["error"]
    assert any("FAILED" in ln and str(paths[2]) in ln for ln in r.stderr.splitlines())
    first, second = records[0]["association"], records[3]["association"]
    assert first != second
    assert {rec["association"] for rec in records[:2]} == {first}
    assert {rec["association"] for rec in records[3:]} == {second}


def test_report_names_the_association_a_file_failed_on(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = write_files(tmp_path / "in", 4, rows=8, columns=8)
    report = tmp_path / "report.json"
    with CapturingSCP(abort_on=3) as scp:
        send(target(scp), *paths, "--report", report, env=forwarder_env)
    records = report_of(report)["files"]
    assert records[2]["association"] == records[0]["association"]


# -- contexts, fallback, lossy -------------------------------------------------------------------


def _storage_classes(count: int) -> list[str]:
    """``count`` storage SOP classes pydicom names and pynetdicom's SCP supports."""
    supported = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    named = sorted(uid for uid in supported if UID(uid).name.endswith("Storage"))
    assert len(named) >= count
    return named[:count]


def test_more_than_128_contexts_take_further_associations(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    classes = _storage_classes(60)
    paths = []
    for i, sop_class in enumerate(classes):
        for j, syntax in enumerate(ALL_THREE):
            ds = make_dataset(rows=8, columns=8, transfer_syntax=syntax, seed=3 * i + j)
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            path = tmp_path / "in" / f"{i:02d}-{j}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    report = tmp_path / "report.json"
    with CapturingSCP(transfer_syntaxes=ALL_THREE) as scp:
        r = send(target(scp), tmp_path / "in", "--report", report, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        received = {rec.sop_instance_uid: rec for rec in scp.received_list()}
        assert set(received) == {uid_of(p) for p in paths}
        assert scp.associations >= 2  # 60 classes x 3 syntaxes do not fit in 128 contexts
        for p in paths:
            meta = read_meta(p)
            assert received[meta.sop_instance_uid].sop_class_uid == meta.sop_class_uid
            assert received[meta.sop_instance_uid].transfer_syntax == meta.transfer_syntax
            assert scp.datasets[meta.sop_instance_uid] == dataset_bytes(p)
    records = report_of(report)["files"]
    assert len({rec["association"] for rec in records}) == scp.associations
    assert all(rec["sent_transfer_syntax"] == rec["transfer_syntax"] for rec in records)


def test_rle_to_a_peer_accepting_only_uncompressed(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    rle = gen(tmp_path / "rle.dcm", transfer_syntax=RLE)
    bundled = Path(get_testdata_file("MR_small_RLE.dcm"))  # type: ignore[arg-type]
    report = tmp_path / "report.json"
    with CapturingSCP(transfer_syntaxes=UNCOMPRESSED) as scp:
        r = send(target(scp), rle, bundled, "--report", report, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert {rec.transfer_syntax for rec in scp.received_list()} <= set(UNCOMPRESSED)
        assert len(scp.received_list()) == 2
    for record in report_of(report)["files"]:
        assert record["transfer_syntax"] == RLE
        assert record["sent_transfer_syntax"] in UNCOMPRESSED
        assert record["status"] == "0x0000"


def _lossy_refusal(
    tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], str]:
    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # type: ignore[arg-type]
    with CapturingSCP(transfer_syntaxes=UNCOMPRESSED) as scp:
        r = send(target(scp), jpeg, env=env)
        assert scp.received_list() == []
    lines = [ln for ln in r.stderr.splitlines() if "FAILED" in ln and str(jpeg) in ln]
    assert len(lines) == 1, r.stderr  # one line says why
    return r, lines[0]


def test_lossy_jpeg_is_refused_without_the_flag(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    r, line = _lossy_refusal(tmp_path, forwarder_env)
    assert r.returncode == 1
    assert "JPEG Baseline" in line and "1.2.840.10008.1.2.4.50" in line
    assert "--allow-lossy-decompress" in line


def test_lossy_refusal_names_sop_class_and_what_the_peer_accepted(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    _, line = _lossy_refusal(tmp_path, forwarder_env)
    assert "Secondary Capture Image Storage" in line or "1.2.840.10008.5.1.4.1.1.7" in line
    assert "Explicit VR Little Endian" in line or EXPLICIT in line


def test_lossy_jpeg_with_the_flag_is_decompressed(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # type: ignore[arg-type]
    report = tmp_path / "report.json"
    with CapturingSCP(transfer_syntaxes=UNCOMPRESSED) as scp:
        r = send(
            target(scp), jpeg, "--allow-lossy-decompress", "--report", report, env=forwarder_env
        )
        assert r.returncode == 0, r.stderr
        (rec,) = scp.received_list()
    assert rec.transfer_syntax in UNCOMPRESSED
    (record,) = report_of(report)["files"]
    assert record["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
    assert record["sent_transfer_syntax"] == rec.transfer_syntax


def test_no_acceptable_context_names_class_syntax_and_offer(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    with CapturingSCP(sop_classes=["1.2.840.10008.5.1.4.1.1.4"]) as scp:  # MR only
        r = send(target(scp), files[0], env=forwarder_env)
    assert r.returncode == 1, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "FAILED" in ln)
    assert "CT Image Storage" in line and "Explicit VR Little Endian" in line
    assert "accepted nothing" in line


# -- receive fed by send -------------------------------------------------------------------------


def test_receive_fed_by_send_gets_byte_identical_data_sets(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    paths = [
        *write_files(tmp_path / "in", 2, rows=64, columns=64),
        *write_files(tmp_path / "in", 1, prefix="imp", transfer_syntax=IMPLICIT),
        *write_files(tmp_path / "in", 1, prefix="rle", transfer_syntax=RLE),
        Path(get_testdata_file("CT_small.dcm")),  # type: ignore[arg-type]
        Path(get_testdata_file("MR_small_RLE.dcm")),  # type: ignore[arg-type]
    ]
    output = tmp_path / "received"
    log = tmp_path / "receive.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [FORWARDER, "receive", "--port", "0", "--bind", "127.0.0.1", "--output", str(output),
             "--ae-title", "RECV"],
            stdout=fh, stderr=subprocess.STDOUT, env=forwarder_env,
        )  # fmt: skip
    try:
        match = wait_until(
            lambda: re.search(r"listening on \S+:(\d+) as AE", log.read_text()),
            timeout=30,
            what="forwarder receive to listen",
        )
        port = int(match.group(1))  # type: ignore[union-attr]
        r = send(f"RECV@127.0.0.1:{port}", *paths, env=forwarder_env)
        assert r.returncode == 0, r.stderr
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            out = output / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            wait_until(out.exists, what=f"{out.name} to be written")
            assert dataset_bytes(out) == dataset_bytes(path), path.name
            assert read_meta(out).transfer_syntax == read_meta(path).transfer_syntax
    finally:
        stop_process(proc)


# -- flat memory -------------------------------------------------------------------------------


def write_big_file(path: Path, frames: int) -> int:
    """A 512x512x16-bit multi-frame CT of ``frames`` frames, written without holding the pixels:
    the header by pydicom, then the Pixel Data element header, then a sparse zero extension."""
    ds = make_dataset(rows=512, columns=512)
    del ds.PixelData
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    nbytes = 512 * 512 * 2 * frames
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes))
        f.truncate(f.tell() + nbytes)
    return path.stat().st_size


_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run ``argv``; its exit code, peak resident set (MB, from wait4's rusage) and stderr.

    Linux carries the RSS high-water mark across fork and execve, so a child of the (large)
    pytest process would report at least pytest's size: a small launcher forks it instead."""
    launcher = [sys.executable, "-S", "-I", "-c", _LAUNCHER, *argv]
    result = subprocess.run(launcher, capture_output=True, text=True, env=env, timeout=120)
    maxrss_kb, code = result.stdout.split()
    return int(code), int(maxrss_kb) / 1024, result.stderr


def test_a_300_mb_file_streams_in_flat_memory(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    big = tmp_path / "big.dcm"
    size = write_big_file(big, frames=572)
    assert size > 299_000_000
    with storescp(tmp_path / "out", extra=["--ignore", "-pdu", "131072"]) as scp:
        where = f"{scp.ae_title}@127.0.0.1:{scp.port}"
        code, small_rss, err = peak_rss_mb([FORWARDER, "send", where, str(files[0])], forwarder_env)
        assert code == 0, err
        code, big_rss, err = peak_rss_mb([FORWARDER, "send", where, str(big)], forwarder_env)
        assert code == 0, err
        assert "1 stored" in err
    assert big_rss < 100, f"peak RSS {big_rss:.0f} MB sending a {size / 1e6:.0f} MB file"
    # Flat: the big file costs about what a tiny one does (a few MB of buffers at most).
    assert big_rss - small_rss < 25, (small_rss, big_rss)


@pytest.mark.parametrize("command", ["send", "echo", "receive", "run", "status"])
def test_version_after_the_command(command: str) -> None:
    """dcmsnd's -V works after the sub-command too (forwarder send -V)."""
    from forwarder import __version__

    for flag in ("-V", "--version"):
        result = subprocess.run(
            [FORWARDER, command, flag], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"forwarder {__version__}"


# -- one check before sending; never exit 0 with a file not stored -------------------------------

#: pydicom's broken files, and the fault the refusal must name (as dcmsend refuses them).
BROKEN = {
    "MR_truncated.dcm": "truncated",
    "SC_rgb_jpeg.dcm": "does not match the transfer syntax",
    "priv_SQ.dcm": "no SOP Class UID",
}


def _copies(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = folder / name
        path.write_bytes(Path(str(get_testdata_file(name))).read_bytes())
        out.append(path)
    return out


def test_broken_files_are_refused_before_any_association(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """send used to read the meta header only: a truncated file, one whose bytes do not match
    its syntax, and one without its own SOP Instance UID were sent and reported stored."""
    broken = _copies(tmp_path / "broken", list(BROKEN))
    report = tmp_path / "report.json"
    with CapturingSCP() as scp:
        r = send(target(scp), *broken, "--report", report, env=forwarder_env)
        assert scp.associations == 0, "an association was opened for nothing to send"
        assert scp.received_uids() == []
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
    assert len(lines) == len(BROKEN), r.stderr
    records = {Path(rec["path"]).name: rec for rec in report_of(report)["files"]}
    for name, fault in BROKEN.items():
        (line,) = [ln for ln in lines if name in ln]
        assert fault in line and "not sent" in line, line
        assert records[name]["outcome"] == "failed"
        assert fault in records[name]["error"] and records[name]["status"] is None
    assert "0 stored" in r.stderr and f"{len(BROKEN)} failed" in r.stderr


def test_a_broken_file_among_good_ones_is_the_only_one_not_sent(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    (truncated,) = _copies(files[0].parent, ["MR_truncated.dcm"])
    with storescp(tmp_path / "out") as scp:
        r = send(f"STORESCP@127.0.0.1:{scp.port}", files[0].parent, env=forwarder_env)
        assert len(scp.files()) == len(files)
    assert r.returncode == 1, r.stderr
    assert f"{len(files)} stored" in r.stderr and "1 failed" in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
    assert str(truncated) in line and "refused, not sent: truncated" in line, line


def test_no_check_sends_files_as_they_are(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    """For experts: the meta header only, as before (the peer decides)."""
    paths = _copies(tmp_path / "broken", ["MR_truncated.dcm", "priv_SQ.dcm"])
    with CapturingSCP() as scp:
        r = send(target(scp), *paths, "--no-check", env=forwarder_env)
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in paths)
        truncated_uid = uid_of(paths[0])
        sent = scp.datasets[truncated_uid]
    assert r.returncode == 0, r.stderr
    original = dataset_bytes(paths[0])
    assert sent[: len(original)] == original  # as it is (plus a pad byte if odd)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_an_io_error_during_the_send_is_never_exit_0(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    """EIO while reading the data set escaped as a bare OSError: the channel thread died and
    send exited 0 with the file never stored. strace makes every preadv (the sender's only
    read of data set bytes) fail; whichever layer catches it, the file is not stored."""
    with CapturingSCP() as scp:
        r = subprocess.run(
            [
                *(str(shutil.which("strace")), "-f", "-qq", "-o", str(tmp_path / "strace.log")),
                *("-e", "trace=preadv,preadv2", "-e", "inject=preadv,preadv2:error=EIO"),
                *(FORWARDER, "send", target(scp), str(files[0])),
            ],
            capture_output=True,
            text=True,
            env=forwarder_env,
            timeout=120,
        )
        assert scp.received_uids() == []
    assert r.returncode == 1, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
    assert str(files[0]) in line and "Input/output error" in line, line
    assert "0 stored" in r.stderr and "1 failed" in r.stderr


# -- what a directory tree yields: nothing left out unnamed, never exit 0 for nothing -----------


def test_a_symlinked_folder_in_a_tree_is_sent_as_storescu_and_dcmsnd_send_it(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """A symlinked series folder was skipped without a word and send exited 0 "2 stored" with
    two files never sent; storescu +sd +r and dcmsnd follow the link. A link back up the tree
    (a loop) is walked once."""
    tree = tmp_path / "tree"
    paths = write_files(tree / "real", 2, rows=8, columns=8)
    paths += write_files(tmp_path / "elsewhere", 2, rows=8, columns=8, prefix="linked")
    (tree / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tree / "real" / "loop").symlink_to(tree, target_is_directory=True)
    with CapturingSCP() as scp:
        r = send(target(scp), tree, env=forwarder_env)
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in paths), r.stderr
    assert r.returncode == 0, r.stderr
    assert "4 stored" in r.stderr and "0 failed" in r.stderr


def test_an_empty_folder_is_not_success(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    """An empty folder (an export not made, a share not mounted) exited 0 "0 stored, 0 failed":
    a script took it for delivered. storescu says "no input files to be sent" and exits 1,
    dcmsnd exits 2."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    write_file(tmp_path / "empty" / ".hidden.dcm")
    with CapturingSCP() as scp:
        r = send(target(scp), tmp_path / "empty", env=forwarder_env)
        assert scp.associations == 0
    assert r.returncode == 2, r.stderr
    assert "no files to send" in r.stderr and str(tmp_path / "empty") in r.stderr


def test_a_fifo_in_a_tree_is_named_and_not_waited_on(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """A named pipe in the tree hung send for ever (its open waits for a writer)."""
    paths = write_files(tmp_path / "in", 1, rows=8, columns=8)
    fifo = tmp_path / "in" / "pipe"
    os.mkfifo(fifo)
    report = tmp_path / "report.json"
    with CapturingSCP() as scp:
        r = send(target(scp), tmp_path / "in", "--report", report, env=forwarder_env, timeout=30)
        assert scp.received_uids() == [uid_of(paths[0])]
    assert r.returncode == 1, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
    assert str(fifo) in line and "not a regular file" in line, line
    assert "1 stored" in r.stderr and "1 failed" in r.stderr
    records = {rec["path"]: rec for rec in report_of(report)["files"]}
    assert records[str(fifo)]["outcome"] == "failed"


def test_a_report_that_cannot_be_written_is_refused_before_sending(
    tmp_path: Path, files: list[Path], forwarder_env: dict[str, str]
) -> None:
    """--report into a missing folder sent every file, then died with a traceback and exit 1
    ("at least one file not stored"): the operator sent it all again."""
    report = tmp_path / "no-such-folder" / "report.json"
    with CapturingSCP() as scp:
        r = send(target(scp), *files, "--report", report, env=forwarder_env)
        assert scp.associations == 0
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot write the report {report}" in r.stderr


def test_parallel_associations_to_a_peer_that_takes_one_at_a_time_all_arrive(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """-async 4 to a pynetdicom SCP limited to one association: the associations were
    requested at the same moment, the SCP rejected all of them ("local limit exceeded":
    it counts those being negotiated) and send exited 3, "0 stored". The first association
    is now made before the spares ask; a spare refused hands its file back."""
    paths = write_files(tmp_path / "in", 12, rows=8, columns=8)
    with CapturingSCP() as scp:
        scp._server.ae.maximum_associations = 1
        r = send(target(scp), tmp_path / "in", "-async", "4", env=forwarder_env)
        assert sorted(scp.received_uids()) == sorted(uid_of(p) for p in paths), r.stderr
    assert r.returncode == 0, r.stderr
    assert "12 stored" in r.stderr and "0 failed" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["PACS_ARCHIVE_MAIN1@127.0.0.1:{port}"],
        ["SCP@127.0.0.1:{port}", "-aet", "FORWARDER_GATEWAY"],
        ["127.0.0.1", "{port}", "-aec", "PACS_ARCHIVE_MAIN1"],
        ["SCP@127.0.0.1:{port}", "-L", "BACK\\SLASH"],
    ],
    ids=["called-17", "calling-17", "storescu-called-17", "backslash"],
)
def test_an_ae_title_that_cannot_go_on_the_wire_is_a_bad_command_line(
    files: list[Path], forwarder_env: dict[str, str], argv: list[str]
) -> None:
    """A 17-character AE title was cut to 16 on the wire while the summary and the report
    named the whole one: a PACS that checks titles refused "PACS_ARCHIVE_MAIN" and the
    operator read "PACS_ARCHIVE_MAIN1"."""
    with CapturingSCP() as scp:
        args = [a.format(port=scp.port) for a in argv]
        r = send(*args[:1], *args[1:], files[0], env=forwarder_env)
        assert scp.associations == 0, r.stderr
    assert r.returncode == 2, r.stderr
    assert "AE title" in r.stderr


def test_a_folder_that_cannot_be_read_is_named_not_skipped(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """os.walk drops a folder it cannot list without a word (EACCES for an operator's account;
    here, as root, a path longer than PATH_MAX): its files were never sent and send exited 0."""
    tree = tmp_path / "tree"
    (top,) = write_files(tree, 1, rows=8, columns=8)
    fd = os.open(tree, os.O_RDONLY)
    try:
        for _ in range(17):  # 17 x 251 characters: past Linux's 4096
            os.mkdir("d" * 250, dir_fd=fd)
            deeper = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        out = os.open("bottom.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, top.read_bytes())
        os.close(out)
    finally:
        os.close(fd)
    with CapturingSCP() as scp:
        r = send(target(scp), tree, env=forwarder_env)
        assert scp.received_uids() == [uid_of(top)]
    assert r.returncode == 1, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "FAILED" in ln]
    assert "cannot read the folder" in line and "too long" in line, line
    assert "1 stored" in r.stderr and "1 failed" in r.stderr
