"""``forwarder explain`` (issue 15) as a subprocess: every route's verdict with the failing
condition, destinations and priority, the changes per destination (old -> new), exit codes,
and nothing written (no queue, no folders) and nothing sent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER
from dicomgen import write_file
from pydicom.data import get_testdata_file

CONFIG = """\
incoming: {root}/in
done: {root}/done
failed: {root}/failed
queue: {root}/q.sqlite
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: 9
    modify: {{set: {{IssuerOfPatientID: HOSP}}}}
  - {{name: research, ae_title: RES, host: 127.0.0.1, port: 9}}
routes:
  - name: ct
    match: {{Modality: CT, StationName: {{not: [OLD*]}}}}
    to: [pacs]
    modify: {{set: {{InstitutionName: "General Hospital", StudyID: "EXT-{{StudyID}}"}},
              remove: [private]}}
  - name: research
    match: {{StudyDescription: {{regex: "^RESEARCH"}}, StudyDate: {{range: [20200101, null]}}}}
    to: [research]
  - name: test-patients
    match: {{PatientID: "TEST*"}}
    action: discard
"""


def explain(tmp_path: Path, env: dict[str, str], *files: str, json_out: bool = False) -> Any:
    config = tmp_path / "f.yaml"
    if not config.exists():
        config.write_text(CONFIG.format(root=tmp_path))
    args = [FORWARDER, "explain", "-c", str(config), *(["--json"] if json_out else []), *files]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


def ct_small() -> str:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return str(path)


def test_text_output_names_routes_conditions_destinations_and_changes(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    mr = tmp_path / "mr.dcm"
    write_file(mr, modality="MR")
    result = explain(tmp_path, forwarder_env, ct_small(), str(mr))
    assert result.returncode == 1, result.stderr  # mr.dcm: no route
    out = result.stdout
    assert "  route ct: matched -> pacs\n" in out
    assert (
        "  route research: not matched: StudyDescription is 'e+1', expected regex ^RESEARCH" in out
    )
    assert (
        "  route test-patients (discard): not matched: PatientID is '1CT1', expected TEST*" in out
    )
    assert "  => pacs (priority normal)\n" in out
    assert "(0008,0080) InstitutionName: 'JFK IMAGING CENTER' -> 'General Hospital'" in out
    assert "(0020,0010) StudyID: '1CT1' -> 'EXT-1CT1'" in out
    assert "(0010,0021) IssuerOfPatientID: (absent) -> 'HOSP'" in out
    assert "(0009,1001) (private): 'GE_GENESIS_FF' -> (removed)" in out
    assert "  route ct: not matched: Modality is 'MR', expected CT" in out
    assert "  => failed/: no route matches this file" in out
    # nothing written: no queue, no folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.yaml", "mr.dcm"]


def test_json_output_and_exit_0_when_every_file_is_sent_or_discarded(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    test = tmp_path / "test.dcm"
    write_file(test, modality="CT")
    import pydicom

    ds = pydicom.dcmread(test)
    ds.PatientID = "TEST42"
    ds.save_as(test)
    result = explain(tmp_path, forwarder_env, ct_small(), str(test), json_out=True)
    assert result.returncode == 0, result.stderr
    ct, discarded = json.loads(result.stdout)["files"]
    assert ct["outcome"] == "send"
    assert [r["matched"] for r in ct["routes"]] == [True, False, False]
    assert ct["routes"][1]["failed"] == {
        "key": "StudyDescription",
        "expected": "regex ^RESEARCH",
        "actual": "e+1",
    }
    (pacs,) = ct["destinations"]
    assert (pacs["destination"], pacs["priority"], pacs["routes"]) == ("pacs", "normal", ["ct"])
    assert pacs["steps"] == ["route ct: modify", "destination pacs: modify"]
    changes = {c["keyword"]: (c["old"], c["new"]) for c in pacs["changes"]}
    assert changes["InstitutionName"] == ("JFK IMAGING CENTER", "General Hospital")
    assert changes["StudyID"] == ("1CT1", "EXT-1CT1")
    assert discarded["outcome"] == "discard"
    assert discarded["discarded_by"] == ["test-patients"]
    assert discarded["destinations"] == []


@pytest.mark.parametrize(
    ("args", "code"),
    [(["explain"], 2), (["explain", "-c", "/nonexistent.yaml", "x.dcm"], 78)],
)
def test_exit_codes_for_usage_and_config(
    args: list[str], code: int, forwarder_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [FORWARDER, *args], env=forwarder_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == code, result.stderr


def test_a_file_that_is_not_dicom_exits_1_with_the_reason(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = explain(tmp_path, forwarder_env, str(junk))
    assert result.returncode == 1
    assert "=> failed/: not usable DICOM:" in result.stdout


def test_conflicting_changes_are_shown_and_exit_1(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    config = tmp_path / "f.yaml"
    config.write_text(
        CONFIG.format(root=tmp_path)
        + "  - name: station\n"
        + "    match: {StationName: 'CT01*'}\n"
        + "    to: [pacs]\n"
        + "    deidentify: basic\n"
    )
    result = explain(tmp_path, forwarder_env, ct_small(), json_out=True)
    assert result.returncode == 1, result.stderr
    (doc,) = json.loads(result.stdout)["files"]
    assert doc["outcome"] == "conflict"
    (pacs,) = doc["destinations"]
    assert pacs["conflict"].startswith("routes ct, station send it to pacs with different")
    text = explain(tmp_path, forwarder_env, ct_small()).stdout
    assert "failed/: conflicting changes: routes ct, station" in text


def test_the_changes_of_deidentify_options_are_shown(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    config = tmp_path / "f.yaml"
    options = "[retain_device_identity, retain_long_modified_dates, clean_descriptors]"
    config.write_text(
        CONFIG.format(root=tmp_path).split("routes:")[0]
        + "routes:\n  - name: anon\n    to: [research]\n"
        + f"    deidentify: {{profile: basic, options: {options}}}\n"
    )
    result = explain(tmp_path, forwarder_env, ct_small(), json_out=True)
    assert result.returncode == 0, result.stderr
    (doc,) = json.loads(result.stdout)["files"]
    (research,) = doc["destinations"]
    assert research["steps"] == [
        "route anon: deidentify (basic + retain_device_identity + retain_long_modified_dates"
        " + clean_descriptors)"
    ]
    changes = {c["keyword"]: (c["old"], c["new"]) for c in research["changes"]}
    assert "StationName" not in changes  # kept: retain_device_identity
    assert changes["StudyDescription"] == ("e+1", "CLEANED")  # clean_descriptors
    old, new = changes["StudyDate"]  # shifted, not emptied
    assert old == "20040119" and new and new < old
    assert changes["InstitutionName"][1] == "ANONYMIZED"  # no institution option
    assert changes["LongitudinalTemporalInformationModified"][1] == "MODIFIED"


@pytest.mark.parametrize(
    ("charset", "value"),
    [
        ("ISO_IR 100", "Klinikum München"),  # Latin-1
        ("ISO_IR 192", "Klinikum München"),  # UTF-8
        ("ISO_IR 144", "Больница"),  # Cyrillic
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # PN with ideographic group
    ],
)
def test_non_ascii_values_match_in_the_file_s_character_set(
    tmp_path: Path, forwarder_env: dict[str, str], charset: str | list[str], value: str
) -> None:
    # The header is read in its Specific Character Set, as the daemon routes it: a route on
    # "Klinikum München" matches a Latin-1 file, not only a UTF-8 one.
    import pydicom

    path = tmp_path / "file.dcm"
    write_file(path, modality="CT")
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = charset
    ds.InstitutionName = value.split("=")[0]
    ds.PatientName = value
    ds.save_as(path)
    config = tmp_path / "f.yaml"
    config.write_text(
        CONFIG.format(root=tmp_path).split("routes:")[0]
        + "routes:\n  - name: site\n"
        + f"    match: {{InstitutionName: {json.dumps(value.split('=')[0])},"
        + f" PatientName: {json.dumps(value)}}}\n"
        + "    to: [research]\n",
        encoding="utf-8",
    )
    result = explain(tmp_path, forwarder_env, str(path), json_out=True)
    assert result.returncode == 0, result.stdout
    (doc,) = json.loads(result.stdout)["files"]
    assert doc["routes"][0]["matched"], doc["routes"][0]["failed"]


def test_a_received_file_is_explained_with_its_calling_ae_and_folder(tmp_path: Path) -> None:
    # A file the listener received sits under incoming/.listen/<CALLING_AE>/; the daemon
    # routed it with that calling AE title and its path without `.listen/` (README, listen):
    # explain says the same, not "calling_ae: (none)".
    import shutil

    from forwarder.config import parse_config
    from forwarder.daemon.explain import explain_file, router_for

    text = CONFIG.format(root=tmp_path).split("routes:")[0] + (
        "routes:\n"
        "  - name: ct-rooms\n"
        "    match: {calling_ae: 'CT*', folder: 'CT01/*'}\n"
        "    to: [research]\n"
    )
    config = parse_config(text)
    path = config.incoming / ".listen" / "CT01" / "1.2.3" / "1.2.3.4.dcm"
    path.parent.mkdir(parents=True)
    shutil.copy(ct_small(), path)
    doc = explain_file(path, config, router_for(config))
    assert doc["routes"][0]["matched"], doc["routes"][0]["failed"]
    assert doc["outcome"] == "send" and doc["rel_path"] == "CT01/1.2.3/1.2.3.4.dcm"
