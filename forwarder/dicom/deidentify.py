"""De-identification: the Basic Application Level Confidentiality Profile of PS3.15 Annex E and
its options, applied to what a route sends (an :class:`~forwarder.dicom.edit.Editor`).

The Basic Profile's action per attribute (PS3.15 Table E.1-1) comes from ``dicom-anonymizer``
(KitwareMedical), which ships the table generated from the standard for each edition; the
2026c edition is used. It holds the Basic Profile column only; the option columns come from
innolitics/dicom-standard's extraction of the same table (:mod:`forwarder.dicom.deid_options`).

The Basic Profile's actions, at every level of nested sequences:

* X: removed; Z: emptied (a sequence: no items); D: a dummy value of its VR (a sequence: no
  items; a UID: replaced as U); U: replaced by a new UID from the UID map, the same for the same
  original UID every time (persisted in the queue database), so a study stays one study;
* where the table leaves a choice to keep the IOD valid (Z/D, X/Z, X/D, X/Z/D, X/Z/U*), the
  choice that keeps an attribute the IOD may require: Z/D and X/D and X/Z/D -> D, X/Z -> Z,
  X/Z/U* -> its UIDs replaced (U) and everything else in it emptied;
* every UID the table does not list is replaced too (except the standard's own, 1.2.840.10008.*),
  every private element is removed, and curves (50xx), overlay data and comments (60xx);
* Retrieve URL (0008,1190) and Retrieve URI (0040,E010), which the table does not list, are
  done as Retrieve AE Title (0008,0054) is (removed; cleaned under the Retain Device Identity
  Option): they name the source archive and usually hold the original Study Instance UID,
  which would undo its replacement;
* then Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and its
  Code Sequence (0012,0064, CID 7050: 113100 and each applied option's code), and Longitudinal
  Temporal Information Modified (0028,0303) = UNMODIFIED, MODIFIED or REMOVED.

``retain_safe_private`` keeps the private elements PS3.15 Table E.3.10-1 lists (matched by
group, element byte and the value of their block's Private Creator, at every level) and the
Private Creator elements of the blocks that keep one; their UIDs (VR UI) are replaced like any
other unless ``retain_uids``; a listed element whose VR is unknown (UN: implicit VR, not in
pydicom's private dictionary) is removed when the table says it is a UID. Safe-listing through
Private Data Element Characteristics (0008,0300) is not used.

An option changes only the rows its column marks. When options disagree on a row, K (keep) wins
over C (clean), and C over the Basic Profile's action:

* K: the attribute is kept as it is (a sequence: kept, the profile applied to its items);
  ``retain_uids`` keeps every UID, listed or not, but those the Basic Profile removes (X)
  where its column does not say K;
* C of ``retain_long_modified_dates``: dates (DA, and the date of a DT) are moved back by a
  number of whole days, the same for every object of a patient: 1 to 3650 days, drawn at random
  the first time a patient (Patient ID, else Patient's Name, else Study Instance UID) is seen
  and kept in the UID map (under a SHA-256 of that key, never the key itself), so it survives
  restarts. Times (TM, the time of a DT) are kept: a whole-day shift keeps every interval. A
  date that is not a full YYYYMMDD is emptied;
* any other C ("clean: replace with values of similar meaning known not to contain identifying
  information", PS3.15 E.1.1): forwarder does not interpret free text, so a text value (AE, CS,
  SH, LO, ST, LT, UT, UC, UR, PN) is replaced by the dummy ``CLEANED`` (PN: ``ANONYMOUS``); a
  sequence is kept and the whole profile applied to its items (codes, measurements and graphic
  coordinates stay, their free text is cleaned: Text Value (0040,A160), which the table does not
  list, becomes ``CLEANED`` in such items); numbers and binary values (curve data, overlay
  bitmaps) are kept as they are: forwarder does not look at pixels, so text burned into an
  overlay bitmap stays, as it does in Pixel Data (the Clean Pixel Data Option is not
  implemented).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from forwarder.dicom.deid_options import OPTIONS, ORDER, column, safe_private

#: The PS3.15 edition of the Basic Profile table used.
EDITION = "2026c"
#: The options this module implements (the standard's others are refused by check-config).
IMPLEMENTED = tuple(o for o in ORDER if o != "basic")
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
_CLEANED = "CLEANED"
_TEXT_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR"})
_TEXT_VALUE = 0x0040A160  # Text Value: free text of SR content items, not in the table
#: Attributes the table does not list, done as a listed one: Retrieve URL (0008,1190) and
#: Retrieve URI (0040,E010) locate the object at its source archive, as Retrieve AE Title
#: (0008,0054) does, and usually embed the original Study Instance UID.
_AS_LISTED = {0x00081190: 0x00080054, 0x0040E010: 0x00080054}
_NUMBERS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BYTES = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
#: Date shift: the key's prefix in the UID map, and the largest shift in days.
SHIFT_KEY = "deidentify-date-shift:"
MAX_SHIFT_DAYS = 3650
_FULL_DATE = re.compile(r"^\d{8}")
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
def raw_basic_table() -> dict[tuple[int, int], str]:
    """dicom-anonymizer's table as the standard writes its codes: (tag, mask) -> "X/Z/D"..."""
    import importlib

    table = importlib.import_module(
        f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{EDITION}"
    )
    out: dict[tuple[int, int], str] = {}
    for category in _CATEGORIES:
        code = category.removesuffix("_TAGS").replace("_STAR", "*").replace("_", "/")
        for entry in getattr(table, category):
            if len(entry) == 2:
                out[((entry[0] << 16) | entry[1], 0xFFFFFFFF)] = code
            else:
                group, elem, gmask, emask = entry
                out[((group << 16) | elem, (gmask << 16) | emask)] = code
    return out


