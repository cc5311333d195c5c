"""Route conditions as matcher objects: one per ``match:`` entry, each answering whether a
file's value holds and, when it does not, saying why (for ``forwarder explain``).

The values are the header's, as text (what ingest reads in its one header walk): ``None`` when
the file does not have the attribute. Multi-valued elements (``ORIGINAL\\PRIMARY``) match on any
value or on the whole (in ST, LT and UT, which hold one value, a ``\\`` is text). The operators:

* a value, a list of values, ``*``/``?`` wildcards (:class:`Equals`): case-sensitive, as DICOM
  code strings are; ``*`` any run of characters, ``?`` one, every other character itself (a
  ``[`` too: ``CT HEAD [W/O]`` is a study description, not a character class); a missing
  attribute never matches, an empty one matches ``*``;
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
from functools import cache
from typing import Any, Protocol

from forwarder.config.routing import DATE_VRS, NUMERIC_VRS, keyword_vr
from forwarder.dicom.scanner import person_name


class Condition(Protocol):
    """One ``match:`` entry."""

    @property
    def key(self) -> str: ...

    def holds(self, value: str | None) -> bool: ...

    def expected(self) -> str:
        """What it wants, for ``explain`` ("CT", "regex ^RES", "not SR, KO"...)."""
        ...


#: A DA, DT or TM value (PS3.5 6.2), and the retired ACR-NEMA forms of DA and TM, which
#: PS3.5 recommends readers accept: ``2026.01.01`` is ``20260101``, ``08:30:00`` ``083000``.
_DATE_TEXT = re.compile(r"^\d{2,14}(\.\d{1,6})?([+-]\d{4})?$")
_OLD_DATE = re.compile(r"^\d{4}\.\d{2}\.\d{2}$")
_OLD_TIME = re.compile(r"^\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$")


@cache
def _one_value(key: str) -> bool:
    """ST, LT and UT hold one value: a ``\\`` in them is text (PS3.5 6.2)."""
    return keyword_vr(key) in ("ST", "LT", "UT")


def _candidates(value: str, key: str) -> list[str]:
    value = value.strip(" \x00")
    if "\\" not in value or _one_value(key):
        return [value]
    return [value, *(v.strip(" \x00") for v in value.split("\\"))]


@cache
def _wildcard(pattern: str) -> re.Pattern[str]:
    """A route value as DICOM's wildcards (PS3.4 C.2.2.2.4): ``*`` and ``?`` only."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def _wildcards(key: str, value: str | None, patterns: tuple[str, ...]) -> bool:
    if value is None:
        return False
    matchers = [_wildcard(p).match for p in patterns]
    return any(m(c) for c in _candidates(value, key) for m in matchers)


@dataclass(frozen=True, slots=True)
class Equals:
    key: str
    patterns: tuple[str, ...]

    def holds(self, value: str | None) -> bool:
        return _wildcards(self.key, value, self.patterns)

    def expected(self) -> str:
        return " or ".join(self.patterns)


@dataclass(frozen=True, slots=True)
class Regex:
    key: str
    pattern: re.Pattern[str]

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        return any(self.pattern.search(c) for c in _candidates(value, self.key))

    def expected(self) -> str:
        return f"regex {self.pattern.pattern}"


@dataclass(frozen=True, slots=True)
class Not:
    key: str
    patterns: tuple[str, ...]

    def holds(self, value: str | None) -> bool:
        return not _wildcards(self.key, value, self.patterns)

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
        if _OLD_DATE.match(value):
            value = value.replace(".", "")
        elif _OLD_TIME.match(value):
            value = value.replace(":", "")
        if not _DATE_TEXT.match(value):
            return False  # not a DA, DT or TM value: its text would compare by chance
        return (self.low is None or value[: len(self.low)] >= self.low) and (
            self.high is None or value[: len(self.high)] <= self.high
        )

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        values = _candidates(value, self.key)
        return any(self._one(v) for v in (values[1:] if len(values) > 1 else values))

    def expected(self) -> str:
        return f"range {self.low or '(open)'}..{self.high or '(open)'}"


def condition(key: str, value: str | list[str] | dict[str, Any]) -> Condition:
    """The matcher of one checked ``match:`` entry (:func:`forwarder.config.routing.
    check_condition` has normalised it)."""
    # Person names are read without trailing empty components (dicom.scanner.person_name):
    # ``Doe^John^^`` as written in a route is the same name.
    same = person_name if keyword_vr(key) == "PN" else str
    if isinstance(value, str):
        return Equals(key, (same(value),))
    if isinstance(value, list):
        return Equals(key, tuple(same(v) for v in value))
    ((op, arg),) = value.items()
    if op == "regex":
        return Regex(key, re.compile(arg))
    if op == "not":
        return Not(key, tuple(same(v) for v in (arg if isinstance(arg, list) else [arg])))
    if op == "present":
        return Present(key, bool(arg))
    if op == "range":
        vr = keyword_vr(key) or ""
        numeric = vr in NUMERIC_VRS or vr not in DATE_VRS
        return Range(key, arg[0], arg[1], numeric)
    raise ValueError(f"unknown condition operator {op!r}")
