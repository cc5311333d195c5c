"""The configuration's routes: what a route matches (``match:`` conditions) and what it does
(``action``, ``to``).

A condition maps a DICOM keyword (or ``folder``, or ``calling_ae``) to a value, a list of values
or ``*``/``?`` wildcards, or to one operator: ``{regex: ...}``, ``{not: value|list}``, ``{present:
bool}``, ``{range: [lo, hi]}``. Each is checked here once, when the config is read (a bad regular
expression or range is reported with its key and line); the router
(:mod:`forwarder.daemon.conditions`) turns the checked values into matchers.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

FOLDER = "folder"
CALLING_AE = "calling_ae"  # the AE title a file came in with through `listen`
OPERATORS = ("regex", "not", "present", "range")
#: VRs a ``range`` compares as numbers, and those it compares as dates/times (as text, each
#: value cut to the bound's length: ``20261231`` holds all of that day's DT values).
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
_DATE_BOUND = re.compile(r"^\d{1,14}(\.\d{1,6})?([+-]\d{4})?$")
#: VRs whose values are bytes, not text: the header walk cannot match them.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _text(v: Any) -> Any:
    """YAML reads ``SeriesNumber: 1`` as a number and ``2026-01-01`` as a date; header values
    are matched as text (a date as DICOM writes it, YYYYMMDD)."""
    if isinstance(v, datetime.date) and not isinstance(v, datetime.datetime):
        return v.strftime("%Y%m%d")
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _values(v: Any, what: str) -> str | list[str]:
    v = _text(v)
    if isinstance(v, list):
        v = [_text(x) for x in v]
        if not v or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{what} must be a value or a non-empty list of values")
        return [str(x) for x in v]
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a value or a non-empty list of values")
    return str(v)


def _unreadable(keyword: str, vr: str) -> str | None:
    """Why the header walk, which reads the data set's own top-level values as text, can never
    see ``keyword`` (None when it can): a route on it would never match, and its ``not`` or
    ``present: false`` would hold for every file."""
    group = (keyword_tag(keyword) or 0) >> 16
    if group == 0x0002:
        why = f"{keyword} is in the file meta information, not the data set routes read"
        if keyword == "SourceApplicationEntityTitle":
            why += " (the AE title a file came in with through `listen` is `calling_ae`)"
        return why
    if group in (0x0000, 0xFFFE):
        return f"{keyword} is not in a data set (a command or item element)"
    if vr in BINARY_VRS:
        return f"{keyword} holds binary data ({vr}): match takes attributes with text values"
    return None


def keyword_tag(keyword: str) -> int | None:
    """The data dictionary's tag of ``keyword``; None when it is not a DICOM keyword. With
    :func:`keyword_vr`, the one place config reaches into pydicom: its data dictionary."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return None if tag is None else int(tag)


def keyword_vr(keyword: str) -> str | None:
    """The data dictionary's VR of ``keyword`` (its first, for ``US or SS``); None when it is
    not a DICOM keyword."""
    from pydicom.datadict import dictionary_VR

    tag = keyword_tag(keyword)
    if tag is None:
        return None
    return str(dictionary_VR(tag)).split(" or ")[0]


def _check_range(bounds: Any) -> list[str | None]:
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ValueError("range must be a list of two bounds [low, high] (null for an open end)")
    out = [None if b is None else _text(b) for b in bounds]
    if all(b is None for b in out):
        raise ValueError("range needs at least one bound (null leaves one end open)")
    if not all(b is None or isinstance(b, str) for b in out):
        raise ValueError("range bounds must be numbers, dates (YYYYMMDD) or times (HHMMSS)")
    return out


def check_condition(value: Any) -> str | list[str] | dict[str, Any]:
    """One ``match:`` value, checked and normalised (numbers to text); the keyword-dependent
    checks (a range on a number or date attribute) are :meth:`Route._conditions_fit`'s."""
    if not isinstance(value, dict):
        return _values(value, "a condition")
    if len(value) != 1:
        raise ValueError(f"a condition takes one operator of {', '.join(OPERATORS)}")
    ((op, arg),) = value.items()
    if op == "regex":
        if not isinstance(arg, str):
            raise ValueError("regex must be a string (a Python regular expression)")
        try:
            re.compile(arg)
        except re.error as exc:
            raise ValueError(f"regex {arg!r} is not a valid regular expression: {exc}") from None
        return {"regex": arg}
    if op == "not":
        return {"not": _values(arg, "not")}
    if op == "present":
        if not isinstance(arg, bool):
            raise ValueError("present must be true or false")
        return {"present": arg}
    if op == "range":
        return {"range": _check_range(arg)}
    raise ValueError(f"unknown operator {op!r} (one of {', '.join(OPERATORS)})")


