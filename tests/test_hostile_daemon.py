"""The daemon against peers that break PS3.7/PS3.8 on their first association (issue 12: "no
peer behaviour kills a worker or makes a file retry forever"): every file is retried on a new
association and ends in done/, the reason is logged, the daemon keeps running, and a good
destination beside them is not held up.
"""

from __future__ import annotations

from pathlib import Path

from daemon import Daemon, destination, route
from hostile import Behaviour, HostilePeer
from peers import ScriptedSCP

#: hostile destination -> what its first association does, and words the log must show
SCENARIOS: dict[str, tuple[Behaviour, str]] = {
    "no-status": (Behaviour.NO_STATUS, "without Status"),
    "empty-status": (Behaviour.EMPTY_STATUS, "Status (0000,0900) has 0 bytes"),
    "wrong-id": (Behaviour.WRONG_MESSAGE_ID, "our request was message"),
    "wrong-uid": (Behaviour.WRONG_INSTANCE, "Affected SOP Instance UID"),
    "pending": (Behaviour.PENDING, "Pending status 0xFF00"),
    "short-rj": (Behaviour.SHORT_RJ, "A-ASSOCIATE-RJ of 2 bytes"),
}
FILES = 2


def test_the_daemon_retries_every_protocol_violation_and_delivers(tmp_path: Path) -> None:
    peers = {name: HostilePeer(b, then=Behaviour.ACCEPT) for name, (b, _) in SCENARIOS.items()}
    with ScriptedSCP() as good:
        for p in peers.values():
            p.start()
        try:
            dests = [destination("good", good.port)]
            routes = [route("all", ["good"])]
            for name, p in peers.items():
                dests.append(destination(name, p.port, ae_title="HOSTILE"))
                routes.append(route(name, [name], folder=f"{name}/*"))
            d = Daemon(
                tmp_path / "d",
                destinations=dests,
                routes=routes,
                retry={"initial_delay": "100ms", "max_delay": "500ms"},
            )
            with d:
                dropped = {
                    name: d.drop_files(FILES, folder=name, prefix=name, rows=8, columns=8)
                    for name in SCENARIOS
                }
                d.wait_incoming_empty(timeout=60)
                assert len(d.done_files()) == FILES * len(SCENARIOS), d.log_tail()
                assert d.failed_files() == []
                assert d.running()
                status = d.status_json()["destinations"]
                log = d.log_text()
            assert d.exit_codes[-1] == 0
        finally:
            for p in peers.values():
                p.stop()
    assert good.uids() == {f.sop_instance_uid for files in dropped.values() for f in files}
    for name, (behaviour, words) in SCENARIOS.items():
        assert status[name]["done"] == FILES and status[name]["failed"] == 0, (name, status)
        assert peers[name].connections >= 2, name  # retried on a new association
        lines = [line for line in log.splitlines() if f"-> {name}:" in line or f"{name}: " in line]
        assert any(words in line for line in lines), (name, words, lines)
        if behaviour is not Behaviour.SHORT_RJ:
            # the bytes reached the peer, and still nothing was counted as stored at first
            assert any("will retry" in line for line in lines), (name, lines)
