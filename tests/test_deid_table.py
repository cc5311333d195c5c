"""``deidentify:`` options (issue 15): every row of PS3.15 Table E.1-1 under every option.

The table with all its option columns is ``forwarder/dicom/data/confidentiality_profile.json``
(innolitics/dicom-standard's extraction of the standard, April 2024); the Basic Profile column
forwarder uses is dicom-anonymizer's 2026c table. The two are compared row by row here, and each
row's attribute is put in a data set and de-identified with each option alone: the result is
what the option's column says (K kept, C cleaned, the modified-dates C shifted) or, where the
column says nothing, what the Basic Profile says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr._concepts_dict import concepts

import forwarder.dicom
from forwarder.daemon.explain import PreviewUids
from forwarder.dicom.deid_options import OPTIONS, column, parse_tag
from forwarder.dicom.deidentify import IMPLEMENTED, Deidentifier, raw_basic_table, shift_date

TABLE = Path(forwarder.dicom.__file__).parent / "data" / "confidentiality_profile.json"
ROWS: list[dict[str, str]] = json.loads(TABLE.read_text(encoding="utf-8"))
#: Rows of dicom-anonymizer's 2026c table the April 2024 extraction does not have: attributes
#: the standard added to Table E.1-1 since (all X but two). Their option columns are unknown to
#: forwarder, so only their Basic Profile action applies, whatever the options.
ONLY_IN_2026C = {
    0x00081301: "X",  # Principal Diagnosis Code Sequence
    0x00081302: "X",  # Primary Diagnosis Code Sequence
    0x00081303: "X",  # Secondary Diagnoses Code Sequence
    0x00081304: "X",  # Histological Diagnoses Code Sequence
    0x00100011: "X",  # Person Names to Use Sequence
    0x00100012: "X",  # Name to Use
    0x00100013: "X",  # Name to Use Comment
    0x00100014: "X",  # Third Person Pronouns Sequence
    0x00100015: "X",  # Pronoun Code Sequence
    0x00100016: "X",  # Pronoun Comment
    0x00100041: "X",  # Gender Identity Sequence
    0x00100042: "X",  # Sex Parameters for Clinical Use Category Comment
    0x00100043: "X",  # Sex Parameters for Clinical Use Category Sequence
    0x00100044: "X",  # Gender Identity Code Sequence
    0x00100045: "X",  # Gender Identity Comment
    0x00100046: "X",  # Sex Parameters for Clinical Use Category Code Sequence
    0x00100047: "X",  # Sex Parameters for Clinical Use Category Reference
    0x00102161: "X",  # Ethnic Group Code Sequence
    0x00102162: "X",  # Ethnic Groups
    0x00181010: "X",  # Secondary Capture Device ID
    0x00181011: "X",  # Hardcopy Creation Device ID
    0x003A0020: "X",  # Multiplex Group Label
    0x003A0203: "X",  # Channel Label
    0x003A020C: "X",  # Channel Derivation Description
    0x00400556: "X",  # Acquisition Context Description
    0x0040A034: "X",  # Effective Start DateTime
    0x0040A035: "X",  # Effective Stop DateTime
    0x0040B020: "X/D",  # Waveform Annotation Sequence
    0x0040B034: "X",  # Annotation DateTime
    0x0040B036: "X",  # Segment Definition DateTime
    0x0040B03B: "X",  # Montage Name
    0x0040B03F: "X",  # Montage Channel Label
    0x0040E012: "X",  # Display URI
    0x00700006: "D",  # Unformatted Text Value
    0x300A0054: "U",  # Table Top Position Alignment UID
}
ONLY_IN_2026C_NAMES = {
    int(line.split(":")[0], 16): line.split("# ")[1]
    for line in Path(__file__).read_text(encoding="utf-8").splitlines()
    if line.startswith("    0x") and "# " in line
}
#: What forwarder does for each of the standard's Basic Profile codes.
DOES = {"X": "X", "Z": "Z", "D": "D", "U": "U", "Z/D": "D", "X/Z": "Z", "X/D": "D"}
DOES |= {"X/Z/D": "D", "X/Z/U*": "U*"}
#: A concrete tag for each masked row.
CONCRETE = {"(50XX,XXXX)": 0x50020022, "(60XX,4000)": 0x60024000, "(60XX,3000)": 0x60023000}
_SAMPLES: dict[str, Any] = {
    "PN": "Doe^John",
    "DA": "20200302",
    "TM": "101112",
    "DT": "20200302101112",
    "AS": "045Y",
    "CS": "SOME_CODE",
    "UI": "1.2.826.0.1.3680043.8.498.77",
    "IS": "7",
    "UR": "http://example.org/x",
    "DS": "1.5",
    "US": 3,
    "OB": b"\x01\x02",
    "OW": b"\x01\x02",
    "UN": b"\x01\x02",
}


def row_tags() -> list[tuple[str, int]]:
    out = []
    for row in ROWS:
        parsed = parse_tag(row["tag"])
        if parsed is None:
            assert row["name"] == "Private Attributes"
            continue
        out.append((row["tag"], CONCRETE.get(row["tag"], parsed[0])))
    return out


def test_the_two_sources_agree_on_every_basic_profile_row() -> None:
    anonymizer = raw_basic_table()
    seen = set()
    disagree = []
    for row in ROWS:
        parsed = parse_tag(row["tag"])
        if parsed is None:
            continue
        seen.add(parsed)
        if anonymizer.get(parsed) != row["basicProfile"]:
            disagree.append((row["tag"], row["basicProfile"], anonymizer.get(parsed)))
    assert disagree == []
    only_2026c = {tag: code for (tag, mask), code in anonymizer.items() if (tag, mask) not in seen}
    assert only_2026c == ONLY_IN_2026C
    assert len(seen) == len(ROWS) - 1 == 620


def test_the_codes_are_cid_7050() -> None:
    cid = {
        value: meaning
        for group in concepts["DCM"].values()
        for value, (meaning, cids) in group.items()
        if 7050 in cids
    }
    for _, code, meaning in OPTIONS.values():
        assert cid[code] == meaning


def sample(vr: str) -> Any:
    if vr == "SQ":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-1", "99X", "thing"
        return Sequence([item])
    return _SAMPLES.get(vr, "Some text")


def vr_of(tag: int) -> str:
    """The tag's VR; for attributes newer than pydicom's dictionary, from their name."""
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        pass
    name = ONLY_IN_2026C_NAMES[tag]
    return "SQ" if name.endswith("Sequence") else "DT" if name.endswith("DateTime") else "LO"


def dataset_with(tag: int) -> tuple[Dataset, DataElement]:
    vr = vr_of(tag)
    if vr in ("OB", "OW") and tag >> 16 & 0xFF00 == 0x6000:
        vr = "OW"
    ds = Dataset()
    ds.PatientID = "PID-1"
    elem = DataElement(tag, vr, sample(vr))
    ds.add(elem)
    return ds, elem


def expected(ds: Dataset, elem: DataElement, code: str, shift: int) -> None:
    """Check what the row's attribute became under the action ``code``."""
    tag, vr, before = elem.tag, elem.VR, elem.value
    if code == "X":
        assert tag not in ds
        return
    assert tag in ds, "kept"
    after = ds[tag].value
    if code == "K":
        assert after == before
    elif code == "S":
        assert after == (shift_date(before, shift) if vr in ("DA", "DT") else before)
        assert vr not in ("DA", "DT") or after != before
    elif code == "C":
        if vr == "SQ":
            assert len(after) == 1 and after[0].CodeValue == "T-1"
        elif vr in ("AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR"):
            assert after == "CLEANED"
        elif vr == "PN":
            assert after == "ANONYMOUS"
        elif vr in ("DA", "DT", "TM", "AS"):
            assert after != before and after
        else:
            assert after == before
    elif code == "Z":
        assert after in (None, "", b"") or (vr == "SQ" and len(after) == 0)
    elif code == "D":
        if vr == "SQ":
            assert len(after) == 0
        else:
            assert after not in (None, "") and after != before
    elif code == "U":
        assert str(after).startswith("2.25.")
    elif code == "U*":
        assert vr == "SQ" and len(after) == 1


