"""The watch folder against a real writer that stalls with its file open.

Each test runs ``forwarder run`` (a :class:`daemon.Daemon`) against a scripted PACS and a real
writer as a subprocess (``dd`` fed by a pipe that pauses), and checks the folder promise: a
file is taken only once it is complete. (helper-58 also ran cp, mv across filesystems, rsync
with and without --inplace, tar, unzip, curl and wget against the daemon: all delivered
whole.) The writers' pauses are the scenario (a copy from a modality over SMB stalls longer
than ``watch.settle``); the tests wait on conditions.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from conftest import wait_until
from daemon import Daemon, destination
from dicomgen import write_file
from peers import ScriptedSCP

PAUSE = 2.0  # the writer's stall: several times settle (200 ms) and the polling interval


def slow_dd(source: Path, target: Path, first: int, pause: float) -> subprocess.Popen[bytes]:
    """``dd of=TARGET`` fed by a pipe that gives ``first`` bytes of ``source``, stalls
    ``pause`` seconds, then gives the rest (dd writes each read as it comes)."""
    src, dst = shlex.quote(str(source)), shlex.quote(str(target))
    script = (
        f"{{ head -c {first} {src}; sleep {pause}; tail -c +{first + 1} {src}; }}"
        f" | dd of={dst} bs=65536 status=none"
    )
    return subprocess.Popen(["sh", "-c", script])


def study_file(tmp_path: Path) -> tuple[Path, str]:
    """A generated image of ~130 kB kept out of incoming, and its SOP Instance UID."""
    path = tmp_path / "source" / "im1.dcm"
    ds = write_file(path, rows=256, columns=256)
    return path, str(ds.SOPInstanceUID)


def delivered_whole(d: Daemon, scp: ScriptedSCP, rel_path: str, uid: str, size: int) -> None:
    """``rel_path`` (``size`` bytes, ``uid``) went to done/ whole and reached the PACS."""
    wait_until(lambda: d.done_files() or d.failed_files(), 30, what="the file to be finished")
    for name in d.failed_files():
        why = d.error_json(name)["reason"]
        got = (d.failed / name).stat().st_size
        raise AssertionError(f"{name} ({got} of {size} bytes) went to failed/: {why}")
    assert d.done_files() == [rel_path]
    assert (d.done / rel_path).stat().st_size == size
    wait_until(lambda: uid in scp.uids(), 10, what="the PACS to have the file")


def test_polling_a_writer_that_stalls_longer_than_settle_is_not_taken_mid_write(
    tmp_path: Path,
) -> None:
    """watch.polling (no close events): a ``dd`` whose feed stalls longer than settle and
    than the polling interval keeps the file open; it is taken once dd has closed it."""
    source, uid = study_file(tmp_path)
    size = source.stat().st_size
    with (
        ScriptedSCP() as scp,
        Daemon(
            tmp_path / "fw", destinations=[destination("a", scp.port)], watch={"polling": True}
        ) as d,
    ):
        writer = slow_dd(source, d.incoming / "im1.dcm", size // 2, PAUSE)
        try:
            assert writer.wait(30) == 0
        finally:
            writer.kill()
            writer.wait()
        delivered_whole(d, scp, "im1.dcm", uid, size)
        assert d.stop() == 0


def test_a_file_being_written_when_the_daemon_starts_is_taken_once_its_writer_is_done(
    tmp_path: Path,
) -> None:
    """Found by the start's scan (no event seen for it), mid-stall: not taken half written."""
    source, uid = study_file(tmp_path)
    size = source.stat().st_size
    with ScriptedSCP() as scp:
        d = Daemon(tmp_path / "fw", destinations=[destination("a", scp.port)])
        target = d.incoming / "im1.dcm"
        writer = slow_dd(source, target, size // 2, PAUSE)
        try:
            wait_until(
                lambda: target.exists() and target.stat().st_size >= size // 2,
                10,
                what="the first half written",
            )
            with d:
                assert writer.wait(30) == 0
                delivered_whole(d, scp, "im1.dcm", uid, size)
                assert d.stop() == 0
        finally:
            writer.kill()
            writer.wait()
