"""``deidentify:`` options (issue 15) on pydicom's real files: what each option keeps, removes,
replaces (CT_small, MR_small, rtplan, the SR reportsi, examples_overlay), and a study sent by
the daemon with options to DCMTK storescp, compared element by element with the original.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from peers import storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from forwarder.daemon.explain import PreviewUids
from forwarder.dicom.deidentify import MAX_SHIFT_DAYS, Deidentifier, UidSource, basic_profile
from forwarder.dicom.edit import edit_file
from forwarder.queue import Queue


def real(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(str(path))


def sent(name: str | Path, options: set[str], uids: UidSource | None = None) -> Dataset:
    """The object as a destination would receive it, de-identified with ``options``."""
    deid = Deidentifier(frozenset(options), uids or PreviewUids())
    obj = edit_file(str(name if isinstance(name, Path) else real(name)), [deid])
    return dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))


def codes(ds: Dataset) -> list[str]:
    return [str(c.CodeValue) for c in ds.DeidentificationMethodCodeSequence]


def days(a: str, b: str) -> int:
    def day(s: str) -> datetime.date:
        return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    return (day(b) - day(a)).days


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
def test_retain_device_and_institution_identity(name: str) -> None:
    original = dcmread(real(name))
    basic = sent(name, set())
    kept = sent(name, {"retain_device_identity", "retain_institution_identity"})
    assert kept.StationName == original.StationName != basic.StationName == "ANONYMIZED"
    assert kept.InstitutionName == original.InstitutionName
    assert basic.InstitutionName == "ANONYMIZED" != original.InstitutionName
    if "DeviceSerialNumber" in original:
        assert kept.DeviceSerialNumber == original.DeviceSerialNumber
        assert basic.DeviceSerialNumber == "ANONYMIZED"
    assert codes(kept) == ["113100", "113109", "113112"]
    assert str(kept.PatientName) == "" and kept.PatientID != original.PatientID  # still basic


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_retain_patient_characteristics(name: str) -> None:
    original = dcmread(real(name))
    basic = sent(name, set())
    kept = sent(name, {"retain_patient_characteristics"})
    assert kept.PatientSex == original.PatientSex and basic.PatientSex in ("", None)
    assert kept.PatientWeight == original.PatientWeight and "PatientWeight" not in basic
    if "PatientAge" in original:
        assert kept.PatientAge == original.PatientAge and "PatientAge" not in basic
    assert kept.PatientBirthDate in ("", None)  # not a characteristic the option keeps
    assert codes(kept) == ["113100", "113108"]


def test_retain_long_full_dates_keeps_dates_but_not_the_birth_date(tmp_path: Path) -> None:
    original = dcmread(real("CT_small.dcm"))
    original.PatientBirthDate = "19700203"
    original.save_as(tmp_path / "ct.dcm")
    kept = sent(tmp_path / "ct.dcm", {"retain_long_full_dates"})
    basic = sent("CT_small.dcm", set())
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime"):
        assert kept[keyword].value == original[keyword].value, keyword
    assert basic.StudyDate in ("", None) and basic.SeriesDate == "19000101"
    assert original.PatientBirthDate and kept.PatientBirthDate in ("", None)
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert codes(kept) == ["113100", "113106"]


def test_retain_long_modified_dates_shifts_every_date_of_a_patient_alike(tmp_path: Path) -> None:
    original = dcmread(real("CT_small.dcm"))
    with Queue(tmp_path / "q.sqlite") as q:
        first = sent("CT_small.dcm", {"retain_long_modified_dates"}, q)
    with Queue(tmp_path / "q.sqlite") as q:  # reopened: the shift comes from the database
        again = sent("CT_small.dcm", {"retain_long_modified_dates"}, q)
    shift = days(original.StudyDate, first.StudyDate)
    assert -MAX_SHIFT_DAYS <= shift <= -1
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        assert days(original[keyword].value, first[keyword].value) == shift, keyword
        assert again[keyword].value == first[keyword].value
    assert first.StudyTime == original.StudyTime  # whole days: times are kept
    assert days(original.InstanceCreationDate, first.InstanceCreationDate) == shift
    assert first.PatientBirthDate in ("", None)
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"
    assert codes(first) == ["113100", "113107"]
    other = sent("MR_small.dcm", {"retain_long_modified_dates"}, PreviewUids())
    assert other.StudyDate != dcmread(real("MR_small.dcm")).StudyDate


def test_clean_descriptors() -> None:
    ct = dcmread(real("CT_small.dcm"))
    cleaned = sent("CT_small.dcm", {"clean_descriptors"})
    basic = sent("CT_small.dcm", set())
    assert ct.StudyDescription and cleaned.StudyDescription == "CLEANED"
    assert "StudyDescription" not in basic
    assert ct.ImageComments and cleaned.ImageComments == "CLEANED" and "ImageComments" not in basic
    plan = sent("rtplan.dcm", {"clean_descriptors"})
    plan_basic = sent("rtplan.dcm", set())
    assert plan.RTPlanLabel == "CLEANED" and plan_basic.RTPlanLabel == "ANONYMIZED"
    assert plan.RTPlanName == "CLEANED" and "RTPlanName" not in plan_basic
    assert codes(plan) == ["113100", "113105"]


def test_clean_structured_content_keeps_the_tree_and_cleans_its_text() -> None:
    original = dcmread(real("reportsi.dcm"))
    cleaned = sent("reportsi.dcm", {"clean_structured_content"})
    basic = sent("reportsi.dcm", set())
    assert len(basic.ContentSequence) == 0
    assert len(cleaned.ContentSequence) == len(original.ContentSequence) > 0

    def walk(items: object) -> list[Dataset]:
        out: list[Dataset] = []
        for item in items:  # type: ignore[attr-defined]
            out.append(item)
            out += walk(item.get("ContentSequence", []))
        return out

    before, after = walk(original.ContentSequence), walk(cleaned.ContentSequence)
    assert len(before) == len(after)
    texts = 0
    for old, new in zip(before, after, strict=True):
        assert new.ValueType == old.ValueType
        if "ConceptNameCodeSequence" in old:
            assert new.ConceptNameCodeSequence[0].CodeValue == (
                old.ConceptNameCodeSequence[0].CodeValue
            )
        if "TextValue" in old:
            texts += 1
            assert new.TextValue == "CLEANED"
        if "PersonName" in old:
            assert str(new.PersonName) == "ANONYMOUS"
    assert texts > 0
    assert codes(cleaned) == ["113100", "113104"]


def test_clean_graphics_keeps_overlays() -> None:
    original = dcmread(real("examples_overlay.dcm"))
    overlay = 0x60003000  # Overlay Data
    assert overlay in original
    kept = sent("examples_overlay.dcm", {"clean_graphics"})
    basic = sent("examples_overlay.dcm", set())
    assert kept[overlay].value == original[overlay].value and overlay not in basic
    assert codes(kept) == ["113100", "113103"]


#: CT_small's private elements Table E.3.10-1 lists, with their blocks' Private Creators.
SAFE_IN_CT_SMALL = {
    0x00190010,  # GEMS_ACQU_01
    0x00191023,  # Table Speed [mm/rotation]
    0x00191024,  # Mid Scan Time [sec]
    0x00191027,  # Rotation Speed (Gantry Period)
    0x00250010,  # GEMS_SERS_01
    0x00251007,  # Images in Series
    0x00430010,  # GEMS_PARM_01
    0x00431027,  # Scan Pitch Ratio
}


def test_retain_safe_private_keeps_what_table_e_3_10_1_lists() -> None:
    original = dcmread(real("CT_small.dcm"))
    assert original[0x00190010].value == "GEMS_ACQU_01"
    safe = SAFE_IN_CT_SMALL
    kept = sent("CT_small.dcm", {"retain_safe_private"})
    private = {int(e.tag) for e in kept if e.tag.is_private}
    assert private == safe
    for tag in safe:
        assert kept[tag].value == original[tag].value
    assert not [e for e in sent("CT_small.dcm", set()) if e.tag.is_private]
    assert codes(kept) == ["113100", "113111"]


def test_a_safe_private_uid_is_replaced_and_an_unlisted_creator_block_removed(
    tmp_path: Path,
) -> None:
    ds = dcmread(real("MR_small.dcm"))
    block = ds.private_block(0x0099, "NQHeader", create=True)
    block.add_new(0x02, "UI", "1.2.3.4.5.6")  # Analyzed Series UID: listed, a UID
    block.add_new(0x05, "LT", "return message")  # listed
    block.add_new(0x30, "LO", "Doe^John")  # not listed
    other = ds.private_block(0x0099, "SOMEONE ELSE", create=True)
    other.add_new(0x02, "UI", "1.2.3.4.5.7")  # same element byte, another creator
    ds.save_as(tmp_path / "mr.dcm")
    kept = sent(tmp_path / "mr.dcm", {"retain_safe_private"})
    private = {int(e.tag): e.value for e in kept if e.tag.is_private}
    assert private[0x00990010] == "NQHeader" and private[0x00991005] == "return message"
    assert str(private[0x00991002]).startswith("2.25.")  # mapped like every UID
    assert set(private) == {0x00990010, 0x00991002, 0x00991005}
    uids_kept = sent(tmp_path / "mr.dcm", {"retain_safe_private", "retain_uids"})
    assert uids_kept[0x00991002].value == "1.2.3.4.5.6"


OPTIONS = [
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_modified_dates",
    "clean_descriptors",
]


def test_the_daemon_sends_a_study_deidentified_with_options(tmp_path: Path) -> None:
    """Two instances of a CT study through the daemon to storescp: each element received is
    what the options say (kept, shifted, cleaned, replaced) and nothing the profile removes
    arrived; the originals stay byte-identical in done/."""
    with storescp(tmp_path / "storescp", extra=["+xa"]) as dcmtk:
        d = Daemon(
            tmp_path / "fw",
            destinations=[destination("dcmtk", dcmtk.port, ae_title="STORESCP")],
            routes=[
                {"name": "research", "to": ["dcmtk"], "deidentify": {"options": OPTIONS}},
            ],
        )
        originals = {}
        with d:
            for n in range(2):
                ds = dcmread(real("CT_small.dcm"))
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                tmp = d.incoming / f".c{n}.tmp"
                ds.save_as(tmp)
                originals[str(ds.SOPInstanceUID)] = tmp.read_bytes()
                tmp.rename(d.incoming / f"c{n}.dcm")
            d.wait_done(2)
            wait_until(lambda: len(dcmtk.files()) == 2, 15, what="2 files at storescp")
            assert d.stop() == 0
        received = [dcmread(p) for p in dcmtk.files()]
    for n in range(2):
        assert (d.done / f"c{n}.dcm").read_bytes() in originals.values()
    original = dcmread(real("CT_small.dcm"))
    shifts = {days(original.StudyDate, r.StudyDate) for r in received}
    assert len(shifts) == 1 and shifts.pop() < 0
    assert {str(r.SOPInstanceUID) for r in received} == set(originals)  # retain_uids
    for r in received:
        assert r.StationName == original.StationName
        assert r.InstitutionName == original.InstitutionName
        assert r.PatientSex == original.PatientSex and r.PatientAge == original.PatientAge
        assert r.StudyDescription == "CLEANED" and r.ImageComments == "CLEANED"
        assert r.ContrastBolusAgent == "CLEANED" != original.ContrastBolusAgent
        assert str(r.PatientName) == "" and r.PatientID != original.PatientID
        assert r.PatientIdentityRemoved == "YES"
        assert codes(r) == [
            "113100", "113111", "113110", "113109", "113112", "113108", "113107", "113105"
        ]  # fmt: skip
        assert r.LongitudinalTemporalInformationModified == "MODIFIED"
        assert {int(e.tag) for e in r if e.tag.is_private} == SAFE_IN_CT_SMALL
        for tag in SAFE_IN_CT_SMALL:
            assert r[tag].value == original[tag].value
        assert (r.pixel_array == original.pixel_array).all()
        # every other element: as the original
        changed = {
            "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
            "PatientBirthDate", "PatientName", "PatientID", "StudyDescription", "ImageComments",
            "SOPInstanceUID", "AccessionNumber", "ContrastBolusAgent", "ReferringPhysicianName",
            "StudyID",
        }  # fmt: skip
        for elem in original:
            if elem.tag.is_private or elem.keyword in changed:
                continue
            if elem.tag not in r:  # only what the Basic Profile removes is missing
                assert basic_profile().action(int(elem.tag)) == "X", elem.keyword
                continue
            assert r[elem.tag].value == elem.value, elem.keyword
