"""Finishing races found in an audit of the finishing path (forwarder/daemon/finisher.py,
finish_relay.py, ingest_child.py), each on a real ``forwarder run`` with a real peer: what a
file dropped again under a name being finished becomes, what a clean stop leaves queued, and
what a file rewritten while being sent becomes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination, uids
from peers import ScriptedSCP
from test_ingest_process import children, queue_counts, site_env

from forwarder.dicom.part10 import read_meta

# The watch-and-ingest process's finisher stops once it has recorded where victim.dcm goes
# (its row FINISHING), before it moves it, until the test says go: the moment a file dropped
# again under that name lands (in a batch, while the files before it are moved).
PAUSED_MOVE = """\
import time
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.queue.finishing import Finishing

    here = Path(__file__).parent
    begin = Finishing.begin_finish_many

    def begin_finish_many(self, items):
        begin(self, items)
        if any(p.endswith("victim.dcm") for _, p in items) and not (here / "paused").exists():
            (here / "paused").write_text("")
            deadline = time.monotonic() + 60
            while not (here / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    Finishing.begin_finish_many = begin_finish_many
"""


def test_a_file_dropped_again_while_its_earlier_copy_is_being_moved_is_sent(
    tmp_path: Path,
) -> None:
    """victim.dcm is delivered; its finisher has recorded where it goes (FINISHING) and is
    about to rename it when another object is dropped under the same name (a modality's
    resend). The rename must not carry the new, never sent object to done/ in place of the
    delivered one: the new object is sent (or at least stays queued in incoming)."""
    site, env = site_env(tmp_path, PAUSED_MOVE)
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        with d:
            first = d.drop("victim.dcm", seed=1)
            wait_until((site / "paused").exists, 30, what="the finisher at the move")
            assert scp.uids() == uids([first])
            second = d.drop("victim.dcm", seed=2)  # atomically, over the delivered copy
            (site / "go").write_text("")
            try:
                wait_until(
                    lambda: second.sop_instance_uid in scp.uids(),
                    20,
                    what="the object dropped again sent",
                )
                d.wait_incoming_empty(timeout=20)
            finally:
                assert d.stop() == 0
        assert len(scp.received) == 2
        # The second object, delivered. The first is gone: whoever dropped the second
        # overwrote it in incoming (it was delivered before).
        assert d.done_files() == ["victim.dcm"]
        assert queue_counts(d.queue) == ({"FINISHED": 2}, {"DONE": 2})


def test_the_same_object_dropped_again_after_a_crash_mid_finish_is_sent_again(
    tmp_path: Path,
) -> None:
    """same.dcm is delivered and moved to done/, and the daemon dies before the move is
    recorded (its row FINISHING). The same object is dropped again under that name (a
    resend: the same bytes, a new file) before the next start. A name dropped again after its
    first copy is done is sent again: the start must not take the new file for the original
    still in place, and rename it over the delivered copy unsent."""
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={"FORWARDER_CRASH_AT": "finish-after-move"},
        )
        try:
            one = d.drop("same.dcm", seed=1)
            d.start(wait_ready=False)
            assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
            assert d.done_files() == ["same.dcm"]
            assert len(scp.received) == 1
            staged = tmp_path / "again.part"
            staged.write_bytes((d.done / "same.dcm").read_bytes())
            os.rename(staged, d.incoming / "same.dcm")  # the same bytes, dropped again
            del d.env["FORWARDER_CRASH_AT"]
            d.start()
            try:
                wait_until(lambda: len(scp.received) == 2, 20, what="the resend sent")
                d.wait_incoming_empty(timeout=30)
            finally:
                assert d.stop() == 0
        finally:
            d.close()
    assert scp.uids() == uids([one])
    assert d.done_files() == ["same.1.dcm", "same.dcm"]
    assert queue_counts(d.queue) == ({"FINISHED": 2}, {"DONE": 2})


# The start's sweep of the whole queue in the watch-and-ingest process, as on a long queue:
# several slices (5 files a slice here, 1000 in production, over 20,000 rows), each taking
# {pause} s (12 slices).
LONG_SWEEP = """\
import time
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.queue.finishing import Finishing

    sweep = Finishing.sweep_to_finish

    def sweep_to_finish(self, after, span=20_000, limit=1000, *, finishing=True):
        time.sleep({pause})
        return sweep(self, after, span, min(limit, 5), finishing=finishing)

    Finishing.sweep_to_finish = sweep_to_finish
"""


EXIT_SWEEP_CUT = "finish: the sweep of the queue did not end within 6 s of the stop"


# 0.4 s a slice: longer than a stop takes, and the process's exit sweeps the whole queue
# within its 6 s; 1.0 s a slice: its exit's sweep is cut at 6 s, and the daemon sweeps.
@pytest.mark.parametrize("pause", [0.4, 1.0])
def test_a_clean_stop_during_a_restarted_process_s_sweep_leaves_no_delivered_file_queued(
    tmp_path: Path, pause: float
) -> None:
    """Files delivered, their ids handed to a watch-and-ingest process that never read them
    (stopped), which is then killed -9: they are QUEUED with every job DONE, and only the
    restarted process's sweep of the whole queue finds them. The daemon is stopped (SIGTERM)
    while that sweep is still going: a clean stop leaves the queue settled, every such file
    moved to done/, none left QUEUED for the next start; by the process, or when its sweep
    takes too long, by the daemon (said, and never by killing the process)."""
    site, env = site_env(tmp_path)
    total = 60
    with ScriptedSCP(delay=0.05) as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        with d:
            dropped = d.drop_files(total)
            wait_until(lambda: sum(queue_counts(d.queue)[0].values()) == total, 30, what="queued")
            (child,) = children(d.pid)
            # For the next process (this one imported its sitecustomize, none, at its start),
            # written first: a process stopped inside a queue transaction is killed and
            # restarted within seconds, and that restart must have the long sweep too.
            (site / "sitecustomize.py").write_text(LONG_SWEEP.format(pause=pause))
            os.kill(child, signal.SIGSTOP)  # it finishes nothing from now on
            try:
                wait_until(
                    lambda: not {"READY", "CLAIMED"} & set(queue_counts(d.queue)[1]),
                    30,
                    what="every file sent",
                )
            finally:
                os.kill(child, signal.SIGKILL)
            files = queue_counts(d.queue)[0]
            assert files.get("QUEUED", 0) > 10, files
            d.wait_log("watch: watching incoming again", timeout=30, what="the restart")
            assert d.stop() == 0  # while the restarted process's sweep goes on
            log = d.log_text(current_run=True)
    assert (EXIT_SWEEP_CUT in log) == (pause > 0.5), log[-3000:]
    assert "did not stop; killing it" not in log
    assert len(scp.received) == total
    assert scp.uids() == uids(dropped)
    assert queue_counts(d.queue) == ({"FINISHED": total}, {"DONE": total})
    assert d.incoming_files() == []
    assert d.done_files() == sorted(f.rel_path for f in dropped)


@pytest.mark.parametrize("crash", ["", "retire-before-move"])
def test_a_file_rewritten_while_being_sent_goes_to_failed_with_no_false_error(
    tmp_path: Path, crash: str
) -> None:
    """a.dcm is appended to while its first version is being sent (the peer has it and holds
    its answer): not DICOM any more, it goes to failed/ saying so, the send under way ends,
    and nothing looks for the file in incoming afterwards (the finisher said ERROR "neither in
    incoming nor at done/ ... removed by someone else?"). Killed -9 after the queue let go of
    the version it held and before the move, the restart moves the file to failed/."""
    release = threading.Event()

    def held(_: object) -> int:
        release.wait(20)
        return 0x0000

    with ScriptedSCP(status=held) as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={"FORWARDER_CRASH_AT": crash} if crash else {},
        )
        try:
            d.start()
            first = d.drop("a.dcm", seed=1)
            wait_until(lambda: scp.started, 20, what="the first version being sent")
            with open(d.incoming / "a.dcm", "ab") as f:
                f.write(b"appended: not DICOM any more")
            if crash:
                assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
                assert d.incoming_files() == ["a.dcm"] and d.failed_files() == []
                release.set()
                del d.env["FORWARDER_CRASH_AT"]
                d.start()
            d.wait_failed(1, timeout=20)
            release.set()
            wait_until(lambda: "CLAIMED" not in queue_counts(d.queue)[1], 20, what="the send ended")
            assert d.stop() == 0
        finally:
            release.set()
            d.close()
    assert " ERROR " not in d.log_text(), d.log_tail()
    assert scp.started == [first.sop_instance_uid]
    assert (d.incoming_files(), d.done_files(), d.failed_files()) == ([], [], ["a.dcm"])
    reason = d.error_json("a.dcm")["reason"]
    assert reason.startswith("not usable DICOM: "), reason
    # After the crash the restart takes it as the new file it is.
    assert ("rewritten while queued" in reason) == (not crash), reason
    if crash:  # the send under way died with the daemon
        assert queue_counts(d.queue) == ({"FINISHED": 1}, {})
        return
    # The send under way ended stored: the queue keeps that the PACS has that version (it
    # forgot it), and the log says so of the version, not of the file now in failed/.
    assert queue_counts(d.queue) == ({"FINISHED": 1}, {"DONE": 1})
    assert (
        f"a.dcm: the version queued before (SOP Instance UID {first.sop_instance_uid}) was "
        f"stored by pacs; the file had been rewritten since, and is at {d.failed / 'a.dcm'}"
    ) in d.log_text(), d.log_tail()
    found = d.cli("find", "--json", first.sop_instance_uid)
    assert found.returncode == 0, found.stderr
    (file,) = json.loads(found.stdout)["files"]
    assert [(j["destination"], j["state"]) for j in file["destinations"]] == [("pacs", "stored")]


# In the watch-and-ingest process: once the finisher has recorded where taken.dcm goes, and
# before it moves it, another file appears at that very name in done/ (an administrator, a
# script): the move must not replace it.
TAKEN_TARGET = """\
import os
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.queue.finishing import Finishing

    begin = Finishing.begin_finish_many

    def begin_finish_many(self, items):
        begin(self, items)
        for _, path in items:
            if path.endswith("taken.dcm") and not os.path.lexists(path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(b"someone else's file")

    Finishing.begin_finish_many = begin_finish_many
"""


def test_a_file_put_at_the_name_chosen_in_done_before_the_move_is_not_replaced(
    tmp_path: Path,
) -> None:
    """taken.dcm is delivered; between recording where it goes (done/taken.dcm) and the
    move, another file appears there. It stays as it is; the delivered file goes to the next
    free name, which the queue records, and the log says so in one line."""
    _, env = site_env(tmp_path, TAKEN_TARGET)
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)], env=env)
        with d:
            first = d.drop("taken.dcm", seed=1)
            d.wait_incoming_empty(timeout=30)
            wait_until(lambda: queue_counts(d.queue)[0] == {"FINISHED": 1}, 20, what="finished")
            assert d.stop() == 0
    assert scp.uids() == uids([first])
    assert (d.done / "taken.dcm").read_bytes() == b"someone else's file"
    assert read_meta(d.done / "taken.1.dcm").sop_instance_uid == first.sop_instance_uid
    assert " ERROR " not in d.log_text(), d.log_tail()
    assert "moving it to" in d.log_text() and "taken.1.dcm instead" in d.log_text()
    conn = sqlite3.connect(f"file:{d.queue}?mode=ro", uri=True)
    try:
        (final,) = conn.execute("SELECT final_path FROM files").fetchone()
    finally:
        conn.close()
    assert final == str(d.done / "taken.1.dcm")


def test_a_name_taken_in_done_while_the_daemon_was_down_mid_finish_is_not_taken_for_the_move(
    tmp_path: Path,
) -> None:
    """The daemon dies after recording where late.dcm goes (done/late.dcm), before the move;
    another file is put at that name while it is down. At the restart the file still in
    incoming is the one queued (same size and mtime): it goes to the next free name, not
    "already moved" (which left it behind, to be sent again as a new file)."""
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={"FORWARDER_CRASH_AT": "finish-before-move"},
        )
        try:
            first = d.drop("late.dcm", seed=1)
            d.start(wait_ready=False)
            assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
            assert d.incoming_files() == ["late.dcm"] and len(scp.received) == 1
            (d.done / "late.dcm").write_bytes(b"someone else's file")
            del d.env["FORWARDER_CRASH_AT"]
            d.start()
            d.wait_incoming_empty(timeout=30)
            wait_until(lambda: queue_counts(d.queue)[0] == {"FINISHED": 1}, 20, what="finished")
            assert d.stop() == 0
        finally:
            d.close()
    assert len(scp.received) == 1, "sent again"
    assert (d.done / "late.dcm").read_bytes() == b"someone else's file"
    assert read_meta(d.done / "late.1.dcm").sop_instance_uid == first.sop_instance_uid
    assert "already moved" not in d.log_text(), d.log_tail()


def test_a_same_size_same_mtime_file_dropped_after_a_crash_mid_finish_is_sent(
    tmp_path: Path,
) -> None:
    """late.dcm is delivered and moved to done/, and the daemon dies before the move is
    recorded. Another file of the same size is put at incoming/late.dcm with the same mtime
    (same-size slices copied with ``cp -p``, ``rsync -t``). The file at the target recorded
    keeps the queued size and mtime (a rename keeps them): it is the delivered copy, and the
    new file is sent as a new one, not moved to done/late.1.dcm unsent."""
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={"FORWARDER_CRASH_AT": "finish-after-move"},
        )
        try:
            d.drop("late.dcm", seed=1)
            d.start(wait_ready=False)
            assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
            assert d.done_files() == ["late.dcm"] and len(scp.received) == 1
            delivered = d.done / "late.dcm"
            data = bytearray(delivered.read_bytes())
            data[-1] ^= 0xFF  # one byte of pixel data changed, the same size
            st = delivered.stat()
            staged = tmp_path / "again.part"
            staged.write_bytes(bytes(data))
            os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(staged, d.incoming / "late.dcm")
            del d.env["FORWARDER_CRASH_AT"]
            d.start()
            try:
                wait_until(lambda: len(scp.received) == 2, 20, what="the new file sent")
                d.wait_incoming_empty(timeout=30)
            finally:
                assert d.stop() == 0
        finally:
            d.close()
    assert d.done_files() == ["late.1.dcm", "late.dcm"]
    assert (d.done / "late.1.dcm").read_bytes() == bytes(data)
    assert queue_counts(d.queue) == ({"FINISHED": 2}, {"DONE": 2})


# As TAKEN_TARGET, for a file going to failed/: the other file comes with its own report.
TAKEN_FAILED_TARGET = """\
import os
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.queue.finishing import Finishing

    begin = Finishing.begin_finish_many

    def begin_finish_many(self, items):
        begin(self, items)
        for _, path in items:
            if path.endswith("taken.dcm") and not os.path.lexists(path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(b"someone else's file")
                Path(path + ".error.json").write_text('{"reason": "their own"}')

    Finishing.begin_finish_many = begin_finish_many
"""


def test_a_file_and_report_put_at_the_name_chosen_in_failed_before_the_move_keep_the_report(
    tmp_path: Path,
) -> None:
    """taken.dcm is refused; between recording where it goes (failed/taken.dcm) and the
    move, another file appears there with its own report. Neither is replaced nor removed:
    the failed file goes to the next free name, with its report beside it."""
    _, env = site_env(tmp_path, TAKEN_FAILED_TARGET)
    with ScriptedSCP(status=0xC001) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)], env=env)
        with d:
            first = d.drop("taken.dcm", seed=1)
            d.wait_incoming_empty(timeout=30)
            wait_until(lambda: queue_counts(d.queue)[0] == {"FINISHED": 1}, 20, what="finished")
            assert d.stop() == 0
    assert (d.failed / "taken.dcm").read_bytes() == b"someone else's file"
    assert json.loads((d.failed / "taken.dcm.error.json").read_text()) == {"reason": "their own"}
    assert read_meta(d.failed / "taken.1.dcm").sop_instance_uid == first.sop_instance_uid
    ours = json.loads((d.failed / "taken.1.dcm.error.json").read_text())
    assert ours["file"] == "taken.dcm" and ours["destinations"][0]["status"] == "0xC001"
