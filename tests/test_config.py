"""Config loading: durations, every problem at once with key path and YAML line, paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forwarder.config import (
    Config,
    config_path_from_env,
    load_config,
    parse_config,
    parse_duration,
)
from forwarder.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# Ten lines; problems in text appended to it are on line 11 and after.
BASE = """\
ae_title: FORWARDER
incoming: in
done: done
failed: failed
queue: q.sqlite
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: 104
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="test.yaml")
    assert info.value.source == "test.yaml"
    assert info.value.problems, "a ConfigError must list its problems"
    return info.value.problems


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        (" 2 m ", 120.0),
        ("30", 30.0),
        (30, 30.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 parsecs", "", "-1s", "5sec", "1e3", "s", True, None, -3, []])
def test_bad_durations_are_rejected_with_a_hint(value: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(value)


def test_durations_in_the_config_become_seconds() -> None:
    config = parse_config(
        BASE
        + "retry: {initial_delay: 250ms, max_delay: 2h, give_up_after: 7d, max_attempts: 3}\n"
        + "watch: {settle: 1.5, rescan_interval: 10m}\n"
    )
    assert config.retry.initial_delay == 0.25
    assert config.retry.max_delay == 7200.0
    assert config.retry.give_up_after == 604800.0
    assert config.retry.max_attempts == 3
    assert config.watch.settle == 1.5
    assert config.watch.rescan_interval == 600.0


def test_a_bad_duration_names_key_and_line() -> None:
    assert problems(BASE + "watch:\n  settle: soon\n") == [
        "watch.settle (line 12): 'soon' is not a duration: "
        "use 250ms, 5s, 10m, 2h, 7d or a number of seconds"
    ]


# -- every problem at once, key path and line ------------------------------------------------


def test_every_field_problem_is_reported_at_once_with_key_and_line() -> None:
    text = """\
ae_title: FORWARDER
incoming: in
done: done
failed: failed
queue: q.sqlite
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: 70000
    connect_timeout: 5 parsecs
    colour: blue
  - name: archive
    ae_title: AN_AE_TITLE_FAR_TOO_LONG
    host: 127.0.0.1
routes:
  - name: r
    match: {Modalty: CT}
    to: [pacs]
unknown_top: 1
"""
    found = problems(text)
    expected = {
        "destinations[0].port (line 10)": "must be 1..65535",
        "destinations[0].connect_timeout (line 11)": "is not a duration",
        "destinations[0].colour (line 12)": "unknown key",
        "destinations[1].ae_title (line 14)": "1 to 16 characters",
        "destinations[1].port (line 13)": "required key is missing",
        "routes[0].match.Modalty (line 18)": "'Modalty' is not a DICOM keyword",
        "unknown_top (line 20)": "unknown key",
    }
    assert len(found) == len(expected), found
    for prefix, words in expected.items():
        assert any(p.startswith(prefix + ": ") and words in p for p in found), (prefix, found)


def test_cross_checks_name_key_and_line() -> None:
    text = BASE + (
        "  - name: pacs\n"  # line 11: a duplicate
        "    ae_title: OTHER\n"
        "    host: 127.0.0.2\n"
        "    port: 105\n"
        "routes:\n"
        "  - name: r\n"
        "    match: {Modality: CT}\n"
        "    to: [pacs, nowhere]\n"  # line 18
        "retry:\n"
        "  initial_delay: 5m\n"  # line 20
        "  max_delay: 1s\n"
    )
    assert problems(text) == [
        "destinations[1].name (line 11): duplicate destination name 'pacs' (also destinations[0])",
        "routes[0].to[1] (line 18): unknown destination 'nowhere' (known: pacs)",
        "retry.initial_delay (line 20): must not exceed retry.max_delay",
    ]


def test_field_and_cross_check_problems_are_reported_together() -> None:
    text = BASE.replace("port: 104", "port: 0") + "routes:\n  - {name: r, to: [nowhere]}\n"
    found = problems(text)
    assert any(p.startswith("destinations[0].port (line 10)") for p in found), found
    assert any(p.startswith("routes[0].to[0] (line 12)") for p in found), found


def test_unknown_keys_are_errors_at_every_level() -> None:
    text = BASE + (
        "    tls: {ca: ca.pem, pinned: yes}\n"  # line 11
        "retry:\n"
        "  backoff: 2\n"  # line 13
        "watch:\n"
        "  inotify: true\n"  # line 15
        "routes:\n"
        "  - name: r\n"
        "    to: [pacs]\n"
        "    when: {}\n"  # line 19
        "destination: x\n"  # line 20
    )
    found = problems(text)
    for key, line in [
        ("destinations[0].tls.pinned", 11),
        ("retry.backoff", 13),
        ("watch.inotify", 15),
        ("routes[0].when", 19),
        ("destination", 20),
    ]:
        assert (
            f"{key} (line {line}): unknown key "
            "(check the spelling; `forwarder check-config --schema` lists every key)" in (found)
        ), found
    assert len(found) == 5, found


@pytest.mark.parametrize(
    ("snippet", "key", "words"),
    [
        ("ae_title: ''\n", "ae_title (line 11)", "1 to 16 characters"),
        ("ae_title: 'A\\\\B'\n", "ae_title (line 11)", "without backslash"),
        ("log_level: TRACE\n", "log_level (line 11)", ""),
        ("metrics: {listen: nowhere}\n", "metrics.listen (line 11)", ""),
        (
            "retry: {max_attempts: 0}\n",
            "retry.max_attempts (line 11)",
            "greater than or equal to 1",
        ),
        ("retry: {max_delay: -5}\n", "retry.max_delay (line 11)", "must not be negative"),
        ("destinations: []\n", "destinations (line 11)", "at least 1"),
    ],
)
def test_single_field_problems(snippet: str, key: str, words: str) -> None:
    text = BASE + snippet
    if snippet.startswith("ae_title"):  # instead of BASE's (a key given twice is an error)
        text = BASE.replace("ae_title: FORWARDER", "", 1) + snippet
    if snippet.startswith("destinations"):
        text = BASE.split("destinations:")[0] + "\n" * 5 + snippet
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(key + ": "), found
    assert words in found[0]


def test_missing_required_keys_are_listed_each() -> None:
    found = problems("ae_title: X\n")
    for key in ("incoming", "done", "failed", "queue", "destinations"):
        assert f"{key} (line 1): required key is missing" in found, found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "routes: [\n", "not valid YAML (line 12)"),
        (BASE + "- item\n", "not valid YAML (line 11)"),
        ("- a list\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
    ],
)
def test_yaml_syntax_and_shape(text: str, message: str) -> None:
    found = problems(text)
    assert len(found) == 1 and message in found[0], found


