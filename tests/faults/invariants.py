"""What must hold after any fault: checked on the real folders and the real queue database.

:func:`queue_problems` reads a queue database (the live one once the daemon stopped, or a copy
taken while it ran) and lists every inconsistency; :func:`settled_problems` adds what must hold
once the daemon has finished everything (nothing pending, every file moved, nothing orphaned).
:func:`clone_files` writes many small valid files fast (one template, a new UID per copy).
"""

from __future__ import annotations

import io
import itertools
import os
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from dicomgen import make_dataset

_TEMP_MARKERS = (".moving", ".tmp", ".part")


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """Row counts of a queue database, for messages and assertions."""

    files: dict[str, int]  # state -> count
    jobs: dict[str, int]  # status -> count


def open_readonly(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)


def snapshot(db: Path) -> QueueSnapshot:
    conn = open_readonly(db)
    try:
        files = dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        jobs = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    finally:
        conn.close()
    return QueueSnapshot(files, jobs)


def queue_problems(db: Path, *, writable_copy: bool = False) -> list[str]:
    """Integrity and state-machine consistency of the queue at ``db`` (any moment)."""
    uri = f"file:{db}" if writable_copy else f"file:{db}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    problems: list[str] = []
    try:
        check = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if check != ["ok"]:
            return [f"integrity_check: {check[:5]}"]
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if fk:
            problems.append(f"foreign_key_check: {fk[:5]}")
        orphans = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE file_id NOT IN (SELECT id FROM files)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} jobs without a file")
        jobless = conn.execute(
            "SELECT COUNT(*) FROM files WHERE id NOT IN (SELECT file_id FROM jobs)"
        ).fetchone()[0]
        if jobless:
            problems.append(f"{jobless} files without any job")
        finishing_early = conn.execute(
            """SELECT COUNT(*) FROM files AS f WHERE f.state != 'QUEUED' AND EXISTS (
                   SELECT 1 FROM jobs AS j WHERE j.file_id = f.id
                     AND j.status IN ('READY', 'CLAIMED'))"""
        ).fetchone()[0]
        if finishing_early:
            problems.append(f"{finishing_early} files finishing with jobs still READY/CLAIMED")
        no_target = conn.execute(
            "SELECT COUNT(*) FROM files WHERE state != 'QUEUED' AND final_path IS NULL"
        ).fetchone()[0]
        if no_target:
            problems.append(f"{no_target} FINISHING/FINISHED files without a final path")
        dup = conn.execute(
            """SELECT path, COUNT(*) FROM files WHERE state != 'FINISHED'
               GROUP BY path HAVING COUNT(*) > 1"""
        ).fetchall()
        if dup:
            problems.append(f"paths queued twice: {dup[:5]}")
    finally:
        conn.close()
    return problems


def settled_problems(
    db: Path,
    incoming: Path,
    done: Path,
    failed: Path,
    *,
    expect_done: int | None = None,
    vanished: Collection[str] = (),
) -> list[str]:
    """After the daemon finished everything and stopped: the queue is consistent, no job is
    READY or CLAIMED, every file row is FINISHED and at its final path (except the names in
    ``vanished``: files someone else deleted), incoming is empty, no temporary file is left,
    and every file in failed/ has its NAME.error.json."""
    problems = queue_problems(db)
    conn = open_readonly(db)
    try:
        live = conn.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE status IN ('READY', 'CLAIMED') GROUP BY status"
        ).fetchall()
        if live:
            problems.append(f"jobs not terminal: {live}")
        unfinished = conn.execute(
            "SELECT state, COUNT(*) FROM files WHERE state != 'FINISHED' GROUP BY state"
        ).fetchall()
        if unfinished:
            problems.append(f"files not finished: {unfinished}")
        rows = conn.execute(
            "SELECT final_path FROM files WHERE state = 'FINISHED' AND retried_as IS NULL"
        ).fetchall()
    finally:
        conn.close()
    missing = [
        r[0] for r in rows if not os.path.exists(r[0]) and os.path.basename(r[0]) not in vanished
    ]
    if missing:
        problems.append(f"{len(missing)} finished files are not at their final path: {missing[:3]}")
    left = [p for p in incoming.rglob("*") if p.is_file()]
    if left:
        problems.append(f"{len(left)} files left in incoming: {left[:3]}")
    for folder in (done, failed):
        temps = [p for p in folder.rglob("*") if p.is_file() and _is_temp(p.name)]
        if temps:
            problems.append(f"temporary files left in {folder.name}/: {temps[:3]}")
    for p in failed.rglob("*"):
        is_data = p.is_file() and not p.name.endswith(".error.json") and not _is_temp(p.name)
        if is_data and not p.with_name(p.name + ".error.json").exists():
            problems.append(f"{p} has no .error.json beside it")
    if expect_done is not None:
        n = sum(1 for p in done.rglob("*") if p.is_file())
        if n != expect_done:
            problems.append(f"{n} files in done/, expected {expect_done}")
    return problems


def _is_temp(name: str) -> bool:
    return name.startswith(".") or name.endswith(_TEMP_MARKERS)


# -- many files, fast -----------------------------------------------------------------------

_UID_ROOT = "1.2.826.0.1.3680043.10.7"
_serial = itertools.count(1)


def clone_files(
    folder: Path, count: int, *, prefix: str = "c", start: int = 0, atomic: bool = False
) -> list[str]:
    """Write ``count`` small valid CT files ``folder/prefix000000.dcm``... from one template,
    each with its own SOP Instance UID (same length, patched in place). Returns the UIDs.
    ``atomic`` writes each under a dot-name and renames it into place (the daemon is running)."""
    placeholder = f"{_UID_ROOT}.{'9' * 13}"
    ds = make_dataset(rows=4, columns=4, sop_instance_uid=placeholder)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    old = placeholder.encode()
    assert template.count(old) == 2, "the UID is in the meta header and the data set"
    folder.mkdir(parents=True, exist_ok=True)
    uids = []
    for i in range(start, start + count):
        # a UID component must not start with 0: "1" + pid + serial, always 13 digits
        uid = f"{_UID_ROOT}.1{os.getpid() % 1000:03d}{next(_serial):09d}"
        data = template.replace(old, uid.encode())
        path = folder / f"{prefix}{i:06d}.dcm"
        if atomic:
            tmp = folder / f".{path.name}.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, path)
        else:
            path.write_bytes(data)
        uids.append(uid)
    return uids
