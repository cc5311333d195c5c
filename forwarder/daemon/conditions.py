"""Route conditions as matcher objects: one per ``match:`` entry, each answering whether a
file's value holds and, when it does not, saying why (for ``forwarder explain``).

The values are the header's, as text (what ingest reads in its one header walk): ``None`` when
the file does not have the attribute. Multi-valued elements (``ORIGINAL\\PRIMARY``) match on any
value or on the whole. The operators:

* a value, a list of values, ``*``/``?`` wildcards (:class:`Equals`): case-sensitive, as DICOM
  code strings are; a missing attribute never matches, an empty one matches ``*``;
* ``{regex: ...}`` (:class:`Regex`): Python's ``re.search`` on the value without its padding,
  so it matches anywhere unless anchored (``^RESEARCH``); a missing attribute never matches;
* ``{not: value|list}`` (:class:`Not`): holds when the attribute is missing or none of its
  values matches (wildcards allowed);
* ``{present: true}`` (:class:`Present`): the attribute is there with a non-empty value;
  ``{present: false}``: missing or empty;
* ``{range: [low, high]}`` (:class:`Range`): inclusive; ``null`` leaves an end open. Numbers
  (IS, DS, US...) compare as numbers; DA, DT and TM as text, the value cut to the bound's
  length (``[20260101, 20261231]`` holds every DT of 2026). A missing, empty or unparsable value
  does not match.

Another key than a DICOM keyword is matched the same way against a value the router is given
(``folder``: the file's path under incoming, or its folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from forwarder.config.routing import DATE_VRS, NUMERIC_VRS, keyword_vr


class Condition(Protocol):
    """One ``match:`` entry."""

    @property
    def key(self) -> str: ...

    def holds(self, value: str | None) -> bool: ...

    def expected(self) -> str:
        """What it wants, for ``explain`` ("CT", "regex ^RES", "not SR, KO"...)."""
        ...


def _candidates(value: str) -> list[str]:
    value = value.strip(" \x00")
    return [value, *(v.strip(" \x00") for v in value.split("\\"))] if "\\" in value else [value]


def _wildcards(value: str | None, patterns: tuple[str, ...]) -> bool:
    if value is None:
        return False
    return any(fnmatchcase(c, p) for c in _candidates(value) for p in patterns)


@dataclass(frozen=True, slots=True)
class Equals:
    key: str
    patterns: tuple[str, ...]

    def holds(self, value: str | None) -> bool:
        return _wildcards(value, self.patterns)

    def expected(self) -> str:
        return " or ".join(self.patterns)


@dataclass(frozen=True, slots=True)
class Regex:
    key: str
    pattern: re.Pattern[str]

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        return any(self.pattern.search(c) for c in _candidates(value))

    def expected(self) -> str:
        return f"regex {self.pattern.pattern}"


@dataclass(frozen=True, slots=True)
class Not:
    key: str
    patterns: tuple[str, ...]

    def holds(self, value: str | None) -> bool:
        return not _wildcards(value, self.patterns)

    def expected(self) -> str:
        return f"not {', '.join(self.patterns)}"


@dataclass(frozen=True, slots=True)
class Present:
    key: str
    present: bool

    def holds(self, value: str | None) -> bool:
        there = value is not None and bool(value.strip(" \x00"))
        return there is self.present

    def expected(self) -> str:
        return "present" if self.present else "absent or empty"


@dataclass(frozen=True, slots=True)
class Range:
    key: str
    low: str | None
    high: str | None
    numeric: bool

    def _one(self, value: str) -> bool:
        if not value:
            return False
        if self.numeric:
            try:
                number = float(value)
            except ValueError:
                return False
            return (self.low is None or number >= float(self.low)) and (
                self.high is None or number <= float(self.high)
            )
        return (self.low is None or value[: len(self.low)] >= self.low) and (
            self.high is None or value[: len(self.high)] <= self.high
        )

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        values = _candidates(value)
        return any(self._one(v) for v in (values[1:] if len(values) > 1 else values))

    def expected(self) -> str:
        return f"range {self.low or '(open)'}..{self.high or '(open)'}"


def condition(key: str, value: str | list[str] | dict[str, Any]) -> Condition:
    """The matcher of one checked ``match:`` entry (:func:`forwarder.config.routing.
    check_condition` has normalised it)."""
    if isinstance(value, str):
        return Equals(key, (value,))
    if isinstance(value, list):
        return Equals(key, tuple(value))
    ((op, arg),) = value.items()
    if op == "regex":
        return Regex(key, re.compile(arg))
    if op == "not":
        return Not(key, tuple(arg) if isinstance(arg, list) else (arg,))
    if op == "present":
        return Present(key, bool(arg))
    if op == "range":
        vr = keyword_vr(key) or ""
        numeric = vr in NUMERIC_VRS or vr not in DATE_VRS
        return Range(key, arg[0], arg[1], numeric)
    raise ValueError(f"unknown condition operator {op!r}")
