"""The daemon's watch-and-ingest process (forwarder/daemon/ingest_process.py, ingest_child.py),
tested on a real ``forwarder run``: its life with the daemon's, its restart after a kill -9,
the forgets, routes and counts that cross between the two processes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import wait_until
from daemon import Daemon, Dropped, destination, route, uids
from peers import ScriptedSCP, free_port

CHILD_MODULE = "forwarder.daemon.ingest_child"
DIED = re.compile(r"watch: the watch-and-ingest process \(PID (\d+)\) died \(signal 9\)")
UNHEALTHY = "not feeding systemd's watchdog: the watcher of incoming is not running"
AGAIN = "watch: watching incoming again"
KNOWN = re.compile(r"watch: (\d+) file\(s\) queued from incoming, not finished yet")


def children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s watch-and-ingest processes (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and CHILD_MODULE.encode() in cmdline:
            found.append(int(entry))
    return found


def site_env(tmp_path: Path, code: str = "") -> tuple[Path, dict[str, str]]:
    """A folder whose ``sitecustomize.py`` (``code``; none yet when empty, written later) the
    daemon's processes run as they start, and the daemon's environment for it: the tree under
    test still found where this run's PYTHONPATH says (a worktree's)."""
    site = tmp_path / "site"
    site.mkdir()
    if code:
        (site / "sitecustomize.py").write_text(code)
    return site, {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    }


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def queued(d: Daemon, destination: str = "pacs") -> int:
    """How many files the daemon has queued for ``destination`` (done, pending or in flight):
    its jobs not failed, read-only from the queue (polled: a ``forwarder status`` a look costs
    a second of CPU the daemon needs for the backlog being waited for)."""
    conn = sqlite3.connect(f"file:{d.queue}?mode=ro", uri=True, isolation_level=None)
    try:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE destination = :d AND status != 'FAILED'",
            {"d": destination},
        ).fetchone()
    finally:
        conn.close()
    return int(n)


def staged_backlog(tmp_path: Path, count: int, **kwargs: Any) -> tuple[Path, list[Dropped]]:
    """``count`` generated files in a folder of their own, to be renamed into incoming at once
    (a backlog arriving in one step); the folder and the files."""
    staged = Daemon(tmp_path / "staged", destinations=[])  # only to write the files
    return staged.incoming, staged.drop_files(count, **kwargs)


def test_ready_only_once_the_process_watches_and_it_ends_with_the_daemon(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            log = d.log_text(current_run=True)
            assert log.index(f"watching {d.incoming} (inotify)") < log.index("forwarder running")
            (child,) = children(d.pid)
            d.signal(signal.SIGUSR1)  # passed on: the process writes its stacks, and goes on
            wait_until(lambda: "ingest_child.py" in d.log_text(), 10, what="the process's stacks")
            dropped = d.drop_files(3)
            d.wait_done(3)
            assert scp.uids() == uids(dropped)
            assert children(d.pid) == [child]
            assert d.stop() == 0
            # SIGTERM: the process stopped taking files before the daemon said it stopped.
            log = d.log_text(current_run=True)
            assert log.index("watch: stopped") < log.rindex("stopped\n")
            assert not alive(child)
            d.start()
            (child,) = children(d.pid)
            d.kill()  # kill -9 of the daemon: its process goes with it (PR_SET_PDEATHSIG)
            wait_until(lambda: not alive(child), 10, what="the process to die with the daemon")


def test_sigterm_stops_taking_files_before_the_senders_drain(tmp_path: Path) -> None:
    with ScriptedSCP(delay=2.0) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            sent = d.drop("sent.dcm")
            # At the peer (claimed is not enough: a job claimed but not yet sent when SIGTERM
            # comes goes back to READY, and waits for the next start).
            wait_until(lambda: scp.started, 30, what="the file at the peer")
            d.signal(signal.SIGTERM)
            d.wait_log("watch: stopped", what="the process to stop")
            late = d.drop("late.dcm")  # while the sender still waits for its answer
            assert d.wait_exit(30) == 0
            log = d.log_text(current_run=True)
            assert log.index("watch: stopped") < log.index("sent.dcm -> pacs: stored")
            assert scp.uids() == uids([sent])
            assert d.incoming_files() == ["late.dcm"]  # not taken: it waits for the next start
            scp.delay = 0.0  # its slowness served its purpose: the stop came during a send
            d.start()
            d.wait_done(2)
            assert scp.uids() == uids([sent, late])
            assert d.stop() == 0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_a_killed_process_is_logged_restarted_and_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            extra={"metrics": {"listen": f"127.0.0.1:{port}"}},
        )
        with d:
            first = d.drop_files(4, prefix="before")
            d.wait_done(4)
            (child,) = children(d.pid)
            os.kill(child, signal.SIGKILL)
            meanwhile = d.drop_files(6, prefix="meanwhile")
            d.wait_log(DIED.pattern, regex=True, what="the death logged")
            (line,) = [s for s in d.log_text(current_run=True).splitlines() if DIED.search(s)]
            assert " ERROR " in line and f"(PID {child})" in line
            d.wait_log(UNHEALTHY, what="the watcher reported unhealthy")
            d.wait_log(AGAIN, what="the restart")
            d.wait_done(10)
            assert children(d.pid) != [child]
            # Each file once: the restarted process knew what was already queued.
            assert scp.uids() == uids(first + meanwhile)
            assert len(scp.received) == 10
            d.wait_log("healthy again", what="healthy again")
            text = scrape(port)
            assert "forwarder_ingest_process_restarts_total 1.0" in text
            assert "forwarder_ingest_accepted_total 10.0" in text
            assert d.stop() == 0


def test_killed_during_a_backlog_each_file_is_queued_once(tmp_path: Path) -> None:
    """Killed while it takes a 400-file backlog in (files checked and fsynced, perhaps not
    committed): the next one queues the rest, and none twice."""
    with ScriptedSCP(delay=0.005) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        backlog, dropped = staged_backlog(tmp_path, 400, rows=16, columns=16)
        with d:
            os.rename(backlog, d.incoming / "backlog")  # all at once
            wait_until(lambda: scp.received, 30, what="the first file at the peer")
            (child,) = children(d.pid)
            os.kill(child, signal.SIGKILL)
            d.wait_log(AGAIN, what="the restart")
            d.wait_done(400, timeout=120)
            assert scp.uids() == uids(dropped)
            assert len(scp.received) == 400  # none queued (so sent) twice
            status = d.status_json()["destinations"]["pacs"]
            assert (status["done"], status["pending"], status["in_flight"]) == (400, 0, 0)
            assert d.stop() == 0


def test_a_name_dropped_again_after_its_first_copy_is_done_is_sent_again(
    tmp_path: Path,
) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)], log_level="DEBUG")
        with d:
            one = d.drop("same.dcm", seed=1)
            d.wait_done(1)
            two = d.drop("same.dcm", seed=2)
            d.wait_done(2)
            assert scp.uids() == uids([one, two])
            others = d.drop_files(5)
            d.wait_done(7)
            assert scp.uids() == uids([one, two, *others])

            def nothing_known() -> bool:
                said = KNOWN.findall(d.log_text(current_run=True))
                return bool(said) and said[-1] == "0"

            # The process's set of queued paths is empty again once everything is finished
            # (without the finisher's forgets it would keep all 7).
            wait_until(nothing_known, 15, what="the process to know no queued file")
            assert d.stop() == 0


def test_a_reload_routes_the_files_dropped_after_it_with_the_new_routes(tmp_path: Path) -> None:
    with ScriptedSCP(ae_title="A") as a, ScriptedSCP(ae_title="B") as b:
        dests = [destination("a", a.port, ae_title="A"), destination("b", b.port, ae_title="B")]
        d = Daemon(tmp_path, destinations=dests, routes=[route("ct", ["a"], Modality="CT")])
        with d:
            before = d.drop_files(2, prefix="before", modality="CT")
            d.wait_done(2)
            d.write_config(routes=[route("ct", ["b"], Modality="CT")])
            d.reload()
            after = d.drop_files(3, prefix="after", modality="CT")
            d.wait_done(5)
            assert a.uids() == uids(before)
            assert b.uids() == uids(after)
            assert d.stop() == 0


def test_the_process_counts_reach_the_daemons_metrics(tmp_path: Path) -> None:
    port = free_port()
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            routes=[route("ct", ["pacs"], Modality="CT")],
            extra={"metrics": {"listen": f"127.0.0.1:{port}"}},
        )
        with d:
            d.drop_files(3, modality="CT")
            d.drop("mr.dcm", modality="MR")  # no route
            d.drop_bytes("junk.dcm", b"not DICOM at all")
            bad = os.fsencode(d.incoming) + b"/bad\xff.dcm"
            tmp = os.fsencode(d.incoming) + b"/.bad.tmp"
            Path(os.fsdecode(tmp)).write_bytes(b"x")
            os.rename(tmp, bad)  # a name that is not UTF-8
            d.wait_done(3)
            d.wait_failed(3)

            wanted = [
                "forwarder_ingest_accepted_total 3.0",
                'forwarder_ingest_rejected_total{reason="no_route"} 1.0',
                'forwarder_ingest_rejected_total{reason="not_dicom"} 1.0',
                'forwarder_ingest_rejected_total{reason="bad_name"} 1.0',
            ]
            wait_until(lambda: all(w in scrape(port) for w in wanted), 10, what="the counts")
            assert d.stop() == 0


def test_polling_and_rescans_work_in_the_process(tmp_path: Path) -> None:
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path,
            destinations=[destination("pacs", scp.port)],
            watch={"polling": True, "rescan_interval": "1s"},
        )
        with d:
            assert "(polling), settle 0.20s, full rescan every 1s" in d.log_text(current_run=True)
            dropped = d.drop_files(4)
            d.wait_done(4)
            assert scp.uids() == uids(dropped)
            assert d.stop() == 0


KILLED = re.compile(
    r"watch: the watch-and-ingest process \(PID (\d+)\) "
    r"(?:does not read its messages|has said nothing for \d+ s)"
)


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped (state T)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"

    wait_until(stopped, 10, what=f"process {pid} stopped")


# The daemon's watch of its watch-and-ingest process, its silence limits shortened (10 s
# unhealthy, 30 s killed in production): still a silent child that is unhealthy first, then
# killed, and well above its 1 s heartbeat and the 3 s of LOCKED_SILENCE (the kill of a child
# stopped while it holds the queue's lock stays the earlier one).
QUICK_SILENCE = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    from forwarder.daemon.ingest_process import IngestProcess

    IngestProcess.silent_after = 4.0
    IngestProcess.kill_after = 8.0
"""


