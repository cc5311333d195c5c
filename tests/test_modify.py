"""``modify:`` on routes and destinations (issue 15): what arrives carries exactly the
configured changes and nothing else, its pixels are the original's, the file in done/ is
byte-identical to what was dropped, and a modified 500 MB object is sent with flat memory.

Real files (pydicom's test files) to real peers: DCMTK storescp, Orthanc over DIMSE and over
STOW-RS; the comparison is element by element against the original.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER, wait_until
from daemon import Daemon, destination
from peers import orthanc, orthanc_dicomweb_url, storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from forwarder.config import Route, parse_config
from forwarder.daemon.router import Router
from forwarder.dicom.edit import EditError, Modification, edit_file
from forwarder.errors import ConfigError

FILES = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"]
FILES += ["image_dfl.dcm"]  # deflated: changed in memory
FILES_NO_PIXELS = ["rtplan.dcm"]

ROUTE_MODIFY = {
    "set": {"InstitutionName": "General Hospital", "StudyID": "EXT-{StudyID}"},
    "remove": ["private", "OtherPatientIDs", "ReferringPhysicianName"],
}
DEST_MODIFY = {"set": {"IssuerOfPatientID": "HOSP-A", "StationName": "{StationName}-FW"}}


def real(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


GONE = object()  # expected absent (None is an empty value)


def expected_after(original: Dataset, *modifies: Mapping[str, Any]) -> dict[int, Any]:
    """Tag -> the value expected to arrive (None: must be absent), for every top-level tag the
    original has or a modification touches; worked out here independently of forwarder
    (:data:`GONE`: must be absent)."""
    want: dict[int, Any] = {e.tag: e.value for e in original}
    for mod in modifies:
        for keyword, template in mod.get("set", {}).items():
            t = tag_for_keyword(keyword)
            assert t is not None
            text = template
            if "{" in template:
                field = template[template.index("{") + 1 : template.index("}")]
                ft = tag_for_keyword(field)
                value = want.get(ft) if ft is not None else None
                shown = "" if value is None or value is GONE else str(value)
                text = template.replace("{" + field + "}", shown)
            want[t] = text
        for item in mod.get("remove", []):
            if item == "private":
                for t in [t for t in want if (t >> 16) & 1]:
                    want[t] = GONE
            else:
                t = tag_for_keyword(item)
                assert t is not None
                want[t] = GONE
    return want


def assert_exactly(
    original: Dataset, received: Dataset, want: dict[int, Any], *, padding: bool = True
) -> None:
    """Every top-level element of ``received`` is the original's, except exactly the changes
    in ``want``; pixel data decoded equal. ``padding=False``: the peer drops Data Set Trailing
    Padding (FFFC,FFFC) when it writes the file (DCMTK storescp does, by default)."""
    got = {e.tag: e for e in received}
    problems = []
    for tag, value in want.items():
        if tag == 0x7FE00010 or (tag == 0xFFFCFFFC and not padding):
            continue
        if value is GONE:
            if tag in got:
                problems.append(f"{tag}: should be gone, is {got[tag].value!r}")
        elif tag not in got:
            problems.append(f"{tag}: missing (expected {value!r})")
        elif got[tag].value != value and not (got[tag].value in (None, "") and value in (None, "")):
            problems.append(f"{tag}: {got[tag].value!r} != {value!r}")
    extra = [t for t in got if t not in want]
    assert not extra, f"unexpected elements arrived: {extra}"
    assert not problems, "\n".join(problems)
    if "PixelData" in original:
        assert (received.pixel_array == original.pixel_array).all()


# -- the edit itself, on real files -----------------------------------------------------------


@pytest.mark.parametrize("name", FILES + FILES_NO_PIXELS)
def test_an_edited_object_carries_exactly_the_changes(name: str) -> None:
    path = real(name)
    original = dcmread(path)
    editors = [
        Modification.from_config(Route(name="r", to=["x"], modify=ROUTE_MODIFY).modify),  # type: ignore[arg-type]
        Modification.from_config(Route(name="d", to=["x"], modify=DEST_MODIFY).modify),  # type: ignore[arg-type]
    ]
    before = path.read_bytes()
    obj = edit_file(str(path), editors)
    assert path.read_bytes() == before  # the file on disk is never changed
    received = dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))
    assert str(received.file_meta.TransferSyntaxUID) == str(original.file_meta.TransferSyntaxUID)
    assert_exactly(original, received, expected_after(original, ROUTE_MODIFY, DEST_MODIFY))
    if "PixelData" in original and name != "image_dfl.dcm":
        # the pixel data element is the file's own bytes, not re-encoded
        assert any(not isinstance(s, bytes) for s in obj.segments)
    keywords = {c.keyword for c in obj.changes}
    assert {"InstitutionName", "StudyID", "IssuerOfPatientID", "StationName"} <= keywords


def test_a_template_naming_a_missing_attribute_renders_it_empty() -> None:
    mod = Modification((("AccessionNumber", "EXT-{AccessionNumber}"),), ())
    ds = Dataset()
    mod.apply(ds)
    assert ds.AccessionNumber == "EXT-"


def test_remove_a_group_and_a_tag() -> None:
    path = real("CT_small.dcm")
    original = dcmread(path)
    assert any(e.tag >> 16 == 0x0009 for e in original)
    obj = edit_file(str(path), [Modification((), ("0x0009", "(0043,1010)"))])
    received = dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))
    assert not any(e.tag >> 16 == 0x0009 for e in received)
    assert 0x00431010 in original and 0x00431010 not in received
    assert 0x00431011 in received  # the rest of its group stays


def test_an_edit_never_drops_the_pixels_of_a_deflated_object() -> None:
    """A deflated object is changed in memory, pixels included: a removal of Pixel Data (which
    the config refuses) must fail there too, not send an image without pixels."""
    drop = Modification((), ("(7FE0,0010)",))
    with pytest.raises(EditError, match="Pixel Data"):
        edit_file(str(real("image_dfl.dcm")), [drop])


def test_a_destination_without_changes_keeps_the_byte_exact_path() -> None:
    routes = [
        Route(name="r", to=["pacs", "plain"], modify=ROUTE_MODIFY),  # type: ignore[arg-type]
        Route(name="s", to=["plain2"]),
    ]
    router = Router(routes, ["pacs", "plain", "plain2", "other"], {"other": None})
    assert router.may_edit("pacs") and router.may_edit("plain")
    assert not router.may_edit("plain2") and not router.may_edit("other")


# -- config: conflicts --------------------------------------------------------------------------

CONFIG = """\
incoming: in
done: done
failed: failed
queue: q.sqlite
destinations:
  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}
