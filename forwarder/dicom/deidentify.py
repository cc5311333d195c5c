"""De-identification: the Basic Application Level Confidentiality Profile of PS3.15 Annex E,
applied to what a route sends (an :class:`~forwarder.dicom.edit.Editor`).

The profile's action per attribute (PS3.15 Table E.1-1) comes from ``dicom-anonymizer``
(KitwareMedical), which ships the table generated from the standard for each edition; the
2026c edition is used. Its tables hold the Basic Profile column only; the options forwarder
implements follow from the standard's definition of their columns:

* ``retain_uids`` (Retain UIDs Option, E.3.9): every UID is kept;
* ``retain_long_full_dates`` (Retain Longitudinal Temporal Information with Full Dates Option,
  E.3.6): every date and time (DA, DT, TM) is kept.

The actions, at every level of nested sequences:

* X: removed; Z: emptied (a sequence: no items); D: a dummy value of its VR (a sequence: no
  items; a UID: replaced as U); U: replaced by a new UID from the UID map, the same for the same
  original UID every time (persisted in the queue database), so a study stays one study;
* where the table leaves a choice to keep the IOD valid (Z/D, X/Z, X/D, X/Z/D, X/Z/U*), the
  choice that keeps an attribute the IOD may require: Z/D and X/D and X/Z/D -> D, X/Z -> Z,
  X/Z/U* -> its UIDs replaced (U) and everything else in it emptied;
* every private element is removed (the Retain Safe Private Option is not implemented), and
  curves (50xx), overlay data and comments (60xx,3000/4000);
* then Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and its
  Code Sequence (0012,0064, CID 7050: 113100 and the options' codes), and Longitudinal Temporal
  Information Modified (0028,0303) = REMOVED or UNMODIFIED.

Pixel data is not looked at: burned-in text (Clean Pixel Data Option) is not removed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

#: The PS3.15 edition of the table used.
EDITION = "2026c"
_ITEM_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_long_full_dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
}
_METHOD_TEXT = {
    "basic": "PS3.15 Basic Application Level Confidentiality Profile",
    "retain_uids": "Retain UIDs Option",
    "retain_long_full_dates": "Retain Longitudinal Temporal Information Full Dates Option",
}
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_DUMMY = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "LO": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "UC": "ANONYMIZED",
    "AE": "ANONYMIZED",
    "UR": "ANONYMIZED",
    "IS": "0",
    "DS": "0",
}
_NUMBERS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BYTES = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
#: The table's categories and what forwarder does for each (see the module docstring).
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
    "X_Z_U_STAR_TAGS": "U*",
}


class UidSource(Protocol):
    """Where replacement UIDs come from (the queue's UID map)."""

    def replacement_uids(self, originals: Iterable[str]) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class Profile:
    """The Basic Profile's action per tag, and per masked tag (repeating groups)."""

    exact: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]  # (tag, mask, action)

    def action(self, tag: int) -> str | None:
        found = self.exact.get(tag)
        if found is not None:
            return found
        for value, mask, action in self.masked:
            if tag & mask == value:
                return action
        return None


@functools.cache
def basic_profile() -> Profile:
    """PS3.15 Table E.1-1's Basic Profile column (:data:`EDITION`), from dicom-anonymizer."""
    import importlib

    table = importlib.import_module(
        f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{EDITION}"
    )
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for category, action in _CATEGORIES.items():
        for entry in getattr(table, category):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, elem, gmask, emask = entry
                masked.append(((group << 16) | elem, (gmask << 16) | emask, action))
    return Profile(exact, tuple(masked))


def _walk_uids(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_uids(item)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            yield from (str(v) for v in values)


@dataclass(frozen=True, slots=True)
class Deidentifier:
    """A route's ``deidentify:``; ``uids`` maps original UIDs to their replacements."""

    options: frozenset[str]
    uids: UidSource

    def apply(self, ds: Dataset) -> None:
        profile = basic_profile()
        mapping: dict[str, str] = {}
        if "retain_uids" not in self.options:
            wanted = [u for u in _walk_uids(ds) if not u.startswith("1.2.840.10008.")]
            # UIDs the standard defines (SOP classes, transfer syntaxes, coding schemes) are
            # not identifying and stay; all others are replaced, the same way every time.
            mapping = self.uids.replacement_uids(wanted)
        self._level(ds, profile, mapping)
        self._mark(ds)

    def _uid(self, elem: DataElement, mapping: dict[str, str]) -> None:
        if not elem.value:
            return
        if isinstance(elem.value, list):
            elem.value = [mapping.get(str(v), str(v)) for v in elem.value]
        else:
            elem.value = mapping.get(str(elem.value), str(elem.value))

    def _level(self, ds: Dataset, profile: Profile, mapping: dict[str, str]) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]
            if tag >> 16 & 1:
                del ds[tag]  # private (no Retain Safe Private Option)
                continue
            action = profile.action(int(tag))
            retained_date = elem.VR in _DATE_VRS and "retain_long_full_dates" in self.options
            if elem.VR == "UI":
                if "retain_uids" in self.options:
                    continue
                if action == "X":
                    del ds[tag]
                else:  # U, D, or a UID the table does not list: every UID is mapped alike
                    self._uid(elem, mapping)
                continue
            if action is None or retained_date:
                if elem.VR == "SQ":
                    for item in elem.value:
                        self._level(item, profile, mapping)
                continue
            if action == "X":
                del ds[tag]
            elif action == "U*" and elem.VR == "SQ":
                for item in elem.value:
                    self._level(item, profile, mapping)
            elif action in ("Z", "U*") or elem.VR == "SQ":
                elem.value = Sequence() if elem.VR == "SQ" else None
            elif action == "D":
                self._dummy(elem)
            elif action == "U":
                self._uid(elem, mapping)

    @staticmethod
    def _dummy(elem: DataElement) -> None:
        vr = elem.VR
        if vr in _DUMMY:
            elem.value = _DUMMY[vr]
        elif vr in _NUMBERS:
            elem.value = 0
        elif vr in _BYTES:
            elem.value = b""
        else:
            elem.value = None

    def _mark(self, ds: Dataset) -> None:
        chosen = [o for o in ("retain_uids", "retain_long_full_dates") if o in self.options]
        ds.PatientIdentityRemoved = "YES"
        methods = [_METHOD_TEXT[k] for k in ["basic", *chosen]]  # LO, one value each
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        codes = Sequence()
        for key in ["basic", *chosen]:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = _ITEM_CODES[key]
            item.CodingSchemeDesignator = "DCM"
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        full_dates = "retain_long_full_dates" in self.options
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if full_dates else "REMOVED"
