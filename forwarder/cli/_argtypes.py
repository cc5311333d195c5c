"""argparse ``type=`` converters shared by the sub-commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(
    minimum: int, maximum: int | None = None, *, what: str = "a whole number", hint: str = ""
) -> Callable[[str], int]:
    """A converter accepting integers in ``minimum..maximum``; the error says which bound."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be {minimum}..{maximum}{hint}")
        if value < minimum:
            bound = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise argparse.ArgumentTypeError(bound)
        return value

    return convert


positive = whole_number(1)
non_negative = whole_number(0)


def ae_title(value: str) -> str:
    """An AE title as it goes on the wire: 1 to 16 printable ASCII characters, no backslash
    (surrounding spaces dropped)."""
    text = value.strip()
    if not 1 <= len(text) <= 16 or "\\" in text or any(not 32 <= ord(c) <= 126 for c in text):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an AE title: 1 to 16 printable ASCII characters, no backslash"
        )
    return text
