"""The spool: done/ and failed/ targets, suffixes on clashes, moves (also across filesystems),
and ``NAME.error.json`` written atomically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.daemon.noreplace import link_noreplace, rename_noreplace
from forwarder.daemon.spool import DestinationResult, Spool, SpoolError, TargetTakenError

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")


def put(spool: Spool, rel: str, data: bytes = b"data") -> Path:
    path = spool.incoming / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_the_folders_are_created(tmp_path: Path) -> None:
    s = Spool(tmp_path / "a" / "in", tmp_path / "b" / "done", tmp_path / "c" / "failed")
    assert s.incoming.is_dir() and s.done.is_dir() and s.failed.is_dir()


def test_rel_path_is_posix_relative_to_incoming(spool: Spool) -> None:
    assert spool.rel_path(spool.incoming / "ct" / "x" / "a.dcm") == "ct/x/a.dcm"


# -- targets and suffixes --------------------------------------------------------------------


def test_target_keeps_the_relative_path(spool: Spool) -> None:
    assert spool.target("ct/x/a.dcm", failed=False) == spool.done / "ct" / "x" / "a.dcm"
    assert spool.target("ct/x/a.dcm", failed=True) == spool.failed / "ct" / "x" / "a.dcm"


@pytest.mark.parametrize(
    ("name", "clashes"),
    [
        ("a.dcm", ["a.dcm", "a.1.dcm", "a.2.dcm", "a.3.dcm"]),
        ("IM0001", ["IM0001", "IM0001.1", "IM0001.2"]),
        ("CT.dcm.bak", ["CT.dcm.bak", "CT.dcm.1.bak"]),
        ("x.tar.gz", ["x.tar.gz", "x.tar.1.gz"]),
    ],
)
def test_a_name_clash_gets_a_numeric_suffix(spool: Spool, name: str, clashes: list[str]) -> None:
    sub = spool.done / "s"
    sub.mkdir()
    for expected in clashes:
        target = spool.target(f"s/{name}", failed=False)
        assert target == sub / expected
        target.write_bytes(b"x")


def test_a_clash_on_a_uid_named_file_appends_the_suffix(spool: Spool) -> None:
    (spool.done / "1.2.840.113619.2.55").write_bytes(b"x")
    assert spool.target("1.2.840.113619.2.55", failed=False) == spool.done / "1.2.840.113619.2.55.1"


def test_a_failed_target_also_avoids_a_leftover_error_json(spool: Spool) -> None:
    (spool.failed / "a.dcm.error.json").write_text("{}")
    assert spool.target("a.dcm", failed=True) == spool.failed / "a.1.dcm"
    # done/ has no error files, so the same leftover does not matter there
    (spool.done / "a.dcm.error.json").write_text("{}")
    assert spool.target("a.dcm", failed=False) == spool.done / "a.dcm"


def test_moving_many_files_with_one_name_keeps_every_one(spool: Spool) -> None:
    for i in range(5):
        source = put(spool, "ct/a.dcm", f"copy {i}".encode())
        spool.move(source, spool.target("ct/a.dcm", failed=False))
    names = sorted(p.name for p in (spool.done / "ct").iterdir())
    assert names == ["a.1.dcm", "a.2.dcm", "a.3.dcm", "a.4.dcm", "a.dcm"]
    contents = sorted(p.read_bytes() for p in (spool.done / "ct").iterdir())
    assert contents == [f"copy {i}".encode() for i in range(5)]


# -- moves -------------------------------------------------------------------------------------


def test_move_creates_parents_and_removes_the_source(spool: Spool) -> None:
    source = put(spool, "a/b/c.dcm", b"payload")
    target = spool.target("a/b/c.dcm", failed=False)
    spool.move(source, target)
    assert target.read_bytes() == b"payload"
    assert not source.exists()


def test_a_failed_move_raises_and_leaves_the_file_in_place(spool: Spool) -> None:
    source = put(spool, "a.dcm", b"payload")
    (spool.done / "blocker").write_bytes(b"a file where a folder must go")
    with pytest.raises(SpoolError, match=r"cannot move .*a\.dcm.*it stays in place"):
        spool.move(source, spool.done / "blocker" / "a.dcm")
    assert source.read_bytes() == b"payload"


def test_a_move_of_a_vanished_file_raises(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        spool.move(spool.incoming / "gone.dcm", spool.done / "gone.dcm")


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path: a tmpfs mounted for the test (root), else
    /dev/shm when it is a different device. Unmounted/removed afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mount = shutil.which("mount") or "/bin/mount"
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if result.returncode == 0:
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", str(mount_point)], check=True, timeout=30)
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = Path(tempfile.mkdtemp(dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder)
        return
    pytest.fail(  # no skip: the cross-device path must be tested somewhere
        f"cannot make a second filesystem: mount said {result.stderr!r}, /dev/shm unusable"
    )


def test_a_move_across_filesystems_copies_syncs_and_unlinks(
    spool: Spool, other_filesystem: Path
) -> None:
    assert other_filesystem.stat().st_dev != spool.incoming.stat().st_dev
    far = Spool(spool.incoming, other_filesystem / "done", other_filesystem / "failed")
    data = os.urandom(300_000)
    source = put(spool, "ct/big.dcm", data)
    target = far.target("ct/big.dcm", failed=False)
    far.move(source, target)
    assert target.read_bytes() == data
    assert not source.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["big.dcm"]  # no .moving left
    # and a clash on the far side still gets its suffix
    source = put(spool, "ct/big.dcm", b"second")
    target2 = far.target("ct/big.dcm", failed=False)
    far.move(source, target2)
    assert target2.name == "big.1.dcm" and target2.read_bytes() == b"second"


def test_a_cross_device_move_that_fails_keeps_the_source(
    spool: Spool, other_filesystem: Path
) -> None:
    far = Spool(spool.incoming, other_filesystem / "done", other_filesystem / "failed")
    source = put(spool, "big.dcm", os.urandom(64 * 1024))
    (far.done / "blocker").write_bytes(b"x")
    with pytest.raises(SpoolError):
        far.move(source, far.done / "blocker" / "big.dcm")
    assert source.exists() and source.stat().st_size == 64 * 1024


def test_a_cross_device_move_that_runs_out_of_space_keeps_the_source(
    spool: Spool, other_filesystem: Path
) -> None:
    if other_filesystem.name != "tmpfs":
        pytest.fail("needs the 16 MB tmpfs mount (see other_filesystem)")
    far = Spool(spool.incoming, other_filesystem / "done", other_filesystem / "failed")
    source = put(spool, "huge.dcm", os.urandom(20 * 1024 * 1024))  # more than the tmpfs holds
    with pytest.raises(SpoolError, match="No space left"):
        far.move(source, far.target("huge.dcm", failed=False))
    assert source.stat().st_size == 20 * 1024 * 1024
    assert not (far.done / "huge.dcm").exists()


def test_a_cross_device_move_that_fails_midway_leaves_no_partial_copy(
    spool: Spool, other_filesystem: Path
) -> None:
    if other_filesystem.name != "tmpfs":
        pytest.fail("needs the 16 MB tmpfs mount (see other_filesystem)")
    far = Spool(spool.incoming, other_filesystem / "done", other_filesystem / "failed")
    source = put(spool, "huge.dcm", os.urandom(20 * 1024 * 1024))
    with pytest.raises(SpoolError):
        far.move(source, far.target("huge.dcm", failed=False))
    assert list(far.done.iterdir()) == []


# -- NAME.error.json ---------------------------------------------------------------------------


def test_error_json_content(spool: Spool) -> None:
    target = spool.target("ct/a.dcm", failed=True)
    results = [
        DestinationResult("pacs", "stored", 0x0000, None, 1, T0, T0 + 2),
        DestinationResult("archive", "failed", 0xA700, "out of resources", 3, T0, T0 + 60.4),
        DestinationResult("cloud", "failed", None, "connection refused", 2, T0, None),
    ]
    path = spool.write_error(target, "ct/a.dcm", "archive: out of resources", results)
    assert path == spool.failed / "ct" / "a.dcm.error.json"
    doc = json.loads(path.read_text())
    failed_at = doc.pop("failed_at")
    assert failed_at.endswith("Z") and len(failed_at) == 20
    assert doc == {
        "file": "ct/a.dcm",
        "reason": "archive: out of resources",
        "destinations": [
            {
                "destination": "pacs",
                "outcome": "stored",
                "status": "0x0000",
                "error": None,
                "attempts": 1,
                "first_queued": "2023-11-14T22:13:20Z",
                "finished": "2023-11-14T22:13:22Z",
            },
            {
                "destination": "archive",
                "outcome": "failed",
                "status": "0xA700",
                "error": "out of resources",
                "attempts": 3,
                "first_queued": "2023-11-14T22:13:20Z",
                "finished": "2023-11-14T22:14:20Z",
            },
            {
                "destination": "cloud",
                "outcome": "failed",
                "status": None,
                "error": "connection refused",
                "attempts": 2,
                "first_queued": "2023-11-14T22:13:20Z",
                "finished": None,
            },
        ],
    }


def test_error_json_is_replaced_atomically(spool: Spool) -> None:
    """Written to a temp name and renamed: a reader sees the old or the new document, whole,
    never a half-written one, and no temp file is left behind."""
    target = spool.failed / "a.dcm"
    path = spool.write_error(target, "a.dcm", "first")
    old = open(path, "rb")  # noqa: SIM115 - held open so its inode cannot be reused
    stop = threading.Event()
    seen: list[str] = []
    broken: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                broken.append("<missing>")
                continue
            try:
                seen.append(json.loads(text)["reason"][:8])
            except ValueError:
                broken.append(text[:80])

    thread = threading.Thread(target=reader, name="error-json-reader")
    thread.start()
    try:
        for i in range(200):
            spool.write_error(target, "a.dcm", f"reason {i} " + "x" * 20_000)
    finally:
        stop.set()
        thread.join(10)
    try:
        # renamed over, not rewritten in place: the first file is intact under its old inode
        assert os.fstat(old.fileno()).st_ino != path.stat().st_ino
        assert json.loads(old.read())["reason"] == "first"
    finally:
        old.close()
    assert not broken, broken[:3]
    assert seen
    assert json.loads(path.read_text())["reason"].startswith("reason 199 ")
    assert sorted(p.name for p in spool.failed.iterdir()) == ["a.dcm.error.json"]


def test_error_json_that_cannot_be_written_raises_and_leaves_nothing(spool: Spool) -> None:
    (spool.failed / "blocker").write_bytes(b"x")
    with pytest.raises(SpoolError, match="cannot write"):
        spool.write_error(spool.failed / "blocker" / "a.dcm", "a.dcm", "why")
    assert sorted(p.name for p in spool.failed.iterdir()) == ["blocker"]


def test_reject_moves_to_failed_with_the_reason(spool: Spool) -> None:
    source = put(spool, "junk/readme.txt", b"not dicom")
    target = spool.reject(source, "not usable DICOM: no DICM", extra={"sop_instance_uid": "1.2"})
    assert target == spool.failed / "junk" / "readme.txt"
    assert target.read_bytes() == b"not dicom"
    assert not source.exists()
    doc = json.loads((spool.failed / "junk" / "readme.txt.error.json").read_text())
    assert doc["file"] == "junk/readme.txt"
    assert doc["reason"] == "not usable DICOM: no DICM"
    assert doc["destinations"] == []
    assert doc["sop_instance_uid"] == "1.2"
    # a second file with the same name: both kept, each with its own reason
    source = put(spool, "junk/readme.txt", b"again")
    target2 = spool.reject(source, "second reason")
    assert target2 == spool.failed / "junk" / "readme.1.txt"
    doc2 = json.loads((spool.failed / "junk" / "readme.1.txt.error.json").read_text())
    assert doc2["reason"] == "second reason"


def test_the_start_up_write_check_leaves_no_trace_in_done_or_failed(tmp_path: Path) -> None:
    """Scripts watch done/ and failed/: the daemon's start-up probe of each folder must not
    make a file appear there, even for an instant (an unnamed O_TMPFILE: inotify reports it
    opened and closed, but no name is ever created, moved or deleted)."""
    import queue as stdqueue

    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.inotify import InotifyObserver

    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    seen: stdqueue.Queue[str] = stdqueue.Queue()

    class Record(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("created", "moved", "deleted"):
                seen.put(f"{event.event_type} {event.src_path!r}")

    observer = InotifyObserver()
    for folder in (spool.done, spool.failed):
        observer.schedule(Record(), str(folder))
    observer.start()
    try:
        spool.check_writable()
        (spool.done / "marker").write_bytes(b"x")  # proves the observer sees events at all
        first = seen.get(timeout=10)
    finally:
        observer.stop()
        observer.join(10)
    assert "marker" in first, first


# -- never replacing what is at the target ---------------------------------------------------


@pytest.mark.parametrize("rename", [rename_noreplace, link_noreplace], ids=["renameat2", "link"])
@pytest.mark.parametrize("kind", ["file", "dangling-symlink"])
def test_a_rename_never_replaces_what_is_at_the_target(
    tmp_path: Path, rename: Callable[[Path, Path], None], kind: str
) -> None:
    """A file (or a symlink pointing nowhere) at the target stays: the rename raises
    FileExistsError and the source stays where it was. ``link`` is the fallback where
    renameat2 or its flag is missing."""
    source, target = tmp_path / "a.dcm", tmp_path / "b.dcm"
    source.write_bytes(b"failed file")
    if kind == "file":
        target.write_bytes(b"a modality's new file")
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        rename(source, target)
    assert source.read_bytes() == b"failed file"
    if kind == "file":
        assert target.read_bytes() == b"a modality's new file"
    else:
        assert target.is_symlink() and os.readlink(target) == str(tmp_path / "nowhere")
    rename(source, tmp_path / "c.dcm")
    assert (tmp_path / "c.dcm").read_bytes() == b"failed file" and not source.exists()


def test_a_move_onto_a_name_taken_since_it_was_chosen_fails_and_keeps_both(spool: Spool) -> None:
    src = put(spool, "a.dcm", b"delivered")
    target = spool.target("a.dcm", failed=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"another file")  # put there after the name was chosen
    with pytest.raises(TargetTakenError) as info:
        spool.move(src, target)
    message = str(info.value)
    assert "\n" not in message and str(src) in message and str(target) in message
    assert "not replaced" in message
    assert src.read_bytes() == b"delivered" and target.read_bytes() == b"another file"


def test_a_move_killed_between_link_and_unlink_is_finished_by_the_next(spool: Spool) -> None:
    """The fallback's crash window leaves one file under two names: moving it again removes
    the source's name (nothing is lost: the target is the same file)."""
    src = put(spool, "a.dcm", b"delivered")
    target = spool.target("a.dcm", failed=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, target)
    spool.move(src, target)
    assert not src.exists() and target.read_bytes() == b"delivered"


