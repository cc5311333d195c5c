"""A 500 MB object goes by STOW-RS with flat memory: ``forwarder send`` streams it from disk
(the server receives it whole, byte for byte) and its peak RSS stays far below its size."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import time
from pathlib import Path

from conftest import FORWARDER
from dicomgen import make_dataset
from stowserver import Answer, StowServer, stow_json

from forwarder.dicom.part10 import read_meta

ROWS = COLUMNS = 16384  # 16-bit: 512 MiB of pixel data (the 500 MB object)
PIXEL_BYTES = ROWS * COLUMNS * 2


def big_sparse_file(path: Path) -> None:
    """A valid Part 10 image whose 512 MiB of pixel data is a hole in a sparse file."""
    ds = make_dataset(rows=8, columns=8)
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.PixelData = b"\0\0"  # replaced below: the last element, length patched
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data[-14:-10] == b"\xe0\x7f\x10\x00" and data[-10:-8] == b"OW", data[-14:]
    with open(path, "r+b") as f:
        f.seek(len(data) - 6)
        f.write(struct.pack("<I", PIXEL_BYTES))
        f.truncate(len(data) - 2 + PIXEL_BYTES)


def expected_sha256(path: Path, boundary: str) -> str:
    digest = hashlib.sha256(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    digest.update(f"\r\n--{boundary}--\r\n".encode())
    return digest.hexdigest()


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass  # exited meanwhile
    return 0


def test_a_500_mb_file_streams_with_flat_memory(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    path = tmp_path / "big.dcm"
    big_sparse_file(path)
    size = path.stat().st_size
    assert size > 500 * 1024 * 1024
    uid = read_meta(str(path)).sop_instance_uid
    answer = Answer(body=stow_json({uid: None}, {}))  # stream=True: the server keeps no parts
    with StowServer(answer, stream=True) as server:
        proc = subprocess.Popen(
            [FORWARDER, "send", "--no-check", server.url, str(path)],
            env=forwarder_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # VmHWM: the peak RSS of the forwarder process image itself. (wait4's ru_maxrss would
        # also count this pytest process's pages, which the child had before its exec.)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
            time.sleep(0.005)
        _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert peak_kb > 10_000, "the forwarder process was never measured"
    (post,) = server.posts()
    boundary = post.headers["content-type"].split("boundary=")[1]
    assert post.nbytes == int(post.headers["content-length"])
    assert post.sha256 == expected_sha256(path, boundary)  # the whole file, byte for byte
    peak_mb = peak_kb / 1024
    # ~40 MB is the interpreter with urllib3 and ssl loaded: the file adds nothing to it.
    assert peak_mb < 64, f"send peaked at {peak_mb:.0f} MB RSS for a {size / 1e6:.0f} MB file"
