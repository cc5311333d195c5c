"""SIGTERM while proof of delivery waits on a peer that never answers: the daemon exits 0 within
a few seconds (not after the destination's response_timeout), marks nothing committed, and after
the restart asks again, so what the PACS does commit then reaches done/.

The peer (tests/commitment_peer.py, ``hang``) accepts the association, then never answers the
N-ACTION (storage commitment) or the C-FIND (verify_by_query). A peer that keeps an association
open to the daemon's report acceptor does not hold the stop up either."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from commitment_peer import SC, SYNTAXES, CommitmentSCP
from conftest import wait_until
from daemon import Daemon, destination
from peers import free_port
from pydicom import dcmread
from test_scp_engine import Raw

STUDY = "1.2.826.0.1.3680043.10.1284.57.1"
PROMPT = 5.0  # seconds a SIGTERM may take


def _stop_promptly(d: Daemon) -> None:
    started = time.monotonic()
    assert d.stop(timeout=30) == 0
    took = time.monotonic() - started
    assert took < PROMPT, f"SIGTERM took {took:.1f}s"


def _held_as_sent(d: Daemon, scp: CommitmentSCP) -> None:
    for rel in d.done_files():
        ds = dcmread(d.done / rel)
        assert scp.held[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def _awaiting(d: Daemon) -> tuple[int, int]:
    status = d.status_json()["destinations"]["pacs"]
    return status["awaiting_commitment"], status["committed"]


def _dest(scp: CommitmentSCP, **proof: Any) -> dict[str, Any]:
    # A long response_timeout: without a cancellable wait, the stop would take that long.
    return destination("pacs", scp.port, ae_title=scp.ae_title, response_timeout="60s", **proof)


def test_sigterm_while_the_n_action_is_unanswered(tmp_path: Path) -> None:
    policy = {"timeout": "60s", "settle": "300ms", "wait_on_association": "60s"}
    scp = CommitmentSCP(mode="same", hang=True)
    with scp, Daemon(tmp_path, destinations=[_dest(scp, storage_commitment=policy)]) as d:
        dropped = d.drop_files(2, study_uid=STUDY)
        wait_until(lambda: len(scp.actions) == 1, 30, what="the N-ACTION")
        _stop_promptly(d)
        assert d.done_files() == [] and d.failed_files() == []
        assert _awaiting(d)[1] == 0  # nothing was marked committed (read before the restart,
        scp.hang = False  # which may commit at once); the PACS answers again
        d.start()
        d.wait_done(2)
        assert _awaiting(d) == (0, 2)
        assert d.stop() == 0
    assert len(scp.actions) == 2  # asked again after the restart
    assert sorted(scp.stores) == sorted(f.sop_instance_uid for f in dropped)  # stored once
    _held_as_sent(d, scp)
    assert "asked again after the restart" in d.log_text()


def test_sigterm_while_the_association_request_is_unanswered(tmp_path: Path) -> None:
    policy = {"timeout": "60s", "settle": "2s"}
    scp = CommitmentSCP(mode="same")
    with scp:
        dest = _dest(scp, storage_commitment=policy, connect_timeout="30s")
        with Daemon(tmp_path, destinations=[dest]) as d:
            d.drop_files(1, study_uid=STUDY)
            wait_until(lambda: len(scp.stores) == 1, 30, what="the C-STORE")
            scp.hang_associate = True  # the commitment association is never answered
            wait_until(lambda: scp.hung_associations >= 1, 30, what="the A-ASSOCIATE-RQ")
            _stop_promptly(d)
            scp.hang_associate = False
            d.start()
            d.wait_done(1)
            assert d.stop() == 0
    assert len(scp.actions) == 1 and len(scp.stores) == 1
    _held_as_sent(d, scp)


def test_sigterm_with_an_idle_association_on_the_report_acceptor(tmp_path: Path) -> None:
    port = free_port()
    policy = {"timeout": "60s", "settle": "300ms", "port": port, "bind": "127.0.0.1"}
    scp = CommitmentSCP(mode="new", report_to=("127.0.0.1", port, "FORWARDER"), hang=True)
    with scp, Daemon(tmp_path, destinations=[_dest(scp, storage_commitment=policy)]) as d:
        d.drop_files(1, study_uid=STUDY)
        wait_until(lambda: len(scp.actions) == 1, 30, what="the N-ACTION")
        # Someone holds an association open on the report acceptor and says nothing. Spoken
        # in bytes: pynetdicom's requestor, its peer gone at the stop, could leak its socket
        # (a ResourceWarning from its reactor thread, seen once in CI).
        idle = Raw(port)
        try:
            idle.associate([(1, SC, list(SYNTAXES))], calling="IDLE", called="FORWARDER")
            _stop_promptly(d)
        finally:
            idle.close()
        scp.hang = False
        d.start()
        d.wait_done(1)
        assert d.stop() == 0
    assert len(scp.actions) == 2 and len(scp.stores) == 1
    _held_as_sent(d, scp)


def test_sigterm_while_the_c_find_is_unanswered(tmp_path: Path) -> None:
    policy = {"after": "0s", "max_resends": 1}
    scp = CommitmentSCP(hang=True)
    with scp, Daemon(tmp_path, destinations=[_dest(scp, verify_by_query=policy)]) as d:
        dropped = d.drop_files(2, study_uid=STUDY)
        wait_until(lambda: len(scp.finds) >= 1, 30, what="a C-FIND")
        _stop_promptly(d)
        assert d.done_files() == [] and d.failed_files() == []
        assert _awaiting(d)[1] == 0  # nothing verified (before the restart, which may at once)
        scp.hang = False
        d.start()
        d.wait_done(2)
        assert _awaiting(d) == (0, 2)
        assert d.stop() == 0
    assert sorted(scp.stores) == sorted(f.sop_instance_uid for f in dropped)  # never resent
    assert len(scp.finds) >= 3  # the interrupted round was asked again
    _held_as_sent(d, scp)
    assert "asked again after the restart" in d.log_text()
