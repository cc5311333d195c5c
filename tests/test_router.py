"""The router: header values and sub-folder -> destinations, every matching route applies."""

from __future__ import annotations

import pytest

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
        ("[CM]T", "MT", True),
    ],
)
def test_wildcards(pattern: str, value: str, matches: bool) -> None:
    router = Router([r("x", ["pacs"], StationName=pattern)], DESTS)
    assert router.route({"StationName": value}, "a.dcm") == (["pacs"] if matches else [])


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