def test_a_process_stopped_mid_drain_is_killed_and_what_it_held_is_finished_once(
    tmp_path: Path,
) -> None:
    """The watch-and-ingest process stopped (SIGSTOP, as a hung mount would leave it) while the
    daemon sends what it queued and hands it the ids to finish: the senders are not held up,
    the silent process is reported unhealthy, then killed (its socket full, or silent) and
    started again; its start's sweep finishes every file once, and it takes the files dropped
    while it was stopped."""
    _, env = site_env(tmp_path, QUICK_SILENCE)
    count = 600
    with ScriptedSCP(delay=0.002) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)], env=env)
        backlog, dropped = staged_backlog(tmp_path, count, rows=8, columns=8)
        with d:
            (child,) = children(d.pid)
            os.rename(backlog, d.incoming / "backlog")  # all at once

            wait_until(lambda: queued(d) == count, 60, what="every file queued")
            stop_process(child)  # alive, but says nothing and takes nothing
            meanwhile = d.drop_files(3, prefix="meanwhile")
            # Stopped inside one of its finisher's queue transactions (it happens, during a
            # drain), it holds SQLite's write lock and every claim and ack waits: it is then
            # killed after LOCKED_SILENCE seconds, not kill_after (8 s here), and the sends go on
            # (test_a_process_stopped_inside_a_queue_transaction_... makes that case certain).
            wait_until(lambda: len(scp.received) == count, 25, what="every file sent meanwhile")
            d.wait_log(UNHEALTHY, timeout=30, what="the silent process reported unhealthy")
            d.wait_log(KILLED.pattern, regex=True, timeout=60, what="the stopped process killed")
            d.wait_log(AGAIN, timeout=30, what="the restart")
            d.wait_done(count + 3, timeout=120)
            assert scp.uids() == uids(dropped + meanwhile)
            assert len(scp.received) == count + 3  # none sent twice
            assert not alive(child)
            assert children(d.pid) != [child]
            assert d.stop() == 0


