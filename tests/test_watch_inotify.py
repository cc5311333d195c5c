"""The watcher's own inotify reader, against real folders and the real kernel interface."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from forwarder.daemon import watch_inotify
from forwarder.daemon.watch_inotify import IN_Q_OVERFLOW, InotifyReader
from forwarder.daemon.watch_settle import Hint
from forwarder.daemon.watcher import Watcher

pytestmark = pytest.mark.skipif(not watch_inotify.available(), reason="Linux inotify only")


class Hints:
    """The reader's callbacks: every hint in arrival order, and the overflows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, Hint]] = []
        self.overflows = 0

    def note_many(self, hints: dict[str, Hint]) -> None:
        with self._lock:
            self.seen.extend(hints.items())

    def overflow(self) -> None:
        with self._lock:
            self.overflows += 1

    def paths(self) -> set[str]:
        with self._lock:
            return {p for p, _ in self.seen}

    def last(self, path: Path) -> Hint | None:
        with self._lock:
            hints = [h for p, h in self.seen if p == str(path)]
        return hints[-1] if hints else None


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Hints, InotifyReader]]:
    root = tmp_path / "incoming"
    root.mkdir()
    hints = Hints()
    reader = InotifyReader(os.path.realpath(root), hints.note_many, hints.overflow)
    reader.start()
    try:
        yield root, hints, reader
    finally:
        reader.stop(5.0)


def barrier(root: Path, hints: Hints, name: str = "barrier.dcm") -> None:
    """Events are read in order: once this file's close is seen, every earlier event was."""
    path = root / name
    path.write_bytes(b"b")
    wait_until(lambda: hints.last(path) is Hint.CLOSED, what=f"the close of {name}")


def test_files_written_renamed_in_and_deleted_give_their_hints(
    watched: tuple[Path, Hints, InotifyReader], tmp_path: Path
) -> None:
    root, hints, _ = watched
    (root / "written.dcm").write_bytes(b"1")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"2")
    os.rename(outside, root / "renamed.dcm")
    (root / "gone.dcm").write_bytes(b"3")
    os.unlink(root / "gone.dcm")
    (root / "moved-out.dcm").write_bytes(b"4")
    os.rename(root / "moved-out.dcm", tmp_path / "moved-out.dcm")
    barrier(root, hints)
    assert hints.last(root / "written.dcm") is Hint.CLOSED
    assert hints.last(root / "renamed.dcm") is Hint.MOVED_IN
    assert hints.last(root / "gone.dcm") is Hint.DELETED
    assert hints.last(root / "moved-out.dcm") is Hint.DELETED


def test_ignored_folders_are_not_watched_so_nothing_inside_them_is_reported(
    watched: tuple[Path, Hints, InotifyReader],
) -> None:
    """The listener stages every object under incoming/.listen/<AE>/<Study>: six events each
    if it were watched. It is not, nor is anything below it, nor a folder like x.tmp."""
    root, hints, reader = watched
    staged = root / ".listen" / "CT01" / "1.2.3"
    staged.mkdir(parents=True)
    for i in range(20):
        part = staged / f".receiving.{i}.part"
        part.write_bytes(b"x" * 100)
        os.rename(part, staged / f"{i}.dcm")
    (root / "scratch.tmp").mkdir()
    (root / "scratch.tmp" / "a.dcm").write_bytes(b"x")
    barrier(root, hints)
    assert not [p for p in hints.paths() if ".listen" in p or "scratch.tmp" in p]
    assert reader.watched_folders() == [str(os.path.realpath(root))]


def test_a_new_folder_tree_is_watched_and_reported_for_a_scan(
    watched: tuple[Path, Hints, InotifyReader], tmp_path: Path
) -> None:
    root, hints, reader = watched
    (root / "a" / "b").mkdir(parents=True)
    tree = tmp_path / "study"
    (tree / "series").mkdir(parents=True)
    (tree / "series" / "1.dcm").write_bytes(b"1")
    (tree / "series" / "2.part").write_bytes(b"2")
    os.rename(tree, root / "study")
    barrier(root, hints)
    real = os.path.realpath(root)
    # A folder made in place is reported (its files may predate its watch: the settle thread
    # scans it); a tree renamed in is finished: its files are taken at once, as moved in.
    assert hints.last(Path(real, "a")) is Hint.DIR
    assert hints.last(Path(real, "study/series/1.dcm")) is Hint.MOVED_IN
    assert hints.last(Path(real, "study/series/2.part")) is None  # an ignored name
    wait_until(lambda: f"{real}/a/b" in reader.watched_folders(), what="a/b watched")
    assert f"{real}/study/series" in reader.watched_folders()
    (root / "study" / "series" / "3.dcm").write_bytes(b"3")
    (root / "a" / "b" / "4.dcm").write_bytes(b"4")
    wait_until(lambda: hints.last(Path(real, "a/b/4.dcm")) is Hint.CLOSED, what="a/b/4.dcm")
    wait_until(lambda: hints.last(Path(real, "study/series/3.dcm")) is Hint.CLOSED, what="3.dcm")


def test_a_folder_staged_under_a_dot_name_and_renamed_in_is_taken_without_settling(
    tmp_path: Path,
) -> None:
    """The staging folder is not watched, so its rename arrives unpaired (only IN_MOVED_TO):
    its files are still taken at once, not after the settle time."""
    root = tmp_path / "incoming"
    root.mkdir()
    taken = threading.Event()
    watcher = Watcher(root, lambda batch: taken.set(), settle=30.0)
    watcher.start()
    try:
        (root / ".stage").mkdir()
        (root / ".stage" / "c.dcm").write_bytes(b"c")
        os.rename(root / ".stage", root / "study")
        assert taken.wait(10.0), "not taken before the 30 s settle time"
    finally:
        watcher.stop()


