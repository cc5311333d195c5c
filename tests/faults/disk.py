"""Disk trouble on demand: small tmpfs mounts, filling them up, and taking privileges away.

We run as root, so file modes alone stop nothing: :func:`without_dac_override` makes a wrapper
that runs a command as root *without* CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``setpriv
--bounding-set``), so that a file of mode 000 is unreadable to it while everything else (owner
root, modes 0755/0644) works as before. ``chattr +i`` (immutable) makes a file that nobody,
root included, may rename or delete.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SETPRIV = shutil.which("setpriv")
CHATTR = shutil.which("chattr")


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (created if needed); unmount it afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        # lazy: a daemon killed a moment ago may still hold a descriptor in there
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, name: str = ".filler") -> Path:
    """Fill the filesystem of ``folder`` until ENOSPC; returns the filler to delete later."""
    filler = folder / name
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        # the last blocks: smaller writes until not one byte fits
        for size in (4096, 512, 1):
            with suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``chattr +i`` on ``path`` for the block (no rename, no unlink, even for root)."""
    assert CHATTR is not None
    subprocess.run([CHATTR, "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run([CHATTR, "-i", str(path)], check=False)


def without_dac_override(wrapper: Path, program: str) -> Path:
    """Write an executable ``wrapper`` that runs ``program`` as root but without the
    capabilities that bypass file modes, so mode 000 files are unreadable to it."""
    assert SETPRIV is not None
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {SETPRIV} --bounding-set=-dac_override,-dac_read_search "
        f'--inh-caps=-dac_override,-dac_read_search {program} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper
