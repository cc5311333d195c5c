"""``forwarder send --stgcmt``: storage commitment for what was just stored (dcmsnd ``-stgcmt``).

After the C-STOREs, one N-ACTION asks the peer to commit every instance it answered Success or
Warning for (each SOP Instance once, however often ``--repeat`` sent it), on an association of its
own. The report is awaited on that association, or, with ``--stgcmt-port``, on an association the
peer opens to our calling AE title on that port (the peer must know that address: Orthanc's
``DicomModalities``, a PACS's AE configuration). What the peer does not commit by
``--stgcmt-timeout`` counts as not committed. Each file's record in ``--report`` gains
``commitment`` (``committed``, ``failed``, ``not reported``, ``not requested``) and
``commitment_error``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from forwarder.cli._net import Target, _duration
from forwarder.net.channel import SendOutcome
from forwarder.net.commitment import (
    CommitmentBook,
    CommitmentError,
    CommitmentReport,
    Reference,
    failure_text,
)

logger = logging.getLogger("forwarder.send")

DEFAULT_TIMEOUT = 60.0

COMMITTED = "committed"
FAILED = "failed"
NOT_REPORTED = "not reported"
NOT_REQUESTED = "not requested"  # the file was not stored: there is nothing to commit


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("storage commitment (proof of delivery)")
    g.add_argument(
        "--stgcmt",
        action="store_true",
        help="after storing, request storage commitment for what was stored and wait for the "
        "report; exit 1 when any file was not committed (dcmsnd -stgcmt)",
    )
    g.add_argument(
        "--stgcmt-timeout",
        type=_duration,
        metavar="DURATION",
        help=f"how long to wait for the report (default {DEFAULT_TIMEOUT:g}s)",
    )
    g.add_argument(
        "--stgcmt-port",
        type=int,
        metavar="PORT",
        help="take the report on an association the peer opens to our calling AE title on "
        "this port (default: on the same association)",
    )


def usage_problem(args: argparse.Namespace, target: object) -> str | None:
    """A one-line reason the commitment options cannot be used as given, or None."""
    if not args.stgcmt:
        if args.stgcmt_timeout is not None or args.stgcmt_port is not None:
            return "--stgcmt-timeout and --stgcmt-port need --stgcmt"
        return None
    if not isinstance(target, Target):
        return "--stgcmt needs a DICOM peer (storage commitment is DIMSE, not STOW-RS)"
    if args.stgcmt_port is not None and not 0 <= args.stgcmt_port <= 65535:
        return "--stgcmt-port must be 0..65535"
    if args.stgcmt_timeout is not None and args.stgcmt_timeout <= 0:
        return "--stgcmt-timeout must be more than 0"
    return None


@dataclass(slots=True)
class Verdicts:
    """Per SOP Instance UID: ``committed``, ``failed`` or ``not reported``, and the reason."""

    transaction_uid: str | None = None
    error: str | None = None
    states: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def of(self, outcome: SendOutcome) -> tuple[str, str | None]:
        uid = outcome.sop_instance_uid
        if not outcome.outcome.stored or uid is None:
            return NOT_REQUESTED, None
        return self.states.get(uid, (NOT_REPORTED, self.error or "no report"))

    def counts(self) -> tuple[int, int]:
        committed = sum(1 for s, _ in self.states.values() if s == COMMITTED)
        return committed, len(self.states) - committed


def stored_references(outcomes: list[SendOutcome]) -> list[Reference]:
    """Each instance stored (Success or Warning) once, in the order first stored."""
    seen: dict[str, Reference] = {}
    for o in outcomes:
        if o.outcome.stored and o.sop_instance_uid and o.sop_class_uid:
            seen.setdefault(o.sop_instance_uid, Reference(o.sop_class_uid, o.sop_instance_uid))
    return list(seen.values())


def request(args: argparse.Namespace, target: Target, outcomes: list[SendOutcome]) -> Verdicts:
    """Ask the peer to commit what ``outcomes`` stored; wait; the verdict per instance."""
    from forwarder.net.commitment_scu import ReportAcceptor, request_commitment

    refs = stored_references(outcomes)
    verdicts = Verdicts()
    if not refs:
        return verdicts
    for ref in refs:
        verdicts.states[ref.sop_instance] = (NOT_REPORTED, None)
    timeout = args.stgcmt_timeout or DEFAULT_TIMEOUT
    book = CommitmentBook()
    acceptor = None
    report: CommitmentReport | None = None
    try:
        if args.stgcmt_port is not None:
            acceptor = ReportAcceptor(
                book,
                ae_title=target.settings.calling_ae_title,
                port=args.stgcmt_port,
                bind=target.settings.bind_host or "0.0.0.0",
            ).start()
        verdicts.transaction_uid, report = request_commitment(
            target.peer,
            target.settings,
            refs,
            book,
            timeout=timeout,
            release_at_once=acceptor is not None,
        )
    except CommitmentError as exc:
        verdicts.error = str(exc)
    finally:
        if acceptor is not None:
            acceptor.stop()
    if report is None:
        why = verdicts.error or f"no storage commitment report within {timeout:g}s"
        for ref in refs:
            verdicts.states[ref.sop_instance] = (NOT_REPORTED, why)
        verdicts.error = why
        return verdicts
    for ref in report.committed:
        verdicts.states[ref.sop_instance] = (COMMITTED, None)
    for failure in report.failed:
        verdicts.states[failure.reference.sop_instance] = (
            FAILED,
            f"stored but not committed: {failure_text(failure.reason)}",
        )
    for ref in report.not_reported(refs):
        verdicts.states[ref.sop_instance] = (
            NOT_REPORTED,
            "stored but not committed: the report does not name it",
        )
    return verdicts


def print_outcome(verdicts: Verdicts, outcomes: list[SendOutcome], *, quiet: bool) -> None:
    """One FAILED line per stored file not committed, and a summary unless ``quiet``."""
    shown: set[str] = set()
    for o in outcomes:
        state, why = verdicts.of(o)
        uid = o.sop_instance_uid
        if state in (FAILED, NOT_REPORTED) and uid not in shown:
            shown.add(uid or "")
            print(
                f"forwarder send: NOT COMMITTED {o.request.path} SOP Instance {uid}: {why}",
                file=sys.stderr,
            )
    committed, not_committed = verdicts.counts()
    if not quiet:
        txn = f" (transaction {verdicts.transaction_uid})" if verdicts.transaction_uid else ""
        print(
            f"forwarder send: storage commitment: {committed} committed, {not_committed} not "
            f"committed{txn}",
            file=sys.stderr,
        )


def annotate(record: dict[str, Any], verdicts: Verdicts, outcome: SendOutcome) -> None:
    state, why = verdicts.of(outcome)
    record["commitment"] = state
    record["commitment_error"] = why


def summary(verdicts: Verdicts) -> dict[str, Any]:
    committed, not_committed = verdicts.counts()
    return {
        "transaction_uid": verdicts.transaction_uid,
        "committed": committed,
        "not_committed": not_committed,
        "error": verdicts.error,
    }