# At a stop the daemon gives its watch-and-ingest process 3 s, not 10 s, to finish what it was
# handed and exit: a stopped one is still killed at that deadline (its kill_after, 30 s, is far).
QUICK_STOP = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    from forwarder.daemon.finish_relay import ChildFinisher

    ChildFinisher.stop.__defaults__ = (3.0,)  # its timeout
"""


def test_sigterm_with_the_process_stopped_exits_promptly(tmp_path: Path) -> None:
    _, env = site_env(tmp_path, QUICK_STOP)
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)], env=env)
        with d:
            (child,) = children(d.pid)
            stop_process(child)
            d.signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0
            assert "did not stop; killing it" in d.log_text(current_run=True)
            assert not alive(child)


SLOW_START = """\
import time
from pathlib import Path
from typing import Any

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    Path(__file__).with_name("child-started").write_text("")
    time.sleep(120)  # a start that hangs (a queue on a hung mount)
"""


def test_sigterm_while_the_process_is_slow_to_start_is_not_held_up(tmp_path: Path) -> None:
    """The daemon waits up to a minute for its watch-and-ingest process to start; a SIGTERM
    meanwhile stops the start-up at once (the process is killed), with exit status 0."""
    site, env = site_env(tmp_path, SLOW_START)
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        d.start(wait_ready=False)
        try:
            wait_until((site / "child-started").exists, 30, what="the child to start")
            (child,) = children(d.pid)
            d.signal(signal.SIGTERM)
            assert d.wait_exit(15) == 0
            log = d.log_text(current_run=True)
            assert "forwarder: stopped during start-up" in log
            assert "forwarder running" not in log
            wait_until(lambda: not alive(child), 10, what="the slow child killed")
        finally:
            d.close()


def queue_counts(db: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(files by state, jobs by status), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        files = dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        jobs = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    finally:
        conn.close()
    return files, jobs


# The watch-and-ingest process restarted 0.2 s after each death, not 1 s then 2 s: what is
# proven is what its start's sweep finishes, however soon it comes.
QUICK_RESTART = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    from forwarder.daemon.ingest_process import IngestProcess

    IngestProcess.restart_delays = (0.2,)
"""


