"""What the Storage SCP accepts: SOP classes, transfer syntaxes, and the answer per context.

The tables are built once, at start, from pynetdicom's lists (the storage SOP classes and every
transfer syntax it knows, as the receiver registered them when it ran on pynetdicom's SCP);
after that, negotiating an association is a few dictionary look-ups and no library is imported
on the per-object path. :func:`scp_profile` returns the same tables for the conformance
statement (:mod:`forwarder.conformance`), so the document shows what the engine accepts.

Not here: decoding the A-ASSOCIATE-RQ (:mod:`forwarder.net.scp_codec`), who may associate at
all (allow lists, :mod:`forwarder.net.receiver`), the association loop
(:mod:`forwarder.net.scp_association`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from forwarder.net.commitment import COMMITMENT_SYNTAXES, STORAGE_COMMITMENT_PUSH
from forwarder.net.pdu import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    VERIFICATION_SOP_CLASS,
)
from forwarder.net.scp_codec import AssociateRequest, RequestedContext
from forwarder.net.scp_object import Origin

logger = logging.getLogger(__name__)

#: Presentation context results (PS3.8 9.3.3.2).
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# When a requestor offers several transfer syntaxes in one presentation context, the first of
# *ours* that it offers is chosen. Keep what the sender has where that loses nothing: lossless
# compressed syntaxes first, then uncompressed, and lossy ones last, so that we never make a
# sender compress lossily an image it holds uncompressed.
_PREFERRED_FIRST = (
    "RLELossless",
    "JPEGLossless",
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEG2000Lossless",
    "JPEG2000MCLossless",
    "HTJ2KLossless",
    "HTJ2KLosslessRPCL",
    "JPEGXLLossless",
    "JPEGXLJPEGRecompression",
    "DeflatedImageFrameCompression",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "ExplicitVRBigEndian",
)

#: Verification in the transfer syntaxes pynetdicom's ``add_supported_context`` defaults to.
VERIFICATION_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)

#: The SOP classes we serve that are not storage: no C-STORE on their contexts.
NON_STORAGE = frozenset({VERIFICATION_SOP_CLASS, STORAGE_COMMITMENT_PUSH})

#: Timeouts of the engine (seconds).
ASSOCIATE_TIMEOUT = 10.0  # a connection's first PDU (A-ASSOCIATE-RQ): a silent one is dropped
IDLE_TIMEOUT = 60.0  # no PDU, or no progress inside one, on an established association
RELEASE_TIMEOUT = 10.0  # our A-RELEASE-RP / A-ABORT going out
HANDSHAKE_TIMEOUT = 30.0  # the TLS handshake
MAX_ASYNC_WINDOW = 16  # outstanding operations we grant when a requestor proposes more


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the SCP engine negotiates and reads (the same for every association)."""

    max_pdu: int  # the largest P-DATA-TF we accept (0 = no limit)
    max_object_size: int | None
    async_window: int
    associate_timeout: float
    idle_timeout: float
    release_timeout: float
    #: Once a PDU has begun, all of it must arrive within ``idle_timeout`` plus its length at
    #: this rate (bytes/s): a peer past the AE checks cannot hold a slot by dripping a byte
    #: just inside the idle timeout. 8 KiB/s: 2 min more for a 1 MiB PDU, far below any link.
    min_pdu_rate: float = 8192.0


#: Decides on an A-ASSOCIATE-RQ: None to accept, or ((result, source, reason), why) to reject.
Admit = Callable[[AssociateRequest, Origin], "tuple[tuple[int, int, int], str] | None"]


@dataclass(frozen=True, slots=True)
class SupportedContext:
    """One SOP class we accept, in these transfer syntaxes (our order of preference)."""

    abstract_syntax: str
    transfer_syntax: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ScpProfile:
    """What the Storage SCP accepts and announces (names as on pynetdicom's ``AE``, which the
    conformance statement used to read)."""

    supported_contexts: tuple[SupportedContext, ...]  # Verification, commitment, storage
    promiscuous: bool
    maximum_pdu_size: int
    maximum_associations: int
    require_called_aet: bool
    async_ops_window: int
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str = IMPLEMENTATION_VERSION
    acse_timeout: float = ASSOCIATE_TIMEOUT
    network_timeout: float = IDLE_TIMEOUT
    dimse_timeout: float = IDLE_TIMEOUT
    answers_commitment: bool = False  # N-ACTION (the requestor as Storage Commitment SCU)
    takes_reports: bool = False  # N-EVENT-REPORT (the requestor as Storage Commitment SCP)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The answer to an A-ASSOCIATE-RQ's presentation contexts and asynchronous window."""

    results: list[tuple[int, int, str]]  # (context ID, result, transfer syntax) per context
    accepted: dict[int, tuple[str, str]]  # context ID -> (abstract syntax, transfer syntax)
    refused: list[str]  # the abstract syntaxes of the contexts not accepted, sorted
    window: tuple[int, int] | None  # the asynchronous operations window granted, if proposed
    roles: list[tuple[str, int, int]] = field(default_factory=list)  # role selections answered


