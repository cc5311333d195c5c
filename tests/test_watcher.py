"""The watcher against real folders, real inotify and real polling observers."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import FileMovedEvent

from forwarder.daemon.watch_events import EventHandler
from forwarder.daemon.watch_settle import (
    CLOSED_SETTLE,
    Hint,
    ReadyFile,
    Settler,
    is_ignored_name,
    then,
)
from forwarder.daemon.watcher import Watcher
from forwarder.errors import ForwarderError

MODES = [pytest.param(False, id="inotify"), pytest.param(True, id="polling")]
BARRIER_PREFIX = "zz-barrier-"


# -- helpers -------------------------------------------------------------------------------


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``cond`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


class Collector:
    """The ``on_ready`` callback: records every batch, thread-safely."""

    def __init__(self, known: set[str] | None = None) -> None:
        self._lock = threading.Lock()
        self.batches: list[list[ReadyFile]] = []
        self.times: dict[str, float] = {}
        self._known = set(known or ())  # a stand-in for the daemon's queue

    def __call__(self, batch: list[ReadyFile]) -> None:
        now = time.monotonic()
        with self._lock:
            self.batches.append(list(batch))
            for f in batch:
                self.times.setdefault(f.rel_path, now)
                self._known.add(str(f.path))

    def is_known(self, path: str) -> bool:
        with self._lock:
            return path in self._known

    def forget_all(self) -> None:
        with self._lock:
            self._known.clear()

    def files(self) -> list[ReadyFile]:
        with self._lock:
            return [f for batch in self.batches for f in batch]

    def rel_paths(self) -> list[str]:
        """Every emitted relative path (barrier files left out), once per emission."""
        return sorted(f.rel_path for f in self.files() if not f.rel_path.startswith(BARRIER_PREFIX))

    def count(self, rel_path: str) -> int:
        return sum(1 for f in self.files() if f.rel_path == rel_path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target under an ignored name, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def barrier(watcher: Watcher, collector: Collector, root: Path) -> None:
    """Request a rescan, then wait for a fresh file to be emitted.

    The rescan runs on the next tick and the fresh file needs at least one stability window
    after that, so whatever the watcher was going to emit for older files has been emitted.
    """
    watcher.rescan()
    name = f"{BARRIER_PREFIX}{uuid.uuid4().hex}.dcm"
    write_atomic(root / name, b"barrier")
    wait_until(lambda: collector.count(name) == 1, f"barrier file {name}")


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Fail a test that leaves any thread running."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before]
    assert not left, f"threads left alive: {left}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return incoming


StartWatcher = Callable[..., tuple[Watcher, Collector]]


@pytest.fixture
def start_watcher(root: Path) -> Iterator[StartWatcher]:
    """Build and start watchers on ``root``; every one is stopped at the end of the test."""
    started: list[Watcher] = []

    def start(
        *, remember: bool = False, known: set[str] | None = None, **kwargs: object
    ) -> tuple[Watcher, Collector]:
        """``remember=True`` passes the collector's ``is_known``, seeded with ``known``."""
        collector = Collector(known)
        if remember:
            kwargs["is_known"] = collector.is_known
        kwargs.setdefault("settle", 0.3)
        watcher = Watcher(root, collector, **kwargs)  # type: ignore[arg-type]
        started.append(watcher)
        watcher.start()
        return watcher, collector

    yield start
    for watcher in started:
        watcher.stop()


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".hidden.dcm", True),
        (".", True),
        ("a.tmp", True),
        ("a.TMP", True),
        ("a.part", True),
        ("a.Partial", True),
        ("a.dcm", False),
        ("IM0001", False),
        ("tmp", False),
        ("a.part.dcm", False),
    ],
)
def test_is_ignored_name(name: str, ignored: bool) -> None:
    assert is_ignored_name(name) is ignored