def test_killed_while_finishing_a_drain_every_file_is_finished_once(tmp_path: Path) -> None:
    """The finisher runs in the process. Killed with file ids in hand that it never read
    (stopped while the senders went on), then killed -9 while it moves a second backlog to
    done/: the next process's start finishes them all, each once, the queue consistent."""
    _, env = site_env(tmp_path, QUICK_RESTART)
    total = 300
    with ScriptedSCP(delay=0.005) as scp:
        d = Daemon(tmp_path / "d", destinations=[destination("pacs", scp.port)], env=env)
        staged = Daemon(tmp_path / "staged", destinations=[])  # only to write the files
        first, second = (
            [
                staged.drop(f"{name}/img{i:04d}.dcm", seed=seed + i, rows=16, columns=16)
                for i in range(total)
            ]
            for name, seed in (("first", 0), ("second", 1000))
        )
        with d:
            os.rename(staged.incoming / "first", d.incoming / "first")  # all at once

            def queued() -> int:
                return sum(queue_counts(d.queue)[0].values())

            wait_until(lambda: queued() == total, 60, what="the backlog queued")
            d.wait_done(10)
            (child,) = children(d.pid)
            # Stopped: it neither ingests nor finishes; the senders send what is queued and
            # hand the ids over to a process that will never read them.
            os.kill(child, signal.SIGSTOP)
            try:

                def all_sent() -> bool:
                    jobs = queue_counts(d.queue)[1]
                    return not jobs.get("READY") and not jobs.get("CLAIMED")

                wait_until(all_sent, 60, what="the queued files sent")
                files = queue_counts(d.queue)[0]
                unfinished = files.get("QUEUED", 0) + files.get("FINISHING", 0)
            finally:
                os.kill(child, signal.SIGKILL)
            assert unfinished > 0  # handed over, never moved: only the next start finds them
            d.wait_done(total, timeout=60)
            said = f"finish: {unfinished} file(s) left unfinished before this start finished"
            assert said in d.log_text(current_run=True)
            # Killed -9 in the middle of a drain, its moves and messages wherever they are.
            os.rename(staged.incoming / "second", d.incoming / "second")
            d.wait_done(total + 50, timeout=60)
            (child,) = children(d.pid)
            os.kill(child, signal.SIGKILL)
            d.wait_done(2 * total, timeout=120)
            everything = first + second
            assert d.done_files() == sorted(f.rel_path for f in everything)
            assert d.incoming_files() == []
            assert scp.uids() == uids(everything)
            assert len(scp.received) == 2 * total  # none sent twice
            assert d.stop() == 0
        files, jobs = queue_counts(d.queue)
        assert files == {"FINISHED": 2 * total}
        assert jobs == {"DONE": 2 * total}


