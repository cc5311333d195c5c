"""Command line entry point (placeholder until the dispatcher lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("forwarder: CLI not built yet")