def test_a_reject_onto_a_name_taken_since_goes_to_the_next_free_one(spool: Spool) -> None:
    src = put(spool, "a.dcm", b"not dicom")
    target = spool.target("a.dcm", failed=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"another file")
    went = spool.reject(src, "not DICOM", target=target)
    assert went == spool.failed / "a.1.dcm"
    assert went.read_bytes() == b"not dicom" and target.read_bytes() == b"another file"
    assert json.loads((spool.failed / "a.1.dcm.error.json").read_text())["reason"] == "not DICOM"
    assert not (spool.failed / "a.dcm.error.json").exists()


def test_a_reject_onto_a_name_taken_since_with_its_report_keeps_that_report(
    spool: Spool,
) -> None:
    """Another writer (the listener's reject in another process) put a file and its report at
    the name chosen: neither is replaced nor removed; ours goes to the next free name."""
    src = put(spool, "a.dcm", b"not dicom")
    target = spool.target("a.dcm", failed=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"another file")
    theirs = spool.failed / "a.dcm.error.json"
    theirs.write_text('{"reason": "their own"}\n')
    went = spool.reject(src, "not DICOM", target=target)
    assert went == spool.failed / "a.1.dcm" and went.read_bytes() == b"not dicom"
    assert json.loads((spool.failed / "a.1.dcm.error.json").read_text())["reason"] == "not DICOM"
    assert target.read_bytes() == b"another file"
    assert json.loads(theirs.read_text()) == {"reason": "their own"}


def test_a_reject_onto_a_name_whose_report_alone_was_taken_goes_to_the_next_free_one(
    spool: Spool,
) -> None:
    """Only a report was put at the name chosen (its file not moved there yet): it is not
    replaced, and ours goes to the next free name."""
    src = put(spool, "a.dcm", b"not dicom")
    target = spool.target("a.dcm", failed=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    theirs = spool.failed / "a.dcm.error.json"
    theirs.write_text('{"reason": "their own"}\n')
    went = spool.reject(src, "not DICOM", target=target)
    assert went == spool.failed / "a.1.dcm" and went.read_bytes() == b"not dicom"
    assert json.loads(theirs.read_text()) == {"reason": "their own"}
    assert not target.exists()