def test_stopped_while_the_process_is_down_the_daemon_finishes_what_it_held(
    tmp_path: Path,
) -> None:
    """SIGTERM in the second before a killed process is restarted: the daemon itself finishes
    the files handed to it, so a clean stop leaves no finished file in incoming."""
    total = 100
    with ScriptedSCP(delay=0.01) as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        backlog, dropped = staged_backlog(tmp_path, total, rows=16, columns=16)
        with d:
            os.rename(backlog, d.incoming / "backlog")
            wait_until(
                lambda: sum(queue_counts(d.queue)[0].values()) == total, 60, what="all queued"
            )
            (child,) = children(d.pid)
            os.kill(child, signal.SIGSTOP)  # it finishes nothing from now on
            try:
                wait_until(
                    lambda: not {"READY", "CLAIMED"} & set(queue_counts(d.queue)[1]),
                    60,
                    what="the queued files sent",
                )
            finally:
                os.kill(child, signal.SIGKILL)
            assert len(d.done_files()) < total
            d.wait_log(DIED.pattern, regex=True, what="the death logged")
            assert d.stop() == 0  # within the second before the restart
            log = d.log_text(current_run=True)
            assert AGAIN not in log
            assert "finished here, the process being down" in log
        assert d.done_files() == sorted(f"backlog/{f.rel_path}" for f in dropped)
        assert d.incoming_files() == []
        assert queue_counts(d.queue) == ({"FINISHED": total}, {"DONE": total})
        assert len(scp.received) == total


FINISHER_DIES = """\
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    marker = Path(__file__).with_name("finisher-died")
    if not marker.exists():  # the first process only: its restart finishes normally
        marker.write_text("")
        from forwarder.daemon.finisher import Finisher

        def finish_ids(self, file_ids):
            raise SystemExit("the finisher thread ends (an error its loop does not catch)")

        Finisher.finish_ids = finish_ids
"""


def test_the_finisher_thread_dying_ends_the_process_and_its_restart_finishes_every_file(
    tmp_path: Path,
) -> None:
    """The watch-and-ingest process's finisher thread dies (an error its loop does not catch,
    injected in the first process only): the process sees it at its next sweep and exits, the
    daemon logs the death and starts another, whose start finishes every file it was handed.
    Meanwhile the files are sent once each, and they stay in incoming, queued."""
    _, env = site_env(tmp_path, FINISHER_DIES)
    total = 40
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        with d:
            (first,) = children(d.pid)
            dropped = d.drop_files(total)
            d.wait_log(
                "finish: the finisher thread died; ending the watch-and-ingest process",
                timeout=30,
                what="the dead finisher seen",
            )
            died = rf"watch: the watch-and-ingest process \(PID {first}\) died \(exit status 1\)"
            d.wait_log(died, regex=True, timeout=30, what="the death logged")
            d.wait_log(AGAIN, timeout=30, what="the restart")
            d.wait_done(total, timeout=60)
            assert not alive(first)
            assert d.done_files() == sorted(f.rel_path for f in dropped)
            assert d.incoming_files() == []
            assert scp.uids() == uids(dropped)
            assert len(scp.received) == total  # none sent twice
            assert d.stop() == 0
        assert queue_counts(d.queue) == ({"FINISHED": total}, {"DONE": total})


