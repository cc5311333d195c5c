"""RoutesInUse (forwarder/daemon/routes_in_use.py): when work routed with replaced routes ends."""

from __future__ import annotations

from forwarder.daemon.routes_in_use import RoutesInUse


def test_advance_with_nothing_in_progress_calls_back_at_once() -> None:
    in_use = RoutesInUse()
    said: list[str] = []
    in_use.advance(lambda: said.append("taken"))
    assert said == ["taken"]


def test_the_callback_waits_for_the_last_piece_of_work_begun_before() -> None:
    in_use = RoutesInUse()
    said: list[str] = []
    first, second = in_use.begin(), in_use.begin()
    in_use.advance(lambda: said.append("taken"))
    newer = in_use.begin()  # begun with the new routes: not waited for
    in_use.end(first)
    assert said == []
    in_use.end(second)
    assert said == ["taken"]
    in_use.end(newer)
    assert said == ["taken"]


def test_two_replacements_each_wait_for_what_was_begun_before_them() -> None:
    in_use = RoutesInUse()
    said: list[int] = []
    old = in_use.begin()
    in_use.advance(lambda: said.append(1))
    middle = in_use.begin()
    in_use.advance(lambda: said.append(2))
    in_use.end(middle)
    assert said == []  # the first replacement's work is still in progress
    in_use.end(old)
    assert said == [1, 2]
