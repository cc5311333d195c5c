"""Durations as operators write them: ``250ms``, ``5s``, ``10m``, ``2h``, ``7d`` or seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Return seconds for ``250ms``, ``5s``, ``10m``, ``2h``, ``7d`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 250ms, 5s, 10m, 2h, 7d or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(
            f"{value!r} is not a duration: use 250ms, 5s, 10m, 2h, 7d or a number of seconds"
        )
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds
