"""Plumbing for ``make test-systemd``: printed steps, expectations, deadlines, host commands."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
STARTED = time.monotonic()


class Failure(Exception):
    """A failed expectation: the message says what was expected and what was seen."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def host(cmd: list[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """``cmd`` on the host, from the checkout; its stdout, or Failure with its output."""
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=ROOT
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise Failure(f"{' '.join(cmd)} exited {result.returncode}:\n{output}")
    return result.stdout
