"""``deidentify:`` (issue 15): PS3.15 Annex E's Basic Profile on what a route sends.

The profile's table (dicom-anonymizer's, generated from the standard) is checked against rows
of PS3.15 Table E.1-1; objects de-identified and received by DCMTK storescp hold no attribute
the profile removes, no private element, the identity-removed marks, and new UIDs that are the
same across a study and across a daemon restart (the map is in the queue database).
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from peers import orthanc, storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from stowserver import StowServer

from forwarder.config import Route
from forwarder.config.routing import DEID_OPTIONS
from forwarder.daemon.explain import PreviewUids
from forwarder.dicom.deidentify import Deidentifier, basic_profile
from forwarder.dicom.edit import edit_dataset_bytes, edit_file
from forwarder.dicom.part10 import read_meta
from forwarder.queue import SCHEMA_VERSION, Queue

#: Rows of PS3.15 Table E.1-1 (Basic Profile column), as the standard gives them.
STANDARD_ROWS = {
    0x00100010: "Z",  # Patient's Name
    0x00100030: "Z",  # Patient's Birth Date
    0x00100040: "Z",  # Patient's Sex
    0x00101000: "X",  # Other Patient IDs
    0x00101001: "X",  # Other Patient Names
    0x00101010: "X",  # Patient's Age
    0x00101040: "X",  # Patient's Address
    0x00102160: "X",  # Ethnic Group
    0x0020000D: "U",  # Study Instance UID
    0x0020000E: "U",  # Series Instance UID
    0x00080018: "U",  # SOP Instance UID
    0x00200052: "U",  # Frame of Reference UID
    0x00080050: "Z",  # Accession Number
    0x00080090: "Z",  # Referring Physician's Name
    0x00080020: "Z",  # Study Date
    0x00080030: "Z",  # Study Time
    0x00200010: "Z",  # Study ID
    0x00080081: "X",  # Institution Address
    0x00080080: "X/Z/D",  # Institution Name
    0x00081010: "X/Z/D",  # Station Name
    0x00181000: "X/Z/D",  # Device Serial Number
    0x00081070: "X/Z/D",  # Operators' Name
    0x00080023: "Z/D",  # Content Date
    0x00080021: "X/D",  # Series Date
    0x00080022: "X/Z",  # Acquisition Date
    0x00081030: "X",  # Study Description
    0x0008103E: "X",  # Series Description
    0x00081048: "X",  # Physician(s) of Record
    0x00081050: "X",  # Performing Physician's Name
    0x00400275: "X",  # Request Attributes Sequence
    0x00081140: "X/Z/U*",  # Referenced Image Sequence
}
#: What forwarder does for each of the standard's codes (the module docstring's choices).
DOES = {"X": "X", "Z": "Z", "D": "D", "U": "U", "Z/D": "D", "X/Z": "Z", "X/D": "D"}
DOES |= {"X/Z/D": "D", "X/Z/U*": "U*"}


@pytest.mark.parametrize(("tag", "code"), sorted(STANDARD_ROWS.items()))
def test_the_profile_table_agrees_with_the_standard(tag: int, code: str) -> None:
    assert basic_profile().action(tag) == DOES[code]


def test_repeating_groups_and_private_elements() -> None:
    profile = basic_profile()
    assert profile.action(0x60003000) == profile.action(0x60223000) == "X"  # Overlay Data
    assert profile.action(0x50000000) == profile.action(0x50100000) == "X"  # Curve Data


def removed_tags() -> set[int]:
    return {t for t, a in basic_profile().exact.items() if a == "X"}


def walk(ds: Dataset) -> list[tuple[int, Any, str]]:
    out = []
    for elem in ds:
        out.append((int(elem.tag), elem.value, elem.VR))
        if elem.VR == "SQ":
            for item in elem.value:
                out += walk(item)
    return out


def assert_deidentified(original: Dataset, received: Dataset) -> None:
    """Nothing the profile removes, nothing private, the marks set, the UIDs replaced."""
    gone = removed_tags()
    found = walk(received)
    assert not [t for t, _, _ in found if t in gone], "an attribute the profile removes arrived"
    assert not [t for t, _, _ in found if t >> 16 & 1], "a private element arrived"
    assert received.PatientIdentityRemoved == "YES"
    codes = [c.CodeValue for c in received.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100"
    assert received.LongitudinalTemporalInformationModified in ("REMOVED", "UNMODIFIED")
    assert str(received.PatientName) == ""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        new, old = str(received.get(keyword)), str(original.get(keyword))
        assert new.startswith("2.25.") and new != old, keyword
    assert str(received.SOPClassUID) == str(original.SOPClassUID)
    if "PixelData" in original:
        assert (received.pixel_array == original.pixel_array).all()


def real(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(str(path))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_a_deidentified_object_keeps_nothing_the_profile_removes(name: str) -> None:
    original = dcmread(real(name))
    obj = edit_file(str(real(name)), [Deidentifier(frozenset(), PreviewUids())])
    received = dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))
    assert_deidentified(original, received)
    assert obj.sop_instance_uid == str(received.SOPInstanceUID)
    assert str(received.file_meta.MediaStorageSOPInstanceUID) == obj.sop_instance_uid
    # what the destination holds it by (recorded with the ack, for the proof of delivery)
    sent = (received.StudyInstanceUID, received.SeriesInstanceUID, received.SOPInstanceUID)
    assert obj.sent_uids == sent and obj.sent_uids[2] != original.SOPInstanceUID


def test_a_transcoded_object_says_the_uids_it_is_sent_with() -> None:
    """The C-STORE path that transcodes before it changes (the peer accepted another syntax):
    the UIDs the changes gave it, as edit_file says them; None when they are its own."""
    path = real("CT_small.dcm")
    data = path.read_bytes()[read_meta(str(path)).dataset_offset :]
    out, sop, sent = edit_dataset_bytes(data, False, [Deidentifier(frozenset(), PreviewUids())])
    received = dcmread(io.BytesIO(out), force=True)
    assert sent == (received.StudyInstanceUID, received.SeriesInstanceUID, sop)
    assert sop == received.SOPInstanceUID != dcmread(path).SOPInstanceUID
    kept = Deidentifier(frozenset({"retain_uids"}), PreviewUids())
    assert edit_dataset_bytes(data, False, [kept])[2] is None


def test_the_options_keep_uids_and_dates() -> None:
    original = dcmread(real("CT_small.dcm"))
    options = frozenset({"retain_uids", "retain_long_full_dates"})
    obj = edit_file(str(real("CT_small.dcm")), [Deidentifier(options, PreviewUids())])
    received = dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))
    assert received.StudyInstanceUID == original.StudyInstanceUID
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert obj.sent_uids is None  # sent with the file's own: nothing to record
    assert received.StudyDate == original.StudyDate and received.StudyTime == original.StudyTime
    assert str(received.PatientName) == "" and "OtherPatientIDsSequence" not in received
    codes = [c.CodeValue for c in received.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113110", "113106"]
    assert received.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert len(received.DeidentificationMethod) == 3


def test_options_the_standard_names_but_forwarder_lacks_are_refused() -> None:
    with pytest.raises(ValueError, match="does not implement"):
        Route.model_validate(
            {"name": "r", "to": ["x"], "deidentify": {"options": ["clean_pixel_data"]}}
        )
    with pytest.raises(ValueError, match="exclude each other"):
        both = ["retain_long_full_dates", "retain_long_modified_dates"]
        Route.model_validate({"name": "r", "to": ["x"], "deidentify": {"options": both}})
    every = [o for o in DEID_OPTIONS if o != "retain_long_full_dates"]
    route = Route.model_validate({"name": "r", "to": ["x"], "deidentify": {"options": every}})
    assert route.deidentify is not None and route.deidentify.options == every
    with pytest.raises(ValueError, match="unknown option"):
        Route.model_validate({"name": "r", "to": ["x"], "deidentify": {"options": ["nope"]}})
    assert Route.model_validate({"name": "r", "to": ["x"], "deidentify": "basic"}).deidentify


def test_the_uid_map_is_kept_across_reopening_and_an_old_database_gains_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.sqlite"
    with Queue(path) as q:
        first = q.replacement_uids(["1.2.3", "1.2.4", "1.2.3"])
        assert set(first) == {"1.2.3", "1.2.4"} and first["1.2.3"] != first["1.2.4"]
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE uid_map")
    conn.execute("PRAGMA user_version = 4")  # as a version 4 database was
    conn.close()
    with Queue(path) as q:
        again = q.replacement_uids(["1.2.3"])
        assert again["1.2.3"] != first["1.2.3"]  # the dropped map is gone, a new one made
        assert q.replacement_uids(["1.2.3"]) == again
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# -- end to end: DCMTK storescp, a study across a restart ------------------------------------


def drop_copy(d: Daemon, name: str) -> Dataset:
    """CT_small.dcm as another instance of its study and series, dropped into incoming."""
    ds = dcmread(real("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    tmp = d.incoming / f".{name}.tmp"
    ds.save_as(tmp)
    tmp.rename(d.incoming / name)
    return ds


def test_a_study_deidentified_keeps_its_new_uids_across_a_restart(tmp_path: Path) -> None:
    with (
        storescp(tmp_path / "storescp", extra=["+xa"]) as dcmtk,
        orthanc(tmp_path / "orthanc") as orth,
    ):
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                destination("dcmtk", dcmtk.port, ae_title="STORESCP"),
                destination("orthanc", orth.port, ae_title=orth.ae_title),
            ],
            routes=[
                {"name": "research", "to": ["dcmtk"], "deidentify": "basic"},
                {"name": "archive", "to": ["orthanc"], "deidentify": "basic"},
            ],
        )
        originals = {}
        with d:
            for n in range(3):
                ds = drop_copy(d, f"a{n}.dcm")
                originals[str(ds.SOPInstanceUID)] = ds
            d.wait_done(3)
            assert d.stop() == 0
        with d:  # started again: the map must come from the queue database
            for n in range(2):
                ds = drop_copy(d, f"b{n}.dcm")
                originals[str(ds.SOPInstanceUID)] = ds
            d.wait_done(5)
            wait_until(lambda: len(dcmtk.files()) == 5, 15, what="5 files at storescp")
            wait_until(lambda: orth.instance_count() == 5, 30, what="5 instances in Orthanc")
            assert d.stop() == 0
        received = [dcmread(p) for p in dcmtk.files()]
        at_orthanc = [dcmread(p) for p in orth.take_all(tmp_path / "from-orthanc")]
    # the other route and destination: the same new UIDs (one map)
    assert {str(r.SOPInstanceUID) for r in at_orthanc} == {str(r.SOPInstanceUID) for r in received}
    assert {str(r.StudyInstanceUID) for r in at_orthanc} == {
        str(r.StudyInstanceUID) for r in received
    }
    for name in ("a0.dcm", "b1.dcm"):
        original = dcmread(d.done / name)
        assert str(original.SOPInstanceUID) in originals  # done/ holds the original
    studies = {str(r.StudyInstanceUID) for r in received}
    series = {str(r.SeriesInstanceUID) for r in received}
    frames = {str(r.FrameOfReferenceUID) for r in received}
    assert len(studies) == len(series) == len(frames) == 1, (studies, series)
    assert len({str(r.SOPInstanceUID) for r in received}) == 5
    any_original = next(iter(originals.values()))
    for r in received + at_orthanc:
        assert_deidentified(any_original, r)
    with Queue(d.queue) as q:  # the map: original study UID -> what arrived
        mapped = q.replacement_uids([str(any_original.StudyInstanceUID)])
    assert mapped[str(any_original.StudyInstanceUID)] == studies.pop()


# -- STOW-RS: the Part 10 meta header sent with a de-identified object --------------------------


def test_stow_rs_sends_no_identity_in_the_meta_header(tmp_path: Path) -> None:
    """A STOW-RS part is a Part 10 file: its meta header is written anew for a de-identified
    object, without the original writer's AE title, addresses or Private Information (the
    modality's identity and whatever its vendor put there), only the SOP Class and new SOP
    Instance UID, the transfer syntax and the implementation's identity."""
    original = dcmread(real("CT_small.dcm"))
    ds = dcmread(real("CT_small.dcm"))
    ds.file_meta.SourceApplicationEntityTitle = "CT_ROOM_3_NORTH"
    ds.file_meta.SendingApplicationEntityTitle = "ER_GATEWAY"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.10.99"
    ds.file_meta.PrivateInformation = f"patient {original.PatientName}".encode() + b"\x00"
    with (
        StowServer() as server,
        Daemon(
            tmp_path / "fw",
            destinations=[{"name": "research", "url": server.url}],
            routes=[{"name": "deid", "to": ["research"], "deidentify": "basic"}],
        ) as d,
    ):
        ds.save_as(d.incoming / ".ct.tmp")
        (d.incoming / ".ct.tmp").rename(d.incoming / "ct.dcm")
        d.wait_done(1, timeout=30)
        ((part,),) = [p.parts for p in server.posts()]
    received = dcmread(io.BytesIO(part))
    assert_deidentified(original, received)
    meta = received.file_meta
    assert str(meta.MediaStorageSOPInstanceUID) == str(received.SOPInstanceUID)
    for leaked in (b"CT_ROOM_3_NORTH", b"ER_GATEWAY", str(original.PatientName).encode()):
        assert leaked not in part, leaked
    left = {e.keyword for e in meta} - {"FileMetaInformationGroupLength"}
    assert left <= {
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    }, left