@pytest.mark.parametrize("polling", MODES)
def test_rename_into_place_is_emitted_once_promptly(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    watcher, collector = start_watcher(settle=0.5, polling=polling)
    target = root / "a.dcm"
    written = time.monotonic()
    write_atomic(target, b"DICM" * 100)
    wait_until(lambda: collector.count("a.dcm") == 1, "a.dcm")
    latency = collector.times["a.dcm"] - written
    assert latency < 3.0, f"renamed file took {latency:.2f}s to be emitted"

    barrier(watcher, collector, root)
    assert collector.rel_paths() == ["a.dcm"]
    (ready,) = (f for f in collector.files() if f.rel_path == "a.dcm")
    st = target.stat()
    assert ready == ReadyFile(target, "a.dcm", 400, st.st_mtime_ns)
    assert ready.path.is_absolute()


@pytest.mark.parametrize("polling", MODES)
def test_slow_in_place_writer_is_emitted_only_after_it_stops(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    watcher, collector = start_watcher(settle=1.0, polling=polling)
    target = root / "slow.dcm"
    with open(target, "wb") as fh:
        for _ in range(30):  # 3 s of appends every 100 ms, the file open throughout
            fh.write(b"x" * 1000)
            fh.flush()
            assert collector.count("slow.dcm") == 0, "emitted while still being written"
            time.sleep(0.1)  # the writer's pace, not a wait for the watcher
    finished = time.monotonic()
    wait_until(lambda: collector.count("slow.dcm") == 1, "slow.dcm")
    assert collector.times["slow.dcm"] >= finished
    barrier(watcher, collector, root)
    assert collector.rel_paths() == ["slow.dcm"]
    assert next(f for f in collector.files() if f.rel_path == "slow.dcm").size == 30_000


@pytest.mark.parametrize("polling", MODES)
def test_empty_file_held_open_is_not_taken_before_its_writer_writes(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    """A writer that creates its file and pauses before the first byte (a modality opening
    the file, then waiting on its reconstruction) must not lose it to failed/ as empty."""
    # settle = CLOSED_SETTLE: a barrier file (renamed into place) created after late.dcm is
    # due no earlier than late.dcm, so once it is handed on late.dcm has been judged too.
    watcher, collector = start_watcher(settle=CLOSED_SETTLE, polling=polling)
    target = root / "late.dcm"
    # O_EXCL, no O_TRUNC: creating the file raises IN_CREATE only (a truncate would add an
    # IN_MODIFY, which already marks the file as being written).
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        _not_taken_while_open(watcher, collector, root, "late.dcm")
        fh.write(b"z" * 5000)
    _taken_whole_once(watcher, collector, root, "late.dcm", 5000)


@pytest.mark.parametrize("polling", MODES)
def test_a_file_held_open_through_a_stall_is_not_taken_half_written(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    """A writer that stalls longer than settle with the file open (a copy from a modality over
    SMB): polled, no close event ever comes; it is taken only once its writer closed it."""
    watcher, collector = start_watcher(settle=CLOSED_SETTLE, polling=polling)
    target = root / "half.dcm"
    with open(target, "wb") as fh:
        fh.write(b"h" * 5000)
        fh.flush()
        _not_taken_while_open(watcher, collector, root, "half.dcm")
        fh.write(b"t" * 5000)
    _taken_whole_once(watcher, collector, root, "half.dcm", 10_000)


def _not_taken_while_open(watcher: Watcher, collector: Collector, root: Path, name: str) -> None:
    """Two full settle passes later (barriers), ``name``, still open for writing, is not taken."""
    barrier(watcher, collector, root)
    barrier(watcher, collector, root)
    assert collector.count(name) == 0, f"{name} taken while its writer still had it open"


def _taken_whole_once(
    watcher: Watcher, collector: Collector, root: Path, name: str, size: int
) -> None:
    """``name`` is handed on once its writer closed it, once, with all ``size`` bytes."""
    wait_until(lambda: collector.count(name) == 1, name)
    barrier(watcher, collector, root)
    assert collector.rel_paths() == [name]
    assert next(f for f in collector.files() if f.rel_path == name).size == size


def test_empty_file_closed_is_taken_and_left_to_ingest(
    root: Path, start_watcher: StartWatcher
) -> None:
    """An empty file nobody writes any more is handed on (ingest sends it to failed/)."""
    _, collector = start_watcher(settle=0.3)
    (root / "empty.dcm").touch()
    wait_until(lambda: collector.count("empty.dcm") == 1, "empty.dcm")
    assert next(f for f in collector.files() if f.rel_path == "empty.dcm").size == 0


def test_writer_that_reopens_between_appends_is_not_emitted_early(
    root: Path, start_watcher: StartWatcher
) -> None:
    """Each append closes the file (IN_CLOSE_WRITE): the close shortcut must not fire early."""
    watcher, collector = start_watcher(settle=1.0)
    target = root / "reopened.dcm"
    for _ in range(40):  # 2 s of open-append-close every 50 ms
        with open(target, "ab") as fh:
            fh.write(b"y" * 100)
        assert collector.count("reopened.dcm") == 0, "emitted between two appends"
        time.sleep(0.05)  # the writer's pace
    wait_until(lambda: collector.count("reopened.dcm") == 1, "reopened.dcm")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == ["reopened.dcm"]
    assert next(f for f in collector.files() if f.rel_path == "reopened.dcm").size == 4000


@pytest.mark.parametrize("polling", MODES)
def test_ignored_names_wait_until_renamed(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    watcher, collector = start_watcher(polling=polling)
    ignored = [".hidden.dcm", "b.part", "c.tmp", "d.PARTIAL", ".staging/inner.dcm"]
    for name in ignored:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"data")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == []

    os.rename(root / ".hidden.dcm", root / "hidden.dcm")
    os.rename(root / "b.part", root / "b.dcm")
    os.rename(root / "c.tmp", root / "c")
    os.rename(root / "d.PARTIAL", root / "d.dcm")
    os.rename(root / ".staging", root / "staging")
    expected = ["b.dcm", "c", "d.dcm", "hidden.dcm", "staging/inner.dcm"]
    wait_until(lambda: collector.rel_paths() == expected, "the renamed files")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == expected


@pytest.mark.parametrize("polling", MODES)
def test_files_present_before_start_are_emitted(
    root: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    for rel in ["a.dcm", "sub/b.dcm", "sub/deeper/c.dcm", ".d.dcm", "sub/e.part"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"old")
    watcher, collector = start_watcher(polling=polling)
    expected = ["a.dcm", "sub/b.dcm", "sub/deeper/c.dcm"]
    wait_until(lambda: collector.rel_paths() == expected, "files present at start")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == expected


@pytest.mark.parametrize("polling", MODES)
def test_sub_folders_created_after_start(
    root: Path, tmp_path: Path, start_watcher: StartWatcher, polling: bool
) -> None:
    watcher, collector = start_watcher(polling=polling)
    # Written straight after mkdir: races the new folder's inotify watch.
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/b/c/one.dcm").write_bytes(b"1")
    write_atomic(root / "a/two.dcm", b"2")
    # A finished tree moved in from outside the watched folder in one rename.
    outside = tmp_path / "outside" / "study"
    (outside / "series").mkdir(parents=True)
    (outside / "series/three.dcm").write_bytes(b"3")
    (outside / "four.dcm").write_bytes(b"4")
    os.rename(outside, root / "study")
    expected = ["a/b/c/one.dcm", "a/two.dcm", "study/four.dcm", "study/series/three.dcm"]
    wait_until(lambda: collector.rel_paths() == expected, "files in new sub-folders")
    # A folder removed after its files were taken is fine.
    for rel in expected[:2]:
        (root / rel).unlink()
    for sub in ["a/b/c", "a/b", "a"]:
        (root / sub).rmdir()
    write_atomic(root / "a/again.dcm", b"5")
    wait_until(lambda: collector.count("a/again.dcm") == 1, "a/again.dcm")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == sorted([*expected, "a/again.dcm"])
    assert watcher.healthy


def test_a_folder_renamed_inside_incoming_keeps_being_watched_under_its_new_name(
    root: Path, start_watcher: StartWatcher
) -> None:
    """Moves inside incoming are paired within a short window (MOVE_PAIRING_WINDOW, not
    watchdog's 0.5 s, which held every later event behind each file moved out to done/): a
    folder written under a staging name and renamed keeps its watch, and files written into
    it afterwards are reported under the new name."""
    watcher, collector = start_watcher(settle=0.2)
    (root / ".staging").mkdir()
    (root / ".staging/one.dcm").write_bytes(b"1")
    os.rename(root / ".staging", root / "study")
    wait_until(lambda: collector.count("study/one.dcm") == 1, "study/one.dcm")
    write_atomic(root / "study/two.dcm", b"2")
    (root / "study/three.dcm").write_bytes(b"3")
    wait_until(lambda: collector.count("study/three.dcm") == 1, "study/three.dcm")
    barrier(watcher, collector, root)
    assert collector.rel_paths() == ["study/one.dcm", "study/three.dcm", "study/two.dcm"]
    assert watcher.healthy


@pytest.mark.parametrize("polling", MODES)
def test_incoming_that_is_itself_a_symlink_is_watched(tmp_path: Path, polling: bool) -> None:
    """`incoming` may be a symlink to the real spool folder; paths are reported under it."""
    real = tmp_path / "spool"
    real.mkdir()
    link = tmp_path / "incoming-link"
    link.symlink_to(real, target_is_directory=True)
    collector = Collector()
    watcher = Watcher(link, collector, settle=0.2, polling=polling, rescan_interval=3600)
    watcher.start()
    try:
        write_atomic(real / "sub" / "a.dcm", b"a")  # no rescan soon: only events find it
        wait_until(lambda: collector.count("sub/a.dcm") == 1, "sub/a.dcm")
    finally:
        watcher.stop()
    assert collector.files()[0].path == link / "sub" / "a.dcm"


def test_changed_file_is_emitted_again(root: Path, start_watcher: StartWatcher) -> None:
    watcher, collector = start_watcher()
    write_atomic(root / "a.dcm", b"first")
    wait_until(lambda: collector.count("a.dcm") == 1, "first version")
    barrier(watcher, collector, root)
    write_atomic(root / "a.dcm", b"second version")
    wait_until(lambda: collector.count("a.dcm") == 2, "second version")
    assert [f.size for f in collector.files() if f.rel_path == "a.dcm"] == [5, 14]


def test_rescan_offers_again_a_file_the_daemon_lost(
    root: Path, start_watcher: StartWatcher
) -> None:
    (root / "queued-before.dcm").write_bytes(b"q")
    watcher, collector = start_watcher(
        remember=True, known={str(root / "queued-before.dcm")}, rescan_interval=0.5
    )
    write_atomic(root / "a.dcm", b"a")
    wait_until(lambda: collector.count("a.dcm") == 1, "a.dcm")
    barrier(watcher, collector, root)
    # Held by the daemon since before start: never offered; a.dcm offered once, rescans or not.
    assert collector.rel_paths() == ["a.dcm"]

    # The daemon loses both (a lost row, a crash between hand-over and commit...).
    collector.forget_all()
    wait_until(
        lambda: collector.count("a.dcm") == 2 and collector.count("queued-before.dcm") == 1,
        "periodic rescan to offer the lost files again",
    )


def test_explicit_rescan_finds_a_file_whose_event_was_missed(
    root: Path, start_watcher: StartWatcher
) -> None:
    """Stand-in for a lost inotify event: a file the daemon forgot, no periodic rescan soon."""
    lost = {"yes": False}

    def is_known(path: str) -> bool:
        return path == str(root / "forgotten.dcm") and not lost["yes"]

    (root / "forgotten.dcm").write_bytes(b"f")
    watcher, collector = start_watcher(is_known=is_known, rescan_interval=3600)
    barrier(watcher, collector, root)
    assert collector.count("forgotten.dcm") == 0
    lost["yes"] = True
    watcher.rescan()
    wait_until(lambda: collector.count("forgotten.dcm") == 1, "forgotten.dcm after rescan()")


def test_on_ready_failure_is_logged_and_retried(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[list[str]] = []
    delivered = Collector()

    def flaky(batch: list[ReadyFile]) -> None:
        calls.append([f.rel_path for f in batch])
        if len(calls) == 1:
            raise RuntimeError("queue database is locked")
        delivered(batch)

    write_atomic(root / "a.dcm", b"a")
    watcher = Watcher(root, flaky, settle=0.1, rescan_interval=0.5)
    watcher.start()
    try:
        wait_until(lambda: delivered.count("a.dcm") == 1, "a.dcm after the failed batch")
        assert watcher.healthy
    finally:
        watcher.stop()
    assert calls[0] == ["a.dcm"]
    assert "on_ready failed" in caplog.text


@pytest.mark.parametrize("polling", MODES)
def test_symlinks_are_not_followed(
    root: Path,
    tmp_path: Path,
    start_watcher: StartWatcher,
    polling: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="forwarder.daemon.watch_settle")
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.dcm").write_bytes(b"s")
    (outside / "dir/inner.dcm").write_bytes(b"i")
    (root / "before.dcm").symlink_to(outside / "secret.dcm")
    (root / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    watcher, collector = start_watcher(polling=polling)
    (root / "after.dcm").symlink_to(outside / "secret.dcm")
    barrier(watcher, collector, root)
    barrier(watcher, collector, root)  # two more full scans: still warned only once
    assert collector.rel_paths() == []
    for name in ["before.dcm", "linkdir", "after.dcm"]:
        warnings = [r for r in caplog.records if str(root / name) in r.getMessage()]
        assert len(warnings) == 1, f"{name}: {[r.getMessage() for r in warnings]}"
        assert warnings[0].levelno == logging.WARNING
        assert "not followed" in warnings[0].getMessage()


def test_many_files_at_start_flow_in_batches(root: Path, start_watcher: StartWatcher) -> None:
    count = 5000
    for i in range(count):
        folder = root / f"series{i % 10}"
        folder.mkdir(exist_ok=True)
        (folder / f"IM{i:05d}.dcm").write_bytes(b"x")
    started = time.monotonic()
    watcher, collector = start_watcher(settle=0.2, batch_max=500)
    wait_until(lambda: len(collector.files()) >= count, f"{count} files", timeout=30)
    elapsed = time.monotonic() - started
    sizes = [len(b) for b in collector.batches]
    assert max(sizes) <= 500
    assert len(sizes) <= 30, f"{len(sizes)} batches for {count} files: not batched"
    assert len({f.path for f in collector.files()}) == count
    assert elapsed < 10, f"{count} files took {elapsed:.1f}s"
    assert watcher.healthy


@pytest.mark.parametrize("polling", MODES)
def test_stop_joins_every_thread(root: Path, polling: bool) -> None:
    before = set(threading.enumerate())
    watcher = Watcher(root, Collector(), settle=0.1, polling=polling)
    assert not watcher.healthy
    watcher.start()
    try:
        assert len(set(threading.enumerate()) - before) >= 2  # observer + emitter + settle
        wait_until(lambda: watcher.healthy, "healthy watcher")
    finally:
        watcher.stop()
    assert not watcher.healthy
    assert set(threading.enumerate()) == before
    watcher.stop()  # idempotent


def test_start_on_a_missing_folder_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    watcher = Watcher(tmp_path / "missing", Collector())
    with pytest.raises(ForwarderError, match="does not exist"):
        watcher.start()
    watcher.stop()
    assert set(threading.enumerate()) == before


def test_unhealthy_once_the_watched_folder_is_deleted(
    root: Path, start_watcher: StartWatcher
) -> None:
    watcher, _ = start_watcher()
    wait_until(lambda: watcher.healthy, "healthy watcher")
    root.rmdir()
    wait_until(lambda: not watcher.healthy, "unhealthy watcher after the folder went away")


def test_bad_arguments_are_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="batch_max"):
        Watcher(root, Collector(), batch_max=0)
    with pytest.raises(ValueError, match="negative"):
        Watcher(root, Collector(), settle=-1)


def test_open_for_writing_is_read_from_proc(tmp_path: Path) -> None:
    from forwarder.daemon.watch_settle import _open_for_writing

    path = tmp_path / "f.dcm"
    with open(path, "wb") as writer:
        writer.write(b"x")
        assert _open_for_writing(str(path))
    with open(path, "rb"):  # a reader is not a writer
        assert not _open_for_writing(str(path))
    assert not _open_for_writing(str(tmp_path / "missing.dcm"))


def _settler(root: Path, settle: float) -> tuple[Settler, list[ReadyFile]]:
    ready: list[ReadyFile] = []
    settler = Settler(
        str(root),
        ready.extend,
        settle=settle,
        polling=False,
        is_known=None,
        batch_max=64,
        stopping=threading.Event(),
    )
    return settler, ready


def test_a_file_renamed_into_place_is_ready_at_the_first_look(root: Path) -> None:
    """Zero-wait hand-off: the rename is the writer's "complete"; no settle window, even a long
    one. A close-after-write still waits its window (the writer may open the file again)."""
    settler, ready = _settler(root, settle=60.0)
    (root / "renamed.dcm").write_bytes(b"r" * 300)
    (root / "closed.dcm").write_bytes(b"c" * 200)
    now = time.monotonic()
    settler.apply(
        {str(root / "renamed.dcm"): Hint.MOVED_IN, str(root / "closed.dcm"): Hint.CLOSED}, now
    )
    settler.check_due(now)
    assert [f.rel_path for f in ready] == ["renamed.dcm"]
    assert ready[0].size == 300
    settler.check_due(now + CLOSED_SETTLE / 2)
    assert [f.rel_path for f in ready] == ["renamed.dcm"]
    settler.check_due(now + CLOSED_SETTLE + 0.01)
    assert [f.rel_path for f in ready] == ["renamed.dcm", "closed.dcm"]


def test_a_write_after_the_rename_cancels_the_zero_wait(root: Path) -> None:
    settler, ready = _settler(root, settle=5.0)
    path = root / "a.dcm"
    path.write_bytes(b"a" * 10)
    now = time.monotonic()
    settler.apply({str(path): Hint.MOVED_IN}, now)
    settler.apply({str(path): Hint.WRITING}, now)  # the writer is still at it
    settler.check_due(now)
    settler.check_due(now + 1.0)
    assert ready == []


@pytest.mark.parametrize(
    ("events", "kept"),
    [
        ((Hint.WRITING, Hint.CLOSED, Hint.CHANGED), Hint.CLOSED),  # shutil.copy, cp -p
        ((Hint.MOVED_IN, Hint.CHANGED), Hint.MOVED_IN),  # mv, then chmod
        ((Hint.CLOSED, Hint.WRITING), Hint.WRITING),  # opened and written again
        ((Hint.CLOSED, Hint.DELETED, Hint.CHANGED), Hint.CHANGED),  # gone, made anew
        ((Hint.CHANGED, Hint.CLOSED), Hint.CLOSED),
    ],
)
def test_one_hint_kept_per_path_does_not_let_a_mode_change_erase_the_close(
    events: tuple[Hint, ...], kept: Hint
) -> None:
    hint: Hint | None = None
    for event in events:
        hint = then(hint, event)
    assert hint is kept


def test_a_file_seen_written_then_closed_and_chmodded_in_one_batch_is_ready(root: Path) -> None:
    """The settle thread saw the copy being written; the close and the mode change that
    shutil.copy makes after it came in one read (the thread was busy, the machine loaded).
    Kept as CHANGED, the candidate waited for a close already gone, for STALE_WRITER (60 s):
    ``make run``'s first file did not arrive in 30 s on a loaded CI machine."""
    settler, ready = _settler(root, settle=1.0)
    path = root / "copied.dcm"
    with path.open("wb") as writer:
        writer.write(b"c" * 100)
        writer.flush()
        now = time.monotonic()
        settler.apply({str(path): Hint.WRITING}, now)
        settler.check_due(now + 1.5)
    os.chmod(path, 0o640)
    batch: dict[str, Hint] = {}
    for hint in (Hint.CLOSED, Hint.CHANGED):  # as the inotify reader and the inbox keep them
        batch[str(path)] = then(batch.get(str(path)), hint)
    settler.apply(batch, now + 1.5)
    settler.check_due(now + 1.5)
    settler.check_due(now + 1.5 + CLOSED_SETTLE + 0.01)
    assert [f.rel_path for f in ready] == ["copied.dcm"]


def test_the_event_handler_reports_a_move_in_as_moved_in(root: Path) -> None:
    notes: list[tuple[str, Hint]] = []
    handler = EventHandler(lambda path, hint: notes.append((path, hint)))
    handler.on_moved(FileMovedEvent(str(root / ".x.tmp"), str(root / "x.dcm")))
    assert notes == [(str(root / ".x.tmp"), Hint.DELETED), (str(root / "x.dcm"), Hint.MOVED_IN)]


def test_a_long_backlog_handed_on_in_one_turn_is_not_taken_for_stuck(tmp_path: Path) -> None:
    """A backlog found settled at start goes to ``on_ready`` batch after batch within one turn
    of the settle loop: ``stuck_for`` measures the time since the last batch (what the
    watch-and-ingest process reports as stuck), not the turn's length."""
    for i in range(8):
        (tmp_path / f"f{i}.dcm").write_bytes(b"x")
        os.utime(tmp_path / f"f{i}.dcm", (1, 1))  # long settled
    handed: list[str] = []

    def slow_ingest(files: list[ReadyFile]) -> None:
        time.sleep(0.4)  # the work of one batch: checks, fsyncs, a commit
        handed.extend(f.path.name for f in files)

    watcher = Watcher(tmp_path, slow_ingest, settle=0.0, rescan_interval=3600, batch_max=1)
    seen: list[float] = []
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while len(handed) < 8 and time.monotonic() < deadline:
            seen.append(watcher.stuck_for)
            time.sleep(0.05)  # sampling, not waiting for a condition
        assert sorted(handed) == [f"f{i}.dcm" for i in range(8)]
        assert max(seen) < 1.5, max(seen)  # ~0.4 a batch; the turn itself took ~3.2 s
    finally:
        watcher.stop()
