"""Flow control values of the config: send windows (``window:``) and rates (``max_rate:``,
``outside_window_rate:``), parsed with errors that say what is wrong.

A window is ``DAYS [HH:MM-HH:MM]`` in local time: ``Mon-Fri 19:00-07:00`` (a range whose end
is not after its start crosses midnight: it opens on each listed day and closes the next
morning, so Friday 19:00 to Saturday 07:00 is inside, Monday 03:00 is not), ``Sat-Sun`` (whole
days), ``Mon,Wed 08:00-12:00``, ``Fri-Mon`` (day ranges wrap), or ``22:00-06:00`` alone (every
day). :func:`window_open` answers for one local time, so a test injects the clock.

A rate is bytes per second: ``20MB/s``, ``500KB/s``, ``1.5MiB/s``, ``2G/s`` or a number (K/M/G
are powers of 1024, as every size of this config; the ``/s`` may be left out).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*(?:/\s*s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True, slots=True)
class Window:
    """One send window: on ``days`` (0 Monday .. 6 Sunday) from ``start`` to ``end`` minutes
    after midnight; ``end <= start`` crosses midnight; (0, 1440) is the whole day."""

    days: frozenset[int]
    start: int = 0
    end: int = 1440

    def contains(self, at: datetime) -> bool:
        day, minute = at.weekday(), at.hour * 60 + at.minute
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        yesterday = (day - 1) % 7
        return (day in self.days and minute >= self.start) or (
            yesterday in self.days and minute < self.end
        )


def _day(name: str, text: str) -> int:
    key = name.strip().lower()[:3]
    if key not in DAYS or len(name.strip()) < 3:
        raise ValueError(f"{text!r}: {name.strip()!r} is not a weekday (Mon, Tue, ... Sun)")
    return DAYS.index(key)


def _days(spec: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            first, _, last = part.partition("-")
            a, b = _day(first, text), _day(last, text)
            days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            days.add(_day(part, text))
    return frozenset(days)


def _minutes(hours: str, minutes: str, text: str, *, end: bool) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise ValueError(f"{text!r}: {hours}:{minutes} is not a time of day (00:00 to 24:00)")
    return h * 60 + m


def parse_window(text: str) -> Window:
    """``Mon-Fri 19:00-07:00``, ``Sat-Sun``, ``22:00-06:00`` -> :class:`Window`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a window is DAYS [HH:MM-HH:MM], e.g. 'Mon-Fri 19:00-07:00' or 'Sat-Sun'")
    parts = text.split()
    times = _TIME_RE.match(parts[-1])
    if len(parts) > 2 or (len(parts) == 2 and times is None):
        raise ValueError(
            f"{text!r}: a window is DAYS [HH:MM-HH:MM], e.g. 'Mon-Fri 19:00-07:00' or 'Sat-Sun'"
        )
    days = frozenset(range(7)) if times is not None and len(parts) == 1 else _days(parts[0], text)
    if times is None:
        return Window(days)
    start = _minutes(times.group(1), times.group(2), text, end=False)
    end = _minutes(times.group(3), times.group(4), text, end=True)
    if start == end or (start == 0 and end == 1440):
        raise ValueError(f"{text!r}: the time range is empty or the whole day; give the days only")
    return Window(days, start, end % 1440 if end == 1440 and start > 0 else end)


def window_open(windows: Sequence[Window], at: datetime) -> bool:
    """Whether the local time ``at`` is inside one of ``windows`` (none given: always)."""
    return not windows or any(w.contains(at) for w in windows)


def parse_rate(value: object) -> float:
    """``20MB/s``, ``500K``, ``1.5MiB/s`` or a number of bytes per second -> bytes per second."""
    if isinstance(value, bool):
        raise ValueError("must be a rate such as 20MB/s")
    if isinstance(value, int | float):
        rate = float(value)
    else:
        match = _RATE_RE.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a rate: use bytes per second or 500KB/s, 20MB/s")
        rate = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if rate < 1024:
        raise ValueError("must be at least 1KB/s")
    return rate
