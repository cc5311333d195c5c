"""``python -m bench`` at a tiny scale: it runs, writes sane results, and cannot be fooled.

Never asserts a speed: only that numbers exist, are positive and finite, and that storescp
received every file of every attempt.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not os.access("/usr/bin/storescp", os.X_OK) or not os.access("/usr/bin/storescu", os.X_OK),
    reason="DCMTK storescp/storescu not installed (make system-deps)",
)


def run_bench(
    tmp_path: Path, *args: str, status: int = 0
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "out"
    tiny = ["--scale", "0.02", "--repeat", "1", "--corpus-dir", str(tmp_path / "corpus")]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *tiny, "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    return proc, out


def sane(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_small_and_ct_produce_sane_results(tmp_path: Path) -> None:
    proc, out = run_bench(tmp_path, "--cases", "small,ct")
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["nproc"] >= 1
    assert "3." in data["machine"]["dcmtk"]
    # forwarder runs byte-compiled, as installed, even where PYTHONDONTWRITEBYTECODE is set
    assert data["settings"]["forwarder_bytecode"].startswith("compiled"), data["settings"]
    assert list((REPO / "forwarder" / "daemon" / "__pycache__").glob("service.*.pyc"))
    assert [c["case"] for c in data["cases"]] == ["small", "ct"]
    for case in data["cases"]:
        assert case["files"] == {"small": 40, "ct": 10}[case["case"]]
        labels = [row["sender"] for row in case["rows"]]
        assert labels == ["storescu", "forwarder send -a1", "forwarder send -a2"]
        for row in case["rows"]:
            assert row["ok"], row["error"]
            assert row["received_matched"]
            for attempt in row["attempts"]:
                assert attempt["received"] == attempt["expected"] == case["files"]
            for key in ("files_per_s", "mb_per_s", "peak_rss_mib", "seconds"):
                assert sane(row[key]), (key, row)
            assert 1 < row["peak_rss_mib"] < 4096
            if row["sender"] != "storescu":
                assert sane(row["ratio"]) and isinstance(row["met"], bool)
    assert any(
        line.startswith("| small ") and "storescu" in line for line in proc.stdout.splitlines()
    )
    assert (out / "results.md").read_text().startswith("| case")
    assert not (tmp_path / "corpus" / "scale-0.02").exists()  # removed without --keep-corpus


def test_daemon_cases_drain_the_backlog_and_the_ct_files(tmp_path: Path) -> None:
    """Issue 13's two daemon goals: 20,000 small files (400 at this scale) and 500 CT files
    (10), given at once to a started daemon (on tmpfs, and on disk for comparison), timed until
    all are in done/."""
    proc, out = run_bench(tmp_path, "--cases", "daemon,daemon-ct", "--associations", "1")
    data = json.loads((out / "results.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["daemon", "daemon-ct"]
    for case in data["cases"]:
        assert case["files"] == {"daemon": 400, "daemon-ct": 10}[case["case"]]
        labels = [row["sender"] for row in case["rows"]]
        assert labels == ["storescu", "forwarder run -a1", "forwarder run -a1 (on disk)"]
        for row in case["rows"]:
            assert row["ok"], row["error"]
            for attempt in row["attempts"]:
                assert attempt["received"] >= attempt["expected"] == case["files"]
            assert sane(row["files_per_s"]) and sane(row["mb_per_s"])
    assert any(line.startswith("| daemon-ct ") for line in proc.stdout.splitlines())


def test_a_sender_that_sends_nothing_is_failed_not_fast(tmp_path: Path) -> None:
    fake = tmp_path / "fake-forwarder"
    fake.write_text("#!/bin/sh\nexit 0\n")  # answers --help, "sends" instantly, stores nothing
    fake.chmod(0o755)
    proc, out = run_bench(
        tmp_path, "--cases", "small", "--associations", "1", "--forwarder", str(fake), status=1
    )
    case = json.loads((out / "results.json").read_text())["cases"][0]
    reference, fake_row = case["rows"]
    assert reference["ok"] and reference["received_matched"]
    assert not fake_row["ok"]
    assert fake_row["files_per_s"] is None and fake_row["ratio"] is None
    assert "storescp received 0 of 40" in fake_row["error"]
    assert "FAILED" in proc.stdout


@pytest.mark.skipif(
    not os.access("/usr/sbin/Orthanc", os.X_OK)
    or not os.path.exists("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    reason="Orthanc or its DICOMweb plugin not installed (make system-deps)",
)
def test_stow_case_checks_what_orthanc_holds_after_every_sender(tmp_path: Path) -> None:
    """The issue 19 case: C-STORE and STOW-RS into the same Orthanc, emptied before each sender
    (so every attempt's count is the corpus exactly, not a running total)."""
    proc, out = run_bench(tmp_path, "--cases", "stow-small", "--associations", "1")
    data = json.loads((out / "results.json").read_text())
    assert "Orthanc" in data["machine"]["orthanc"]
    (case,) = data["cases"]
    assert case["case"] == "stow-small" and case["files"] == 40
    labels = [row["sender"] for row in case["rows"]]
    assert labels == ["storescu", "forwarder send -a1", "forwarder send STOW-RS -a1"]
    for row in case["rows"]:
        assert row["ok"], row["error"]
        assert [(a["received"], a["expected"]) for a in row["attempts"]] == [(40, 40)]
        for key in ("files_per_s", "mb_per_s", "peak_rss_mib", "seconds"):
            assert sane(row[key]), (key, row)
    assert any(line.startswith("| stow-small ") for line in proc.stdout.splitlines())