MatchValue = Annotated[
    str | list[str] | dict[str, Any],
    BeforeValidator(check_condition),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "number"},
                {"type": "array", "items": {"type": ["string", "number"]}, "minItems": 1},
                {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "properties": {
                        "regex": {"type": "string"},
                        "not": {
                            "anyOf": [
                                {"type": ["string", "number"]},
                                {"type": "array", "items": {"type": ["string", "number"]}},
                            ]
                        },
                        "present": {"type": "boolean"},
                        "range": {
                            "type": "array",
                            "minItems": 2,
                            "maxItems": 2,
                            "items": {"type": ["string", "number", "null"]},
                        },
                    },
                    "additionalProperties": False,
                },
            ],
            "description": "a value, a list of values, * ? wildcards, or one of "
            "{regex: ...}, {not: value|list}, {present: bool}, {range: [low, high]}",
        }
    ),
]


class Action(StrEnum):
    SEND = "send"
    DISCARD = "discard"


def _range_problem(keyword: str, vr: str, bounds: list[str | None]) -> str | None:
    if vr in NUMERIC_VRS:
        nums = []
        for b in bounds:
            if b is None:
                continue
            try:
                nums.append(float(b))
            except ValueError:
                return f"range bound {b!r} is not a number ({keyword} is {vr})"
        if len(nums) == 2 and nums[0] > nums[1]:
            return f"range [{bounds[0]}, {bounds[1]}]: the low bound is above the high one"
        return None
    if vr in DATE_VRS:
        for b in bounds:
            if b is not None and not _DATE_BOUND.match(b):
                return (
                    f"range bound {b!r} is not a DICOM {vr} value (dates YYYYMMDD, "
                    "times HHMMSS, date-times YYYYMMDDHHMMSS; a prefix is allowed)"
                )
        lo, hi = bounds
        if lo is not None and hi is not None and lo[: len(hi)] > hi:
            return f"range [{lo}, {hi}]: the low bound is above the high one"
        return None
    return f"range applies to numbers and DA/DT/TM dates and times; {keyword} is {vr}"


class Route(_Model):
    """Files whose header (and sub-folder) match go to the listed destinations, or, for an
    ``action: discard`` route, to done/ with nothing sent."""

    name: str = Field(min_length=1)
    match: dict[str, MatchValue] = Field(
        default_factory=dict,
        description="DICOM keyword (or `folder`, or `calling_ae`: the AE title a file came in "
        "with through `listen`) -> value, list of values, * ? wildcards, or "
        "{regex|not|present|range: ...}; all must hold",
    )
    to: list[str] = Field(
        default_factory=list, description="destination names (send routes: at least one)"
    )
    modify: Modify | None = Field(
        None, description="changes made to what this route sends (not to the file on disk)"
    )
    deidentify: Deidentify | None = Field(
        None,
        description="PS3.15 Annex E Basic Profile on what this route sends: basic, or "
        "{profile: basic, options: [retain_uids, retain_long_full_dates]}",
    )
    priority: Literal["urgent", "normal", "low"] = Field(
        "normal",
        description="claimed urgent first, low last (never starved); sets the C-STORE Priority",
    )
    action: Action = Field(
        Action.SEND,
        description="send, or discard: a matching file goes to done/ with a note, nothing sent "
        "(a discard route wins over send routes)",
    )

    @model_validator(mode="after")
    def _conditions_fit(self) -> Route:
        data = {
            "match": dict(self.match),
            "to": list(self.to),
            "action": self.action.value,
            "modify": self.modify is not None and not self.modify.empty,
            "deidentify": self.deidentify is not None,
        }
        problems = route_problems(data)
        if problems:
            # Reported by load's cross check with key and line when the config comes from YAML.
            loc, message = problems[0]
            where = ".".join(str(p) for p in loc)
            raise PydanticCustomError("route_shape", f"{where}: {message}")
        return self


