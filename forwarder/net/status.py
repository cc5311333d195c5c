"""What a C-STORE-RSP status means for the file: the DICOM status categories and our outcomes.

:func:`classify_status` maps a status that passed :func:`forwarder.net.command_set.check_response`
to an :class:`Outcome` (stored, stored with a warning, retried, failed); :func:`code_to_category` is
pynetdicom's category of a status, restated without importing pynetdicom. Nothing here touches a
socket or a file: :mod:`forwarder.net.channel` applies the outcome to a send, the worker and
``forwarder send`` act on it, :mod:`forwarder.conformance` tabulates it.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What became of one C-STORE."""

    STORED = "stored"  # Success
    WARNING = "warning"  # Warning status: stored, with a remark
    RETRY = "retry"  # transient: try again later
    FAILED = "failed"  # permanent: do not retry

    @property
    def stored(self) -> bool:
        return self in (Outcome.STORED, Outcome.WARNING)


_FAILURE_CODES = frozenset(
    {0x0105, 0x0106, 0x0110, 0x0111, 0x0112, 0x0113, 0x0114, 0x0115, 0x0117, 0x0118, 0x0119}
    | {0x0120, 0x0121, 0x0122, 0x0123, 0x0124, 0x0210, 0x0211, 0x0212, 0x0213}
)


def code_to_category(code: int) -> str:
    """pynetdicom.status.code_to_category, restated so that sending does not import pynetdicom
    (and with it pydicom and numpy); tests/test_sender.py checks both agree on every code."""
    if code == 0x0000:
        return "Success"
    if code in (0xFF00, 0xFF01):
        return "Pending"
    if code == 0xFE00:
        return "Cancel"
    if code in _FAILURE_CODES or 0xA000 <= code <= 0xAFFF or 0xC000 <= code <= 0xCFFF:
        return "Failure"
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "Warning"
    return "Unknown"


#: Failure statuses that say nothing against the file: the peer may store it later.
_TRANSIENT_FAILURES = frozenset(
    {
        0x0110,  # processing failure: PACS use it for passing database trouble
        0x0210,  # duplicate invocation (a Message ID clash on the peer's side)
        0x0213,  # resource limitation
    }
)


def classify_status(status: int) -> Outcome:
    """Map the status of a C-STORE-RSP that passed
    :func:`forwarder.net.command_set.check_response` to an outcome.

    - Success and Warning (0xB000, 0xB006, 0xB007, 0x0001...) are stored.
    - Retried with backoff (the file is not at fault, or we cannot tell): 0xA7xx (out of
      resources), 0x0213 (resource limitation), 0x0110 (processing failure), 0x0210 (duplicate
      invocation), Cancel, and every status outside PS3.4's categories (Unknown).
    - Every other failure is permanent: 0xA9xx (data set does not match the SOP class), 0xCxxx
      (cannot understand), 0x0122 (SOP class not supported), 0x0124 (not authorised), ...

    Pending (0xFF00, 0xFF01) is not a C-STORE status: ``check_response`` refuses such a response
    as a protocol error (the association is aborted, the file retried), so no status of that
    category reaches here from the sender; passing one is a caller's error (``ValueError``).
    """
    category = code_to_category(status)
    if category == "Success":
        return Outcome.STORED
    if category == "Warning":
        return Outcome.WARNING
    if category == "Pending":
        raise ValueError(
            f"status 0x{status:04X} is Pending: a protocol error for C-STORE "
            "(command_set.check_response)"
        )
    if category == "Failure" and (status & 0xFF00) != 0xA700 and status not in _TRANSIENT_FAILURES:
        return Outcome.FAILED
    return Outcome.RETRY
