"""Placing a received object into its study folder, against a real filesystem."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

from forwarder.net.placement import place


def test_a_study_folder_removed_under_it_is_made_again(tmp_path: Path) -> None:
    """The daemon's finisher removes a listener study folder once it is empty, while an
    association may be placing the next object of that study: the object must still land
    (a failure here would be answered to the modality as 0xA700)."""
    out = tmp_path / "out"
    out.mkdir()
    stop = threading.Event()
    # An event, not a semaphore: go-aheads given while the pruner was not looking must not
    # pile up into several removals during one place(), which the finisher never does (it
    # prunes a folder once it saw it empty), and which outlast place()'s three attempts.
    turn = threading.Event()
    removed = 0

    def prune() -> None:
        # As the finisher does: one removal of the empty folder now and then, here as each
        # place() starts, so that it races the folder's open, mkdir and rename.
        nonlocal removed
        while not stop.is_set():
            if turn.wait(timeout=0.1):
                turn.clear()
                with contextlib.suppress(OSError):
                    os.rmdir(out / "study")  # refused while a file is in it
                    removed += 1

    pruner = threading.Thread(target=prune)
    pruner.start()
    # Where the removal lands depends on the scheduler (and on the GIL: the pruner may only
    # get to run once place() is done). Placing goes on until enough removals happened, and
    # every other time the pruner is given the first go.
    deadline = time.monotonic() + 60
    i = 0
    try:
        while (i < 300 or removed < 20) and time.monotonic() < deadline:
            source = tmp_path / f".part{i}"
            source.write_bytes(b"x")
            turn.set()
            if i % 2:
                time.sleep(0)  # lets the pruner take the GIL now
            place(out, str(source), "study", f"{i}.dcm")
            os.unlink(out / "study" / f"{i}.dcm")  # finished: the folder is empty again
            i += 1
    finally:
        stop.set()
        pruner.join()
    assert removed >= 20, f"{removed} removals in {i} placements: the race was not run"


def test_a_missing_source_is_an_error_not_retried(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError):
        place(out, str(tmp_path / "missing"), "study", "a.dcm")
    assert list((out / "study").iterdir()) == []
