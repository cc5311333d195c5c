"""What a send outcome becomes: its log line, the ack the queue records, the retry rules.

:func:`log_outcome` writes the one line per file sent (stored, warning, retry, failed; journald
fields for the destination, UID, status and file). :class:`Ack` is one outcome to record in the
queue; :func:`retry_ack` turns a transient failure into a retry after :func:`backoff`, or into a
failure once ``retry.max_attempts`` or ``retry.give_up_after`` is reached. :class:`SendMetrics`
and :class:`LastOutcome` are what the workers report to the daemon's metrics and systemd status.
The threads and batches that produce outcomes are :mod:`forwarder.daemon.worker` and
:mod:`forwarder.daemon.worker_batch`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

from forwarder.config import RetryPolicy
from forwarder.net.channel import SendOutcome
from forwarder.net.status import Outcome
from forwarder.queue import Job

logger = logging.getLogger(__name__)


def backoff(policy: RetryPolicy, attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts: exponential, capped, with jitter."""
    # The exponent is capped before it is used: 2.0 ** 1024 overflows, and a week of retries
    # against a dead peer gets there.
    base = min(policy.max_delay, policy.initial_delay * 2.0 ** min(max(attempts - 1, 0), 60))
    return float(base * random.uniform(0.5, 1.0))


class SendMetrics(Protocol):
    def file_sent(self, destination: str, outcome: str, nbytes: int, seconds: float) -> None: ...
    def retry(self, destination: str) -> None: ...
    def associations_open(self, destination: str, delta: int) -> None: ...
    def destination_up(self, destination: str, up: bool) -> None: ...
    def destination_state(self, destination: str, state: str, since: float) -> None: ...


@dataclass(frozen=True, slots=True)
class LastOutcome:
    """The latest outcome of a destination, for systemd STATUS= lines."""

    destination: str
    outcome: str
    at: float


@dataclass(frozen=True, slots=True)
class Ack:
    """One outcome to record in the queue (kept and retried if the queue refuses it)."""

    kind: str  # "done", "retry", "failed" or "release"
    ids: tuple[int, ...]
    status: int | None = None
    error: str = ""
    next_attempt_at: float = 0.0
    charge: bool = True  # a "retry" counts an attempt (not a wait for the file to settle)
    #: A "done": (job id, (Study, Series, SOP Instance UID)) of the jobs its changes sent with
    #: other UIDs than their file's (deidentify); the others were sent with their own.
    sent_uids: tuple[tuple[int, tuple[str, str, str]], ...] = ()


def retry_ack(
    job: Job,
    status: int | None,
    error: str | None,
    *,
    policy: RetryPolicy,
    destination: str,
    metrics: SendMetrics | None,
) -> Ack:
    """The ack for a transient failure of ``job``: retried after :func:`backoff`, or failed
    once the policy gives up (attempts or age)."""
    attempts = job.attempts + 1
    error = error or "transient failure"
    age = time.time() - job.created_at
    if policy.max_attempts is not None and attempts >= policy.max_attempts:
        error = f"gave up after {attempts} attempts: {error}"
        return Ack("failed", (job.id,), status, error)
    if age >= policy.give_up_after:
        error = f"gave up after {age / 3600:.1f} h and {attempts} attempts: {error}"
        return Ack("failed", (job.id,), status, error)
    if metrics is not None:
        metrics.retry(destination)
    next_at = time.time() + backoff(policy, attempts)
    return Ack("retry", (job.id,), status, error, next_at)


def log_outcome(destination: str, job: Job, o: SendOutcome) -> None:
    """The line logged for one file sent (never patient data: UIDs, paths, statuses)."""
    # The object actually read from the file now (it may have been replaced since ingest).
    if o.sop_instance_uid and o.sop_instance_uid != job.sop_instance_uid:
        job = dataclasses.replace(job, sop_instance_uid=o.sop_instance_uid)
    status = f"0x{o.status:04X}" if o.status is not None else "-"
    fields = {
        "DESTINATION": destination,
        "SOP_INSTANCE_UID": job.sop_instance_uid,
        "DIMSE_STATUS": status,
        "FILE": job.path,
        "OUTCOME": o.outcome.value,
    }
    source = job.rel_path
    if job.calling_ae:  # received through listen: where it came from
        fields["CALLING_AE"] = job.calling_ae
        source = f"{job.rel_path} (from {job.calling_ae})"
    if o.outcome is Outcome.STORED:
        logger.info(
            "%s -> %s: stored %s (status %s, %.0f ms)",
            source,
            destination,
            job.sop_instance_uid,
            status,
            o.seconds * 1000,
            extra=fields,
        )
    elif o.outcome is Outcome.WARNING:
        logger.warning(
            "%s -> %s: stored with warning %s: %s",
            source,
            destination,
            job.sop_instance_uid,
            o.error,
            extra=fields,
        )
    elif o.outcome is Outcome.RETRY:
        logger.warning(
            "%s -> %s: will retry %s (attempt %d): %s",
            source,
            destination,
            job.sop_instance_uid,
            job.attempts + 1,
            o.error,
            extra=fields,
        )
    else:
        logger.error(
            "%s -> %s: failed %s: %s",
            source,
            destination,
            job.sop_instance_uid,
            o.error,
            extra=fields,
        )