class ContextPolicy:
    """Answers each proposed presentation context: ``(result, transfer syntax)``."""

    def __init__(self, profile: ScpProfile, known_non_storage: frozenset[str]) -> None:
        self._syntaxes = {c.abstract_syntax: c.transfer_syntax for c in profile.supported_contexts}
        self._promiscuous = profile.promiscuous
        self._known_non_storage = known_non_storage
        self._answers_commitment = profile.answers_commitment
        self._takes_reports = profile.takes_reports

    def answer(self, context: RequestedContext) -> tuple[int, str]:
        ours = self._syntaxes.get(context.abstract_syntax)
        if ours is None:
            if self._promiscuous and self._storage_like(context.abstract_syntax):
                # storescp +pm: private and unknown SOP classes in the caller's first choice.
                return ACCEPTANCE, context.transfer_syntaxes[0]
            return ABSTRACT_SYNTAX_NOT_SUPPORTED, ""
        if self._promiscuous and context.abstract_syntax not in NON_STORAGE:
            # As pynetdicom's unrestricted storage service: the caller's first choice.
            return ACCEPTANCE, context.transfer_syntaxes[0]
        proposed = context.transfer_syntaxes
        for syntax in ours:
            if syntax in proposed:
                return ACCEPTANCE, syntax
        return TRANSFER_SYNTAXES_NOT_SUPPORTED, ""

    def negotiate(self, request: AssociateRequest, max_window: int) -> Negotiated:
        """Every context of ``request`` answered; the window granted is at most ``max_window``
        each way (0, "unlimited", counts as ``max_window``)."""
        results = []
        accepted: dict[int, tuple[str, str]] = {}
        refused: set[str] = set()
        for context in request.contexts:
            result, syntax = self.answer(context)
            if result == ACCEPTANCE:
                accepted[context.context_id] = (context.abstract_syntax, syntax)
                results.append((context.context_id, result, syntax))
                continue
            refused.add(context.abstract_syntax)
            # PS3.8 9.3.3.2: the AC's context item holds one Transfer Syntax sub-item even when
            # refused ("not significant"); strict requestors expect it: echo their first one.
            echoed = context.transfer_syntaxes[0] if context.transfer_syntaxes else ""
            results.append((context.context_id, result, echoed))
        window = None
        if request.async_window is not None:
            invoked, performed = request.async_window
            window = (
                min(invoked or max_window, max_window),
                min(performed or max_window, max_window),
            )
        return Negotiated(results, accepted, sorted(refused), window, self._roles(request))

    def _roles(self, request: AssociateRequest) -> list[tuple[str, int, int]]:
        """SCP/SCU Role Selection (PS3.7 D.3.3.4) answered for Storage Commitment only: a PACS
        proposes itself as SCP to send its N-EVENT-REPORTs (PS3.4 J.3.3); we accept each role
        we serve (a role not proposed is answered 0). Other SOP classes: default roles."""
        out = []
        for uid, scu, scp in request.roles:
            if uid == STORAGE_COMMITMENT_PUSH:
                out.append(
                    (
                        uid,
                        int(bool(scu) and self._answers_commitment),
                        int(bool(scp) and self._takes_reports),
                    )
                )
        return out

    def _storage_like(self, uid: str) -> bool:
        """Private, unknown, or a storage SOP class: anything but a known other service."""
        return uid not in self._known_non_storage


def _preferred_transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax pynetdicom knows, in the order of :data:`_PREFERRED_FIRST`."""
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    rank = {keyword: i for i, keyword in enumerate(_PREFERRED_FIRST)}
    known = [str(uid) for uid in ALL_TRANSFER_SYNTAXES]
    return tuple(sorted(known, key=lambda uid: rank.get(UID(uid).keyword, len(rank))))


def scp_profile(
    *,
    max_pdu: int,
    max_associations: int,
    require_called_aet: bool,
    promiscuous: bool = False,
    commitment: bool = False,
    reports: bool = False,
) -> ScpProfile:
    """The SCP's tables: Verification, the Storage Commitment Push Model when ``commitment``
    (we answer N-ACTION) or ``reports`` (we take N-EVENT-REPORT),
    and every storage SOP class pynetdicom lists, each in every transfer syntax it knows
    (imports pynetdicom: call it once, at start)."""
    from pynetdicom import AllStoragePresentationContexts

    syntaxes = _preferred_transfer_syntaxes()
    storage = [
        SupportedContext(str(c.abstract_syntax), syntaxes) for c in AllStoragePresentationContexts
    ]
    return ScpProfile(
        supported_contexts=(
            SupportedContext(VERIFICATION_SOP_CLASS, VERIFICATION_SYNTAXES),
            *(
                [SupportedContext(STORAGE_COMMITMENT_PUSH, COMMITMENT_SYNTAXES)]
                if commitment or reports
                else []
            ),
            *storage,
        ),
        promiscuous=promiscuous,
        maximum_pdu_size=max_pdu,
        maximum_associations=max_associations,
        require_called_aet=require_called_aet,
        async_ops_window=MAX_ASYNC_WINDOW,
        answers_commitment=commitment,
        takes_reports=reports,
    )


def context_policy(profile: ScpProfile) -> ContextPolicy:
    """The negotiator for ``profile`` (imports pynetdicom's SOP class list once)."""
    from pynetdicom import sop_class

    storage = {c.abstract_syntax for c in profile.supported_contexts} - NON_STORAGE
    known = {
        str(value)
        for name in dir(sop_class)
        if not name.startswith("_") and isinstance(value := getattr(sop_class, name), str)
    }
    return ContextPolicy(profile, frozenset(known - storage))


def log_refused(calling: str, refused: list[str]) -> None:
    """The caller learns only "context rejected"; say here what and why, once per association."""
    from pydicom.uid import UID

    unknown = any(UID(uid).name == uid for uid in refused)  # pydicom has no name for it
    logger.warning(
        "association from %s: refused the presentation contexts of %d SOP class(es): %s%s",
        calling,
        len(refused),
        ", ".join(refused[:10]) + (" ..." if len(refused) > 10 else ""),
        " (private or unknown ones are accepted with --promiscuous)" if unknown else "",
    )