def bracket_notes(routes: Sequence[Route] | None) -> list[str]:
    """The route values holding a ``[``: matched as written, since only ``*`` and ``?`` are
    wildcards (the contract's, and DICOM's). Earlier builds matched with fnmatch, where
    ``[...]`` is a character class (``[CM]T``); a config written for that means something else
    now, so each is said (by check-config, and in the daemon's log at start and at a reload)."""
    notes = []
    for i, route in enumerate(routes or ()):
        for key, cond in route.match.items():
            if isinstance(cond, dict):
                cond = cond.get("not", [])
            for value in cond if isinstance(cond, list) else [cond]:
                if isinstance(value, str) and "[" in value:
                    notes.append(
                        f"routes[{i}].match.{key}: {value!r} is matched with its [ as itself "
                        "(only * and ? are wildcards; [...] is no character class)"
                    )
    return notes


def route_problems(route: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """What is wrong with one route across its keys (a condition that does not fit its
    keyword, ``to`` against ``action``), each with its path inside the route. Run on the raw
    YAML by :mod:`forwarder.config.load` (to name the line) and by :class:`Route`."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    match = route.get("match")
    for key, cond in match.items() if isinstance(match, dict) else ():
        if key in (FOLDER, CALLING_AE):
            if isinstance(cond, dict) and "range" in cond:
                problems.append((("match", key), "range applies to numbers and dates"))
            continue
        vr = keyword_vr(str(key))
        if vr is None:
            problems.append(
                (("match", key), f"{key!r} is not a DICOM keyword (e.g. Modality, StationName)")
            )
            continue
        if vr == "SQ":  # the header is read for values: a sequence would never match
            problems.append(
                (("match", key), f"{key} is a sequence: match takes attributes with values")
            )
            continue
        unreadable = _unreadable(str(key), vr)
        if unreadable is not None:
            problems.append((("match", key), unreadable))
            continue
        if isinstance(cond, dict) and "range" in cond:
            try:
                bounds = _check_range(cond["range"])
            except ValueError:
                continue  # reported by the field's own validation
            problem = _range_problem(str(key), vr, bounds)
            if problem is not None:
                problems.append((("match", key, "range"), problem))
    action = route.get("action", "send")
    to = route.get("to")
    if action == "send" and not to and "to" not in route:
        problems.append((("to",), "required key is missing (a send route needs destinations)"))
    elif action == "send" and isinstance(to, list) and not to:
        problems.append((("to",), "a send route needs at least one destination"))
    if action == "discard" and to:
        problems.append((("to",), "a discard route sends nowhere; remove `to`"))
    for key in ("modify", "deidentify"):
        if action == "discard" and route.get(key):
            problems.append(((key,), f"a discard route sends nothing to {key}"))
    return problems


# -- modify: what is changed in what is sent -------------------------------------------------

_TAG_TEXT = re.compile(r"^\(?(?:0x)?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_GROUP_TEXT = re.compile(r"^(?:0x)?([0-9A-Fa-f]{4})$")
#: What C-STORE and STOW-RS need and a modification may not take away or change.
_PROTECTED = frozenset({"SOPClassUID", "SOPInstanceUID"})
_PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # the same, as tags


def parse_remove(item: str) -> tuple[str, int]:
    """One ``remove:`` entry: ``("private", 0)``, ``("group", 0x0009)``, ``("tag", 0x00091001)``
    or ``("keyword", tag)``. Raises ValueError saying what is accepted."""
    from pydicom.datadict import tag_for_keyword

    if item == "private":
        return "private", 0
    if (m := _GROUP_TEXT.match(item)) is not None:
        return "group", int(m.group(1), 16)
    if (m := _TAG_TEXT.match(item)) is not None:
        return "tag", int(m.group(1) + m.group(2), 16)
    tag = tag_for_keyword(item)
    if tag is None:
        raise ValueError(
            f"{item!r} is not a DICOM keyword, `private`, a group (0x0009) or a tag "
            "((0009,1001) or 0x00091001)"
        )
    return "keyword", int(tag)


def template_fields(template: str) -> list[str]:
    """The attribute keywords a ``set:`` template uses (``EXT-{AccessionNumber}``); raises
    ValueError for a malformed template."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc} (write {{{{ and }}}} for braces)") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if spec or conversion or not field:
            raise ValueError(f"template {template!r}: write {{Keyword}}, nothing else, in braces")
        fields.append(field)
    return fields