def action_for(options: frozenset[str], tag: int, basic: str) -> str:
    """The standard's column for each option; K of any option before C (S: dates shifted)."""
    found = set()
    for option in options:
        code = column(option).code(tag)
        found.add("S" if code == "C" and option == "retain_long_modified_dates" else code)
    for wins in ("K", "S", "C"):
        if wins in found:
            return wins
    return DOES[basic]


ALL_MODIFIED = frozenset(IMPLEMENTED) - {"retain_long_full_dates"}
ALL_FULL = frozenset(IMPLEMENTED) - {"retain_long_modified_dates"}
CASES = [frozenset(), *(frozenset([o]) for o in IMPLEMENTED), ALL_MODIFIED, ALL_FULL]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "+".join(sorted(o)) or "basic")
def test_every_row_under_each_option(options: frozenset[str]) -> None:
    """Every row of the JSON table and every row only in the 2026c one, alone in a data set,
    under each option alone and under all of them together."""
    uids = PreviewUids()
    deid = Deidentifier(options, uids)
    rows = [(t, c, raw_basic_table()[parse_tag(t) or (0, 0)]) for t, c in row_tags()]
    rows += [(f"{t:08X}", t, code) for t, code in ONLY_IN_2026C.items()]
    checked = 0
    for label, tag, basic in rows:
        ds, elem = dataset_with(tag)
        before = DataElement(elem.tag, elem.VR, elem.value)
        shift = deid.date_shift(ds)
        deid.apply(ds)
        code = action_for(options, tag, basic) if label[0] == "(" else DOES[basic]
        if "retain_uids" in options and before.VR == "UI" and code != "X":
            code = "K"  # retain_uids keeps every UID the profile does not remove
        try:
            expected(ds, before, code, shift)
        except AssertionError as exc:
            raise AssertionError(f"{label} {before.VR} {code} -> {ds.get(tag)}: {exc}") from None
        checked += 1
    assert checked == 620 + len(ONLY_IN_2026C)


