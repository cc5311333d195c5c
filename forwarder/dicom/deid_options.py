"""The option columns of PS3.15 Table E.1-1: what each option of the Basic Application Level
Confidentiality Profile keeps (K) or cleans (C), and the option's CID 7050 code.

The table is ``data/confidentiality_profile.json`` (innolitics/dicom-standard's extraction of
Table E.1-1, MIT; source and commit in ``data/README.md``). Its Basic Profile column is not used
here (:mod:`forwarder.dicom.deidentify` takes it from dicom-anonymizer's newer edition); the
two are compared row by row in ``tests/test_deid_table.py``.

Options and the columns they read, by forwarder's config names (PS3.15 E.3):

========================================  ======================  ======================
option                                    column                  CID 7050 code
========================================  ======================  ======================
retain_safe_private                       rtnSafePrivOpt          113111
retain_uids                               rtnUIDsOpt              113110
retain_device_identity                    rtnDevIdOpt             113109
retain_institution_identity               rtnInstIdOpt            113112
retain_patient_characteristics            rtnPatCharsOpt          113108
retain_long_full_dates                    rtnLongFullDatesOpt     113106
retain_long_modified_dates                rtnLongModifDatesOpt    113107
clean_descriptors                         cleanDescOpt            113105
clean_structured_content                  cleanStructContOpt      113104
clean_graphics                            cleanGraphOpt           113103
========================================  ======================  ======================

The codes and meanings are CID 7050 (PS3.16) as pydicom's concept dictionary holds them; a
test checks them against it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

#: option -> (table column, CID 7050 code value, code meaning); "basic" is the profile itself.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "basic": ("basicProfile", "113100", "Basic Application Confidentiality Profile"),
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": (
        "rtnInstIdOpt",
        "113112",
        "Retain Institution Identity Option",
    ),
    "retain_patient_characteristics": (
        "rtnPatCharsOpt",
        "113108",
        "Retain Patient Characteristics Option",
    ),
    "retain_long_full_dates": (
        "rtnLongFullDatesOpt",
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_long_modified_dates": (
        "rtnLongModifDatesOpt",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "clean_structured_content": ("cleanStructContOpt", "113104", "Clean Structured Content Option"),
    "clean_graphics": ("cleanGraphOpt", "113103", "Clean Graphics Option"),
}
#: The order options are listed in (DeidentificationMethod, its code sequence).
ORDER = tuple(OPTIONS)


@dataclass(frozen=True, slots=True)
class Column:
    """One option column: K or C per tag, and per masked tag (50xx, 60xx repeating groups)."""

    exact: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]  # (tag, mask, code)

    def code(self, tag: int) -> str | None:
        found = self.exact.get(tag)
        if found is not None:
            return found
        for value, mask, code in self.masked:
            if tag & mask == value:
                return code
        return None


def parse_tag(text: str) -> tuple[int, int] | None:
    """``(gggg,eeee)`` with ``x`` for any hex digit -> (tag, mask); None for the private row."""
    inner = text.strip("()").split(")")[0]
    digits = inner.replace(",", "").lower()
    if len(inner) != 9 or inner[4] != "," or set(digits) - set("0123456789abcdefx"):
        return None
    tag = int("".join("0" if c == "x" else c for c in digits), 16)
    mask = int("".join("0" if c == "x" else "f" for c in digits), 16)
    return tag, mask


@functools.cache
def table_rows() -> tuple[dict[str, str], ...]:
    """The rows of Table E.1-1 as the JSON file holds them."""
    text = resources.files("forwarder.dicom").joinpath("data/confidentiality_profile.json")
    rows: list[dict[str, str]] = json.loads(text.read_text(encoding="utf-8"))
    return tuple(rows)


@functools.cache
def column(option: str) -> Column:
    """The option's column (K/C per tag)."""
    name = OPTIONS[option][0]
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for row in table_rows():
        code = row.get(name)
        parsed = parse_tag(row["tag"])
        if not code or parsed is None:
            continue
        tag, mask = parsed
        if mask == 0xFFFFFFFF:
            exact[tag] = code
        else:
            masked.append((tag, mask, code))
    return Column(exact, tuple(masked))


@functools.cache
def safe_private() -> dict[tuple[int, int, str], str]:
    """PS3.15 Table E.3.10-1 (``data/safe_private_attributes.json``): (group, element byte,
    Private Creator) -> the VR the standard gives (empty where it gives none)."""
    text = resources.files("forwarder.dicom").joinpath("data/safe_private_attributes.json")
    out: dict[tuple[int, int, str], str] = {}
    for row in json.loads(text.read_text(encoding="utf-8")):
        group, element = row["tag"].strip("()").split(",")
        out[(int(group, 16), int(element[2:], 16), row["creator"])] = row["vr"]
    return out