def test_retrieve_locators_are_removed_like_the_retrieve_ae_title(tmp_path: Path) -> None:
    """Retrieve URL (0008,1190) and Retrieve URI (0040,E010) are not in Table E.1-1, but they
    name the source archive and usually embed the original Study Instance UID: kept, they
    undo the UID replacement. They go as Retrieve AE Title (0008,0054) goes: removed, cleaned
    under the Retain Device Identity Option."""
    ds = dcmread(real("CT_small.dcm"))
    study = str(ds.StudyInstanceUID)
    url = f"https://pacs.hospital.example/dicom-web/studies/{study}"
    ds.RetrieveAETitle = "HOSPITALPACS"
    ds.RetrieveURL = url
    ds.add_new(0x0040E010, "UR", f"{url}/series/{ds.SeriesInstanceUID}")
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.RetrieveURL = f"{url}/instances/{ds.SOPInstanceUID}"
    ds.ReferencedInstanceSequence = [item]
    path = tmp_path / "located.dcm"
    ds.save_as(path)

    def received(options: frozenset[str]) -> Dataset:
        obj = edit_file(str(path), [Deidentifier(options, PreviewUids())])
        return dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))

    plain = received(frozenset())
    assert not [(t, v) for t, v, vr in walk(plain) if vr != "SQ" and study in str(v)]
    for keyword in ("RetrieveAETitle", "RetrieveURL", "RetrieveURI"):
        assert keyword not in plain
    assert "RetrieveURL" not in plain.ReferencedInstanceSequence[0]
    device = received(frozenset({"retain_device_identity"}))
    assert device.RetrieveAETitle == device.RetrieveURL == device.RetrieveURI == "CLEANED"
    assert not [(t, v) for t, v, vr in walk(device) if vr != "SQ" and study in str(v)]
