"""Markdown helpers of the Conformance Statement: table cells and tables, UID, syntax, duration,
size and status code formatting. Nothing here knows the engine or the document's sections.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom.uid import UID


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*out, ""]


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "(no registered name)"


def _syntax(uid: str) -> str:
    """``Explicit VR Little Endian (`1.2.840.10008.1.2.1`)``."""
    return f"{_name(uid)} (`{uid}`)"


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    if value >= 120:
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value % size == 0:
                return f"{value / size:g}{unit}"
    return f"{value:g}s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "none"
    if value == 0:
        return "0 (no limit)"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value} bytes ({value // size} {unit})"
    return f"{value} bytes"


def _hex(code: int) -> str:
    return f"0x{code:04X}"