def test_route_values_that_look_like_numbers_are_text() -> None:
    config = parse_config(BASE + "routes:\n  - {name: r, match: {SeriesNumber: 1}, to: [pacs]}\n")
    assert config.routes is not None
    assert config.routes[0].match == {"SeriesNumber": "1"}


def test_unquoted_route_values_keep_the_text_as_written() -> None:
    # YAML 1.1 reads 00123 as octal (83), 1.50 as 1.5 and 12:30:00 as 45000: a match or a
    # set value is the text the operator wrote, as the header holds it.
    config = parse_config(
        BASE
        + "routes:\n"
        + "  - name: r\n"
        + "    match: {PatientID: 00123, SliceThickness: [1.50, 0x1F], StudyTime: 12:30:00,\n"
        + "            StudyID: {not: 007}, SeriesNumber: {range: [010, 1_000]}}\n"
        + "    to: [pacs]\n"
        + "    modify: {set: {AccessionNumber: 000456}}\n"
    )
    assert config.routes is not None
    assert config.routes[0].match == {
        "PatientID": "00123",
        "SliceThickness": ["1.50", "0x1F"],
        "StudyTime": "12:30:00",
        "StudyID": {"not": "007"},
        "SeriesNumber": {"range": ["010", "1_000"]},
    }
    assert config.routes[0].modify is not None
    assert config.routes[0].modify.set == {"AccessionNumber": "000456"}


