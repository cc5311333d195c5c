"""The router: header values and sub-folder -> destinations, every matching route applies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination
from peers import storescp

from forwarder.config import Route
from forwarder.daemon.router import Router

DESTS = ["pacs", "archive", "research", "cloud"]


def r(name: str, to: list[str], **match: str | list[str]) -> Route:
    return Route(name=name, match=match, to=to)


def test_no_routes_means_every_file_to_every_destination() -> None:
    router = Router(None, DESTS)
    assert router.route({}, "a.dcm") == DESTS
    assert router.route({"Modality": "CT"}, "x/y/a.dcm") == DESTS
    assert router.keywords == frozenset()


def test_an_empty_route_list_routes_nothing() -> None:
    assert Router([], DESTS).route({"Modality": "CT"}, "a.dcm") == []


def test_empty_match_matches_everything() -> None:
    router = Router([r("all", ["archive"])], DESTS)
    assert router.route({}, "a.dcm") == ["archive"]


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("CT", "CT", True),
        ("CT", "MR", False),
        ("CT", "ct", False),  # case-sensitive, like DICOM code strings
        ("C?", "CT", True),
        ("C?", "CTX", False),
        ("*", "anything", True),
        ("SCAN*", "SCANNER1", True),
        ("*NER?", "SCANNER1", True),
        ("*NER?", "SCANNER12", False),
        # Only * and ? are wildcards (the contract's, and DICOM's): a [ is itself.
        ("[CM]T", "MT", False),
        ("CT HEAD [W/O]", "CT HEAD [W/O]", True),
        ("CT HEAD [W/O]*", "CT HEAD [W/O] CONTRAST", True),
        ("C*", "C\nT", True),
    ],
)
def test_wildcards(pattern: str, value: str, matches: bool) -> None:
    router = Router([r("x", ["pacs"], StationName=pattern)], DESTS)
    assert router.route({"StationName": value}, "a.dcm") == (["pacs"] if matches else [])


def test_not_on_a_description_with_brackets_excludes_that_study() -> None:
    """``not: "CT HEAD [W/O]"`` was a character class (fnmatch): it never matched the study it
    names, and sent exactly that study to the research PACS."""
    route = Route(
        name="research", match={"StudyDescription": {"not": "CT HEAD [W/O]"}}, to=["pacs"]
    )
    router = Router([route], DESTS)
    assert router.route({"StudyDescription": "CT HEAD [W/O]"}, "a") == []
    assert router.route({"StudyDescription": "CT HEAD W"}, "a") == ["pacs"]


def test_a_list_matches_any_of_its_values() -> None:
    router = Router([r("mr", ["pacs"], Modality=["MR", "MRS", "P?"])], DESTS)
    assert router.route({"Modality": "MRS"}, "a") == ["pacs"]
    assert router.route({"Modality": "PT"}, "a") == ["pacs"]
    assert router.route({"Modality": "CT"}, "a") == []


def test_every_condition_of_a_route_must_match() -> None:
    router = Router([r("ct1", ["pacs"], Modality="CT", StationName="SCANNER1")], DESTS)
    assert router.route({"Modality": "CT", "StationName": "SCANNER1"}, "a") == ["pacs"]
    assert router.route({"Modality": "CT", "StationName": "SCANNER2"}, "a") == []
    assert router.route({"Modality": "CT"}, "a") == []  # a missing element never matches


def test_a_missing_element_does_not_match_even_a_star() -> None:
    router = Router([r("x", ["pacs"], BodyPartExamined="*")], DESTS)
    assert router.route({}, "a.dcm") == []
    assert router.route({"BodyPartExamined": ""}, "a.dcm") == ["pacs"]


def test_multi_valued_elements_match_any_value_or_the_whole() -> None:
    router = Router([r("orig", ["pacs"], ImageType="ORIGINAL")], DESTS)
    assert router.route({"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, "a") == ["pacs"]
    assert router.route({"ImageType": "DERIVED\\SECONDARY"}, "a") == []
    whole = Router([r("w", ["pacs"], ImageType="ORIGINAL\\PRIMARY*")], DESTS)
    assert whole.route({"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, "a") == ["pacs"]


@pytest.mark.parametrize(
    ("pattern", "rel_path", "matches"),
    [
        ("ct/*", "ct/a.dcm", True),
        ("ct/*", "ct/x/b.dcm", True),
        ("ct/*", "a.dcm", False),
        ("ct/*", "mr/ct/a.dcm", False),
        ("ct", "ct/a.dcm", True),  # the folder itself
        ("ct", "ct/x/a.dcm", False),
        ("scanner?/*", "scanner2/a.dcm", True),
        ("*/night/*", "site1/night/a.dcm", True),
        ("", "a.dcm", True),  # the top-level folder is ""
        ("", "ct/a.dcm", False),
    ],
)
def test_folder_patterns(pattern: str, rel_path: str, matches: bool) -> None:
    router = Router([r("f", ["archive"], folder=pattern)], DESTS)
    assert router.route({}, rel_path) == (["archive"] if matches else [])


def test_folder_and_header_conditions_combine() -> None:
    router = Router([r("x", ["cloud"], Modality=["MR", "MRS"], folder="scanner2/*")], DESTS)
    assert router.route({"Modality": "MR"}, "scanner2/a.dcm") == ["cloud"]
    assert router.route({"Modality": "MR"}, "scanner1/a.dcm") == []
    assert router.route({"Modality": "CT"}, "scanner2/a.dcm") == []


def test_fan_out_every_matching_route_applies_in_config_order_without_duplicates() -> None:
    routes = [
        r("ct-research", ["research", "archive"], Modality="CT"),
        r("everything", ["cloud", "archive"]),
        r("ct-pacs", ["pacs"], Modality="C*"),
        r("mr", ["research"], Modality="MR"),
    ]
    router = Router(routes, DESTS)
    # The result follows the destinations' order in the config, not the routes' order.
    assert router.route({"Modality": "CT"}, "a") == ["pacs", "archive", "research", "cloud"]
    assert router.route({"Modality": "MR"}, "a") == ["archive", "research", "cloud"]
    assert router.route({"Modality": "US"}, "a") == ["archive", "cloud"]


def test_keywords_are_what_ingest_must_read() -> None:
    router = Router(
        [
            r("a", ["pacs"], Modality="CT", folder="x/*"),
            r("b", ["pacs"], StationName="S", ImageType="ORIGINAL"),
        ],
        DESTS,
    )
    assert router.keywords == frozenset({"Modality", "StationName", "ImageType"})


def test_values_are_compared_without_padding() -> None:
    router = Router([r("x", ["pacs"], StationName="SCANNER1")], DESTS)
    assert router.route({"StationName": "SCANNER1 "}, "a") == ["pacs"]


# -- operators: regex, not, present, range (issue 15) ---------------------------------------


def rr(name: str, to: list[str], match: dict[str, object], **kw: object) -> Route:
    return Route.model_validate({"name": name, "match": match, "to": to, **kw})


@pytest.mark.parametrize(
    ("cond", "value", "matches"),
    [
        ({"regex": "^RESEARCH"}, "RESEARCH BRAIN", True),
        ({"regex": "^RESEARCH"}, "CLINICAL RESEARCH", False),
        ({"regex": "RESEARCH"}, "CLINICAL RESEARCH", True),  # search: anywhere unless anchored
        ({"regex": "(?i)^research"}, "Research", True),
        ({"regex": "^A$"}, "A ", True),  # padding is not part of the value
        ({"regex": "x"}, None, False),
        ({"not": ["SR", "KO"]}, "CT", True),
        ({"not": ["SR", "KO"]}, "KO", False),
        ({"not": "S?"}, "SR", False),
        ({"not": "SR"}, None, True),  # a missing attribute is not SR
        ({"present": True}, "A1", True),
        ({"present": True}, "", False),
        ({"present": True}, None, False),
        ({"present": False}, None, True),
        ({"present": False}, "  ", True),
        ({"present": False}, "A1", False),
    ],
)
def test_operators(cond: dict[str, object], value: str | None, matches: bool) -> None:
    key = (
        "StudyDescription"
        if "regex" in cond
        else "Modality"
        if "not" in cond
        else "AccessionNumber"
    )
    router = Router([rr("x", ["pacs"], {key: cond})], DESTS)
    header = {} if value is None else {key: value}
    assert router.route(header, "a.dcm") == (["pacs"] if matches else [])


@pytest.mark.parametrize(
    ("key", "bounds", "value", "matches"),
    [
        ("StudyDate", ["20260101", "20261231"], "20260101", True),  # inclusive
        ("StudyDate", ["20260101", "20261231"], "20261231", True),
        ("StudyDate", ["20260101", "20261231"], "20251231", False),
        ("StudyDate", ["20260101", "20261231"], "20270101", False),
        ("StudyDate", [20260101, None], "29991231", True),  # open end; YAML numbers
        ("StudyDate", [None, "20260101"], "19990101", True),
        ("StudyDate", ["20260101", "20261231"], "", False),
        ("StudyDate", ["20260101", "20261231"], None, False),
        ("AcquisitionDateTime", ["20260101", "20261231"], "20261231235959.5", True),
        ("StudyTime", ["0800", "1200"], "120059", True),  # hours and minutes: a prefix
        ("StudyTime", ["0800", "1200"], "121000", False),
        ("SeriesNumber", [2, 10], "9", True),
        ("SeriesNumber", [2, 10], "10", True),  # numbers, not text ("10" < "2" as text)
        ("SeriesNumber", [2, 10], "11", False),
        ("SliceThickness", [0.5, 1.25], "1.25", True),
        ("SliceThickness", [0.5, 1.25], "abc", False),
        ("Rows", [512, None], "1024", True),
        ("ImagePositionPatient", [0, 10], "-5\\3\\20", True),  # any value
        # the retired ACR-NEMA forms (PS3.5 6.2 DA and TM notes) are the same dates and times
        ("StudyDate", ["20260101", "20261231"], "2026.01.01", True),
        ("StudyDate", ["20260101", None], "2025.12.31", False),
        ("StudyTime", ["0800", "1200"], "08:30:00", True),
        ("StudyTime", ["0800", "1200"], "12:01:00", False),
        # values that are not dates do not match, whatever their first characters compare to
        ("StudyDate", [None, "20261231"], "1/1/2026", False),
        ("StudyDate", [None, "20261231"], "2026-01-01", False),
        ("StudyDate", [None, "20261231"], "UNKNOWN", False),
    ],
)
def test_ranges(key: str, bounds: list[object], value: str | None, matches: bool) -> None:
    router = Router([rr("x", ["pacs"], {key: {"range": bounds}})], DESTS)
    header = {} if value is None else {key: value}
    assert router.route(header, "a.dcm") == (["pacs"] if matches else [])


def test_operators_on_the_folder() -> None:
    router = Router([rr("x", ["pacs"], {"folder": {"not": "test/*"}})], DESTS)
    assert router.route({}, "ct/a.dcm") == ["pacs"]
    assert router.route({}, "test/a.dcm") == []
    regex = Router([rr("x", ["pacs"], {"folder": {"regex": r"^site\d+/"}})], DESTS)
    assert regex.route({}, "site12/a.dcm") == ["pacs"]
    assert regex.route({}, "x/site12/a.dcm") == []


def test_a_discard_route_wins_over_send_routes() -> None:
    routes = [
        rr("everything", ["pacs", "archive"], {}),
        rr("no-test-patients", [], {"PatientID": "TEST*"}, action="discard"),
        rr("no-ko", [], {"Modality": ["KO", "PR"]}, action="discard"),
    ]
    router = Router(routes, DESTS)
    assert router.route({"PatientID": "123", "Modality": "CT"}, "a") == ["pacs", "archive"]
    plan = router.plan({"PatientID": "TEST1", "Modality": "KO"}, "a")
    assert plan.destinations == ()
    assert plan.discarded_by == ("no-test-patients", "no-ko")
    assert plan.routes_to("pacs") == ()
    only_discard = Router([routes[1]], DESTS).plan({"PatientID": "TEST9"}, "a")
    assert (only_discard.destinations, only_discard.discarded_by) == ((), ("no-test-patients",))


def test_a_plan_says_which_condition_failed_and_the_actual_value() -> None:
    routes = [
        rr("ct", ["pacs"], {"Modality": "CT", "StationName": "S1"}),
        rr("research", ["research"], {"StudyDescription": {"regex": "^RES"}}),
        rr("acc", ["archive"], {"AccessionNumber": {"present": True}}),
    ]
    plan = Router(routes, DESTS).plan({"Modality": "CT", "StationName": "S2"}, "a")
    ct, research, acc = plan.verdicts
    assert not ct.matched and ct.failure is not None
    assert (ct.failure.key, ct.failure.expected, ct.failure.actual) == ("StationName", "S1", "S2")
    assert research.failure is not None
    assert (research.failure.expected, research.failure.actual) == ("regex ^RES", None)
    assert acc.failure is not None and acc.failure.expected == "present"
    assert plan.destinations == ()


def test_edits_in_order_and_conflicts() -> None:
    a = rr("a", ["pacs"], {"Modality": "CT"}, modify={"set": {"InstitutionName": "A"}})
    a2 = rr("a2", ["pacs"], {"StationName": "S1"}, modify={"set": {"InstitutionName": "A"}})
    b = rr("b", ["pacs"], {"StationName": "S2"}, modify={"set": {"InstitutionName": "B"}})
    router = Router([a, a2, b], DESTS, {"pacs": a.modify})
    same = router.edits(router.plan({"Modality": "CT", "StationName": "S1"}, "x"), "pacs")
    assert same.conflict is None
    assert [label for label, _ in same.steps] == ["route a: modify", "destination pacs: modify"]
    clash = router.edits(router.plan({"Modality": "CT", "StationName": "S2"}, "x"), "pacs")
    assert clash.conflict is not None and clash.conflict.startswith("routes a, b send it to pacs")
    assert clash.steps == ()


def test_a_discard_route_end_to_end(tmp_path: Path) -> None:
    """The daemon: discarded files reach done/ unsent, with the log line; the others are sent."""
    root = tmp_path
    with storescp(root / "storescp") as dcmtk:
        d = Daemon(
            root / "fw",
            destinations=[destination("dcmtk", dcmtk.port, ae_title="STORESCP")],
            routes=[
                {"name": "all", "to": ["dcmtk"]},
                {"name": "no-mr", "match": {"Modality": "MR"}, "action": "discard"},
            ],
        )
        with d:
            d.drop("ct.dcm", modality="CT")
            d.drop("mr.dcm", modality="MR")
            assert sorted(d.wait_done(2)) == ["ct.dcm", "mr.dcm"]
            wait_until(lambda: len(dcmtk.files()) == 1, 15, what="the CT file at storescp")
            assert d.stop() == 0
        assert "mr.dcm: discarded by route no-mr" in d.log_text()
        assert d.failed_files() == []
        (received,) = dcmtk.files()
        assert received.name.startswith("CT")


# -- header values of real files, as ingest and the listener read them -----------------------


def _charset_files() -> list[str]:
    from pydicom.data import get_charset_files

    return sorted(f for f in get_charset_files("chr*.dcm") if "SQEncoding" not in f)


def _plan_file(path: str, match: dict[str, object]) -> tuple[bool, object]:
    from forwarder.daemon.ingest import header_tags
    from forwarder.dicom.check import check_file_values

    router = Router([rr("x", ["pacs"], match)], DESTS)
    _meta, values = check_file_values(path, *header_tags(router))
    (verdict,) = router.plan(values, "a.dcm").verdicts
    return verdict.matched, verdict.failure


@pytest.mark.parametrize("path", _charset_files(), ids=lambda p: Path(p).name)
def test_a_person_name_route_matches_its_file_in_each_character_set(path: str) -> None:
    # A route on the name as pydicom reads it (component groups Alphabetic=Ideographic=Phonetic
    # as written, trailing empty components and groups left out: PS3.5 6.2.1) matches that
    # file and no other one: chrX1's "Wang^XiaoDong=王^小東=" is "Wang^XiaoDong=王^小東".
    import pydicom

    name = str(pydicom.dcmread(path).PatientName)
    for other in _charset_files():
        matched, failure = _plan_file(other, {"PatientName": name})
        same = str(pydicom.dcmread(other).PatientName) == name
        assert matched is same, (Path(other).name, failure)
    # and the name as written with its trailing delimiters (dcmdump shows them) is the same
    assert _plan_file(path, {"PatientName": name + "^^="})[0]


def test_a_person_name_of_empty_components_is_empty() -> None:
    # "^^^^" (chrFren's Referring Physician) is a name with every component empty: not present.
    from pydicom.data import get_charset_files

    (path,) = get_charset_files("chrFren.dcm")
    assert _plan_file(path, {"ReferringPhysicianName": {"present": False}})[0]
    assert not _plan_file(path, {"ReferringPhysicianName": {"present": True}})[0]


def test_a_long_text_value_is_read_whole(tmp_path: Path) -> None:
    # An LT may hold 10240 characters (PS3.5 6.2): one past 4 KiB was read as absent, so a
    # regex never matched it and `present: false` held.
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageComments = "x" * 5000 + " RESEARCH"
    path = str(tmp_path / "long.dcm")
    ds.save_as(path)
    assert _plan_file(path, {"ImageComments": {"regex": "RESEARCH$"}})[0]
    assert not _plan_file(path, {"ImageComments": {"present": False}})[0]


def test_a_backslash_in_st_lt_ut_is_text_not_a_value_separator(tmp_path: Path) -> None:
    # ST, LT and UT hold one value (PS3.5 6.2): "NOT FOR\RESEARCH" is not a "RESEARCH" value.
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageComments = "NOT FOR\\RESEARCH"
    path = str(tmp_path / "comment.dcm")
    ds.save_as(path)
    assert not _plan_file(path, {"ImageComments": "RESEARCH"})[0]
    assert not _plan_file(path, {"ImageComments": {"regex": "^RESEARCH"}})[0]
    assert _plan_file(path, {"ImageComments": {"not": "RESEARCH"}})[0]
    assert _plan_file(path, {"ImageComments": "NOT FOR\\RESEARCH"})[0]


@pytest.mark.parametrize(
    ("source", "name"),
    [
        # JIS X 0208 山本 and 宮 hold a 0x5C byte (ISO 2022: a delimiter only in ASCII)
        ("chrH31.dcm", "Yamamoto^Tarou=山本^太郎=やまもと^たろう"),
        ("chrH31.dcm", "Miyazaki^Hanako=宮崎^花子"),
        ("chrX2.dcm", "Wang^Cheng=王^誠"),  # GB18030: 誠 is 0xD5 0x5C
    ],
)
def test_a_multi_byte_character_holding_a_backslash_byte_is_read(
    tmp_path: Path, source: str, name: str
) -> None:
    # The value is decoded whole and split on the decoded "\" (as pydicom reads it), never on
    # a 0x5C byte inside a character. Warnings ignored as the daemon's are (not errors):
    # pydicom then decodes a broken piece with replacement characters, and the route missed.
    import warnings

    import pydicom
    from pydicom.data import get_charset_files

    ds = pydicom.dcmread(get_charset_files(source)[0])
    ds.PatientName = name
    ds.InstitutionName = name.split("=")[1].replace("^", "")
    path = str(tmp_path / "name.dcm")
    ds.save_as(path)
    assert str(pydicom.dcmread(path).PatientName) == name
    match = {"PatientName": name, "InstitutionName": ds.InstitutionName}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched, failure = _plan_file(path, match)
    assert matched, failure


def test_a_64_bit_value_is_read_as_a_number(tmp_path: Path) -> None:
    # SV and UV (PS3.5 2019) were read as text ('\x05'): a range never matched, a `not` held.
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SelectorSVValue = [5]
    ds.SelectorUVValue = [2**40]
    path = str(tmp_path / "sv.dcm")
    ds.save_as(path)
    assert _plan_file(path, {"SelectorSVValue": {"range": [1, 10]}})[0]
    assert not _plan_file(path, {"SelectorSVValue": {"not": "5"}})[0]
    assert _plan_file(path, {"SelectorUVValue": str(2**40)})[0]


def test_a_backslash_in_a_text_value_keeps_its_character_set(tmp_path: Path) -> None:
    # In ST, LT and UT a \ is text: it does not end the value's code extension (ISO 2022 IR
    # 144, Cyrillic), as pydicom reads it; the characters after it were read as Latin-1.
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = ["ISO 2022 IR 100", "ISO 2022 IR 144"]
    ds.ImageComments = "Лю\\Лю"
    path = str(tmp_path / "cyrillic.dcm")
    ds.save_as(path)
    assert pydicom.dcmread(path).ImageComments == "Лю\\Лю"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched, failure = _plan_file(path, {"ImageComments": "Лю\\Лю"})
    assert matched, failure


@pytest.mark.parametrize(
    ("charset", "encoding"),
    [
        (None, "latin-1"),  # a modality that never set (0008,0005): pydicom reads ISO 8859-1
        (None, "utf-8"),  # nor declared its UTF-8
        ("ISO-IR 100", "latin-1"),  # a misspelling pydicom corrects (with a warning)
        ("ISO_IR100", "latin-1"),  # one it does not: read as its default, ISO 8859-1
        ("ISO_IR100", "utf-8"),
    ],
)
def test_text_in_no_character_set_the_file_names_is_read_as_written(
    tmp_path: Path, charset: str | None, encoding: str
) -> None:
    # Without a Specific Character Set pydicom reads text as ISO 8859-1, its default; the
    # header walk read it as UTF-8, so "Klinikum Süd" in Latin-1 never matched its route.
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "undeclared.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the misspelled ones
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
        ds.save_as(path)
        raw = path.read_bytes()
        written = ds["InstitutionName"].value.encode()
        assert raw.count(written) == 1
        name = "Klinikum Süd".encode(encoding).ljust(len(written))
        path.write_bytes(raw.replace(written, name))
        assert pydicom.dcmread(path).InstitutionName.rstrip() == (
            "Klinikum Süd" if encoding == "latin-1" else name.decode("latin-1").rstrip()
        )
        matched, failure = _plan_file(str(path), {"InstitutionName": "Klinikum Süd"})
    assert matched, failure


def test_a_reload_that_changed_the_routes_routes_every_job_again_until_settled() -> None:
    old = Router([r("ct", ["pacs"], Modality="CT")], ["pacs", "archive"])
    assert old.settled and not old.routed_again(time.time() + 60)  # queued after the start
    new = Router([r("all", ["archive"])], ["pacs", "archive"]).after(old)
    assert not new.settled
    assert new.routed_again(time.time() + 3600)  # however late: a process may lag behind
    new.settle()
    settled_at = time.time()
    assert new.routed_again(settled_at - 1) and not new.routed_again(settled_at + 1)


def test_a_reload_keeping_the_routes_keeps_the_window_of_the_router_it_replaces() -> None:
    routes = [r("ct", ["pacs"], Modality="CT")]
    first = Router(routes, ["pacs"])
    same = Router(routes, ["pacs"]).after(first)
    assert same.settled and not same.routed_again(time.time() + 60)
    changed = Router([r("all", ["pacs"])], ["pacs"]).after(same)
    # Unchanged again, but the processes have not all taken the routes before: still open.
    again = Router([r("all", ["pacs"])], ["pacs"]).after(changed)
    assert not again.settled and again.routed_again(time.time() + 60)
