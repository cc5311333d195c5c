"""``python -m bench.rate``: does a destination's ``max_rate`` hold? (issue 16)

A real ``forwarder run`` sends to DCMTK ``storescp --ignore`` on 127.0.0.1 through one
destination capped at ``--rate`` (default 20MB/s, i.e. 20 MiB/s: sizes in the config are powers
of 1024), with 1 and with 4 associations, for large files (8 MiB) and small ones (64 KiB). A
pool of hard links to one file (12 seconds' worth, and three claim batches of 64 per
association) is recycled from done/ back into incoming/ so the queue never runs dry (a smaller
pool starves it: a batch holds its files until all of them are sent and acked). After a
warm-up, the rate is read from the daemon's own ``forwarder_sent_bytes_total`` (data set bytes
stored, sampled every 20 ms, between the first and the last file stored in ``--seconds``;
default 10, the issue's check is ``--seconds 60``) and compared with the cap: within
``--tolerance`` (5%) or the exit code is 1::

    .venv/bin/python -m bench.rate                      # ~1.5 min: 4 cases x (3 s + 10 s)
    .venv/bin/python -m bench.rate --seconds 60         # the issue's minute per case
    .venv/bin/python -m bench.rate --associations 4 --sizes 8MB --rate 50MB/s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.procs import StoreSCP, free_port
from forwarder.config.flow import parse_rate
from forwarder.daemon.worker import BATCH

OUT = Path(__file__).parent / "out"
_SENT = re.compile(
    r'^forwarder_sent_bytes_total\{destination="capped",outcome="stored"\} (\S+)$', re.M
)


def _write_file(path: Path, size: int) -> None:
    """A CT image of about ``size`` bytes of pixel data (16-bit, 256 columns)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    rows = max(1, size // 512)
    ds.Rows, ds.Columns = rows, 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = os.urandom(rows * 512)
    ds.save_as(path, enforce_file_format=True)


def _sent(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        m = _SENT.search(resp.read().decode())
    return float(m.group(1)) if m else 0.0


def _window(port: int, seconds: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(time, bytes) when the counter first moved and when it last moved within ``seconds``:
    the counter moves once per file stored, so measuring between two such moments removes the
    error of a partly sent file at either end (one 8 MiB file is 40% of a 20 MiB/s second)."""
    changes: list[tuple[float, float]] = []
    last = _sent(port)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
        value = _sent(port)
        if value != last:
            changes.append((time.monotonic(), value))
            last = value
    if len(changes) < 2:
        raise RuntimeError("fewer than two files stored while measuring; measure longer")
    return changes[0], changes[-1]


def _recycle(done: Path, incoming: Path, stop: threading.Event) -> None:
    """Put delivered files back into incoming under a new name (the daemon takes them anew)."""
    n = 0
    while not stop.wait(0.1):
        for p in list(done.rglob("*.dcm")):
            n += 1
            try:
                os.rename(p, incoming / f"r{n:07d}.dcm")
            except OSError:
                pass


def run_case(
    rate: float, size: int, associations: int, seconds: float, warmup: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
        root = Path(tmp)
        incoming, done = root / "incoming", root / "done"
        for d in (incoming, done, root / "failed"):
            d.mkdir()
        # More than the daemon's claim batches can hold (64 files per association), and 12 s
        # of sending: hard links of one file, so the disk holds one.
        count = max(3 * BATCH * associations, math.ceil(rate * 12 / size))
        template = root / "template.dcm"
        _write_file(template, size)
        for i in range(count):
            os.link(template, incoming / f"f{i:05d}.dcm")
        metrics = free_port()
        OUT.mkdir(exist_ok=True)
        with StoreSCP(OUT / "rate-storescp.log", nodelay=True, fork=False) as scp:
            config = root / "forwarder.yaml"
            config.write_text(
                json.dumps(
                    {
                        "incoming": str(incoming),
                        "done": str(done),
                        "failed": str(root / "failed"),
                        "queue": str(root / "queue.sqlite"),
                        "destinations": [
                            {
                                "name": "capped",
                                "ae_title": scp.ae_title,
                                "host": "127.0.0.1",
                                "port": scp.port,
                                "associations": associations,
                                "max_rate": rate,
                            }
                        ],
                        "watch": {"settle": "100ms", "rescan_interval": "2s"},
                        "metrics": {"listen": f"127.0.0.1:{metrics}"},
                        "log_level": "WARNING",
                    }
                )
            )
            stop = threading.Event()
            recycler = threading.Thread(target=_recycle, args=(done, incoming, stop), daemon=True)
            with (root / "forwarder.log").open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "forwarder", "run", "-c", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                try:
                    recycler.start()
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            _sent(metrics)
                            break
                        except OSError:
                            if time.monotonic() > deadline or proc.poll() is not None:
                                raise RuntimeError("forwarder did not start") from None
                            time.sleep(0.1)
                    time.sleep(warmup)
                    (t0, b0), (t1, b1) = _window(metrics, seconds)
                finally:
                    stop.set()
                    proc.terminate()
                    proc.wait(30)
                    recycler.join(5)
    measured = (b1 - b0) / (t1 - t0)
    return {
        "rate": rate,
        "file_bytes": size,
        "associations": associations,
        "seconds": round(t1 - t0, 2),
        "measured": measured,
        "error": measured / rate - 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__.split("\n")[0])
    p.add_argument("--rate", default="20MB/s", help="the cap (default 20MB/s)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured per case (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--associations", default="1,4", help="comma-separated (default 1,4)")
    p.add_argument("--sizes", default="8MB,64KB", help="file sizes (default 8MB,64KB)")
    p.add_argument("--tolerance", type=float, default=0.05, help="default 0.05 (5%%)")
    args = p.parse_args(argv)
    rate = parse_rate(args.rate)
    results = []
    print("| file size | associations | cap MiB/s | measured MiB/s | error | seconds | ok |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for size_text in args.sizes.split(","):
        size = int(parse_rate(size_text.strip()))
        for n in (int(a) for a in args.associations.split(",")):
            r = run_case(rate, size, n, args.seconds, args.warmup)
            r["ok"] = abs(r["error"]) <= args.tolerance
            results.append(r)
            print(
                f"| {size / 1024:,.0f} KiB | {n} | {rate / 1024**2:.2f} | "
                f"{r['measured'] / 1024**2:.2f} | {r['error'] * 100:+.2f}% | {r['seconds']} | "
                f"{'yes' if r['ok'] else 'NO'} |",
                flush=True,
            )
    OUT.mkdir(exist_ok=True)
    (OUT / "rate.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