class Modify(_Model):
    """Changes made to what is sent to a destination (never to the file on disk)."""

    set: dict[str, str] = Field(
        default_factory=dict,
        description="DICOM keyword -> new value, or a template naming other attributes: "
        '"EXT-{AccessionNumber}" (a missing attribute renders empty)',
    )
    remove: list[str] = Field(
        default_factory=list,
        description="keywords, `private` (every private element), a group (0x0009) or a tag "
        "((0009,1001))",
    )

    @model_validator(mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("set"), dict):
            value = {**value, "set": {k: _text(v) for k, v in value["set"].items()}}
        return value

    @model_validator(mode="after")
    def _check(self) -> Modify:
        problems = modify_problems({"set": dict(self.set), "remove": list(self.remove)})
        if problems:
            # Reported by load's cross check with key and line when the config comes from YAML.
            loc, message = problems[0]
            where = ".".join(str(p) for p in loc)
            raise PydanticCustomError("modify_shape", f"{where}: {message}")
        return self

    @property
    def empty(self) -> bool:
        return not self.set and not self.remove


def modify_problems(modify: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """What is wrong in one ``modify:`` block, each with its path inside it (``("set",
    "Nope")``, ``("remove", 2)``). Run on the raw YAML by :mod:`forwarder.config.load` (to name
    the line) and by :class:`Modify`; values of the wrong type are the fields' own errors."""
    from pydicom.datadict import tag_for_keyword

    problems: list[tuple[tuple[Any, ...], str]] = []
    sets = modify.get("set")
    for keyword, template in sets.items() if isinstance(sets, dict) else ():
        at = ("set", keyword)
        tag = tag_for_keyword(str(keyword))
        if tag is None:
            problems.append((at, f"{keyword!r} is not a DICOM keyword"))
        elif keyword in _PROTECTED | _PIXEL_KEYWORDS or int(tag) >> 16 == 0x0002:
            problems.append((at, f"{keyword} cannot be changed by modify"))
        elif keyword_vr(str(keyword)) == "SQ":
            problems.append((at, f"{keyword} is a sequence: set takes attributes with values"))
        if not isinstance(template, str):
            continue
        try:
            names = template_fields(template)
        except ValueError as exc:
            problems.append((at, str(exc)))
            continue
        for name in names:
            if tag_for_keyword(name) is None:
                problems.append((at, f"{{{name}}} is not a DICOM keyword"))
    removes = modify.get("remove")
    for i, item in enumerate(removes if isinstance(removes, list) else []):
        if not isinstance(item, str):
            continue
        try:
            kind, number = parse_remove(item)
        except ValueError as exc:
            problems.append((("remove", i), str(exc)))
            continue
        if kind in ("tag", "keyword") and number in (0x00080016, 0x00080018):
            problems.append((("remove", i), f"{item} is needed to store the object"))
        # Pixel Data is streamed from the file, not edited: a removal would be ignored for
        # most files but would drop the pixels of a deflated one (changed in memory).
        if (kind in ("tag", "keyword") and number in _PIXEL_TAGS) or (
            kind == "group" and number == 0x7FE0
        ):
            problems.append((("remove", i), f"{item}: Pixel Data cannot be removed by modify"))
        if kind == "group" and number in (0x0002, 0x0008):
            problems.append(
                (("remove", i), f"group {item} holds what is needed to store the object")
            )
    return problems


# -- deidentify: PS3.15 Annex E -------------------------------------------------------------

#: The options forwarder implements, by the standard's names (PS3.15 Table E.1-1 columns, E.3).
DEID_OPTIONS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
#: The standard's other options: named, so that a config asking for one is told it is not
#: implemented rather than that it is misspelled: the pixel options need image analysis.
DEID_OPTIONS_NOT_BUILT = (
    "clean_pixel_data",
    "clean_recognizable_visual_features",
)


class Deidentify(_Model):
    """De-identification of what a route sends: the Basic Application Level Confidentiality
    Profile of PS3.15 Annex E, with options."""

    profile: str = Field("basic", pattern="^basic$", description="basic (PS3.15 Annex E)")
    options: list[str] = Field(
        default_factory=list,
        description="PS3.15 Table E.1-1 option columns: " + ", ".join(DEID_OPTIONS),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"profile": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known_options(self) -> Deidentify:
        for option in self.options:
            if option in DEID_OPTIONS_NOT_BUILT:
                raise ValueError(
                    f"options: {option} is a PS3.15 option forwarder does not implement "
                    f"(implemented: {', '.join(DEID_OPTIONS)})"
                )
            if option not in DEID_OPTIONS:
                raise ValueError(
                    f"options: unknown option {option!r} (one of {', '.join(DEID_OPTIONS)})"
                )
        if {"retain_long_full_dates", "retain_long_modified_dates"} <= set(self.options):
            raise ValueError(
                "options: retain_long_full_dates and retain_long_modified_dates exclude each "
                "other (dates are either kept or shifted)"
            )
        return self


Route.model_rebuild()
