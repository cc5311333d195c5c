"""The listener's receiving process (``listen.separate_process``, the default on Linux).

The engine runs in a child process; the daemon queues what it places. What must hold: a child
killed mid-push is restarted with the port kept open and nothing answered lost; a daemon killed
takes its child with it (nothing left holding the port); SIGTERM to every process of the
daemon (what systemd does) drains as SIGTERM to the daemon alone does; a reload that routes on
an attribute the child did not collect routes received objects by it; ``separate_process:
false`` receives in the daemon's own process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
from conftest import wait_until
from daemon import Daemon, destination, route, uids
from peers import ScriptedSCP, StoreSCP, free_port, storescp
from pki import make_pki
from pydicom.uid import generate_uid
from test_ingest_process import (
    LOCK_KILL,
    STOPS_IN_A_TRANSACTION,
    children,
    queued,
    site_env,
    staged_backlog,
)
from test_listen import (
    DYING_GATEWAY_TIMEOUT,
    GATEWAY,
    STORESCU,
    assert_same_datasets,
    associate,
    copies,
    generated,
    held,
    joined,
    listen_daemon,
    listen_port,
    metric_value,
    pacs,  # noqa: F401 - the fixture
    pacs_destination,
    push,
    pushing,
    staged,
    uid_of,
)

_CHILD = re.compile(r"receiving(?: again,)? in process (\d+)")


def child_pid(d: Daemon, nth: int = -1) -> int:
    """The receiving process's PID as the daemon's log names it (the ``nth`` start)."""
    found = [int(m) for m in _CHILD.findall(d.log_text(current_run=True))]
    assert found, d.log_tail()
    return found[nth]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_receiving_process_killed_mid_push_is_restarted_and_loses_nothing(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    files = generated(tmp_path / "m", 40)
    answered: list[str] = []
    dozen, killed = threading.Event(), threading.Event()
    metrics = free_port()
    with listen_daemon(
        tmp_path / "gw",
        [pacs_destination(pacs)],
        extra={"metrics": {"listen": f"127.0.0.1:{metrics}"}},
    ) as d:
        port = listen_port(d)
        first = child_pid(d)
        assert metric_value(metrics, "forwarder_listen_process_restarts_total") == 0
        sender = pushing(port, files, answered, dozen, killed, dimse_timeout=DYING_GATEWAY_TIMEOUT)
        assert dozen.wait(30), "a dozen answered"
        os.kill(first, signal.SIGKILL)
        killed.set()
        sender.join(30)
        assert not sender.is_alive()
        d.wait_log("listen: the receiving process (PID", timeout=10)
        wait_until(lambda: child_pid(d) != first, 30, what="a new receiving process")
        assert d.running() and alive(child_pid(d))
        assert metric_value(metrics, "forwarder_listen_process_restarts_total") == 1
        # the modality sends again what was not answered; all of it arrives, once
        missing = [p for p in files if uid_of(p) not in answered]
        assert missing, "the kill came mid-push"
        assert push(port, missing, calling="CT01") == [(0, "")] * len(missing)
        wait_until(lambda: len(held(pacs)) == len(files), 60, what="every object at the PACS")
        assert_same_datasets(pacs, files)
        wait_until(lambda: staged(d) == [], 15, what="nothing left staged")
        status = d.status_json()
        assert status["destinations"]["pacs"]["done"] == len(files), status
        assert d.stop() == 0


def test_killing_the_daemon_kills_its_receiving_process(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    files = copies(tmp_path / "m", "CT_small.dcm", 2)
    d = listen_daemon(tmp_path / "gw", [pacs_destination(pacs)])
    with d:
        child = child_pid(d)
        assert push(listen_port(d), files[:1]) == [(0, "")]
        d.kill()
        wait_until(lambda: not alive(child), 10, what="the receiving process gone with it")
    with d:  # nothing of the killed daemon holds the port
        assert alive(child_pid(d))
        assert push(listen_port(d), files[1:]) == [(0, "")]
        wait_until(lambda: len(held(pacs)) == 2, 30, what="both objects")
        assert_same_datasets(pacs, files)
        assert d.stop() == 0


def test_sigterm_to_every_process_of_the_daemon_drains_as_systemd_stops_it(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """systemd's default KillMode sends SIGTERM to the daemon and its receiving process at
    once: the child must not die from it, the daemon drains the open association."""
    files = copies(tmp_path / "m", "CT_small.dcm", 3)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)]) as d:
        child = child_pid(d)
        assoc = associate(listen_port(d), files, calling="CT01")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(os.fspath(files[0])).Status) == 0
            os.kill(child, signal.SIGTERM)
            d.signal(signal.SIGTERM)
            d.wait_log("listen: no longer accepting", timeout=10)
            assert int(assoc.send_c_store(os.fspath(files[1])).Status) == 0
        finally:
            if assoc.is_established:
                assoc.release()
            joined(assoc)
        assert d.wait_exit(20) == 0
        wait_until(lambda: not alive(child), 10, what="the receiving process ended")
    assert "died" not in d.log_text()
    with d:
        wait_until(lambda: len(held(pacs)) == 2, 30, what="both answered objects")
        assert_same_datasets(pacs, files[:2])
        assert d.stop() == 0


def _stations(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, station in enumerate(names):
        ds = pydicom.dcmread(copies(folder / "src", "CT_small.dcm", 1)[0])
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StationName = station
        path = folder / f"{station}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def test_a_reload_routing_on_a_new_attribute_routes_received_objects_by_it(
    tmp_path: Path,
) -> None:
    """The receiving process collects what the routes read; after a reload that routes on
    StationName (read by no route before), objects route by it at once."""
    with storescp(tmp_path / "a", ae_title="A") as a, storescp(tmp_path / "b", ae_title="B") as b:
        d = listen_daemon(
            tmp_path / "gw",
            [destination("a", a.port, ae_title="A"), destination("b", b.port, ae_title="B")],
            routes=[route("all", ["a"])],
        )
        first = _stations(tmp_path / "m1", ["CTROOM1", "CTROOM2"])
        second = _stations(tmp_path / "m2", ["CTROOM1", "CTROOM2"])
        with d:
            assert push(listen_port(d), first) == [(0, "")] * 2
            wait_until(lambda: len(held(a)) == 2, 30, what="both at A")
            d.write_config(
                routes=[route("room2", ["b"], StationName="CTROOM2"), route("all", ["a"])]
            )
            d.reload()
            assert push(listen_port(d), second) == [(0, "")] * 2
            # every matching route applies: all four at A, CTROOM2's second at B too
            wait_until(lambda: len(held(a)) == 4 and len(held(b)) == 1, 30, what="routed")
            assert set(held(b)) == {uid_of(second[1])}
            assert d.stop() == 0


def test_separate_process_false_receives_in_the_daemons_process(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    files = copies(tmp_path / "m", "MR_small.dcm", 3)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], separate_process=False) as d:
        assert "receiving in the daemon's process" in d.log_text()
        assert push(listen_port(d), files) == [(0, "")] * 3
        wait_until(lambda: len(held(pacs)) == 3, 30, what="all three")
        assert_same_datasets(pacs, files)
        assert d.stop() == 0


def test_a_restart_that_cannot_load_its_tls_key_says_why_and_is_retried(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The receiving process loads the TLS material at each start: a key gone when it is
    restarted (a rotation half done) fails that start; the reason is logged, the restarts back
    off, and once the key is back the listener serves TLS again, without a daemon restart."""
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "server.key"
    shutil.copyfile(pki.server_key, key)
    os.chmod(key, 0o600)
    files = copies(tmp_path / "m", "CT_small.dcm", 1)
    tls = {"cert": str(pki.server_cert), "key": str(key), "ca": str(pki.ca_cert)}
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], tls=tls) as d:
        first = child_pid(d)
        away = key.rename(tmp_path / "server.key.away")
        os.kill(first, signal.SIGKILL)
        d.wait_log("could not start (exit status 1: ", timeout=30)
        failure = next(
            line for line in d.log_text().splitlines() if "could not start (exit" in line
        )
        assert str(key) in failure, failure
        away.rename(key)
        wait_until(lambda: child_pid(d) != first, 30, what="a receiving process again")
        secure = subprocess.run(
            [STORESCU, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert),
             "-aet", "CT01", "-aec", GATEWAY, "127.0.0.1", str(listen_port(d)), str(files[0])],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert secure.returncode == 0, secure.stdout + secure.stderr
        wait_until(lambda: len(held(pacs)) == 1, 30, what="the TLS push at the PACS")
        assert_same_datasets(pacs, files)
        assert d.running() and d.stop() == 0