@functools.cache
def basic_profile() -> Profile:
    """PS3.15 Table E.1-1's Basic Profile column (:data:`EDITION`), from dicom-anonymizer."""
    does = {
        k.removesuffix("_TAGS").replace("_STAR", "*").replace("_", "/"): v
        for k, v in _CATEGORIES.items()
    }
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for (tag, mask), code in raw_basic_table().items():
        if mask == 0xFFFFFFFF:
            exact[tag] = does[code]
        else:
            masked.append((tag, mask, does[code]))
    return Profile(exact, tuple(masked))


def _walk_uids(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_uids(item)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            yield from (str(v) for v in values)


def shift_date(value: str, days: int) -> str | None:
    """A DA or DT value moved by ``days`` (its time part kept); None if not a full date."""
    text = value.strip()
    if not _FULL_DATE.match(text):
        return None
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    moved = day + datetime.timedelta(days=days)
    if moved.year < 1:
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}{text[8:]}"


@dataclass(frozen=True, slots=True)
class Deidentifier:
    """A route's ``deidentify:``; ``uids`` maps original UIDs to their replacements."""

    options: frozenset[str]
    uids: UidSource

    def apply(self, ds: Dataset) -> None:
        mapping: dict[str, str] = {}
        if "retain_uids" not in self.options:
            wanted = [u for u in _walk_uids(ds) if not u.startswith("1.2.840.10008.")]
            # UIDs the standard defines (SOP classes, transfer syntaxes, coding schemes) are
            # not identifying and stay; all others are replaced, the same way every time.
            mapping = self.uids.replacement_uids(wanted)
        shift = self.date_shift(ds) if "retain_long_modified_dates" in self.options else 0
        _Run(self.options, mapping, shift).level(ds, cleaning=False)
        self._mark(ds)

    def date_shift(self, ds: Dataset) -> int:
        """The patient's date shift in days (negative), from the UID map."""
        key = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "")
        key = key or str(ds.get("StudyInstanceUID", "") or "")
        name = SHIFT_KEY + hashlib.sha256(key.encode("utf-8")).hexdigest()
        drawn = self.uids.replacement_uids([name])[name]
        return -(1 + int(drawn.rsplit(".", 1)[-1]) % MAX_SHIFT_DAYS)

    def _mark(self, ds: Dataset) -> None:
        chosen = [o for o in ORDER if o == "basic" or o in self.options]
        ds.PatientIdentityRemoved = "YES"
        methods = [OPTIONS[k][2] for k in chosen]  # LO, one value each
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        codes = Sequence()
        for key in chosen:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = OPTIONS[key][1], OPTIONS[key][2]
            item.CodingSchemeDesignator = "DCM"
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        if "retain_long_full_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "retain_long_modified_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


