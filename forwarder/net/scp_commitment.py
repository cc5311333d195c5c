"""The storage commitment exchange on one association of the SCP engine (PS3.4 J.3.3).

:class:`~forwarder.net.scp_association.ScpAssociation` hands this an N-ACTION-RQ whose data set
it has gathered and sends the bytes it gets back: the N-ACTION-RSP and, when the report goes on
the same association, the N-EVENT-REPORT-RQ with its data set right after. It also checks each
N-EVENT-REPORT-RSP against the reports sent, and, once the association has ended, sends the
reports kept for a new association (``receive --stgcmt-peer``). What the answer is
(:class:`~forwarder.net.commitment_scp.CommitmentResponder`) and the command sets
(:mod:`forwarder.net.scp_codec`) are not here.
"""

from __future__ import annotations

import logging

from forwarder.net.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from forwarder.net.commitment_scp import (
    STATUS_SUCCESS,
    ActionAnswer,
    CommitmentResponder,
    encode_dataset,
    send_report,
)
from forwarder.net.scp_codec import (
    DimseRequest,
    encode_action_response,
    encode_event_report,
    encode_pdata,
)

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

    def after(self, calling_ae: str) -> None:
        """The association has ended: send the reports kept for a new one (``report_to``)."""
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
                )
            except Exception:
                logger.exception("sending the storage commitment report to %s failed", host)
        self._later.clear()
