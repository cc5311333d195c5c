"""The queue's ceiling: how many files a second one connection can take through the queue's
whole life (enqueue, claim, ack, begin and complete finishing), in batches, with nothing else
running. Every process of the gateway writes through the one SQLite write lock, so this is
the most all of them together can do for small files, whatever the number of cores
(``docs/scaling.md``).

``python -m bench.queue_ceiling [--files N] [--batch B ...] [--dir DIR ...]``: by default
20,000 files in batches of 16 and 64, on tmpfs (/dev/shm) and on the disk under the system's
temporary folder, with the daemon's pragmas (WAL, synchronous FULL).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from forwarder.queue import FileEntry, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PHASES = ("enqueue", "claim", "ack", "finish")


def _entry(n: int) -> FileEntry:
    uid = f"1.2.826.0.1.3680043.8.498.{10**30 + n}"
    return FileEntry(
        path=f"/in/backlog/{uid}.dcm",
        rel_path=f"backlog/{uid}.dcm",
        size=9000,
        mtime_ns=1,
        sop_class_uid=CT,
        sop_instance_uid=uid,
        transfer_syntax=EXPLICIT_LE,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        accession_number="A1",
        dataset_offset=340,
    )


def measure(folder: Path, files: int, batch: int) -> tuple[float, dict[str, float]]:
    """Files a second, and each phase's seconds a file."""
    spent = dict.fromkeys(PHASES, 0.0)
    with (
        tempfile.TemporaryDirectory(prefix="bench-ceiling-", dir=folder) as tmp,
        Queue(Path(tmp) / "q.sqlite") as q,
    ):
        started = time.perf_counter()
        for first in range(0, files, batch):
            t0 = time.perf_counter()
            q.enqueue_many([(_entry(n), {"pacs": 1}) for n in range(first, first + batch)])
            t1 = time.perf_counter()
            jobs = q.claim("pacs", batch)
            t2 = time.perf_counter()
            finished = q.ack_done([j.id for j in jobs])
            t3 = time.perf_counter()
            items = q.to_finish(finished)
            q.begin_finish_many([(i.file_id, f"/done/{i.rel_path}") for i in items])
            q.complete_finish_many([i.file_id for i in items])
            t4 = time.perf_counter()
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                spent[phase] += seconds
        elapsed = time.perf_counter() - started
    return files / elapsed, {p: s / files for p, s in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_ceiling", description=__doc__)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--dir", type=Path, action="append", help="where the queue lives")
    args = parser.parse_args()
    folders = args.dir or [Path("/dev/shm"), Path(tempfile.gettempdir())]
    for folder in folders:
        for batch in args.batch or [16, 64]:
            rate, phases = measure(folder, args.files, batch)
            split = ", ".join(f"{p} {s * 1e6:.1f} us" for p, s in phases.items())
            print(f"{folder}, batches of {batch}: {rate:,.0f} files/s; a file: {split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