def test_a_folder_renamed_inside_is_watched_under_its_new_name_only(
    watched: tuple[Path, Hints, InotifyReader],
) -> None:
    root, hints, reader = watched
    real = os.path.realpath(root)
    (root / "old" / "sub").mkdir(parents=True)
    barrier(root, hints, "b1.dcm")
    os.rename(root / "old", root / "new")
    barrier(root, hints, "b2.dcm")
    since = len(hints.seen)
    (root / "new" / "sub" / "x.dcm").write_bytes(b"x")
    wait_until(lambda: hints.last(Path(real, "new/sub/x.dcm")) is Hint.CLOSED, what="new/sub/x")
    assert not [p for p, _ in hints.seen[since:] if p.startswith(f"{real}/old")]
    assert sorted(reader.watched_folders()) == [real, f"{real}/new", f"{real}/new/sub"]
    # Moved out of incoming: its watches go, nothing more is heard from it.
    os.rename(root / "new", root.parent / "elsewhere")
    barrier(root, hints, "b3.dcm")
    assert reader.watched_folders() == [real]


def test_a_queue_overflow_asks_for_a_rescan(watched: tuple[Path, Hints, InotifyReader]) -> None:
    """The kernel reports a full event queue as IN_Q_OVERFLOW (wd -1): events were lost, only
    a full rescan can find their files."""
    _, hints, reader = watched
    reader._handle(struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0))
    assert hints.overflows == 1


def test_after_a_real_overflow_folders_made_meanwhile_are_watched(tmp_path: Path) -> None:
    """Events lost to an overflow include folders' own (made, moved away): the watches are
    made whole again, or a folder made meanwhile would never be watched."""
    root = tmp_path / "incoming"
    (root / "leaving").mkdir(parents=True)
    real = os.path.realpath(root)
    hints = Hints()
    held = threading.Event()
    release = threading.Event()

    def note_many(batch: dict[str, Hint]) -> None:
        if not held.is_set():
            held.set()
            release.wait(30)  # the reader stops reading: the kernel's queue fills up
        hints.note_many(batch)

    reader = InotifyReader(real, note_many, hints.overflow)
    reader.start()
    try:
        (root / "first.dcm").write_bytes(b"1")
        assert held.wait(10)
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        for i in range(limit // 3 + 100):  # create, modify, close: three events each
            (root / f"{i}.dcm").write_bytes(b"x")
        (root / "made").mkdir()
        os.rename(root / "leaving", tmp_path / "gone")
        release.set()
        wait_until(lambda: hints.overflows >= 1, what="the overflow")
        assert reader.watched_folders() == sorted([real, f"{real}/made"])
        (root / "made" / "y.dcm").write_bytes(b"y")
        wait_until(lambda: hints.last(Path(real, "made/y.dcm")) is Hint.CLOSED, what="made/y")
    finally:
        release.set()
        reader.stop(5.0)


def test_unmounting_the_watched_folder_makes_it_unhealthy(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    assert done.returncode == 0, "mounting a tmpfs needs root (CI runs as root)"
    reader = InotifyReader(str(mount), Hints().note_many, lambda: None)
    try:
        reader.start()
        assert reader.alive
        subprocess.run(["umount", str(mount)], check=True)
        wait_until(lambda: not reader.alive, what="unhealthy after the unmount")
    finally:
        reader.stop(5.0)
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_start_that_fails_for_want_of_descriptors_leaves_none_open(tmp_path: Path) -> None:
    """inotify_init1 gets the last free descriptor, the wake-up pipe none: the start fails
    and the inotify descriptor is closed (run in a child with a small descriptor limit)."""
    script = f"""
import errno, os, resource
from forwarder.daemon.watch_inotify import InotifyReader
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == errno.EMFILE
os.close(held.pop())  # exactly one free: for inotify_init1
reader = InotifyReader({str(tmp_path)!r}, lambda hints: None, lambda: None)
try:
    reader.start()
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
else:
    raise SystemExit("started")
held.append(os.open("/dev/null", os.O_RDONLY))  # the descriptor came back
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_stop_joins_the_thread_and_closes_every_descriptor(tmp_path: Path) -> None:
    before_fds = set(os.listdir("/proc/self/fd"))
    before_threads = set(threading.enumerate())
    hints = Hints()
    reader = InotifyReader(str(tmp_path), hints.note_many, hints.overflow)
    reader.start()
    assert reader.alive
    reader.stop(5.0)
    assert not reader.alive
    assert set(threading.enumerate()) == before_threads
    assert set(os.listdir("/proc/self/fd")) == before_fds
    reader.stop(5.0)  # idempotent


def test_a_missing_folder_cannot_be_watched(tmp_path: Path) -> None:
    reader = InotifyReader(str(tmp_path / "missing"), Hints().note_many, lambda: None)
    with pytest.raises(OSError):
        reader.start()
    assert not reader.alive


def test_the_watcher_uses_it_without_polling(tmp_path: Path) -> None:
    watcher = Watcher(tmp_path, lambda _batch: None, settle=0.1)
    watcher.start()
    try:
        names = {t.name for t in threading.enumerate()}
        assert "forwarder-watcher-inotify" in names
        assert "forwarder-watcher-observer" not in names  # watchdog only for polling
        wait_until(lambda: watcher.healthy, what="a healthy watcher")
    finally:
        watcher.stop()
