"""The daemon's storage commitment keeper in process, through its seam for other listeners
(``CommitmentKeeper.deliver_report``, for the daemon's ``listen`` Storage SCP): a report for an
open transaction read back from the queue is recorded; one for an unknown transaction, or naming
an instance not asked about, changes nothing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset

from forwarder.daemon.commitment import CommitmentKeeper
from forwarder.net.commitment import Reference, action_dataset
from forwarder.queue import FileEntry, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.10.1284.57.1"


class _Finished:
    """Collects the file ids the keeper hands to the finisher."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def submit(self, file_ids: Sequence[int]) -> None:
        self.ids += list(file_ids)


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    with Queue(tmp_path / "queue.sqlite") as queue:
        yield queue


def _report(uid: str, refs: list[Reference]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    ds.ReferencedSOPSequence = action_dataset(uid, refs).ReferencedSOPSequence
    return ds


def test_a_report_through_the_seam_is_recorded(q: Queue) -> None:
    entries = [
        FileEntry(f"/in/{i}", f"{i}", 1, 1, CT, f"1.2.3.{i}", "1.2.840.10008.1.2.1", STUDY)
        for i in range(2)
    ]
    q.enqueue_many([(e, ["pacs"]) for e in entries])
    jobs = q.claim("pacs", 10)
    q.ack_done([j.id for j in jobs], commitment=True)
    q.begin_commitment("9.9.1", "pacs", "stgcmt", [j.id for j in jobs], deadline=2e9)
    finished = _Finished()
    woken: list[bool] = []
    keeper = CommitmentKeeper(q, cast(Any, finished), wake_workers=lambda: woken.append(True))
    keeper.start()  # reads the open transaction back from the queue
    try:
        refs = [Reference(CT, e.sop_instance_uid) for e in entries]
        assert keeper.deliver_report(1, _report("9.9.2", refs), "PACS") != 0  # unknown
        stranger = [*refs, Reference(CT, "1.2.3.99")]
        assert keeper.deliver_report(1, _report("9.9.1", stranger), "PACS") != 0
        assert finished.ids == [] and q.open_commitments() != []
        assert keeper.deliver_report(1, _report("9.9.1", refs), "PACS") == 0
    finally:
        keeper.stop()
    assert sorted(finished.ids) == sorted(j.file_id for j in jobs)
    assert q.open_commitments() == [] and q.commitment_counts()["pacs"].committed == 2
    assert woken == []
