"""The finisher's two-step move (forwarder/daemon/finisher.py) against a real queue and real
folders: a row left FINISHING by a crash or a queue error after its file was moved must not
move a file dropped again under the same name over the delivered copy; the start's sweep of
the whole queue stops between slices when told."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.daemon.finisher import Finisher
from forwarder.daemon.spool import Spool
from forwarder.queue import FileEntry, Queue


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Queue, Spool]]:
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    for folder in (spool.incoming, spool.done, spool.failed):
        folder.mkdir(exist_ok=True)
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue, spool


def delivered(queue: Queue, spool: Spool, name: str, data: bytes) -> int:
    """A file queued for one destination and stored there: its jobs are all done."""
    path = spool.incoming / name
    path.write_bytes(data)
    st = path.stat()
    entry = FileEntry(
        str(path), name, st.st_size, st.st_mtime_ns, "1.2.3", f"1.2.3.{len(data)}", "1.2.840"
    )
    (file_id,) = queue.enqueue_many([(entry, ["pacs"])])
    assert file_id is not None
    (job,) = queue.claim("pacs", 10)
    queue.ack_done([job.id])
    return file_id


def state(queue: Queue, file_id: int) -> str:
    with sqlite3.connect(queue.path) as conn:
        (value,) = conn.execute("SELECT state FROM files WHERE id = ?", (file_id,)).fetchone()
    return str(value)


def test_a_name_dropped_again_after_the_move_never_replaces_the_delivered_copy(
    rig: tuple[Queue, Spool],
) -> None:
    queue, spool = rig
    file_id = delivered(queue, spool, "a.dcm", b"the delivered one")
    target = spool.done / "a.dcm"
    # The finisher recorded where it goes and moved it; then it was killed (or the queue
    # refused the completion): the row stays FINISHING.
    queue.begin_finish(file_id, str(target))
    os.rename(spool.incoming / "a.dcm", target)
    # Meanwhile a file of the same name is dropped again (not yet queued: its path is taken).
    (spool.incoming / "a.dcm").write_bytes(b"another one, never sent")
    forgotten: list[str] = []
    Finisher(queue, spool, forgotten.extend).sweep_all()
    assert target.read_bytes() == b"the delivered one"
    assert (spool.incoming / "a.dcm").read_bytes() == b"another one, never sent"
    assert state(queue, file_id) == "FINISHED"
    assert forgotten == [str(spool.incoming / "a.dcm")]  # so the new one is ingested


def test_a_move_not_done_before_the_crash_is_done_by_the_sweep(
    rig: tuple[Queue, Spool],
) -> None:
    queue, spool = rig
    file_id = delivered(queue, spool, "b.dcm", b"b")
    queue.begin_finish(file_id, str(spool.done / "b.dcm"))  # killed before the move
    Finisher(queue, spool, lambda _paths: None).sweep_all()
    assert (spool.done / "b.dcm").read_bytes() == b"b"
    assert not (spool.incoming / "b.dcm").exists()
    assert state(queue, file_id) == "FINISHED"


def test_the_whole_queue_sweep_stops_between_slices_when_told(
    rig: tuple[Queue, Spool],
) -> None:
    queue, spool = rig
    ids = [delivered(queue, spool, f"c{n}.dcm", b"c" * (n + 1)) for n in range(3)]
    told = threading.Event()
    told.set()
    assert Finisher(queue, spool, lambda _paths: None).sweep_all(until=told) == 0
    assert [state(queue, i) for i in ids] == ["QUEUED"] * 3
    assert Finisher(queue, spool, lambda _paths: None).sweep_all() == 3
    assert [state(queue, i) for i in ids] == ["FINISHED"] * 3


def test_the_same_bytes_left_behind_by_a_copying_move_are_removed_not_kept(
    rig: tuple[Queue, Spool],
) -> None:
    """Across filesystems the move copies, renames the copy into place, then removes the
    original: a failure at that last step leaves the same bytes at both. That is the original,
    not a file dropped again: the sweep removes it (it would otherwise be sent again)."""
    queue, spool = rig
    file_id = delivered(queue, spool, "d.dcm", b"the one")
    target = spool.done / "d.dcm"
    queue.begin_finish(file_id, str(target))
    target.write_bytes(b"the one")  # the copy made; the original could not be removed
    Finisher(queue, spool, lambda _paths: None).sweep_all()
    assert target.read_bytes() == b"the one"
    assert not (spool.incoming / "d.dcm").exists()
    assert state(queue, file_id) == "FINISHED"