@dataclass(frozen=True, slots=True)
class _Run:
    """One object's de-identification: the options, the UID mapping, the date shift."""

    options: frozenset[str]
    mapping: dict[str, str]
    shift: int

    def action(self, tag: int) -> str | None:
        """The Basic Profile's action, or K / S (shift) / C from the options' columns."""
        tag = _AS_LISTED.get(tag, tag)
        basic = basic_profile().action(tag)
        if basic is None:
            return None
        found = {
            "S" if o == "retain_long_modified_dates" and code == "C" else code
            for o in self.options
            if (code := column(o).code(tag)) is not None
        }
        for wins in ("K", "S", "C"):
            if wins in found:
                return wins
        return basic

    def level(self, ds: Dataset, cleaning: bool) -> None:
        safe = self._safe_private(ds) if "retain_safe_private" in self.options else set()
        for tag in list(ds.keys()):
            elem = ds[tag]
            if tag >> 16 & 1 and tag not in safe:
                del ds[tag]  # private, and not kept by the Retain Safe Private Option
                continue
            action = self.action(int(tag))
            if elem.VR == "UI":
                self._uid(ds, elem, action)
            elif action in (None, "K", "S", "C") and elem.VR == "SQ":
                for item in elem.value:
                    self.level(item, cleaning or action == "C")
            elif action is None or action == "K":
                if cleaning and tag == _TEXT_VALUE and elem.value:
                    elem.value = _CLEANED
            elif action == "S":
                self._shift(elem)
            elif action == "C":
                self._clean(elem)
            elif action == "X":
                del ds[tag]
            elif action == "U*" and elem.VR == "SQ":
                for item in elem.value:
                    self.level(item, cleaning)
            elif action in ("Z", "U*") or elem.VR == "SQ":
                elem.value = Sequence() if elem.VR == "SQ" else None
            elif action == "D":
                _dummy(elem)

    @staticmethod
    def _safe_private(ds: Dataset) -> set[int]:
        """The private tags of this level Table E.3.10-1 lists, and their blocks' creators."""
        table = safe_private()
        keep: set[int] = set()
        for tag in ds.keys():  # noqa: SIM118
            group, element = tag >> 16, tag & 0xFFFF
            if not group & 1 or element < 0x1000:
                continue
            creator_tag = (group << 16) | (element >> 8)
            creator = ds.get(creator_tag)
            if creator is None or not isinstance(creator.value, str):
                continue
            vr = table.get((group, element & 0xFF, creator.value.strip()))
            if vr is None or (vr == "UI" and ds[tag].VR == "UN"):
                continue
            keep |= {int(tag), creator_tag}
        return keep

    def _uid(self, ds: Dataset, elem: DataElement, action: str | None) -> None:
        if "retain_uids" in self.options or action == "K" or not elem.value:
            return
        if action == "X":
            del ds[elem.tag]
        elif isinstance(elem.value, list):  # U, D, or a UID the table does not list
            elem.value = [self.mapping.get(str(v), str(v)) for v in elem.value]
        else:
            elem.value = self.mapping.get(str(elem.value), str(elem.value))

    def _shift(self, elem: DataElement) -> None:
        if elem.VR not in ("DA", "DT") or not elem.value:
            return  # TM: a whole-day shift keeps times
        values = elem.value if isinstance(elem.value, list) else [elem.value]
        moved = [shift_date(str(v), self.shift) for v in values]
        if any(m is None for m in moved):
            elem.value = None
            return
        kept = [m for m in moved if m is not None]
        elem.value = kept if len(kept) > 1 else kept[0]

    @staticmethod
    def _clean(elem: DataElement) -> None:
        if elem.value in (None, "", b""):
            return
        if elem.VR in _TEXT_VRS:
            elem.value = _CLEANED
        elif elem.VR in ("PN", "DA", "DT", "TM", "AS"):
            _dummy(elem)
        # numbers and bytes (curve data, overlay bitmaps) are kept: see the module docstring


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
