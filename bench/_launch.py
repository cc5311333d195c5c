"""Tiny launcher: run a command, then record its exact wall time and peak RSS as JSON.

Usage: ``python -S -I _launch.py RESULT.json COMMAND ARGS...``

Why a separate process: Linux carries a process's RSS high-water mark across ``execve`` (and a
``vfork``/``posix_spawn`` child shares its parent's memory until then), so ``ru_maxrss`` of a
child started straight from the benchmark (numpy, pydicom: ~45 MiB) would never read lower than
the benchmark's own RSS. Started from this small interpreter (``-S -I``: no site-packages,
about 9 MiB), the floor is this launcher's RSS instead, well below what any sender uses.

SIGTERM and SIGINT are passed on to the command. Times are ``time.monotonic()``
(CLOCK_MONOTONIC, the same clock in every process), so the caller can relate them to its own.
Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> int:
    result, argv = sys.argv[1], sys.argv[2:]
    start = time.monotonic()
    pid = os.posix_spawn(argv[0], argv, dict(os.environ))

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _, status, usage = os.wait4(pid, 0)  # retried after a signal handler runs (PEP 475)
    end = time.monotonic()
    record = {
        "start": start,
        "end": end,
        "returncode": os.waitstatus_to_exitcode(status),
        "maxrss_kib": usage.ru_maxrss,
    }
    tmp = result + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
