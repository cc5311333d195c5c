"""Crashes: SIGKILL the daemon at each named point and at random moments, restart it, and check
that every file was delivered at least once, ended in done/ (or failed/ with its reason), none is
orphaned, and the queue is consistent (nothing CLAIMED forever, no job without a file).

The named points are ``forwarder.crashpoints`` hooks (``FORWARDER_CRASH_AT=NAME[:N]``): the
daemon kills itself with SIGKILL at exactly that moment.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from invariants import clone_files, queue_problems, settled_problems, snapshot
from peers import Received, ScriptedSCP

pytestmark = pytest.mark.faults

SMALL = {"rows": 8, "columns": 8}
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def all_names(d: Daemon) -> set[str]:
    """Every data file anywhere (incoming, done, failed): nothing may vanish."""
    names = {Path(p).name for p in d.incoming_files() if not Path(p).name.startswith(".")}
    return names | {Path(p).name for p in d.done_files() + d.failed_files()}


@pytest.mark.parametrize(
    "point",
    [
        "ingest-before-commit",
        "mid-store",
        "after-response",
        "after-response:4",
        "finish-before-move",
        "finish-after-move",
        "finish-after-move:3",
    ],
)
def test_sigkill_at_a_named_point_loses_nothing(point: str, tmp_path: Path) -> None:
    fail_uids: set[str] = set()

    def status(rec: Received) -> int:
        return 0xC000 if rec.sop_instance_uid in fail_uids else 0x0000

    # Explicit VR first: pynetdicom's default order picks Implicit VR, and the sender would
    # then re-encode every file through pydicom instead of streaming it (no "mid-store" point).
    with ScriptedSCP(status=status, transfer_syntaxes=[EXPLICIT, IMPLICIT]) as scp:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", scp.port)],
            env={"FORWARDER_CRASH_AT": point},
        )
        try:
            ok = d.drop_files(6, **SMALL)
            bad = d.drop_files(2, prefix="bad", **SMALL)
            fail_uids.update(f.sop_instance_uid for f in bad)
            if point.startswith("mid-store"):
                # over 1 MB: sent in several batches, so there is a "middle"
                ok.append(d.drop("big.dcm", rows=800, columns=800))
            names = {Path(f.rel_path).name for f in ok + bad}
            d.start(wait_ready=False)
            assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
            # right after the crash: consistent, and every file still somewhere
            assert queue_problems(d.queue) == []
            assert all_names(d) == names
            del d.env["FORWARDER_CRASH_AT"]
            d.start()
            d.wait_incoming_empty(timeout=30)
            assert d.stop() == 0
        finally:
            d.close()
    assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=len(ok)) == []
    assert {Path(p).name for p in d.done_files()} == {Path(f.rel_path).name for f in ok}
    assert {Path(p).name for p in d.failed_files()} == {Path(f.rel_path).name for f in bad}
    for f in bad:
        doc = d.error_json(f.rel_path)
        assert doc["destinations"][0]["status"] == "0xC000", doc
    assert scp.uids() == {f.sop_instance_uid for f in ok}, "every file delivered at least once"
    if point.startswith("after-response"):
        sent = [r.sop_instance_uid for r in scp.received]
        assert len(sent) > len(set(sent)), (
            "the file acked by the peer but not by the queue is sent again"
        )
    d.assert_no_phi()


def test_sigkill_while_applying_a_reload(tmp_path: Path) -> None:
    """Killed in the middle of applying a new config (a destination added): after restart the
    new config is in force, files queued before went where the old one said, nothing lost."""
    with ScriptedSCP() as a, ScriptedSCP() as b:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("a", a.port)],
            env={"FORWARDER_CRASH_AT": "reload"},
        )
        try:
            d.start()
            first = d.drop_files(3, prefix="first", **SMALL)
            d.wait_done(3)
            d.write_config(destinations=[destination("a", a.port), destination("b", b.port)])
            d.signal(signal.SIGHUP)
            assert d.wait_exit(timeout=30) == -signal.SIGKILL, d.log_tail()
            assert queue_problems(d.queue) == []
            second = d.drop_files(3, prefix="second", **SMALL)
            del d.env["FORWARDER_CRASH_AT"]
            d.start()
            d.wait_done(6)
            d.wait_incoming_empty()
            assert d.stop() == 0
        finally:
            d.close()
    assert settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=6) == []
    assert a.uids() == {f.sop_instance_uid for f in first + second}
    assert b.uids() == {f.sop_instance_uid for f in second}


def test_repeated_sigkill_at_random_moments_under_a_500_file_backlog(tmp_path: Path) -> None:
    """500 files, two destinations with two associations each, the daemon SIGKILLed six times at
    random moments (during the first ingest, then after random numbers of deliveries). After
    each crash the queue is consistent and every file is somewhere; in the end every file was
    delivered to both destinations and sits in done/."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    total = 500
    with ScriptedSCP() as a, ScriptedSCP() as b:
        d = Daemon(
            tmp_path / "d",
            destinations=[
                destination("a", a.port, associations=2),
                destination("b", b.port, associations=2),
            ],
        )
        uids = set(clone_files(d.incoming, total))
        names = {p.name for p in d.incoming.iterdir()}
        try:
            for round_ in range(6):
                d.start()
                if round_ == 0:
                    # during the ingest of the first batch, or the first sends
                    time.sleep(rng.uniform(0.0, 0.3))  # the random moment itself
                else:
                    target = min(d.done_count() + rng.randint(1, 60), total)
                    wait_until(
                        lambda t=target: d.done_count() >= t or not d.running(),  # type: ignore[misc]
                        30,
                        what=f"{target} files done (seed {seed})",
                    )
                    time.sleep(rng.uniform(0.0, 0.05))  # jitter: the random moment itself
                d.kill()
                problems = queue_problems(d.queue)
                assert problems == [], f"round {round_}, seed {seed}: {problems}"
                assert all_names(d) == names, f"a file vanished (round {round_}, seed {seed})"
            d.start()
            d.wait_done(total, timeout=60)
            d.wait_incoming_empty()
            assert d.stop() == 0
        finally:
            d.close()
    problems = settled_problems(d.queue, d.incoming, d.done, d.failed, expect_done=total)
    assert problems == [], f"seed {seed}: {problems}"
    assert a.uids() == uids and b.uids() == uids, f"seed {seed}"
    counts = snapshot(d.queue)
    assert counts.jobs == {"DONE": 2 * total}, counts
    assert d.exit_codes.count(-signal.SIGKILL) == 6