STOPS_IN_A_TRANSACTION = """\
import os
import signal
import threading
from pathlib import Path

if b"forwarder.daemon.{module}" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.queue.store import Store

    here = Path(__file__).parent
    begin = Store._begin_immediate

    def _begin_immediate(self, conn):
        begin(self, conn)
        if (here / "arm").exists() and not (here / "stopped").exists():
            # renamed into place: the test reads the PID as soon as the name exists
            (here / f"stopped.{{threading.get_ident()}}").write_text(str(os.getpid()))
            os.replace(here / f"stopped.{{threading.get_ident()}}", here / "stopped")
            # To this thread: it stops the whole process before its next step. A kill() of
            # the process may be taken by another thread, this one going on meanwhile (seen:
            # the transaction committed, the stop coming a moment later).
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    Store._begin_immediate = _begin_immediate
"""

LOCK_KILL = "for the queue's write lock (stopped or hung, perhaps inside"


def test_a_process_stopped_inside_a_queue_transaction_is_killed_within_seconds(
    tmp_path: Path,
) -> None:
    """The watch-and-ingest process stops itself (SIGSTOP) inside one of its queue
    transactions while the daemon drains a backlog: every claim and ack of the daemon waits for
    its lock, so it is killed after a few seconds of silence (not the 30 s of a silent process
    that holds nothing), its transaction rolled back; the sends go on, and its restart finishes
    every file, once."""
    site, env = site_env(tmp_path, STOPS_IN_A_TRANSACTION.format(module="ingest_child"))
    count = 300
    with ScriptedSCP(delay=0.005) as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        backlog, dropped = staged_backlog(tmp_path, count, rows=8, columns=8)
        with d:
            (first,) = children(d.pid)
            os.rename(backlog, d.incoming / "backlog")

            wait_until(lambda: queued(d) == count, 60, what="every file queued")
            (site / "arm").write_text("")  # its next transaction (a finish) stops it
            wait_until((site / "stopped").exists, 30, what="the process stopped in a transaction")
            assert int((site / "stopped").read_text()) == first
            d.wait_log(KILLED.pattern, regex=True, timeout=20, what="the stopped process killed")
            assert LOCK_KILL in d.log_text(current_run=True)
            wait_until(lambda: len(scp.received) == count, 20, what="every file sent")
            d.wait_log(AGAIN, timeout=30, what="the restart")
            d.wait_done(count, timeout=60)
            assert not alive(first)
            assert scp.uids() == uids(dropped)
            assert len(scp.received) == count  # none sent twice
            assert d.stop() == 0
        assert queue_counts(d.queue) == ({"FINISHED": count}, {"DONE": count})


RECORDING_FAILS = """\
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.errors import QueueError
    from forwarder.queue.finishing import Finishing

    full = Path(__file__).with_name("full")
    complete = Finishing.complete_finish_many

    def complete_finish_many(self, file_ids, *, now=None):
        if file_ids and full.exists():
            (full.parent / "refused").write_text("")
            raise QueueError("recording finished files: database or disk is full")
        complete(self, file_ids, now=now)

    Finishing.complete_finish_many = complete_finish_many
"""


def test_a_clean_stop_records_the_moves_whose_record_failed(tmp_path: Path) -> None:
    """The files reach done/, but recording it fails (the queue's disk full, injected in the
    watch-and-ingest process): their rows stay FINISHING. Space comes back and the daemon is
    stopped before the next periodic sweep: the process's exit retries them, so a clean stop
    leaves the queue settled, each file FINISHED once, not waiting for the next start."""
    site, env = site_env(tmp_path, RECORDING_FAILS)
    (site / "full").write_text("")
    total = 5
    with ScriptedSCP() as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env=env,
        )
        with d:
            dropped = d.drop_files(total)
            d.wait_done(total, timeout=30)
            wait_until((site / "refused").exists, 15, what="the record refused")
            d.wait_log("database or disk is full", timeout=15)
            (site / "full").unlink()
            assert d.stop() == 0  # well within the 5 s between two sweeps
        assert d.done_files() == sorted(f.rel_path for f in dropped)
        assert scp.uids() == uids(dropped)
        assert queue_counts(d.queue) == ({"FINISHED": total}, {"DONE": total})


