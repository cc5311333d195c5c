"""Durations and sizes as operators write them: ``250ms``, ``5s``, ``10m``, ``2h``, ``7d`` or
seconds; ``500MB``, ``5GB`` or bytes."""

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


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """Bytes for ``500M``, ``5GB``, ``1.5g``, ``300KiB`` or a bare number of bytes (K, M, G and
    T are powers of 1024, with or without a trailing ``B``/``iB``)."""
    if isinstance(value, bool):
        raise ValueError("must be a size like 500MB, 5GB or a number of bytes")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{value!r} is not a size: use 500MB, 5GB or a number of bytes")
    if size < 0:
        raise ValueError("must not be negative")
    return size
