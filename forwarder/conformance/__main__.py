"""``python -m forwarder.conformance [OUTPUT]``: print the Conformance Statement, or write it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from forwarder.conformance.document import render

DEFAULT_OUTPUT = Path("docs/conformance-statement.md")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwarder.conformance",
        description="Render forwarder's DICOM Conformance Statement (Markdown).",
    )
    parser.add_argument(
        "output", nargs="?", type=Path, help=f"write it here (e.g. {DEFAULT_OUTPUT}); else print"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
