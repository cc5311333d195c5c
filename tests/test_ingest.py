"""Ingest: complete files -> checked, routed, queued; bad ones to failed/ with their reason.
Real files in tmp_path, a real SQLite queue, the real router and spool."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dicomgen import PATIENT_ID, PATIENT_NAME, make_dataset, write_file
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from forwarder.config import Route
from forwarder.daemon.finisher import Finisher
from forwarder.daemon.ingest import CHUNK, FIRST_CHUNK, Ingest
from forwarder.daemon.router import Router
from forwarder.daemon.spool import Spool
from forwarder.daemon.watch_settle import ReadyFile
from forwarder.errors import QueueError
from forwarder.queue import FileEntry, Finish, Job, Queue

DESTS = ["pacs", "archive"]


@dataclass
class Recorder:
    """IngestMetrics and on_enqueued, recorded."""

    ingested_calls: list[tuple[bool, str]] = field(default_factory=list)
    wakes: int = 0

    def ingested(self, accepted: bool, reason: str = "") -> None:
        self.ingested_calls.append((accepted, reason))

    def wake(self) -> None:
        self.wakes += 1


@dataclass
class Env:
    spool: Spool
    queue: Queue
    ingest: Ingest
    rec: Recorder

    def ready(self, rel: str) -> ReadyFile:
        path = self.spool.incoming / rel
        st = path.stat()
        return ReadyFile(path, rel, st.st_size, st.st_mtime_ns)

    def put(self, rel: str, **kwargs: object) -> ReadyFile:
        write_file(self.spool.incoming / rel, **kwargs)
        return self.ready(rel)

    def put_bytes(self, rel: str, data: bytes) -> ReadyFile:
        path = self.spool.incoming / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.ready(rel)

    def jobs(self, destination: str) -> dict[str, str]:
        """rel_path -> sop_instance_uid of every job queued for ``destination`` (claims them)."""
        return {j.rel_path: j.sop_instance_uid for j in self.queue.claim(destination, 1000)}

    def error(self, rel: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.spool.failed / f"{rel}.error.json").read_text())
        return doc


def make_env(tmp_path: Path, routes: list[Route] | None = None) -> Iterator[Env]:
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    rec = Recorder()
    with Queue(tmp_path / "queue.sqlite") as queue:
        ingest = Ingest(spool, queue, Router(routes, DESTS), on_enqueued=rec.wake, metrics=rec)
        yield Env(spool, queue, ingest, rec)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path)


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[Env]:
    routes = [
        Route(name="ct", match={"Modality": "CT"}, to=["pacs"]),
        Route(name="s2", match={"StationName": "SCANNER2", "folder": "site2/*"}, to=["archive"]),
    ]
    yield from make_env(tmp_path, routes)


def test_a_good_file_is_queued_for_every_destination(env: Env) -> None:
    ready = env.put("a/b.dcm", modality="MR")
    env.ingest([ready])
    assert env.ingest.is_known(str(ready.path))
    assert env.rec.wakes == 1
    assert env.rec.ingested_calls == [(True, "")]
    jobs = env.queue.claim("pacs", 10)
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.path, job.rel_path, job.size) == (str(ready.path), "a/b.dcm", ready.size)
    assert job.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert job.transfer_syntax == "1.2.840.10008.1.2.1"
    assert len(env.queue.claim("archive", 10)) == 1
    assert ready.path.exists()  # it stays in incoming until delivered


def test_a_name_that_is_not_utf8_goes_to_failed_and_its_chunk_is_queued(env: Env) -> None:
    """The queue records names as text: a file whose name is not valid UTF-8 could not be
    queued, and it made every file of its chunk fail with it, at every rescan."""
    good = [env.put(f"batch/good{n}.dcm") for n in range(3)]
    raw = os.fsencode(env.spool.incoming / "batch") + b"/bad\xff.dcm"
    write_file(Path(os.fsdecode(raw)))
    bad = env.ready("batch/" + os.fsdecode(b"bad\xff.dcm"))
    env.ingest([good[0], bad, good[1], good[2]])
    assert sorted(env.jobs("pacs")) == ["batch/good0.dcm", "batch/good1.dcm", "batch/good2.dcm"]
    failed = os.fsencode(env.spool.failed / "batch")
    assert sorted(os.listdir(failed)) == [b"bad\xff.dcm", b"bad\xff.dcm.error.json"]
    doc = json.loads(
        (Path(os.fsdecode(failed)) / os.fsdecode(b"bad\xff.dcm.error.json")).read_text()
    )
    assert "not valid UTF-8" in str(doc)
    assert (False, "bad_name") in env.rec.ingested_calls


@pytest.mark.parametrize(
    "kwargs",
    [{"transfer_syntax": ImplicitVRLittleEndian}, {"transfer_syntax": RLELossless}, {"frames": 3}],
)
def test_other_encodings_are_queued_with_their_syntax(env: Env, kwargs: dict[str, object]) -> None:
    ready = env.put("x.dcm", **kwargs)
    env.ingest([ready])
    (job,) = env.queue.claim("pacs", 10)
    assert job.transfer_syntax == kwargs.get("transfer_syntax", "1.2.840.10008.1.2.1")


def test_routing_on_header_and_folder(routed: Env) -> None:
    files = [
        routed.put("ct.dcm", modality="CT"),
        routed.put("site2/mr.dcm", modality="MR", station="SCANNER2"),
        routed.put("site2/ct.dcm", modality="CT", station="SCANNER2"),
        routed.put("site1/mr.dcm", modality="MR", station="SCANNER2"),  # wrong folder: no route
    ]
    routed.ingest(files)
    assert sorted(routed.jobs("pacs")) == ["ct.dcm", "site2/ct.dcm"]
    assert sorted(routed.jobs("archive")) == ["site2/ct.dcm", "site2/mr.dcm"]
    assert routed.spool.failed.joinpath("site1/mr.dcm").exists()
    doc = routed.error("site1/mr.dcm")
    assert str(doc["reason"]).startswith("no route: no route matches this file")
    # the values routes look at, minus patient data (StationName is not)
    assert str(doc["reason"]).endswith("(Modality='MR', StationName='SCANNER2')")
    assert doc["sop_instance_uid"]
    assert routed.rec.ingested_calls.count((False, "no_route")) == 1


def test_a_no_route_reason_never_shows_patient_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = [Route(name="r", match={"Modality": "US", "PatientName": "Nobody*"}, to=["pacs"])]
    for e in make_env(tmp_path, routes):
        caplog.set_level(logging.DEBUG)
        e.ingest([e.put("ct.dcm", modality="CT")])
        reason = str(e.error("ct.dcm")["reason"])
        assert "Modality='CT'" in reason
        for secret in (PATIENT_NAME, PATIENT_ID, "Doe"):
            assert secret not in reason
            assert secret not in (e.spool.failed / "ct.dcm.error.json").read_text()
            assert secret not in caplog.text


def test_log_phi_shows_patient_values_in_a_no_route_reason_for_debugging(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    routes = [Route(name="r", match={"PatientName": "Nobody*"}, to=["pacs"])]
    with Queue(tmp_path / "queue.sqlite") as queue:
        ingest = Ingest(spool, queue, Router(routes, DESTS), log_phi=True)
        write_file(spool.incoming / "a.dcm")
        st = (spool.incoming / "a.dcm").stat()
        ingest([ReadyFile(spool.incoming / "a.dcm", "a.dcm", st.st_size, st.st_mtime_ns)])
        reason = json.loads((spool.failed / "a.dcm.error.json").read_text())["reason"]
        assert PATIENT_NAME in reason


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "not usable DICOM: empty file"),
        (b"hello, this is not DICOM at all\n" * 10, "not usable DICOM: not a DICOM Part 10 file"),
    ],
)
def test_garbage_and_empty_files_go_to_failed_with_the_reason(
    env: Env, data: bytes, words: str
) -> None:
    ready = env.put_bytes("junk/file.dcm", data)
    env.ingest([ready])
    assert not ready.path.exists()
    assert (env.spool.failed / "junk" / "file.dcm").read_bytes() == data
    doc = env.error("junk/file.dcm")
    assert str(doc["reason"]).startswith(words)
    assert doc["file"] == "junk/file.dcm" and doc["destinations"] == []
    assert env.rec.ingested_calls == [(False, "not_dicom")]
    assert env.rec.wakes == 0
    assert env.queue.counts()["READY"] == 0


def test_a_truncated_file_goes_to_failed_and_good_ones_are_queued(env: Env) -> None:
    good = env.put("good.dcm")
    whole = env.spool.incoming / "whole.dcm"
    write_file(whole, rows=32, columns=32)
    data = whole.read_bytes()
    whole.unlink()
    bad = env.put_bytes("cut.dcm", data[: len(data) - 100])
    env.ingest([bad, good])
    assert str(env.error("cut.dcm")["reason"]).startswith(
        "not usable DICOM: truncated: element (7FE0,0010)"
    )
    assert list(env.jobs("pacs")) == ["good.dcm"]


def test_a_file_cut_inside_its_meta_header_does_not_block_the_batch(env: Env) -> None:
    whole = env.spool.incoming / "whole.dcm"
    write_file(whole)
    data = whole.read_bytes()
    whole.unlink()
    bad = env.put_bytes("cut.dcm", data[:153])
    good = env.put("good.dcm")
    env.ingest([bad, good])
    assert list(env.jobs("pacs")) == ["good.dcm"]
    assert (env.spool.failed / "cut.dcm").exists()


def test_a_file_that_changed_since_it_settled_is_left_for_later(env: Env) -> None:
    ready = env.put("a.dcm")
    with open(ready.path, "ab") as f:
        f.write(b"\x00" * 4)  # grew after the watcher saw it (trailing padding: still valid)
    env.ingest([ready])
    assert ready.path.exists()
    assert not env.ingest.is_known(str(ready.path))
    assert env.queue.counts()["READY"] == 0 and env.rec.wakes == 0
    env.ingest([env.ready("a.dcm")])  # offered again with its new size
    assert list(env.jobs("pacs")) == ["a.dcm"]


def test_a_file_gone_before_it_was_read_is_ignored(env: Env) -> None:
    ready = env.put("a.dcm")
    os.unlink(ready.path)
    env.ingest([ready])
    assert list(env.spool.failed.iterdir()) == []
    assert env.rec.ingested_calls == [] and env.rec.wakes == 0


def test_known_files_are_not_queued_twice_until_forgotten(env: Env) -> None:
    ready = env.put("a.dcm")
    env.ingest([ready])
    env.ingest([ready])
    assert env.rec.wakes == 1
    assert len(env.queue.claim("pacs", 10)) == 1
    env.ingest.forget([str(ready.path)])
    assert not env.ingest.is_known(str(ready.path))


def test_known_paths_survive_a_restart(tmp_path: Path) -> None:
    for e in make_env(tmp_path):
        ready = e.put("a.dcm")
        e.ingest([ready])
    for e in make_env(tmp_path):  # a new Ingest on the same queue database
        assert e.ingest.is_known(str(ready.path))
        e.ingest([ready])
        assert e.rec.wakes == 0
        assert e.queue.counts()["READY"] == 2  # still the first run's two jobs


def test_relearn_drops_the_paths_finished_without_a_forget(env: Env) -> None:
    """The finisher runs in another process: a forget lost with it (killed) is made up for
    by ``relearn``, which keeps every path still queued."""
    a, b = env.put("a.dcm"), env.put("b.dcm")
    env.ingest([a, b])
    finished: list[int] = []
    for dest in DESTS:
        jobs = [j for j in env.queue.claim(dest, 10) if j.rel_path == "a.dcm"]
        finished += env.queue.ack_done([j.id for j in jobs])
    Finisher(env.queue, env.spool, lambda _paths: None).finish_ids(finished)  # no forget
    assert (env.spool.done / "a.dcm").exists()
    assert env.ingest.is_known(str(a.path))
    env.ingest.relearn()
    assert not env.ingest.is_known(str(a.path))
    assert env.ingest.is_known(str(b.path))
    assert env.ingest.known_count == 1


def test_set_router_changes_routing_and_what_is_read(env: Env) -> None:
    env.ingest([env.put("before.dcm", station="S9")])
    env.ingest.set_router(
        Router([Route(name="s9", match={"StationName": "S9"}, to=["archive"])], DESTS)
    )
    env.ingest([env.put("after.dcm", station="S9"), env.put("other.dcm", station="S1")])
    assert sorted(env.jobs("pacs")) == ["before.dcm"]
    assert sorted(env.jobs("archive")) == ["after.dcm", "before.dcm"]
    assert (env.spool.failed / "other.dcm").exists()


def test_a_big_batch_is_queued_in_chunks_so_sending_starts_early(env: Env) -> None:
    ds = make_dataset(rows=8, columns=8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    files = []
    for i in range(200):
        # same content, other names: still separate files (a file is queued per path)
        files.append(env.put_bytes(f"batch/{i:03d}.dcm", buf.getvalue()))
    env.ingest(files)
    # one transaction and one wake of the senders per chunk, not one per file: the chunks grow
    # from FIRST_CHUNK (the senders start after a few fsyncs) to CHUNK files
    chunks, left, size = [], 200, FIRST_CHUNK
    while left > 0:
        chunks.append(min(size, left))
        left, size = left - size, min(CHUNK, size * 2)
    assert FIRST_CHUNK < CHUNK and chunks[-2] == CHUNK
    assert env.rec.wakes == len(chunks) < 200 // FIRST_CHUNK
    assert env.queue.counts()["READY"] == 400
    assert len(env.jobs("archive")) == 200


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", ImplicitVRLittleEndian, RLELossless])
def test_the_study_series_and_accession_are_recorded_for_find(routed: Env, syntax: str) -> None:
    """Read in the same walk as the routes' values (here: Modality), in every encoding; found by
    each; padding stripped. A file without an Accession Number records none."""
    ds = make_dataset(transfer_syntax=syntax)
    ds.AccessionNumber = "ACC12"  # odd length: padded with a space on disk
    path = routed.spool.incoming / "with.dcm"
    ds.save_as(path, enforce_file_format=True)
    bare = routed.put("without.dcm", transfer_syntax=syntax)
    routed.ingest([routed.ready("with.dcm"), bare])
    (found,) = routed.queue.find(["ACC12"])
    assert found.rel_path == "with.dcm" and found.path == str(path)
    assert found.study_instance_uid == ds.StudyInstanceUID
    assert found.series_instance_uid == ds.SeriesInstanceUID
    assert [f.rel_path for f in routed.queue.find([ds.StudyInstanceUID])] == ["with.dcm"]
    assert [f.rel_path for f in routed.queue.find([ds.SeriesInstanceUID])] == ["with.dcm"]
    assert [f.rel_path for f in routed.queue.find([ds.SOPInstanceUID])] == ["with.dcm"]
    (other,) = routed.queue.find([_study_of(bare)])
    assert other.rel_path == "without.dcm"
    assert [j.destination for j in found.jobs] == ["pacs"]  # routed on Modality CT
    conn = sqlite3.connect(routed.queue.path)
    try:
        rows = conn.execute("SELECT rel_path, accession_number FROM files ORDER BY id").fetchall()
    finally:
        conn.close()
    assert rows == [("with.dcm", "ACC12"), ("without.dcm", None)]


def _study_of(ready: ReadyFile) -> str:
    import pydicom

    return str(pydicom.dcmread(ready.path, stop_before_pixels=True).StudyInstanceUID)


def test_a_discarded_file_goes_to_done_with_a_log_line_and_nothing_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = [
        Route(name="all", to=["pacs"]),
        Route.model_validate(
            {"name": "no-sr", "match": {"Modality": {"not": ["CT", "MR"]}}, "action": "discard"}
        ),
    ]
    made = make_env(tmp_path, routes)
    env = next(made)
    ct = env.put("a/ct.dcm", modality="CT")
    sr = env.put("a/sr.dcm", modality="SR")
    original = sr.path.read_bytes()
    with caplog.at_level(logging.INFO, logger="forwarder.daemon.ingest"):
        env.ingest([ct, sr])
    assert sorted(env.jobs("pacs")) == ["a/ct.dcm"]  # the discard route wins over "all"
    assert env.jobs("archive") == {}
    assert not sr.path.exists()
    assert (env.spool.done / "a/sr.dcm").read_bytes() == original
    assert not list(env.spool.failed.rglob("*"))
    assert (False, "discarded") in env.rec.ingested_calls
    lines = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(lines) == 1 and "discarded by route no-sr" in lines[0], lines
    made.close()


def _open_files(under: Path) -> list[str]:
    """The files under ``under`` this process holds open (the queue's own are elsewhere)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under) + "/"):
            held.append(target)
    return held


def test_every_descriptor_ingest_opens_is_closed_whatever_becomes_of_the_file(
    tmp_path: Path,
) -> None:
    """Ingest checks and fsyncs each file through one descriptor (daemon/filesync.py): queued,
    not DICOM, no route, discarded, gone, changed while read, or a queue that refuses the
    chunk, none is left open."""
    routes = [
        Route(name="ct", match={"Modality": "CT"}, to=["pacs"]),
        Route.model_validate({"name": "no-sr", "match": {"Modality": "SR"}, "action": "discard"}),
    ]
    made = make_env(tmp_path / "q", routes)
    env = next(made)
    spool = tmp_path / "q"
    ready = [
        env.put("ct.dcm", modality="CT"),
        env.put("mr.dcm", modality="MR"),  # no route
        env.put("sr.dcm", modality="SR"),  # discarded
        env.put_bytes("junk.dcm", b"not dicom at all"),
    ]
    gone = env.put("gone.dcm", modality="CT")
    gone.path.unlink()
    grown = env.put("grown.dcm", modality="CT")
    with grown.path.open("ab") as f:
        f.write(b"\0\0")  # its size is no longer what the watcher saw
    env.ingest([*ready, gone, grown])
    assert sorted(env.jobs("pacs")) == ["ct.dcm"]
    assert _open_files(spool / "incoming") == [] and _open_files(spool / "failed") == []
    env.queue.close()  # the next chunk's enqueue fails
    late = env.put("late.dcm", modality="CT")
    with pytest.raises(QueueError):
        env.ingest([late])
    assert _open_files(spool / "incoming") == []
    next(made, None)


def test_a_failed_commit_leaves_its_files_unknown(env: Env) -> None:
    env.queue.close()  # the enqueue fails
    ready = env.put("a.dcm")
    with pytest.raises(QueueError):
        env.ingest([ready])
    assert not env.ingest.is_known(str(ready.path))  # the watcher's rescan offers it again
    assert env.ingest.known_count == 0


def test_a_forget_arriving_as_the_commit_ends_is_not_undone(tmp_path: Path) -> None:
    """The finisher (in the daemon, while ingest runs in its own process) may move a file out
    and forget it as soon as its commit is made, before Ingest has returned."""
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")

    class Finishing(Queue):  # a real queue whose commit is followed at once by the forget
        ingest: Ingest

        def enqueue_many(self, *args: Any, **kwargs: Any) -> Any:
            ids = super().enqueue_many(*args, **kwargs)
            self.ingest.forget([e.path for e, _ in args[0]])
            return ids

    with Finishing(tmp_path / "queue.sqlite") as queue:
        ingest = Ingest(spool, queue, Router(None, DESTS))
        queue.ingest = ingest
        path = spool.incoming / "a.dcm"
        write_file(path)
        st = path.stat()
        ingest([ReadyFile(path, "a.dcm", st.st_size, st.st_mtime_ns)])
        assert not ingest.is_known(str(path))
        assert ingest.known_count == 0


def test_known_under_a_folder_only_those_files_are_known(tmp_path: Path) -> None:
    """The daemon's own Ingest (the listener's) does not hold the watch folder's paths: the
    watch-and-ingest process does."""
    for e in make_env(tmp_path):
        mine, other = e.put(".listen/AE/a.dcm"), e.put("b.dcm")
        e.ingest([mine, other])
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    with Queue(tmp_path / "queue.sqlite") as queue:
        under = str(spool.incoming / ".listen")
        ingest = Ingest(spool, queue, Router(None, DESTS), known_under=under)
        assert ingest.is_known(str(mine.path)) and not ingest.is_known(str(other.path))
        assert ingest.known_count == 1


def test_a_file_rewritten_while_being_sent_goes_to_failed_and_its_queued_row_ends_with_it(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A queued file appended to (no longer DICOM) while its first version is being sent to
    pacs, archive having stored it: it goes to failed/ saying why, and in the same step the
    queue stops holding the version it had: the send under way ends, and nothing looks for the
    file in incoming again (the finisher said ERROR "removed by someone else?")."""
    ready = env.put("a.dcm")
    env.ingest([ready])
    (stored,) = env.queue.claim("archive", 1)
    assert env.queue.ack_done([stored.id]) == []
    (sending,) = env.queue.claim("pacs", 1)
    with open(ready.path, "ab") as f:
        f.write(b"appended: not DICOM any more")
    # The sender had the first version open: pacs stored it, complete and intact.
    _ingest_again_and_finish(env, sending, caplog)
    assert not ready.path.exists() and not list(env.spool.done.rglob("*"))
    assert (env.spool.failed / "a.dcm").read_bytes().endswith(b"not DICOM any more")
    reason = str(env.error("a.dcm")["reason"])
    assert reason.startswith("not usable DICOM: "), reason
    assert "rewritten while queued" in reason and sending.sop_instance_uid in reason, reason
    assert "stored by archive" in reason and "being sent to pacs" in reason, reason
    assert env.queue.active_files() == {} and not env.ingest.is_known(str(ready.path))
    (row,) = env.queue.find([sending.sop_instance_uid])
    assert row.path == str(env.spool.failed / "a.dcm")
    # pacs's send ended stored: recorded as it is (it was forgotten before session 21).
    assert {j.destination: j.status.value for j in row.jobs} == {"archive": "DONE", "pacs": "DONE"}


def test_a_rewritten_file_whose_name_in_failed_is_taken_before_the_move_is_recorded_there(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but another file is put at failed/a.dcm once the row is retired there and
    before the move: the file goes to failed/a.1.dcm, and the retired row records that name
    (``find`` named the other file)."""
    ready = env.put("a.dcm")
    env.ingest([ready])
    (stored,) = env.queue.claim("archive", 1)
    assert env.queue.ack_done([stored.id]) == []
    (sending,) = env.queue.claim("pacs", 1)
    with open(ready.path, "ab") as f:
        f.write(b"appended: not DICOM any more")
    retire = env.queue.retire_file

    def retire_then_take(path: str, final_path: str, outcome: Finish, **kw: Any) -> Any:
        retired = retire(path, final_path, outcome, **kw)
        Path(final_path).parent.mkdir(parents=True, exist_ok=True)
        Path(final_path).write_bytes(b"another file")
        return retired

    monkeypatch.setattr(env.queue, "retire_file", retire_then_take)
    _ingest_again_and_finish(env, sending, caplog)
    assert (env.spool.failed / "a.dcm").read_bytes() == b"another file"
    assert (env.spool.failed / "a.1.dcm").read_bytes().endswith(b"not DICOM any more")
    (row,) = env.queue.find([sending.sop_instance_uid])
    assert row.path == str(env.spool.failed / "a.1.dcm")


def _ingest_again_and_finish(env: Env, sending: Job, caplog: pytest.LogCaptureFixture) -> None:
    """Ingest sees a.dcm again (rewritten), the send under way ends stored, the finisher
    sweeps: no ERROR on the way."""
    finisher = Finisher(env.queue, env.spool, env.ingest.forget)
    with caplog.at_level(logging.INFO):
        env.ingest([env.ready("a.dcm")])
        finisher.finish_ids(env.queue.ack_done([sending.id]))
        finisher.sweep_all()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_queued_file_rewritten_into_one_a_discard_route_takes_goes_to_done_unsent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for a file rewritten, while being sent, into an object a discard route matches:
    to done/ with its log line, the version queued before ended with it, no ERROR."""
    routes = [
        Route(name="all", to=["pacs"]),
        Route.model_validate({"name": "no-sr", "match": {"Modality": "SR"}, "action": "discard"}),
    ]
    for env in make_env(tmp_path, routes):
        ready = env.put("a.dcm", modality="CT")
        env.ingest([ready])
        (sending,) = env.queue.claim("pacs", 1)
        write_file(ready.path, modality="SR", seed=9)
        _ingest_again_and_finish(env, sending, caplog)
        assert not ready.path.exists() and not list(env.spool.failed.rglob("*"))
        assert [p.name for p in env.spool.done.iterdir()] == ["a.dcm"]
        (line,) = [r.getMessage() for r in caplog.records if "discarded by route" in r.getMessage()]
        assert "rewritten while queued" in line and "being sent to pacs" in line, line
        assert env.queue.active_files() == {}


def test_an_object_received_again_into_a_discard_route_ends_the_row_the_receiving_process_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Most received objects are queued by the listener's receiving process on its own
    connection (DirectQueue), which the daemon's Ingest never hears of (received_elsewhere
    counts them). Sent again, while the first is being sent, as an object a discard route
    takes: the daemon's Ingest moves it to done/, and the row the receiving process queued
    must end with it, as for one the daemon queued itself (no ERROR from the finisher)."""
    routes = [
        Route(name="all", to=["pacs"]),
        Route.model_validate({"name": "no-sr", "match": {"Modality": "SR"}, "action": "discard"}),
    ]
    spool = Spool(tmp_path / "incoming", tmp_path / "done", tmp_path / "failed")
    listen = spool.incoming / ".listen"
    with Queue(tmp_path / "queue.sqlite") as queue:
        ingest = Ingest(spool, queue, Router(routes, DESTS), known_under=str(listen))
        path = listen / "CT01" / "1.2.3" / "1.2.3.4.dcm"
        ds = write_file(path, modality="CT")

        def entry() -> FileEntry:
            st = path.stat()
            return FileEntry(
                str(path),
                spool.rel_path(path),
                st.st_size,
                st.st_mtime_ns,
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                "1.2.840.10008.1.2.1",
                calling_ae="CT01",
            )

        # The receiving process's own connection queues the first copy.
        with Queue(tmp_path / "queue.sqlite", create=False) as child:
            assert child.enqueue_many([(entry(), {"pacs": 1})])[0] is not None
        (sending,) = queue.claim("pacs", 1)
        ds = write_file(path, modality="SR", seed=9)  # received again: now discarded
        finisher = Finisher(queue, spool, ingest.forget)
        with caplog.at_level(logging.INFO):
            assert ingest.enqueue_received(entry(), {"Modality": "SR"}) == []
            finisher.finish_ids(queue.ack_done([sending.id]))
            finisher.sweep_all()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert queue.active_files() == {}


def test_a_file_rewritten_between_the_finisher_s_listing_and_its_begin_is_no_error(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The finisher lists a.dcm and b.dcm as delivered; before it records where they go,
    a.dcm is appended to (not DICOM any more) and ingest ends its row (retire_file). The
    finisher's batch must not fail as a whole with an ERROR: b.dcm goes to done/ now."""
    a, b = env.put("a.dcm", seed=1), env.put("b.dcm", seed=2)
    env.ingest([a, b])
    for dest in DESTS:
        jobs = env.queue.claim(dest, 10)
        terminal = env.queue.ack_done([j.id for j in jobs])
    items = env.queue.to_finish(terminal)
    assert len(items) == 2
    with open(a.path, "ab") as f:
        f.write(b"appended: not DICOM any more")
    finisher = Finisher(env.queue, env.spool, env.ingest.forget)
    with caplog.at_level(logging.INFO):
        env.ingest([env.ready("a.dcm")])
        finisher.finish(items)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [p.name for p in env.spool.done.iterdir()] == ["b.dcm"]
    assert (env.spool.failed / "a.dcm").exists()
