"""The daemon's proof of delivery (``storage_commitment``, ``verify_by_query``) while C-STORE
finds its destination DOWN (``forwarder run`` as a subprocess): no proof association is opened
while the breaker is open, nothing is said about proofs, and what awaits proof is proved as
soon as the probe finds the peer up again, not after the proof's own 30 s rest."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from commitment_peer import SC, STUDY_FIND, CommitmentSCP
from conftest import wait_until
from daemon import Daemon, destination
from dimse_wire import ABORT, VERIFICATION, Closed, Conn, listen, read_associate_rq

STUDY = "1.2.826.0.1.3680043.10.1284.60"
DUE = 4.0  # settle / after: the proof of the first file is due this long after it is stored


@dataclass
class Unreachable:
    """A PACS that is down, seen from the wire: it accepts the TCP connection, reads the
    A-ASSOCIATE-RQ, notes what it proposes (a C-ECHO probe, a proof, a C-STORE) and when,
    and aborts. Listens on ``port`` until stopped."""

    port: int
    seen: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, kind)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Unreachable:
        self._socket = listen(self.port, 16)
        self._threads.append(threading.Thread(target=self._accept, name="unreachable"))
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._socket.close()

    def kinds(self, since: float = 0.0) -> list[str]:
        return [kind for at, kind in list(self.seen) if at >= since]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._socket.accept()
            except TimeoutError:
                continue
            with sock:
                sock.settimeout(0.05)
                conn = Conn(sock, self._stop)
                try:
                    rq = read_associate_rq(conn)
                except Closed:
                    continue
                proposed = {str(c.abstract_syntax) for c in rq.presentation_context_definition_list}
                if proposed & {SC, STUDY_FIND}:
                    kind = "proof"
                elif proposed == {VERIFICATION}:
                    kind = "probe"
                else:
                    kind = "store"
                self.seen.append((time.monotonic(), kind))
                try:
                    conn.send(ABORT)
                except Closed:
                    pass


@pytest.mark.parametrize("proof", ["storage_commitment", "verify_by_query"])
def test_no_proof_is_asked_of_a_destination_down_and_it_is_asked_at_once_when_up(
    proof: str, tmp_path: Path
) -> None:
    """The first file is stored, then the PACS goes away before its proof is due; the second
    file finds it DOWN. While C-ECHO probes fail, no proof association reaches the port (the
    old code dialled it when the proof fell due, then every 30 s) and no proof failure is
    logged. Back on the same port, the probe finds it up and the first file's proof is asked
    within a few seconds (not 30 s later); both files end in done/."""
    policy: dict[str, Any] = (
        {"settle": f"{DUE:g}s", "timeout": "20s"}
        if proof == "storage_commitment"
        else {"after": f"{DUE:g}s"}
    )
    scp = CommitmentSCP(mode="same")
    with scp:
        dest = destination("pacs", scp.port, ae_title=scp.ae_title, **{proof: policy})
        with Daemon(tmp_path, destinations=[dest], extra={"log_level": "DEBUG"}) as d:
            (first,) = d.drop_files(1, prefix="first", study_uid=f"{STUDY}.1")
            wait_until(lambda: first.sop_instance_uid in scp.stores, 20, what="first stored")
            due = time.monotonic() + DUE
            held = dict(scp.held)
            scp.abort_associations()  # the PACS goes away: its open associations too
            scp.stop()
            with Unreachable(scp.port) as down:
                (second,) = d.drop_files(1, prefix="second", study_uid=f"{STUDY}.2")
                d.wait_log("pacs: DOWN", what="C-STORE finding the PACS down")
                d.wait_log("next probe in", what="the breaker open, a probe failed")
                # Well after the first file's proof fell due (and a tick of the thread): two
                # probes more, each a second apart at most.
                wait_until(
                    lambda: len([k for k in down.kinds(since=due + 1.5) if k == "probe"]) >= 2,
                    20,
                    what="two probes after the proof fell due",
                )
                kinds = down.kinds()
            assert "proof" not in kinds, kinds
            assert "asking again in" not in d.log_text()  # a proof round that failed
            again = CommitmentSCP(mode="same", port=scp.port, held=held)
            with again:
                back = time.monotonic()
                d.wait_status(lambda s: s["pacs"]["state"] == "up", 10, "pacs up")
                asked = again.actions if proof == "storage_commitment" else again.finds
                wait_until(lambda: asked, 10, what="the first file's proof asked")
                print(f"proof asked {time.monotonic() - back:.2f}s after the PACS came back")
                d.wait_done(2, timeout=30)
                assert d.stop() == 0
    assert sorted(d.done_files()) == sorted([first.rel_path, second.rel_path])
    status = d.status_json()["destinations"]["pacs"]
    assert status["committed"] == 2 and status["awaiting_commitment"] == 0