def test_a_key_given_twice_is_an_error_naming_both_lines() -> None:
    # YAML would keep the last silently: a second destinations: list dropping the first, or
    # a second Modality: condition replacing the first.
    found = problems(
        BASE
        + "routes:\n"
        + "  - name: r\n"
        + "    match:\n"
        + "      Modality: CT\n"
        + "      Modality: MR\n"
        + "    to: [pacs]\n"
        + "destinations:\n"
        + "  - {name: other, ae_title: O, host: 127.0.0.1, port: 105}\n"
    )
    assert found == [
        "routes[0].match.Modality (line 15): given twice (also line 14); give each key once",
        "destinations (line 17): given twice (also line 6); give each key once",
    ]


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes((BASE + "# Klinikum M\u00fcnchen\n").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["(line 11): not UTF-8 text (byte 0xfc); save it as UTF-8"]


def test_a_condition_on_a_sequence_is_refused() -> None:
    # Routes read values from the header: a sequence (present or not) would read as absent.
    found = problems(
        BASE
        + "routes:\n"
        + "  - name: r\n"
        + "    match: {RequestAttributesSequence: {present: true}}\n"
        + "    to: [pacs]\n"
    )
    assert found == [
        "routes[0].match.RequestAttributesSequence (line 13): RequestAttributesSequence is a "
        "sequence: match takes attributes with values"
    ]


def test_metrics_listen_takes_a_port_up_to_65535_and_an_ipv6_host() -> None:
    # Accepted by check-config, 127.0.0.1:99999 used to stop the daemon at start (exit 1).
    assert problems(BASE + "metrics: {listen: '127.0.0.1:99999'}\n") == [
        "metrics.listen (line 11): the port must be 0..65535 (host:port, e.g. 127.0.0.1:9750)"
    ]
    config = parse_config(BASE + "metrics: {listen: '[::1]:9750'}\n")
    assert config.metrics is not None and config.metrics.listen == "[::1]:9750"


# -- loading from disk -----------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "forwarder.yaml").write_text(BASE + "    tls: {ca: ca.pem}\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    old = os.getcwd()
    os.chdir(elsewhere)
    try:
        config = load_config("../etc/forwarder.yaml")
    finally:
        os.chdir(old)
    assert config.incoming == folder / "in"
    assert config.done == folder / "done"
    assert config.failed == folder / "failed"
    assert config.queue == folder / "q.sqlite"
    assert config.destinations[0].tls is not None
    assert config.destinations[0].tls.ca == folder / "ca.pem"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(BASE.replace("incoming: in", "incoming: /srv/incoming"))
    assert load_config(path).incoming == Path("/srv/incoming")


def test_an_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.problems == ["cannot read the config file: No such file or directory"]


def test_the_shipped_example_config_is_valid() -> None:
    config = load_config(REPO / "config" / "forwarder.yaml")
    assert isinstance(config, Config)
    assert [d.name for d in config.destinations] == ["local"]
    assert config.incoming == (REPO / "run" / "incoming").resolve()
    assert config.retry.initial_delay == 5.0 and config.retry.max_delay == 600.0
    assert config.retry.give_up_after == 7 * 86400.0 and config.retry.max_attempts is None


def test_defaults_and_destination_lookup() -> None:
    config = parse_config(BASE)
    assert config.routes is None  # omitted: every file to every destination
    dest = config.destination("pacs")
    assert (dest.associations, dest.connect_timeout, dest.response_timeout) == (1, 10.0, 60.0)
    assert dest.tls is None
    with pytest.raises(KeyError):
        config.destination("nope")


def test_config_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)
    assert config_path_from_env(None) == "/etc/forwarder/forwarder.yaml"
    monkeypatch.setenv("FORWARDER_CONFIG", "/x/env.yaml")
    assert config_path_from_env(None) == "/x/env.yaml"
    assert config_path_from_env("/x/explicit.yaml") == "/x/explicit.yaml"


def test_bad_route_conditions_name_the_key_and_line() -> None:
    text = BASE + (
        "routes:\n"  # line 11
        "  - name: r\n"
        "    match:\n"
        "      StudyDescription: {regex: '^(RESEARCH'}\n"  # line 14
        "      StudyDate: {range: ['20261231', '20260101']}\n"  # line 15
        "      PatientName: {range: [A, B]}\n"  # line 16
        "      Modality: {nope: CT}\n"  # line 17
        "      AccessionNumber: {present: maybe}\n"  # line 18
        "      SeriesNumber: {range: [1, x]}\n"  # line 19
        "      AcquisitionDate: {range: ['2026/01/01', null]}\n"  # line 20
        "    to: [pacs]\n"
        "  - name: d\n"
        "    action: discard\n"
        "    to: [pacs]\n"  # line 24
        "  - name: s\n"  # line 25: a send route without `to`
        "    match: {Modality: {not: [SR, KO]}}\n"
    )
    found = problems(text)
    expected = [
        ("routes[0].match.StudyDescription (line 14)", "not a valid regular expression"),
        ("routes[0].match.StudyDate.range (line 15)", "low bound is above the high one"),
        ("routes[0].match.PatientName.range (line 16)", "numbers and DA/DT/TM"),
        ("routes[0].match.Modality (line 17)", "unknown operator 'nope'"),
        ("routes[0].match.AccessionNumber (line 18)", "present must be true or false"),
        ("routes[0].match.SeriesNumber.range (line 19)", "'x' is not a number"),
        ("routes[0].match.AcquisitionDate.range (line 20)", "not a DICOM DA value"),
        ("routes[1].to (line 24)", "a discard route sends nowhere"),
        ("routes[2].to (line 25)", "needs destinations"),
    ]
    for prefix, words in expected:
        assert any(p.startswith(prefix + ": ") and words in p for p in found), (prefix, found)
    assert len(found) == len(expected), found


