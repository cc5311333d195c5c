"""The gateway's answer to a modality's storage commitment request, instance by instance: held
(where the queue says the file is, whole, that instance of that class), or why not."""

from __future__ import annotations

from pathlib import Path

from dicomgen import write_file

from forwarder.daemon.listen_commitment import QueueHoldings
from forwarder.net.commitment import Reference
from forwarder.net.commitment_scp import REASON_CLASS_CONFLICT, REASON_NO_SUCH_INSTANCE
from forwarder.queue import FileEntry, Queue

MR = "1.2.840.10008.5.1.4.1.1.4"


def test_held_where_the_queue_says_and_only_as_that_class(tmp_path: Path) -> None:
    path = tmp_path / "incoming" / "a.dcm"
    ds = write_file(path, modality="CT")
    uid, ct = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    with Queue(tmp_path / "q.sqlite") as q:
        entry = FileEntry(
            str(path), "a.dcm", path.stat().st_size, 1, ct, uid, "1.2.840.10008.1.2.1"
        )
        assert q.enqueue(entry, ["pacs"]) is not None
        held = QueueHoldings(q)
        assert held.failure(Reference(ct, uid)) is None
        assert held.failure(Reference(MR, uid)) == REASON_CLASS_CONFLICT
        assert held.failure(Reference(ct, "1.2.3.404")) == REASON_NO_SUCH_INSTANCE
        path.unlink()  # the queue still knows it, the disk no longer has it
        assert held.failure(Reference(ct, uid)) == REASON_NO_SUCH_INSTANCE


def test_held_while_the_finisher_moves_it_out_of_incoming(tmp_path: Path) -> None:
    """The finisher records the final path (FINISHING), moves the file, then records the move
    (FINISHED): a request answered between the move and that record still finds it."""
    path = tmp_path / "incoming" / "a.dcm"
    ds = write_file(path, modality="CT")
    uid, ct = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    final = tmp_path / "done" / "a.dcm"
    final.parent.mkdir()
    with Queue(tmp_path / "q.sqlite") as q:
        entry = FileEntry(
            str(path), "a.dcm", path.stat().st_size, 1, ct, uid, "1.2.840.10008.1.2.1"
        )
        file_id = q.enqueue(entry, ["pacs"])
        assert file_id is not None
        held = QueueHoldings(q)
        (job,) = q.claim("pacs", 1)
        q.ack_done([job.id])
        q.begin_finish(file_id, str(final))
        assert held.failure(Reference(ct, uid)) is None  # not moved yet
        path.rename(final)
        assert held.failure(Reference(ct, uid)) is None  # moved, not yet recorded
        q.complete_finish(file_id)
        assert held.failure(Reference(ct, uid)) is None
        final.unlink()
        assert held.failure(Reference(ct, uid)) == REASON_NO_SUCH_INSTANCE
