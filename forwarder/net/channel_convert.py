"""What a :class:`~forwarder.net.channel.Channel` sends when a file cannot go byte for byte:
transcoded to a syntax the peer accepted for its SOP Class (:func:`fallback_context`), or changed
on the way (``modify``, ``deidentify``: :func:`store_edited`). Both are slow paths, off the one
a plain file takes: pydicom is imported only when they run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from forwarder.dicom.part10 import UNCOMPRESSED, FileMeta
from forwarder.net.acse import AcceptedContext
from forwarder.net.association import Association, Peer
from forwarder.net.send_outcome import SendOutcome, StoreRequest
from forwarder.net.status import Outcome

if TYPE_CHECKING:
    from forwarder.net.channel import Channel


def store_edited(
    channel: Channel,
    assoc: Association,
    request: StoreRequest,
    meta: FileMeta,
    exact: AcceptedContext | None,
    started: float,
) -> SendOutcome:
    """A file sent with changes: re-encoded in its own syntax with its pixels streamed
    (:func:`forwarder.dicom.edit.edit_file`), or, when the peer needs another syntax,
    transcoded and then changed in memory (the transcoding path holds it anyway)."""
    from forwarder.dicom.edit import EditError, edit_dataset_bytes, edit_file

    try:
        if exact is not None:
            obj = edit_file(request.path, request.edits)
            response = assoc.store_edited(obj, exact, priority=request.priority)
            return channel._from_response(
                request, meta, response, exact.transfer_syntax, obj.length, started, obj
            )
        fallback = fallback_context(assoc, meta, channel.peer)
        if isinstance(fallback, str):
            return channel._outcome(request, meta, Outcome.FAILED, None, fallback, started)
        from forwarder.dicom.part10 import IMPLICIT_VR_LITTLE_ENDIAN
        from forwarder.dicom.transcode import transcode

        data = transcode(
            request.path,
            fallback.transfer_syntax,
            allow_lossy=channel.allow_lossy_decompress,
            context=accepted_note(assoc, meta, channel.peer),
        )
        implicit = fallback.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        data, sop_instance, sent_uids = edit_dataset_bytes(data, implicit, request.edits)
        response = assoc.store_bytes(
            meta.sop_class_uid, sop_instance, data, fallback, priority=request.priority
        )
        sent = replace(meta, sop_instance_uid=sop_instance)
        return channel._from_response(
            request,
            sent,
            response,
            fallback.transfer_syntax,
            len(data),
            started,
            sent_uids=sent_uids,
        )
    except EditError as exc:
        error = f"cannot apply the configured changes: {exc}"
        return channel._outcome(request, meta, Outcome.FAILED, None, error, started)


def fallback_context(assoc: Association, meta: FileMeta, peer: Peer) -> AcceptedContext | str:
    """An accepted context to transcode the file to (an uncompressed syntax for its SOP Class),
    or why there is none."""
    from forwarder.dicom.transcode import syntax_name

    for ctx in assoc.accepted_for(meta.sop_class_uid):
        if ctx.transfer_syntax in UNCOMPRESSED:
            return ctx
    accepted = [syntax_name(c.transfer_syntax) for c in assoc.accepted_for(meta.sop_class_uid)]
    offer = ", ".join(accepted) if accepted else "nothing"
    return (
        f"no acceptable presentation context: {syntax_name(meta.sop_class_uid)} in "
        f"{syntax_name(meta.transfer_syntax)}; {peer} accepted {offer} for this SOP class"
    )


def accepted_note(assoc: Association, meta: FileMeta, peer: Peer) -> str:
    """What the peer accepted for the file's SOP Class, for a transcoding error to say."""
    from forwarder.dicom.transcode import syntax_name

    accepted = [syntax_name(c.transfer_syntax) for c in assoc.accepted_for(meta.sop_class_uid)]
    return (
        f"{syntax_name(meta.sop_class_uid)}: {peer} accepted only "
        f"{', '.join(accepted) or 'nothing'} for this SOP class"
    )
