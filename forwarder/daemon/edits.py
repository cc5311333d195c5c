"""The changes a destination's worker makes to a file it sends (``modify``, ``deidentify``).

Which routes sent a file to a destination is not stored in the queue: when a destination may
change what it sends (:meth:`Router.may_edit`), the file's header is read again when it is sent
(the same one-walk check ingest made, a few tens of microseconds) and routed again with the
routes in force then, so a reloaded config applies to what is still queued. A destination
without any change keeps today's path: no header read, the file streamed byte for byte.
Routes sending the file there with different changes are a per-file failure, never a pick.
A file queued before the routes in force were loaded (a reload, a restart), or before every
process that queues files took them (:meth:`Router.routed_again`), is routed again before it
is sent: when they no longer send it to that destination, it is not sent there (failed,
saying so), never sent without the changes its old route made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from forwarder.dicom.check import check_file_values
from forwarder.errors import ForwarderError
from forwarder.queue import Job

if TYPE_CHECKING:
    from forwarder.daemon.router import Router
    from forwarder.dicom.edit import Editor


class EditConflict(ForwarderError):
    """Matching routes send the file to one destination with different changes."""


class NoLongerRouted(ForwarderError):
    """The routes in force, loaded since the file was queued, no longer send it there."""


class RoutingSource(Protocol):
    def routing(self) -> tuple[Router, dict[int, str], dict[int, str]]: ...


class EditResolver:
    """``resolver(job, destination)`` -> the editors for that send (empty: unchanged)."""

    def __init__(self, source: RoutingSource) -> None:
        self.source = source

    def __call__(self, job: Job, destination: str) -> tuple[Editor, ...]:
        """Raises :class:`EditConflict`, :class:`NoLongerRouted`, or the check's
        InvalidFileError/UnreadableFileError."""
        older = self.source.routing()[0].routed_again(job.created_at)
        return self.editors(job.path, job.rel_path, job.calling_ae, destination, reroute=older)

    def sent_uids(
        self, path: str, rel_path: str, calling_ae: str, destination: str
    ) -> tuple[str, str, str] | None:
        """The Study, Series and SOP Instance UID the file at ``path`` is sent to
        ``destination`` with by the routes in force now, when its changes there
        (``deidentify``, ``modify``) may alter them; None: sent unchanged. Raises like
        :meth:`__call__`, or the edit's EditError. The proof of delivery asks by the UIDs the
        queue recorded when the file was stored; this only for a job stored before it did."""
        from forwarder.dicom.edit import edited_uids

        editors = self.editors(path, rel_path, calling_ae, destination)
        return edited_uids(path, editors) if editors else None

    def editors(
        self, path: str, rel_path: str, calling_ae: str, destination: str, *, reroute: bool = False
    ) -> tuple[Editor, ...]:
        """The editors for sending the file at ``path`` to ``destination`` (see __call__);
        ``reroute``: it was queued before the routes in force, which must still send it there."""
        router, want, vrs = self.source.routing()
        if not reroute and not router.may_edit(destination):
            return ()
        _, values = check_file_values(path, want, vrs)
        # Routed again as at ingest: with the calling AE title of a file received by `listen`
        # (kept in the queue), or routes matching it would miss their changes at send time.
        plan = router.plan(values, rel_path, calling_ae or None)
        if reroute and destination not in plan.destinations:
            why = (
                f"discarded by route {', '.join(plan.discarded_by)}"
                if plan.discarded_by
                else f"no longer send it to {destination}"
            )
            raise NoLongerRouted(
                f"not sent: the routes in force (changed since it was queued) {why}"
            )
        if not router.may_edit(destination):
            return ()
        edits = router.edits(plan, destination)
        if edits.conflict is not None:
            raise EditConflict(edits.conflict)
        return edits.editors