SAFE = json.loads((TABLE.parent / "safe_private_attributes.json").read_text(encoding="utf-8"))


def test_every_row_of_the_safe_private_table() -> None:
    """Each of Table E.3.10-1's 130 rows, in a block of its creator: kept with the option (a UI
    replaced), removed without; an element of the same number under another creator removed."""
    assert len(SAFE) == 130
    for row in SAFE:
        group, element = (int(p, 16) for p in row["tag"].strip("()").replace("xx", "").split(","))
        vr = row["vr"] or "LO"  # the standard gives no VR for a few
        numbers = {"SS": 3, "US": 3, "UL": 3, "SL": 3, "FL": 1.5, "FD": 1.5}
        value = numbers.get(vr, sample(vr))
        ds = Dataset()
        ds.private_block(group, row["creator"], create=True).add_new(element, vr, value)
        ds.private_block(group, "NOT " + row["creator"], create=True).add_new(element, vr, value)
        mine, other = (group << 16) | 0x1000 | element, (group << 16) | 0x1100 | element
        Deidentifier(frozenset({"retain_safe_private"}), PreviewUids()).apply(ds)
        assert mine in ds and other not in ds and (group << 16 | 0x11) not in ds, row
        assert ds[(group << 16) | 0x10].value == row["creator"]
        if vr == "UI":
            assert str(ds[mine].value).startswith("2.25."), row
        elif vr != "SQ":
            assert ds[mine].value == value, row
        ds2 = Dataset()
        ds2.private_block(group, row["creator"], create=True).add_new(element, vr, value)
        Deidentifier(frozenset(), PreviewUids()).apply(ds2)
        assert not [e for e in ds2 if e.tag.is_private], row