def test_good_route_conditions_are_accepted() -> None:
    text = BASE + (
        "routes:\n"
        "  - name: research\n"
        "    match:\n"
        "      StudyDescription: {regex: '^RESEARCH'}\n"
        "      Modality: {not: [SR, KO]}\n"
        "      AccessionNumber: {present: true}\n"
        "      StudyDate: {range: [20260101, '20261231']}\n"
        "      SeriesNumber: {range: [1, null]}\n"
        "      AcquisitionDate: {range: [2026-01-01, null]}\n"  # a YAML date
        "    to: [pacs]\n"
        "  - {name: junk, match: {PatientID: 'TEST*'}, action: discard}\n"
    )
    config = parse_config(text)
    assert config.routes is not None
    match = config.routes[0].match
    assert match["StudyDate"] == {"range": ["20260101", "20261231"]}
    assert match["Modality"] == {"not": ["SR", "KO"]}
    assert match["AcquisitionDate"] == {"range": ["20260101", None]}
    assert config.routes[1].action.value == "discard" and config.routes[1].to == []


def test_deidentify_options_are_checked_with_key_and_line() -> None:
    every = (
        "[retain_safe_private, retain_uids, retain_device_identity, retain_institution_identity, "
        "retain_patient_characteristics, retain_long_modified_dates, clean_descriptors, "
        "clean_structured_content, clean_graphics]"
    )
    good = BASE + f"routes:\n  - name: r\n    to: [pacs]\n    deidentify: {{options: {every}}}\n"
    (route,) = parse_config(good, source="test.yaml").routes
    assert route.deidentify is not None and len(route.deidentify.options) == 9
    text = BASE + (
        "routes:\n"  # line 11
        "  - name: a\n"
        "    to: [pacs]\n"
        "    deidentify: {options: [retain_uids, clean_descriptor]}\n"  # line 14
        "  - name: b\n"
        "    to: [pacs]\n"
        "    deidentify: {options: [clean_pixel_data]}\n"  # line 17
        "  - name: c\n"
        "    to: [pacs]\n"
        "    deidentify:\n"  # line 20
        "      options: [retain_long_full_dates, retain_long_modified_dates]\n"
    )
    found = problems(text)
    expected = [
        ("routes[0].deidentify (line 14)", "unknown option 'clean_descriptor'"),
        ("routes[1].deidentify (line 17)", "clean_pixel_data is a PS3.15 option forwarder"),
        ("routes[2].deidentify (line 20)", "exclude each other"),
    ]
    for prefix, words in expected:
        assert any(p.startswith(prefix + ": ") and words in p for p in found), (prefix, found)
    # (the three routes also send to one destination with different changes: reported too)
    assert len([p for p in found if "options" in p]) == len(expected), found


def test_keywords_a_route_cannot_read_are_refused_with_key_and_line() -> None:
    # The header walk reads the data set's own values, as text: a file meta, command or item
    # keyword is never there, and a binary value (OB, OW, UN...) is not text. Such a route
    # would never match (and `present: false` or `not` would hold for every file, Pixel Data
    # of any image included): refused at load, not a route that silently never matches.
    text = BASE + (
        "routes:\n"  # line 11
        "  - name: r\n"
        "    match:\n"
        "      TransferSyntaxUID: 1.2.840.10008.1.2.4.50\n"  # line 14
        "      SourceApplicationEntityTitle: CT01\n"  # line 15
        "      AffectedSOPClassUID: '*'\n"  # line 16
        "      PixelData: {present: false}\n"  # line 17
        "      Item: '*'\n"  # line 18
        "    to: [pacs]\n"
    )
    found = problems(text)
    expected = [
        ("routes[0].match.TransferSyntaxUID (line 14)", "file meta"),
        ("routes[0].match.SourceApplicationEntityTitle (line 15)", "file meta"),
        ("routes[0].match.AffectedSOPClassUID (line 16)", "not in a data set"),
        ("routes[0].match.PixelData (line 17)", "binary"),
        ("routes[0].match.Item (line 18)", "not in a data set"),
    ]
    for prefix, words in expected:
        assert any(p.startswith(prefix + ": ") and words in p for p in found), (prefix, found)
    assert len(found) == len(expected), found
    # the header a modality's AE title is mistaken for points to the one routes can read
    assert "came in with through `listen` is `calling_ae`" in found[1], found
