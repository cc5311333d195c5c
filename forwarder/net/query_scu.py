"""Does the peer hold these instances? C-FIND at IMAGE level (Study Root), over pynetdicom.

For destinations without storage commitment (``verify_by_query``): one association, one C-FIND
per instance naming its Study, Series and SOP Instance UID (the unique keys of each level, as
PS3.4 C.4.1 asks of a Study Root query at IMAGE level). A match (Pending) means held, Success
with none means not held; any other status decides nothing about that instance (it is
``undecided``, with the status; the others are still asked about), and no answer decides
nothing at all (:class:`QueryError`, saying so when the peer reset or closed the connection:
:mod:`forwarder.net.endings`): the caller asks again later. Not a hot path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from forwarder.errors import ForwarderError
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.cancel import (
    Cancelled,
    abort_on_cancel,
    associate,
    why_not_established,
)
from forwarder.net.commitment import COMMITMENT_SYNTAXES
from forwarder.net.endings import lost, release, watched

logger = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


class QueryError(ForwarderError):
    """The peer could not be asked, or did not answer a query clearly."""


@dataclass(frozen=True, slots=True)
class InstanceKey:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class Answers:
    """What the peer said of the instances asked about, by SOP Instance UID."""

    held: frozenset[str]
    undecided: dict[str, str]  # answered with a failure status: uid -> why


def held_instances(
    peer: Peer,
    settings: AssociationSettings,
    keys: Sequence[InstanceKey],
    cancel: threading.Event | None = None,
) -> Answers:
    """Which of ``keys`` the peer holds (the others it does not, but those ``undecided``).
    Raises :class:`QueryError`, also when ``cancel`` is set before all are asked (the
    association is then aborted at once)."""
    from pynetdicom import AE

    ae = AE(ae_title=settings.calling_ae_title)
    ae.add_requested_context(STUDY_ROOT_FIND, list(COMMITMENT_SYNTAXES))
    ae.connection_timeout = settings.connect_timeout
    ae.acse_timeout = settings.accept_timeout or settings.connect_timeout
    ae.dimse_timeout = settings.response_timeout
    ae.network_timeout = max(settings.response_timeout, 60.0)
    kwargs: dict[str, Any] = {"ae_title": peer.ae_title, "max_pdu": settings.max_pdu_receive}
    if settings.bind_host:
        kwargs["bind_address"] = (settings.bind_host, 0)
    if settings.tls is not None:
        kwargs["tls_args"] = (settings.tls, settings.tls_server_name or peer.host)
    try:
        assoc = associate(ae, peer.host, peer.port, kwargs, cancel)
    except Cancelled as exc:
        raise QueryError(str(exc)) from None
    if not assoc.is_established:
        raise QueryError(f"no association with {peer} for C-FIND: {why_not_established(assoc)}")
    held: set[str] = set()
    undecided: dict[str, str] = {}
    with watched(assoc) as ending:
        try:
            with abort_on_cancel(assoc, cancel):
                _ask(assoc, peer, keys, held, undecided, cancel)
        finally:
            release(assoc, ending, peer, cancel)
    return Answers(frozenset(held), undecided)


def _ask(
    assoc: Any,
    peer: Peer,
    keys: Sequence[InstanceKey],
    held: set[str],
    undecided: dict[str, str],
    cancel: threading.Event | None,
) -> None:
    from pydicom.dataset import Dataset

    for key in keys:
        if cancel is not None and cancel.is_set():
            raise QueryError("stopping: not all instances asked about")
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = key.study_instance_uid
        query.SeriesInstanceUID = key.series_instance_uid
        query.SOPInstanceUID = key.sop_instance_uid
        found = False
        asked = f"{peer} answered the C-FIND for {key.sop_instance_uid} with"
        try:
            answers = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
        except ValueError as exc:  # pynetdicom: the identifier cannot be encoded
            undecided[key.sop_instance_uid] = f"cannot ask for {key.sop_instance_uid}: {exc}"
            continue
        except RuntimeError as exc:  # pynetdicom: the association is gone
            raise QueryError(f"{peer}: {exc}") from None
        for status, identifier in answers:
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in (0xFF00, 0xFF01):
                uid = str(getattr(identifier, "SOPInstanceUID", "") or "")
                found = found or uid == key.sop_instance_uid
            elif code is None and cancel is not None and cancel.is_set():
                raise QueryError("stopping: no answer to a C-FIND yet")
            elif code is None:
                ended = lost(assoc, peer, f"the C-FIND-RSP for {key.sop_instance_uid}")
                raise QueryError(ended or f"{asked} nothing")
            elif code != 0x0000:
                # A failure (even after a match): nothing is decided about this instance.
                undecided[key.sop_instance_uid] = f"{asked} status 0x{code:04X}"
                found = False
        if found:
            held.add(key.sop_instance_uid)