# The daemon gives its receiving process 3 s, not 10 s, to answer stop_accepting (which it
# does at once when it runs): a stopped one is still killed for not answering, long before
# its silence (kill_after, 30 s) would have it killed.
QUICK_STOP_CALL = """\
from pathlib import Path

if b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():  # not a child
    import forwarder.daemon.listen_process

    forwarder.daemon.listen_process._CALL_TIMEOUT = 3.0
"""


def test_sigterm_with_the_receiving_process_stopped_is_prompt_and_starts_nothing(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The receiving process stopped (SIGSTOP: hung) when SIGTERM comes: the stop does not wait
    out its silence, kills it, and starts no other one while the daemon stops."""
    _, env = site_env(tmp_path, QUICK_STOP_CALL)
    d = listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], env=env)
    with d:
        child = child_pid(d)
        os.kill(child, signal.SIGSTOP)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(25) == 0
        log = d.log_text(current_run=True)
        assert f"(PID {child}) did not answer at the stop" in log
        assert "receiving again" not in log
        assert not alive(child)


FAILS_AGAIN = """\
import os
from pathlib import Path

if b"forwarder.daemon.ingest_child" in Path("/proc/self/cmdline").read_bytes():
    marker = Path(__file__).with_name("ingest-started")
    if marker.exists():
        os._exit(3)  # every restart fails at once (say, a queue it cannot open any more)
    marker.write_text("")
elif b"forwarder.daemon." not in Path("/proc/self/cmdline").read_bytes():
    # The daemon: it takes the finishing over after 10 s without that process, not 30 s
    # (still long after the restarts began failing and the pushed files were delivered).
    import forwarder.daemon.finish_relay

    forwarder.daemon.finish_relay._TAKE_OVER_AFTER = 10.0
"""


def test_while_the_watch_process_keeps_failing_to_start_the_daemon_finishes_received_files(
    tmp_path: Path,
    pacs: StoreSCP,  # noqa: F811
) -> None:
    """The watch-and-ingest process (which finishes files) is killed and every restart fails:
    what the listener receives meanwhile is still sent, and after a while without that process
    (30 s; 10 s here) the daemon moves the delivered files out of incoming itself, and says
    so."""
    _, env = site_env(tmp_path, FAILS_AGAIN)
    files = generated(tmp_path / "m", 10)
    with listen_daemon(tmp_path / "gw", [pacs_destination(pacs)], env=env) as d:
        (first,) = children(d.pid)
        os.kill(first, signal.SIGKILL)
        d.wait_log(
            rf"watch: the watch-and-ingest process \(PID {first}\) died \(signal 9\)",
            regex=True,
            timeout=15,
        )
        d.wait_log(
            r"watch: the watch-and-ingest process \(PID \d+\) died \(exit status 3\)",
            regex=True,
            timeout=15,
            what="a restart failing",
        )
        assert push(listen_port(d), files, calling="CT01") == [(0, "")] * len(files)
        wait_until(lambda: len(held(pacs)) == len(files), 30, what="every object at the PACS")
        assert_same_datasets(pacs, files)
        assert len(staged(d)) == len(files)  # delivered, not finished yet
        d.wait_log(
            "finish: no watch-and-ingest process has finished files for",
            timeout=60,
            what="the daemon taking the finishing over",
        )
        wait_until(lambda: staged(d) == [], 20, what="the received files finished by the daemon")
        assert d.status_json()["destinations"]["pacs"]["done"] == len(files)
        assert len(d.done_files()) == len(files)
        assert d.failed_files() == []
        assert d.stop() == 0


def test_the_receiving_process_stopped_inside_a_queue_transaction_is_killed_within_seconds(
    tmp_path: Path,
) -> None:
    """The receiving process stops itself (SIGSTOP) inside its queue transaction for an object
    while the daemon drains a backlog: the daemon's claims and acks wait for that lock, so the
    silent process is killed after a few seconds (not 30), the drain goes on, the modality's
    unanswered object is sent again and arrives once."""
    site, env = site_env(tmp_path, STOPS_IN_A_TRANSACTION.format(module="listen_child"))
    count = 600
    files = generated(tmp_path / "m", 3)
    with ScriptedSCP(delay=0.005) as scp:
        backlog, dropped = staged_backlog(tmp_path, count, rows=8, columns=8)
        with listen_daemon(
            tmp_path / "gw",
            [destination("pacs", scp.port)],
            env=env,
        ) as d:
            first = child_pid(d)
            os.rename(backlog, d.incoming / "backlog")

            wait_until(lambda: queued(d) == count, 60, what="every file queued")
            (site / "arm").write_text("")  # the object's queue transaction stops it
            results: list[list[tuple[int, str]]] = []
            modality = threading.Thread(
                target=lambda: results.append(
                    push(listen_port(d), files[:1], dimse_timeout=DYING_GATEWAY_TIMEOUT)
                ),
                daemon=True,
            )
            modality.start()
            wait_until((site / "stopped").exists, 30, what="the process stopped in a transaction")
            assert int((site / "stopped").read_text()) == first
            d.wait_log(
                rf"listen: the receiving process \(PID {first}\) has said nothing",
                regex=True,
                timeout=20,
                what="the stopped process killed",
            )
            assert LOCK_KILL in d.log_text(current_run=True)
            wait_until(lambda: len(scp.received) >= count, 20, what="the backlog sent meanwhile")
            modality.join(60)
            assert not modality.is_alive()
            assert results and results[0] != [(0, "")]  # never answered Success
            wait_until(lambda: child_pid(d) != first, 30, what="a new receiving process")
            assert push(listen_port(d), files[1:], calling="CT01") == [(0, "")] * 2

            def resent() -> bool:  # the recovered copy may be being finished: "send again"
                return push(listen_port(d), files[:1], calling="CT01") == [(0, "")]

            wait_until(resent, 30, interval=0.5, what="the unanswered object sent again")
            d.wait_done(count + len(files), timeout=60)
            assert scp.uids() == uids(dropped) | {uid_of(f) for f in files}
            seen = Counter(r.sop_instance_uid for r in scp.received)
            assert {seen[u] for u in uids(dropped)} == {1}  # the backlog: each once
            assert {seen[uid_of(f)] for f in files[1:]} == {1}
            # The stopped process held the first object durably (fsynced, not answered): its
            # restart queues it, and the modality's resend is queued too; twice is harmless.
            assert seen[uid_of(files[0])] in (1, 2)
            assert d.stop() == 0


def held_at(process: str, module: str, cls: str) -> str:
    """A ``sitecustomize.py`` holding ``cls.queue`` of ``module`` in the process whose command
    line holds ``process`` while the file ``hold`` beside it exists (``holding`` says it is)."""
    return f"""\
import time
from pathlib import Path

if {process!r}.encode() in Path("/proc/self/cmdline").read_bytes().split(b"\\0"):
    from {module} import {cls}

    _site = Path(__file__).parent
    _queue = {cls}.queue

    def _held(self, *args, **kwargs):
        if (_site / "hold").exists():
            (_site / "holding").write_text("")
            while (_site / "hold").exists():
                time.sleep(0.02)
        return _queue(self, *args, **kwargs)

    {cls}.queue = _held
"""


@contextlib.contextmanager
def pushed_while_held(d: Daemon, site: Path, files: list[Path]) -> Iterator[None]:
    """Push ``files`` into ``d``'s listener; the body runs while the object is held (see
    :func:`held_at`); then it is let go and the modality must have been told Success."""
    answers: list[list[tuple[int, str]]] = []
    modality = threading.Thread(
        target=lambda: answers.append(push(listen_port(d), files, dimse_timeout=60))
    )
    modality.start()
    try:
        wait_until((site / "holding").exists, 30, what="the object held")
        yield
    finally:
        (site / "hold").unlink()
        modality.join(90)
    assert answers == [[(0, "")]]


# The receiving process held between reading the routes for an object and queueing it (as a
# loaded machine or a stopped process holds it): the object is queued with the routes read
# before the reload.
HOLD_QUEUE = held_at(
    "forwarder.daemon.listen_child", "forwarder.daemon.listen_queue", "DirectQueue"
)


def test_an_object_queued_with_old_routes_long_after_a_reload_goes_by_the_new_ones(
    tmp_path: Path,
) -> None:
    """A reload removes "gone" from the routes while the receiving process is held queueing an
    object with the old routes; it queues it more than 2 s later: the object must not go to
    "gone", however late the receiving process took the new routes."""
    site, env = site_env(tmp_path, HOLD_QUEUE)
    (site / "hold").write_text("")
    files = generated(tmp_path / "m", 1)
    with ScriptedSCP() as keep, ScriptedSCP() as gone:
        d = listen_daemon(
            tmp_path / "gw",
            [destination("keep", keep.port), destination("gone", gone.port)],
            routes=[route("both", ["keep", "gone"])],
            env=env,
        )
        with d:
            with pushed_while_held(d, site, files):
                d.write_config(routes=[route("keep", ["keep"])])
                d.reload()
                # Longer than the 2 s the daemon once gave its processes to take new routes:
                # the time that passes is what this test is about.
                late = time.monotonic() + 3.0
                wait_until(lambda: time.monotonic() >= late, 10, what="3 s after the reload")
            uid = uid_of(files[0])
            wait_until(lambda: uid in keep.uids(), 30, what="the object at keep")
            wait_until(lambda: len(d.failed_files()) == 1, 30, what="the object in failed/")
            doc = d.error_json(d.failed_files()[0])
            results = {r["destination"]: r for r in doc["destinations"]}
            assert "no longer send it to gone" in results["gone"]["error"]
            assert gone.uids() == set()
            d.wait_log("reload: every process routes with the new routes", timeout=10)
            assert d.stop() == 0


# The daemon's own listener (``separate_process: false``) held between collecting an object's
# header values for the routes then in force and queueing it, while ``hold`` exists.
HOLD_IN_DAEMON = held_at("run", "forwarder.daemon.listen_sink", "ListenSink")


def test_an_object_received_in_the_daemon_across_a_reload_is_routed_on_the_new_routes_values(
    tmp_path: Path,
) -> None:
    """The old routes read no Modality; the new ones send CT to "keep". An object whose values
    were collected before the reload and queued after it is routed by the new routes on values
    that hold what they look at (read again from the file), not on the old routes' values
    (which would match no route: failed/)."""
    site, env = site_env(tmp_path, HOLD_IN_DAEMON)
    (site / "hold").write_text("")
    files = generated(tmp_path / "m", 1)
    assert pydicom.dcmread(files[0]).Modality == "CT"
    with ScriptedSCP() as keep:
        d = listen_daemon(
            tmp_path / "gw",
            [destination("keep", keep.port)],
            routes=[route("all", ["keep"])],
            env=env,
            separate_process=False,
        )
        with d:
            with pushed_while_held(d, site, files):
                d.write_config(routes=[route("ct", ["keep"], Modality="CT")])
                d.reload()
                d.wait_log("reload: every process routes with the new routes", timeout=10)
            wait_until(lambda: uid_of(files[0]) in keep.uids(), 30, what="the object at keep")
            assert d.failed_files() == []
            assert d.stop() == 0