routes:
"""


def test_two_routes_sending_alike_files_with_different_changes_are_refused() -> None:
    text = CONFIG + (
        "  - name: a\n"  # line 8
        "    to: [pacs]\n"
        "    modify: {set: {InstitutionName: A}}\n"
        "  - name: b\n"  # line 11
        "    match: {Modality: CT}\n"
        "    to: [pacs]\n"  # line 13
        "    modify: {set: {InstitutionName: B}}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.problems == [
        "routes[1].to (line 13): routes[0] (a) sends the same files to pacs with other changes "
        "(modify/deidentify): give them the same changes, or put the changes on the destination"
    ]


@pytest.mark.parametrize(
    ("modify", "where", "words"),
    [
        ("{set: {Nope: x}}", "set.Nope (line 10)", "'Nope' is not a DICOM keyword"),
        ("{set: {StudyID: 'X-{Nope}'}}", "set.StudyID (line 10)", "{Nope} is not a DICOM"),
        ("{set: {StudyID: 'X-{'}}", "set.StudyID (line 10)", "template"),
        ("{set: {SOPInstanceUID: '1.2'}}", "set.SOPInstanceUID (line 10)", "cannot be changed"),
        ("{remove: [SOPInstanceUID]}", "remove[0] (line 10)", "needed to store the object"),
        (
            "{set: {OtherPatientIDsSequence: x}}",
            "set.OtherPatientIDsSequence (line 10)",
            "a sequence",
        ),
        ("\n      remove: [private, Nope]", "remove[1] (line 11)", "'Nope' is not a DICOM keyword"),
        # Pixel Data is streamed, never edited: a removal would be ignored for most files and
        # would send a deflated one without its pixels (reported stored)
        ("{remove: [PixelData]}", "remove[0] (line 10)", "Pixel Data cannot be removed"),
        ("{remove: ['(7FE0,0010)']}", "remove[0] (line 10)", "Pixel Data cannot be removed"),
        ("{remove: ['0x7FE0']}", "remove[0] (line 10)", "Pixel Data cannot be removed"),
    ],
)
def test_bad_modifications_are_refused_with_key_and_line(
    modify: str, where: str, words: str
) -> None:
    text = CONFIG + f"  - name: a\n    to: [pacs]\n    modify: {modify}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    (problem,) = err.value.problems
    assert problem.startswith(f"routes[0].modify.{where}: "), problem
    assert words in problem, problem


def test_a_bad_destination_modification_names_its_key_and_line() -> None:
    text = (
        CONFIG.replace(
            "port: 104}", "port: 104,\n      modify: {set: {InstitutionName: A, Bad: B}}}"
        )
        + "  - {name: a, to: [pacs]}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.problems == [
        "destinations[0].modify.set.Bad (line 7): 'Bad' is not a DICOM keyword"
    ]


# -- end to end: DCMTK storescp and Orthanc (DIMSE and STOW-RS) --------------------------------


def drop_real(d: Daemon, names: list[str]) -> None:
    for name in names:
        shutil.copy(real(name), d.incoming / f".{name}.tmp")
        (d.incoming / f".{name}.tmp").rename(d.incoming / name)


def by_uid(paths: list[Path]) -> dict[str, Dataset]:
    out = {}
    for p in paths:
        ds = dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def test_storescp_and_orthanc_receive_exactly_the_configured_changes(tmp_path: Path) -> None:
    # MR_small_bigendian is MR_small_implicit's object (same UIDs): the edit test covers it
    names = ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"]
    names += FILES_NO_PIXELS
    with (
        storescp(tmp_path / "storescp", extra=["+xa"]) as dcmtk,
        orthanc(tmp_path / "orthanc") as orth,
    ):
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                destination("dcmtk", dcmtk.port, ae_title="STORESCP"),
                destination("orthanc", orth.port, ae_title=orth.ae_title, modify=DEST_MODIFY),
            ],
            routes=[
                {"name": "dimse", "to": ["dcmtk", "orthanc"], "modify": ROUTE_MODIFY},
            ],
        )
        with d:
            drop_real(d, names)
            assert sorted(d.wait_done(len(names), timeout=60)) == sorted(names)
            wait_until(lambda: len(dcmtk.files()) == len(names), 15, what="storescp files")
            wait_until(lambda: orth.instance_count() == len(names), 30, what="orthanc")
            assert d.stop() == 0
        for name in names:  # done/ holds the originals, byte for byte
            assert (d.done / name).read_bytes() == real(name).read_bytes(), name
        at_dcmtk = by_uid(dcmtk.files())
        at_orthanc = by_uid(orth.take_all(tmp_path / "from-orthanc"))
        for name in names:
            original = dcmread(real(name))
            uid = str(original.SOPInstanceUID)
            want = expected_after(original, ROUTE_MODIFY)
            assert_exactly(original, at_dcmtk[uid], want, padding=False)
            assert_exactly(
                original, at_orthanc[uid], expected_after(original, ROUTE_MODIFY, DEST_MODIFY)
            )


def test_send_to_a_configured_destination_applies_its_modify(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    """``forwarder send --destination NAME -c CONFIG`` sends what the daemon would send there:
    the destination's own ``modify`` (routes are the daemon's); the files stay as they are."""
    names = ["CT_small.dcm", "MR_small_implicit.dcm"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        shutil.copyfile(real(name), folder / name)
    with storescp(tmp_path / "storescp", extra=["+xa"]) as dcmtk:
        config = tmp_path / "forwarder.yaml"
        config.write_text(
            f"incoming: {tmp_path / 'i'}\ndone: {tmp_path / 'd'}\nfailed: {tmp_path / 'f'}\n"
            f"queue: {tmp_path / 'q.sqlite'}\ndestinations:\n"
            f"  - name: pacs\n    ae_title: STORESCP\n    host: 127.0.0.1\n    port: {dcmtk.port}\n"
            "    modify: {set: {IssuerOfPatientID: HOSP-A, StationName: '{StationName}-FW'}}\n"
        )
        result = subprocess.run(
            [FORWARDER, "send", "--destination", "pacs", "-c", str(config), str(folder)],
            env=forwarder_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(dcmtk.files()) == len(names), 15, what="storescp files")
        received = by_uid(dcmtk.files())
    for name in names:
        original = dcmread(real(name))
        assert (folder / name).read_bytes() == real(name).read_bytes()
        want = expected_after(original, DEST_MODIFY)
        assert_exactly(original, received[str(original.SOPInstanceUID)], want, padding=False)


def test_stow_rs_receives_exactly_the_destination_changes(tmp_path: Path) -> None:
    names = ["CT_small.dcm", "JPEG2000.dcm"]
    with orthanc(tmp_path / "orthanc", dicomweb=True) as orth:
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                {"name": "web", "url": orthanc_dicomweb_url(orth), "modify": ROUTE_MODIFY}
            ],
        )
        with d:
            drop_real(d, names)
            assert sorted(d.wait_done(len(names), timeout=60)) == sorted(names)
            wait_until(lambda: orth.instance_count() == len(names), 30, what="orthanc")
            assert d.stop() == 0
        at_orthanc = by_uid(orth.take_all(tmp_path / "from-orthanc"))
    for name in names:
        original = dcmread(real(name))
        assert (d.done / name).read_bytes() == real(name).read_bytes()
        received = at_orthanc[str(original.SOPInstanceUID)]
        assert_exactly(original, received, expected_after(original, ROUTE_MODIFY))


def test_a_file_two_routes_send_with_different_changes_fails_with_the_reason(
    tmp_path: Path,
) -> None:
    with storescp(tmp_path / "storescp") as dcmtk:
        d = Daemon(
            tmp_path / "fw",
            destinations=[destination("dcmtk", dcmtk.port, ae_title="STORESCP")],
            routes=[
                {
                    "name": "ct",
                    "match": {"Modality": "CT"},
                    "to": ["dcmtk"],
                    "modify": {"set": {"InstitutionName": "A"}},
                },
                {
                    "name": "scanner",
                    "match": {"StationName": "SCANNER1"},
                    "to": ["dcmtk"],
                    "modify": {"set": {"InstitutionName": "B"}},
                },
            ],
        )
        with d:
            d.drop("both.dcm", modality="CT", station="SCANNER1")
            d.drop("one.dcm", modality="CT", station="OTHER")
            assert d.wait_failed(1) == ["both.dcm"]
            assert d.wait_done(1) == ["one.dcm"]
            reason = str(d.error_json("both.dcm")["reason"])
            assert reason.startswith("conflicting changes: routes ct, scanner send it to dcmtk")
            assert d.stop() == 0
        (received,) = dcmtk.files()
        assert dcmread(received).InstitutionName == "A"


# -- memory: a 500 MB object, modified, sent with flat memory ----------------------------------


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_a_modified_500_mb_file_is_sent_with_flat_memory(tmp_path: Path) -> None:
    from test_dicomweb_large import big_sparse_file

    with storescp(tmp_path / "storescp", extra=["--ignore"]) as dcmtk:
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                destination(
                    "dcmtk",
                    dcmtk.port,
                    ae_title="STORESCP",
                    modify={"set": {"InstitutionName": "Big"}},
                    response_timeout="60s",
                )
            ],
        )
        with d:
            assert d.proc is not None
            pid = d.proc.pid
            # A small file first: the baseline has pydicom and the edit code loaded.
            drop_real(d, ["CT_small.dcm"])
            d.wait_done(1)
            idle_kb = _vm_hwm_kb(pid)
            big = d.incoming / ".big.dcm.tmp"
            big_sparse_file(big)  # a sparse file: its 512 MiB of pixels are a hole
            size = big.stat().st_size
            assert size > 500 * 1024 * 1024
            big.rename(d.incoming / "big.dcm")
            peak_kb = idle_kb
            deadline = time.monotonic() + 120
            while not (d.done / "big.dcm").exists():
                assert time.monotonic() < deadline, d.log_tail()
                peak_kb = max(peak_kb, _vm_hwm_kb(pid))
                time.sleep(0.01)
            peak_kb = max(peak_kb, _vm_hwm_kb(pid))
            assert d.stop() == 0
    assert idle_kb > 10_000
    grown_mb = (peak_kb - idle_kb) / 1024
    assert grown_mb < 48, f"the daemon grew by {grown_mb:.0f} MB sending a {size / 1e6:.0f} MB file"


def test_a_modified_500_mb_file_goes_by_stow_rs_with_flat_memory(tmp_path: Path) -> None:
    from stowserver import Answer, Seen, StowServer, stow_json
    from test_dicomweb_large import big_sparse_file

    from forwarder.dicom.part10 import read_meta

    uids: dict[str, str] = {}

    def answer(seen: Seen) -> Answer:  # streamed: the server keeps no parts, so no UIDs
        uid = uids["big"] if seen.nbytes > 100_000_000 else uids["small"]
        return Answer(body=stow_json({uid: None}, {}))

    uids["small"] = str(dcmread(real("CT_small.dcm")).SOPInstanceUID)
    with StowServer(answer, stream=True) as server:
        d = Daemon(
            tmp_path / "fw",
            destinations=[
                {
                    "name": "web",
                    "url": server.url,
                    "response_timeout": "60s",
                    "modify": {"set": {"InstitutionName": "Big"}},
                }
            ],
        )
        with d:
            assert d.proc is not None
            pid = d.proc.pid
            drop_real(d, ["CT_small.dcm"])
            d.wait_done(1)
            idle_kb = _vm_hwm_kb(pid)
            big = d.incoming / ".big.dcm.tmp"
            big_sparse_file(big)
            uids["big"] = read_meta(str(big)).sop_instance_uid
            size = big.stat().st_size
            big.rename(d.incoming / "big.dcm")
            peak_kb = idle_kb
            deadline = time.monotonic() + 120
            while not (d.done / "big.dcm").exists():
                assert time.monotonic() < deadline, d.log_tail()
                peak_kb = max(peak_kb, _vm_hwm_kb(pid))
                time.sleep(0.01)
            peak_kb = max(peak_kb, _vm_hwm_kb(pid))
            assert d.stop() == 0
        big_post = [p for p in server.posts() if p.nbytes > 100_000_000]
    assert len(big_post) == 1 and big_post[0].nbytes > size - 4096  # the whole object went
    grown_mb = (peak_kb - idle_kb) / 1024
    assert grown_mb < 48, f"the daemon grew by {grown_mb:.0f} MB sending a {size / 1e6:.0f} MB file"


def test_a_value_the_object_cannot_hold_fails_the_file_instead_of_arriving_mangled(
    tmp_path: Path,
) -> None:
    """A ``set`` value the object's Specific Character Set cannot write (Cyrillic in an
    ISO_IR 100 object) or that breaks its VR (a 20-character SH from ``EXT-{AccessionNumber}``)
    goes to failed/ with the reason; it never reaches the PACS as ``??????`` or an invalid
    value, reported stored. A valid change next to them still arrives."""
    names = {"cyrillic.dcm": "P-CYR", "long.dcm": "P-LONG", "fine.dcm": "P-FINE"}
    with storescp(tmp_path / "storescp", extra=["+xa"]) as dcmtk:
        d = Daemon(
            tmp_path / "fw",
            destinations=[destination("dcmtk", dcmtk.port, ae_title="STORESCP")],
            routes=[
                {"name": "cyr", "to": ["dcmtk"], "match": {"PatientID": "P-CYR"},
                 "modify": {"set": {"PatientName": "Иванов^Иван"}}},
                {"name": "long", "to": ["dcmtk"], "match": {"PatientID": "P-LONG"},
                 "modify": {"set": {"AccessionNumber": "EXT-{AccessionNumber}"}}},
                {"name": "fine", "to": ["dcmtk"], "match": {"PatientID": "P-FINE"},
                 "modify": {"set": {"PatientName": "Müller^Hans"}}},
            ],
        )  # fmt: skip
        with d:
            for name, patient in names.items():
                ds = dcmread(real("CT_small.dcm"))  # Specific Character Set ISO_IR 100
                ds.PatientID = patient
                ds.AccessionNumber = "ACC-0123456789"  # 14 of SH's 16 characters
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.save_as(d.incoming / f".{name}.tmp")
                (d.incoming / f".{name}.tmp").rename(d.incoming / name)
            wait_until(
                lambda: len(d.done_files()) + len(d.failed_files()) == 3, 60, what="3 outcomes"
            )
            wait_until(lambda: len(dcmtk.files()) >= len(d.done_files()), 15, what="storescp")
            failed = sorted(d.failed_files())
            reasons = {n: d.error_json(n)["destinations"][0]["error"] for n in failed}
            assert d.stop() == 0
        received = [dcmread(p) for p in dcmtk.files()]
    assert [str(r.PatientName) for r in received] == ["Müller^Hans"], "a mangled value arrived"
    assert failed == ["cyrillic.dcm", "long.dcm"], (failed, [str(r.PatientName) for r in received])
    assert "Specific Character Set" in reasons["cyrillic.dcm"], reasons
    assert "AccessionNumber" in reasons["long.dcm"] and "16" in reasons["long.dcm"], reasons


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("InstitutionName", "North\\South", "multiplicity"),  # LO, VM 1: two values
        ("ImageType", "ORIGINAL", "multiplicity"),  # CS, VM 2-n: one value
        ("PixelSpacing", "0.5\\0.5\\0.5", "multiplicity"),  # DS, VM 2
        ("InstitutionName", "Radiology\nNorth", "control character"),  # LO: none but ESC
        ("StudyDescription", "CT\x07HEAD", "control character"),
        ("PatientComments", "seen\x00twice", "control character"),  # LT: CR LF FF ESC only
    ],
)
def test_a_value_breaking_its_multiplicity_or_repertoire_is_refused(
    keyword: str, value: str, reason: str
) -> None:
    """PS3.5 6.2 and 6.4: a PACS may truncate, split or reject such a value; pydicom writes it
    without a word. The file fails with the reason instead."""
    ds = dcmread(real("CT_small.dcm"))
    with pytest.raises(EditError, match=f"set {keyword}: .*{reason}"):
        Modification(((keyword, value),), ()).apply(ds)


def test_values_within_their_multiplicity_and_repertoire_are_set() -> None:
    ds = dcmread(real("CT_small.dcm"))
    sets = {
        "ImageType": "DERIVED\\SECONDARY\\AXIAL",  # CS, 2-n
        "PixelSpacing": "0.5\\0.6",  # DS, 2
        "PatientComments": "seen twice\r\nback\\slash kept\f",  # LT: one value, CR LF FF
        "InstitutionName": "Klinik \x1b-AMitte",  # ESC allowed (code extensions)
        "OtherPatientIDs": "",  # emptied: VM 0 is an empty value
    }
    Modification(tuple(sets.items()), ()).apply(ds)
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.6]
    assert ds.PatientComments == "seen twice\r\nback\\slash kept\f"
    assert ds.InstitutionName == "Klinik \x1b-AMitte"
    assert ds.OtherPatientIDs in (None, "")


@pytest.mark.parametrize(
    ("name", "keyword"),
    [
        ("chrX1.dcm", "PatientName"),  # a trailing empty PN group: "...=王^小東= "
        ("chrKoreanMulti.dcm", "PatientName"),  # an ISO 2022 escape back to ASCII at the end
        ("SC_rgb_gdcm_KY.dcm", "ImageType"),  # over-long text padding
    ],
)
def test_attributes_a_modify_does_not_touch_keep_their_bytes(name: str, keyword: str) -> None:
    """Only what a modify changes is encoded again: pydicom's encoding of a value it decoded
    can differ from the original bytes (padding, empty PN groups, escapes)."""
    from pydicom.data import get_charset_files

    found = get_charset_files(name) or [get_testdata_file(name)]
    path = str(found[0])
    original = dcmread(path)
    tag = int(tag_for_keyword(keyword) or 0)
    raw = original.get_item(tag).value
    modification = Modification((("InstitutionName", "Elsewhere"), ("StudyID", "{StudyID}")), ())
    obj = edit_file(path, [modification])
    sent = dcmread(io.BytesIO(obj.file_meta + b"".join(obj.chunks())))
    assert sent.get_item(tag).value == raw
    assert sent.InstitutionName == "Elsewhere"


def test_check_config_refuses_a_set_value_no_object_can_hold(tmp_path: Path) -> None:
    """A literal ``set`` value (no template) that breaks its VR, multiplicity or repertoire
    would fail every file at send time: check-config says so first. A template's value is
    known only per object, so it is checked then."""
    config = tmp_path / "forwarder.yaml"
    config.write_text(
        "incoming: in\ndone: done\nfailed: failed\nqueue: q.sqlite\n"
        "destinations:\n"
        "  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104,\n"
        "     modify: {set: {InstitutionName: 'North\\South'}}}\n"
        "routes:\n"
        "  - name: a\n"
        "    to: [pacs]\n"
        "    modify:\n"
        "      set: {StudyDescription: \"A\\nB\", AccessionNumber: 'EXT-{AccessionNumber}'}\n"
    )
    result = subprocess.run(
        [FORWARDER, "check-config", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "destinations[0].modify.set.InstitutionName: " in lines[0] and "multiplicity" in lines[0]
    assert "routes[0].modify.set.StudyDescription: " in lines[1]
    assert "control character" in lines[1]


def test_an_edited_object_is_not_sent_from_a_file_replaced_by_one_of_the_same_size(
    tmp_path: Path,
) -> None:
    """The changed attributes are read when the object is edited, its Pixel Data streamed from
    the file later (a STOW-RS batch: while the parts before it go). A file replaced meanwhile by
    another of the same size must be refused, as the unchanged path refuses it (size and
    mtime), not sent as the old header with the new file's bytes."""
    from dicomgen import write_file

    from forwarder.errors import InvalidFileError

    path = tmp_path / "a.dcm"
    write_file(path)
    st = path.stat()
    editors = [Modification.from_config(Route(name="r", to=["x"], modify=ROUTE_MODIFY).modify)]  # type: ignore[arg-type]
    obj = edit_file(str(path), editors)
    other = tmp_path / "b.dcm"
    for _ in range(200):  # generated UIDs vary in length: another instance of the same size
        write_file(other)
        if other.stat().st_size == st.st_size:
            break
    assert other.stat().st_size == st.st_size
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(InvalidFileError, match="changed since"):
        b"".join(obj.chunks())
