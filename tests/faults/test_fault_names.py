"""Names and races in the incoming folder: the same name twice, a file replaced or deleted behind
the daemon's back, folders appearing and vanishing, 10,000 files in one folder, symlinks that
lead outside. Each file is delivered (in the version that ends in done/), or accounted for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination, route
from dicomgen import write_file
from invariants import clone_files, queue_problems, settled_problems
from peers import ScriptedSCP, free_port, storescp

pytestmark = pytest.mark.faults

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
SMALL = {"rows": 8, "columns": 8}


def test_the_same_name_dropped_twice_is_delivered_twice(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        with d:
            first = d.drop("a.dcm", **SMALL)
            d.wait_done(1)
            second = d.drop("a.dcm", seed=2, **SMALL)
            d.wait_done(2)
            third = d.drop("sub/a.dcm", seed=3, **SMALL)
            d.wait_done(3)
    assert d.done_files() == ["a.1.dcm", "a.dcm", "sub/a.dcm"]
    assert scp.uids() == {f.sop_instance_uid for f in (first, second, third)}
    assert queue_problems(d.queue) == []


def test_a_file_replaced_while_queued_reaches_every_destination(tmp_path: Path) -> None:
    """a.dcm reaches A, B is down; the producer replaces a.dcm (rename over it) with a new
    object. What ends in done/ must have been delivered to A and B."""
    port_b = free_port()
    with ScriptedSCP() as a:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("a", a.port), destination("b", port_b)],
        )
        with d:
            old = d.drop("a.dcm", **SMALL)
            wait_until(lambda: old.sop_instance_uid in a.uids(), 15, what="a.dcm at A")
            new = d.drop("a.dcm", seed=9, **SMALL)  # same name, another object
            with ScriptedSCP(port=port_b) as b:
                d.wait_done(1, timeout=30)
    delivered = d.done / "a.dcm"
    assert new.sop_instance_uid in b.uids()
    assert new.sop_instance_uid in a.uids(), (
        f"done/a.dcm is {delivered.stat().st_size} bytes of {new.sop_instance_uid}, "
        "which A never received"
    )


def test_a_file_replaced_before_it_was_sent_is_sent_in_its_new_version(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path / "d", destinations=[destination("pacs", port)])
    with d:
        d.drop("a.dcm", **SMALL)
        d.wait_status(lambda s: s["pacs"]["pending"] + s["pacs"]["in_flight"] == 1)
        new = d.drop("a.dcm", seed=5, **SMALL)
        with ScriptedSCP(port=port) as scp:
            d.wait_done(1, timeout=30)
    assert scp.uids() == {new.sop_instance_uid}
    assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=1) == []


def test_a_file_replaced_by_one_routed_elsewhere_goes_only_where_it_is_routed(
    tmp_path: Path,
) -> None:
    """Two modalities write the same names into one folder: a CT image IM0001 waits for its
    PACS (down), and an MR image replaces it under the same name. The MR image goes to the MR
    PACS and the archive, never to the CT PACS, and the file ends in done/."""
    ct_port = free_port()
    with ScriptedSCP() as mr_pacs, ScriptedSCP() as archive:
        d = Daemon(
            tmp_path / "d",
            destinations=[
                destination("ct-pacs", ct_port),
                destination("mr-pacs", mr_pacs.port),
                destination("archive", archive.port),
            ],
            routes=[
                route("ct", ["ct-pacs", "archive"], Modality="CT"),
                route("mr", ["mr-pacs", "archive"], Modality="MR"),
            ],
        )
        with d:
            ct = d.drop("IM0001", modality="CT", **SMALL)
            wait_until(lambda: ct.sop_instance_uid in archive.uids(), 15, what="CT at archive")
            d.wait_status(lambda s: s["ct-pacs"]["pending"] + s["ct-pacs"]["in_flight"] == 1)
            mr = d.drop("IM0001", modality="MR", seed=4, **SMALL)
            d.wait_done(1, timeout=30)
            d.wait_log("the new version is not routed to ct-pacs", timeout=5)
            with ScriptedSCP(port=ct_port) as ct_pacs:
                status = d.status_json()["destinations"]
                assert status["ct-pacs"]["pending"] + status["ct-pacs"]["in_flight"] == 0
    assert mr_pacs.uids() == {mr.sop_instance_uid}
    assert archive.uids() == {ct.sop_instance_uid, mr.sop_instance_uid}
    assert ct_pacs.uids() == set()
    assert d.done_files() == ["IM0001"]
    assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=1) == []


def test_the_log_names_the_object_actually_sent(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path / "d", destinations=[destination("pacs", port)])
    with d:
        old = d.drop("a.dcm", **SMALL)
        d.wait_status(lambda s: s["pacs"]["pending"] + s["pacs"]["in_flight"] == 1)
        new = d.drop("a.dcm", seed=5, **SMALL)
        with ScriptedSCP(port=port):
            d.wait_done(1, timeout=30)
    stored = [line for line in d.log_text().splitlines() if " stored " in line]
    # At least once: if the replacement is noticed after the new content went out, it is
    # sent again; every line must still name the object actually sent.
    assert stored and all(new.sop_instance_uid in line for line in stored), stored
    assert not any(old.sop_instance_uid in line for line in stored)


def test_files_deleted_by_someone_else_are_accounted_for(tmp_path: Path) -> None:
    """One file vanishes before it settled (never queued: nothing to say), one after it was
    queued while the destination was down (it fails, logged as removed by someone else); the
    others flow and the daemon stays up."""
    port = free_port()
    d = Daemon(tmp_path / "d", destinations=[destination("pacs", port)])
    with d:
        # written in place (not renamed in), deleted before it settles
        early = d.incoming / "early.dcm"
        write_file(early, **SMALL)
        early.unlink()
        queued = d.drop("queued.dcm", **SMALL)
        d.wait_status(lambda s: s["pacs"]["pending"] + s["pacs"]["in_flight"] == 1)
        (d.incoming / "queued.dcm").unlink()
        others = d.drop_files(3, **SMALL)
        with ScriptedSCP(port=port) as scp:
            d.wait_done(3, timeout=30)
            d.wait_status(lambda s: s["pacs"]["failed"] == 1, what="the vanished file failed")
            d.wait_log("removed by someone else", timeout=10)
        assert d.running()
    assert scp.uids() == {f.sop_instance_uid for f in others}
    assert queued.sop_instance_uid not in scp.uids()
    problems = settled_problems(
        d.queue, d.incoming, d.done, d.failed, expect_done=3, vanished={"queued.dcm"}
    )
    assert problems == []
    assert "early.dcm" not in d.failed_files()
    error = d.error_json("queued.dcm")["destinations"][0]["error"]
    assert "No such file" in error, error


def test_sub_folders_created_moved_in_and_removed_while_running(tmp_path: Path) -> None:
    """Nested folders made and removed under the daemon, a whole folder moved in at once, empty
    folders deleted and recreated: every file arrives with its relative path in done/."""
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port, associations=2)])
        expected: set[str] = set()
        uids: set[str] = set()
        with d:
            for round_ in range(3):
                for depth in range(1, 4):
                    folder = "/".join(f"r{round_}l{i}" for i in range(depth))
                    for f in d.drop_files(2, folder=folder, **SMALL):
                        expected.add(f.rel_path)
                        uids.add(f.sop_instance_uid)
                empty = d.incoming / f"empty{round_}" / "deeper"
                empty.mkdir(parents=True)
                shutil.rmtree(d.incoming / f"empty{round_}")
            # a folder prepared outside, then moved in whole (one rename)
            outside = tmp_path / "prepared" / "batch"
            for i in range(4):
                ds = write_file(outside / "x" / f"m{i}.dcm", seed=100 + i, **SMALL)
                expected.add(f"batch/x/m{i}.dcm")
                uids.add(str(ds.SOPInstanceUID))
            os.rename(outside, d.incoming / "batch")
            d.wait_done(len(expected), timeout=30)
            # delivered folders may be removed and made again while the daemon runs
            shutil.rmtree(d.incoming / "r0l0")
            again = d.drop("r0l0/again.dcm", **SMALL)
            expected.add(again.rel_path)
            uids.add(again.sop_instance_uid)
            d.wait_done(len(expected), timeout=30)
            assert d.running()
    assert set(d.done_files()) == expected
    assert scp.uids() == uids
    assert queue_problems(d.queue) == []


def test_ten_thousand_files_in_one_folder(tmp_path: Path) -> None:
    """10,000 files waiting in one folder at start, sent to DCMTK's storescp: all arrive, all
    in done/, the queue settles."""
    total = 10_000
    with storescp(tmp_path / "received") as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port, ae_title=scp.ae_title, associations=2)],
            log_level="WARNING",  # 10,000 "stored" lines cost more than the sending
        )
        clone_files(d.incoming, total)
        d.start(wait_ready=False)  # the "running" line is INFO: not logged at WARNING
        try:
            d.wait_done(total, timeout=150)
            d.wait_incoming_empty()
            assert d.stop() == 0
        finally:
            d.close()
        assert len(scp.files()) == total
    assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=total) == []


def test_symlinks_leading_outside_incoming_are_not_followed(tmp_path: Path) -> None:
    """A symlink to a file outside incoming and a symlinked folder: neither is followed (the
    outside files are neither sent nor moved), both are reported in the log, the rest flows."""
    outside = tmp_path / "outside"
    secret = write_file(outside / "secret.dcm", seed=7, **SMALL)
    hidden = write_file(outside / "folder" / "inner.dcm", seed=8, **SMALL)
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)])
        os.symlink(outside / "secret.dcm", d.incoming / "link.dcm")
        os.symlink(outside / "folder", d.incoming / "linkdir")
        with d:
            normal = d.drop_files(2, **SMALL)
            d.wait_done(2)
            # one created while running, too
            os.symlink(outside / "secret.dcm", d.incoming / "late-link.dcm")
            later = d.drop("later.dcm", **SMALL)
            d.wait_done(3)
            d.wait_log("late-link.dcm is a symbolic link", timeout=10)
    log = d.log_text()
    assert "link.dcm is a symbolic link: not followed" in log
    assert "linkdir is a symbolic link: not followed" in log
    sent = scp.uids()
    assert sent == {f.sop_instance_uid for f in [*normal, later]}
    assert str(secret.SOPInstanceUID) not in sent and str(hidden.SOPInstanceUID) not in sent
    assert (outside / "secret.dcm").exists() and (outside / "folder" / "inner.dcm").exists()
    assert (d.incoming / "link.dcm").is_symlink(), "the link itself is left alone"
    assert sorted(d.done_files()) == sorted(f.rel_path for f in [*normal, later])