# The watch-and-ingest process held in the middle of a batch (as a big batch, a loaded machine
# or a stopped process holds it) until the test removes ``hold``: the batch keeps the routes it
# was read for, so what it queues after the reload was routed with the old ones.
HOLD_BATCH = """\
import time
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    from forwarder.daemon.ingest import Ingest

    _site = Path(__file__).parent
    _ingest = Ingest._ingest

    def _held(self, files, *args):
        if any(Path(f.path).name.startswith("held") for f in files):
            (_site / "holding").write_text("")
            while (_site / "hold").exists():
                time.sleep(0.02)
        return _ingest(self, files, *args)

    Ingest._ingest = _held
"""


def test_a_file_the_process_queues_with_old_routes_long_after_a_reload_goes_by_the_new_ones(
    tmp_path: Path,
) -> None:
    """A reload removes "gone" from the routes while the watch-and-ingest process is held in a
    batch it began with the old routes; it queues that batch more than 2 s later (once a
    fixed window after the reload): the file must still not go to "gone" (the new routes no
    longer send it there), however late the process took the new routes."""
    site, env = site_env(tmp_path, HOLD_BATCH)
    (site / "hold").write_text("")
    with ScriptedSCP() as keep, ScriptedSCP() as gone:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("keep", keep.port), destination("gone", gone.port)],
            routes=[{"name": "both", "to": ["keep", "gone"]}],
            env=env,
        )
        with d:
            before = d.drop("before.dcm", seed=1)
            wait_until(
                lambda: before.sop_instance_uid in keep.uids() & gone.uids(), 30, what="before"
            )
            held = d.drop("held.dcm", seed=2)
            wait_until((site / "holding").exists, 30, what="the batch held")
            d.write_config(routes=[{"name": "keep", "to": ["keep"]}])
            d.reload()
            # Longer than the 2 s the daemon once gave its processes to take new routes: the
            # time that passes is what this test is about, not a wait for something to happen.
            late = time.monotonic() + 3.0
            wait_until(lambda: time.monotonic() >= late, 10, what="3 s after the reload")
            (site / "hold").unlink()
            assert d.wait_failed(1) == ["held.dcm"]
            results = {r["destination"]: r for r in d.error_json("held.dcm")["destinations"]}
            assert results["keep"]["outcome"] == "stored"
            assert "no longer send it to gone" in results["gone"]["error"]
            assert held.sop_instance_uid in keep.uids()
            assert held.sop_instance_uid not in gone.uids()
            d.wait_log("reload: every process routes with the new routes", timeout=10)
            after = d.drop("after.dcm", seed=3)
            wait_until(lambda: after.sop_instance_uid in keep.uids(), 30, what="after at keep")
            d.wait_done(2)
            assert gone.uids() == {before.sop_instance_uid}
            assert d.stop() == 0


def test_a_process_restarted_before_it_took_new_routes_starts_with_them(
    tmp_path: Path,
) -> None:
    """The watch-and-ingest process held in a batch with the old routes is killed after the
    reload: the one started in its place routes with the new routes from its start, so the
    daemon stops routing every job again without waiting for the dead one, and the file it
    queues goes by the new routes."""
    site, env = site_env(tmp_path, HOLD_BATCH)
    (site / "hold").write_text("")
    with ScriptedSCP() as keep, ScriptedSCP() as gone:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("keep", keep.port), destination("gone", gone.port)],
            routes=[{"name": "both", "to": ["keep", "gone"]}],
            env=env,
        )
        with d:
            held = d.drop("held.dcm", seed=2)
            wait_until((site / "holding").exists, 30, what="the batch held")
            (child,) = children(d.pid)
            d.write_config(routes=[{"name": "keep", "to": ["keep"]}])
            d.reload()
            assert "every process routes with the new routes" not in d.log_text(current_run=True)
            (site / "holding").unlink()
            os.kill(child, signal.SIGKILL)
            d.wait_log(AGAIN, timeout=30, what="the restart")
            # Its successor holds the file too (hold is still there), with the new routes.
            wait_until((site / "holding").exists, 30, what="the batch held again")
            d.wait_log("reload: every process routes with the new routes", timeout=10)
            (site / "hold").unlink()
            d.wait_done(1)
            assert keep.uids() == {held.sop_instance_uid}
            assert gone.uids() == set()
            assert d.stop() == 0
