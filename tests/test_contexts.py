"""Presentation contexts planned from the files to send (``forwarder.net.contexts``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from forwarder.net.contexts import (
    MAX_CONTEXTS,
    group_by_contexts,
    plan_contexts,
    proposals_for,
)
from forwarder.net.pdu import ProposedContext

EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)
RLE = str(RLELossless)
CT = str(CTImageStorage)
MR = str(MRImageStorage)
SYNTAXES = [EXPLICIT, IMPLICIT, RLE, str(JPEGBaseline8Bit), str(JPEGLSLossless)]


def test_explicit_is_proposed_first_with_implicit_available() -> None:
    plans = proposals_for(CT, EXPLICIT)
    assert plans[0].abstract_syntax == CT and plans[0].transfer_syntaxes[0] == EXPLICIT
    assert any(IMPLICIT in p.transfer_syntaxes for p in plans)


def test_implicit_offers_only_implicit() -> None:
    assert proposals_for(CT, IMPLICIT) == [ProposedContext(CT, (IMPLICIT,))]


@pytest.mark.parametrize("syntax", [RLE, str(JPEGBaseline8Bit), str(JPEGLSLossless)])
def test_compressed_gets_its_own_context_and_a_separate_uncompressed_fallback(
    syntax: str,
) -> None:
    own, fallback = proposals_for(MR, syntax)
    assert own == ProposedContext(MR, (syntax,))
    assert fallback.abstract_syntax == MR
    assert set(fallback.transfer_syntaxes) == {EXPLICIT, IMPLICIT}


def test_plan_is_each_needs_contexts_in_order_without_repeats() -> None:
    needs = [(CT, EXPLICIT), (CT, RLE), (CT, IMPLICIT), (MR, str(JPEGBaseline8Bit))]
    plans, covered = plan_contexts(needs)
    assert covered == set(needs)
    expected = list(dict.fromkeys(p for n in needs for p in proposals_for(*n)))
    assert plans == expected
    # The uncompressed fallback of CT is proposed once, however many needs share it.
    fallback = proposals_for(CT, RLE)[1]
    assert plans.count(fallback) == 1


def test_plan_keeps_order_and_ignores_duplicates() -> None:
    plans, covered = plan_contexts([(MR, IMPLICIT), (CT, IMPLICIT), (MR, IMPLICIT)])
    assert [p.abstract_syntax for p in plans] == [MR, CT]
    assert covered == {(MR, IMPLICIT), (CT, IMPLICIT)}


def test_a_compressed_need_is_covered_only_with_its_fallback() -> None:
    # One slot left: the RLE need (two contexts) does not fit, the implicit one after it does.
    plans, covered = plan_contexts([(CT, IMPLICIT), (MR, RLE), (MR, IMPLICIT)], limit=2)
    assert covered == {(CT, IMPLICIT), (MR, IMPLICIT)}
    assert len(plans) == 2


def test_plan_never_exceeds_the_limit() -> None:
    needs = [(f"1.2.3.{i}", IMPLICIT) for i in range(300)]
    plans, covered = plan_contexts(needs)
    assert len(plans) == MAX_CONTEXTS == 128
    assert covered == set(needs[:128])


def test_many_sop_classes_times_syntaxes_split_into_groups() -> None:
    needs = [(f"1.2.840.10008.5.1.4.1.1.{i}", ts) for i in range(60) for ts in SYNTAXES[:3]]
    groups = group_by_contexts(needs)
    assert len(groups) == 2  # 60 classes x 3 contexts = 180 > 128
    assert set().union(*groups) == set(needs)
    assert sum(len(g) for g in groups) == len(needs)
    for group in groups:
        plans, covered = plan_contexts(list(group))
        assert covered == group and len(plans) <= MAX_CONTEXTS


def test_group_by_contexts_refuses_an_impossible_limit() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        group_by_contexts([(CT, RLE)], limit=1)


def test_no_needs_no_groups() -> None:
    assert group_by_contexts([]) == []
    assert plan_contexts([]) == ([], set())


needs_strategy = st.lists(
    st.tuples(
        st.sampled_from([f"1.2.840.10008.5.1.4.1.1.{i}" for i in range(90)]),
        st.sampled_from(SYNTAXES),
    ),
    max_size=400,
)


@settings(max_examples=60, deadline=None)
@given(needs=needs_strategy, limit=st.integers(min_value=2, max_value=MAX_CONTEXTS))
def test_groups_partition_the_needs_and_each_fits(needs: list[tuple[str, str]], limit: int) -> None:
    groups = group_by_contexts(needs, limit)
    assert set().union(*groups) == set(needs) if groups else not needs
    seen: set[tuple[str, str]] = set()
    for group in groups:
        assert not (group & seen)
        seen |= group
        plans, covered = plan_contexts(list(group), limit)
        assert covered == group
        assert len(plans) <= limit
        proposed = {(p.abstract_syntax, ts) for p in plans for ts in p.transfer_syntaxes}
        for sop, syntax in group:
            assert (sop, syntax) in proposed
            if syntax not in (EXPLICIT, IMPLICIT):
                # The uncompressed fallback always travels with a compressed need.
                assert ProposedContext(sop, (EXPLICIT, IMPLICIT)) in plans
