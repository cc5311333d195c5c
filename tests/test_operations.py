"""What an administrator meets running the daemon: thread dumps of a hung daemon, and spool
folders it cannot write refused at start (issue 17, items 3 and 5)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from conftest import FORWARDER, wait_until
from daemon import Daemon, destination, subprocess_env
from peers import ScriptedSCP


def test_sigusr1_dumps_every_thread_and_the_daemon_goes_on(tmp_path: Path) -> None:
    with (
        ScriptedSCP() as scp,
        Daemon(tmp_path, destinations=[destination("pacs", scp.port)]) as d,
    ):
        d.signal(signal.SIGUSR1)
        d.wait_log("most recent call first", what="a thread dump after SIGUSR1")
        # The daemon's (the workers') and its watch-and-ingest process's (the watcher's),
        # which the daemon passes SIGUSR1 on to.
        wait_until(
            lambda: "watcher.py" in d.log_text() and "worker.py" in d.log_text(),
            10,
            what="the watcher's and the workers' stacks in the dump",
        )
        d.drop_files(2)
        d.wait_done(2)
        assert d.running()


def test_a_watchdog_abort_leaves_a_thread_dump(tmp_path: Path) -> None:
    """systemd's watchdog kills a hung daemon with SIGABRT: the journal must show where every
    thread was, or nobody can tell why it hung."""
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path, destinations=[destination("pacs", scp.port)])
        with d:
            d.signal(signal.SIGABRT)
            assert d.wait_exit(20) == -signal.SIGABRT
        log = d.log_text()
        assert "Fatal Python error: Aborted" in log
        # The daemon's threads: the senders, and the one serving the watch-and-ingest process
        # (whose watcher threads are its own; the watchdog is fed by the daemon's main loop).
        assert "worker.py" in log and "child_process.py" in log


def _start_with_read_only(d: Daemon, read_only: Path) -> tuple[int, str]:
    """``forwarder run`` in a private mount namespace where ``read_only`` is a read-only bind
    mount: a read-only filesystem, or a folder outside the unit's ReadWritePaths=."""
    script = (
        f"mount --bind '{read_only}' '{read_only}' && "
        f"mount -o remount,bind,ro '{read_only}' && "
        f"exec '{FORWARDER}' run -c '{d.config_path}'"
    )
    proc = subprocess.run(
        ["/usr/bin/unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr


def test_a_read_only_done_folder_is_refused_at_start(tmp_path: Path) -> None:
    d = Daemon(tmp_path, destinations=[destination("pacs", 9)])
    code, err = _start_with_read_only(d, d.done)
    assert code == 78, err
    assert f"the done folder {d.done} is not writable" in err
    assert "Read-only file system" in err
    assert f"ReadWritePaths={d.done}" in err
    assert "Traceback" not in err


def test_a_read_only_failed_folder_is_refused_at_start(tmp_path: Path) -> None:
    d = Daemon(tmp_path, destinations=[destination("pacs", 9)])
    code, err = _start_with_read_only(d, d.failed)
    assert code == 78, err
    assert f"the failed folder {d.failed} is not writable" in err


def test_a_read_only_queue_folder_is_refused_at_start(tmp_path: Path) -> None:
    queue_dir = tmp_path / "state"
    queue_dir.mkdir()
    d = Daemon(
        tmp_path,
        destinations=[destination("pacs", 9)],
        extra={"queue": str(queue_dir / "queue.sqlite")},
    )
    code, err = _start_with_read_only(d, queue_dir)
    assert code == 78, err
    assert f"the queue folder {queue_dir} is not writable" in err
    assert "Traceback" not in err
