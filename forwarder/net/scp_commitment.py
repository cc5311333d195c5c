"""The storage commitment exchange on one association of the SCP engine (PS3.4 J.3.3).

:class:`~forwarder.net.scp_association.ScpAssociation` hands this an N-ACTION-RQ whose data set
it has gathered and sends the bytes it gets back: the N-ACTION-RSP and, when the report goes on
the same association, the N-EVENT-REPORT-RQ with its data set right after. It also checks each
N-EVENT-REPORT-RSP against the reports sent, and, once the association has ended, sends the
reports kept for a new association (``receive --stgcmt-peer``). What the answer is
(:class:`~forwarder.net.commitment_scp.CommitmentResponder`) and the command sets
(:mod:`forwarder.net.scp_command_set`) are not here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from forwarder.net.commitment import (
    STATUS_PROCESSING_FAILURE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
)
from forwarder.net.commitment_scp import (
    STATUS_SUCCESS,
    ActionAnswer,
    CommitmentResponder,
    decode_dataset,
    encode_dataset,
    send_report,
)
from forwarder.net.scp_codec import encode_pdata
from forwarder.net.scp_command_set import (
    DimseRequest,
    encode_action_response,
    encode_event_report,
    encode_event_report_response,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Who takes an N-EVENT-REPORT of the Storage Commitment Push Model we receive (the daemon's
#: :meth:`~forwarder.daemon.commitment.CommitmentKeeper.deliver_report`): (Event Type ID, Event
#: Information, calling AE title) -> the status to answer it with.
ReportSink = Callable[[int, "Dataset", str], int]

logger = logging.getLogger(__name__)


class CommitmentExchange:
    """Storage commitment on one association: requests answered, reports sent and answered."""

    def __init__(self, responder: CommitmentResponder) -> None:
        self.responder = responder
        self._later: list[ActionAnswer] = []  # for a new association, once this one ends
        self._sent: set[int] = set()  # Message IDs of our N-EVENT-REPORTs not yet answered
        self._next_id = 0

    def action(
        self,
        request: DimseRequest,
        context_id: int,
        syntax: str,
        data: bytes,
        send_limit: int,
        calling_ae: str,
    ) -> bytes:
        """The PDUs answering an N-ACTION-RQ (and carrying its report, on this association)."""
        answer = self.responder.answer(
            request.sop_instance, request.action_type, data, syntax, calling_ae
        )
        out = encode_pdata(context_id, encode_action_response(request, answer.status), send_limit)
        if answer.report is None:
            return out
        if self.responder.report_to is not None:
            self._later.append(answer)
            return out
        self._next_id = self._next_id % 0xFFFF + 1
        command = encode_event_report(
            self._next_id, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, answer.event_type
        )
        data_set = encode_dataset(answer.report, syntax)
        self._sent.add(self._next_id)
        logger.info(
            "storage commitment report (transaction %s) sent to %s on its association",
            answer.transaction_uid,
            calling_ae,
        )
        return (
            out
            + encode_pdata(context_id, command, send_limit)
            + encode_pdata(context_id, data_set, send_limit, is_command=False)
        )

    def answered(self, response: DimseRequest, calling_ae: str) -> bool:
        """An N-EVENT-REPORT-RSP: False when it answers no report we sent (a protocol error)."""
        if response.message_id not in self._sent:
            return False
        self._sent.discard(response.message_id)
        if response.status != STATUS_SUCCESS:
            logger.warning(
                "%s answered our storage commitment report with status 0x%04X",
                calling_ae,
                response.status or 0,
            )
        return True

    def after(self, calling_ae: str, cancel: threading.Event | None = None) -> None:
        """The association has ended: send the reports kept for a new one (``report_to``);
        ``cancel`` (the server stopping) ends that at once."""
        if not self._later or self.responder.report_to is None:
            return
        host, port = self.responder.report_to
        for answer in self._later:
            assert answer.report is not None
            try:
                send_report(
                    host,
                    port,
                    calling_ae,
                    self.responder.ae_title,
                    answer.event_type,
                    answer.report,
                    cancel,
                )
            except Exception:
                logger.exception("sending the storage commitment report to %s failed", host)
        self._later.clear()


def take_report(
    sink: ReportSink,
    request: DimseRequest,
    context_id: int,
    syntax: str,
    data: bytes,
    send_limit: int,
    calling_ae: str,
) -> bytes:
    """The PDUs answering an N-EVENT-REPORT-RQ (a storage commitment report a PACS sends us as
    SCP, PS3.4 J.3.3): its data set decoded and handed to ``sink``, whose status is answered;
    one that cannot be decoded, or a sink that fails, is answered 0x0110 (the PACS may send it
    again; the transaction stays awaited meanwhile)."""
    try:
        dataset = decode_dataset(data, syntax)
    except Exception as exc:  # not a data set pydicom can read: not trusted
        logger.warning(
            "storage commitment report from %s with an unreadable data set: %s", calling_ae, exc
        )
        status = STATUS_PROCESSING_FAILURE
    else:
        try:
            status = sink(request.action_type, dataset, calling_ae)
        except Exception:
            logger.exception("storage commitment report from %s not taken", calling_ae)
            status = STATUS_PROCESSING_FAILURE
    return encode_pdata(context_id, encode_event_report_response(request, status), send_limit)
