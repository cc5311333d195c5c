"""Presentation contexts planned from what is actually queued.

Each (SOP class, transfer syntax) a file needs gets a context of its own, and every SOP class
whose files are not stored uncompressed also gets a separate uncompressed fallback context. A peer
thus cannot force the decompression of a file it would have accepted compressed: it accepts or
rejects each context on its own, and the sender prefers the exact match.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from forwarder.dicom.part10 import IMPLICIT_VR_LITTLE_ENDIAN, UNCOMPRESSED
from forwarder.net.pdu import MAX_CONTEXTS, ProposedContext


def proposals_for(sop_class: str, transfer_syntax: str) -> list[ProposedContext]:
    """The contexts to propose for one (SOP class, transfer syntax), most preferred first."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        # Every SCP must accept Implicit VR Little Endian; offering Explicit beside it would
        # only let the peer choose a syntax that forces us to re-encode the file.
        return [ProposedContext(sop_class, (IMPLICIT_VR_LITTLE_ENDIAN,))]
    # The file's own syntax alone (a peer offered Explicit and Implicit together may pick
    # Implicit, forcing a re-encode), and the shared uncompressed fallback beside it.
    return [
        ProposedContext(sop_class, (transfer_syntax,)),
        ProposedContext(sop_class, UNCOMPRESSED),
    ]


def plan_contexts(
    needs: Iterable[tuple[str, str]], limit: int = MAX_CONTEXTS
) -> tuple[list[ProposedContext], set[tuple[str, str]]]:
    """Contexts for ``needs`` in order, at most ``limit``; returns them and the needs covered.

    A need is covered only when all of its contexts fit, so that a compressed file never goes
    out without its fallback having been offered.
    """
    plans: list[ProposedContext] = []
    seen: set[ProposedContext] = set()
    covered: set[tuple[str, str]] = set()
    for need in needs:
        if need in covered:
            continue
        new = [c for c in proposals_for(*need) if c not in seen]
        if len(plans) + len(new) > limit:
            continue
        for c in new:
            seen.add(c)
            plans.append(c)
        covered.add(need)
    return plans, covered


def group_by_contexts(
    needs: Sequence[tuple[str, str]], limit: int = MAX_CONTEXTS
) -> list[set[tuple[str, str]]]:
    """Split ``needs`` into groups that each fit in one association's ``limit`` contexts."""
    remaining = list(dict.fromkeys(needs))
    groups = []
    while remaining:
        _, covered = plan_contexts(remaining, limit)
        if not covered:  # cannot happen with limit >= 2; guard against an endless loop
            raise ValueError(f"cannot fit {remaining[0]} in {limit} contexts")
        groups.append(covered)
        remaining = [n for n in remaining if n not in covered]
    return groups
