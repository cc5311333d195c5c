"""Hostile and broken peers: each misbehaviour is classified (retry or fail), the daemon stays up,
and the other destinations keep flowing.

The first test drives the sender (``pool.Channel``) against the raw-socket :class:`HostilePeer`
for a precise answer per misbehaviour; the daemon tests then run ``forwarder run`` with one
well-behaved destination and several hostile ones at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import wait_until
from daemon import Daemon, destination, route
from dicomgen import write_file
from hostile_peer import Act, HostilePeer
from peers import ScriptedSCP, free_port

from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.channel import Channel, StoreRequest
from forwarder.net.status import Outcome

pytestmark = pytest.mark.faults

FAST = AssociationSettings(
    connect_timeout=1.0, response_timeout=1.0, release_timeout=1.0, max_pdu_receive=16384
)

#: act -> (outcome, words the error must contain)
EXPECTED: dict[Act, tuple[Outcome, str]] = {
    Act.NEVER_ANSWER: (Outcome.RETRY, "did not send a DIMSE response within"),
    Act.NO_AC: (Outcome.RETRY, "A-ASSOCIATE-AC"),
    Act.ABORT_MID_FILE: (Outcome.RETRY, "aborted"),
    Act.CLOSE_MID_FILE: (Outcome.RETRY, ""),
    Act.CLOSE_AFTER_DATA: (Outcome.RETRY, "closed the connection"),
    Act.MALFORMED_PDU: (Outcome.RETRY, "malformed PDU"),
    Act.HUGE_PDU: (Outcome.RETRY, "malformed PDU"),
    Act.REJECT_TRANSIENT: (Outcome.RETRY, "rejected-transient"),
    Act.REJECT_PERMANENT: (Outcome.FAILED, "rejected-permanent"),
    Act.NO_CONTEXTS: (Outcome.FAILED, "no acceptable presentation context"),
}


@pytest.mark.parametrize("act", list(EXPECTED), ids=str)
def test_the_sender_classifies_each_misbehaviour(act: Act, tmp_path: Path) -> None:
    big = act in (Act.ABORT_MID_FILE, Act.CLOSE_MID_FILE)  # several PDUs, so "mid" exists
    path = tmp_path / "a.dcm"
    write_file(path, rows=256 if big else 8, columns=256 if big else 8)
    with HostilePeer([act], max_pdu=4096) as peer:
        channel = Channel(Peer("127.0.0.1", peer.port, "HOSTILE"), FAST)
        started = time.monotonic()
        try:
            (outcome,) = list(channel.send([StoreRequest(str(path))]))
        finally:
            channel.release()
        elapsed = time.monotonic() - started
    want, words = EXPECTED[act]
    assert outcome.outcome is want, outcome
    assert words in (outcome.error or ""), outcome.error
    assert elapsed < 5.0, f"{act}: took {elapsed:.1f}s with 1s timeouts"
    assert not channel.is_open


def test_a_slow_peer_within_the_response_timeout_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    ds = write_file(path, rows=8, columns=8)
    with HostilePeer([Act.STORE], delay=0.6) as peer:
        channel = Channel(Peer("127.0.0.1", peer.port, "HOSTILE"), FAST)
        try:
            (outcome,) = list(channel.send([StoreRequest(str(path))]))
        finally:
            channel.release()
        assert outcome.outcome is Outcome.STORED, outcome
        assert peer.stored_uids() == {ds.SOPInstanceUID}


# -- the daemon against hostile peers -----------------------------------------------------------

#: folder -> (act script for the hostile destination, where its files end: "done", "failed" or
#: "held" (a permanent association rejection is the destination's fault, not the files': they stay
#: queued and the destination is held as down)
SCENARIOS: dict[str, tuple[list[Act], str]] = {
    "never-answer": ([Act.NEVER_ANSWER, Act.STORE], "done"),
    "no-ac": ([Act.NO_AC, Act.STORE], "done"),
    "abort-mid-file": ([Act.ABORT_MID_FILE, Act.STORE], "done"),
    "close-mid-file": ([Act.CLOSE_MID_FILE, Act.STORE], "done"),
    "close-after-data": ([Act.CLOSE_AFTER_DATA, Act.STORE], "done"),
    "malformed-pdu": ([Act.MALFORMED_PDU, Act.STORE], "done"),
    "huge-pdu": ([Act.HUGE_PDU, Act.STORE], "done"),
    "reject-transient": ([Act.REJECT_TRANSIENT, Act.REJECT_TRANSIENT, Act.STORE], "done"),
    "reject-permanent": ([Act.REJECT_PERMANENT], "held"),
    "no-contexts": ([Act.NO_CONTEXTS], "failed"),
    "slow": ([Act.STORE], "done"),
}
FILES_PER_SCENARIO = 3


def test_daemon_survives_every_hostile_peer_at_once_and_the_good_one_keeps_flowing(
    tmp_path: Path,
) -> None:
    """One daemon, a good destination that gets every file, and one hostile destination per
    misbehaviour (routed by sub-folder). The good one must store every file while the hostile
    ones misbehave; transient misbehaviour ends in done/ after a retry, a file's permanent
    failure in failed/ with the reason, a permanent association rejection holds its destination
    (files queued, no attempt charged, state "down"); the daemon never stops."""
    peers = {
        name: HostilePeer(script, delay=0.5 if name == "slow" else 0.0, max_pdu=4096)
        for name, (script, _) in SCENARIOS.items()
    }
    held = [name for name, (_, end) in SCENARIOS.items() if end == "held"]
    with ScriptedSCP() as good:
        for p in peers.values():
            p.start()
        try:
            dests = [destination("good", good.port, associations=2)]
            routes = [route("all", ["good"])]
            for name, p in peers.items():
                dests.append(
                    destination(
                        name,
                        p.port,
                        ae_title="HOSTILE",
                        connect_timeout="1s",
                        # "slow" answers after 0.5 s: within its timeout with room for a
                        # loaded machine (CI's other worker), as a slow PACS within it is
                        response_timeout="3s" if name == "slow" else "1s",
                        release_timeout="1s",
                    )
                )
                routes.append(route(name, [name], folder=f"{name}/*"))
            d = Daemon(
                tmp_path / "d",
                destinations=dests,
                routes=routes,
                retry={"initial_delay": "100ms", "max_delay": "500ms"},
            )
            with d:
                dropped: dict[str, list[str]] = {}
                for name in SCENARIOS:
                    # bigger files where the peer acts mid-file: several PDUs per data set
                    size = 128 if "mid-file" in name else 8
                    files = d.drop_files(
                        FILES_PER_SCENARIO, folder=name, prefix=name, rows=size, columns=size
                    )
                    dropped[name] = [f.sop_instance_uid for f in files]
                to_done = sum(end == "done" for _, end in SCENARIOS.values()) * FILES_PER_SCENARIO
                to_fail = sum(end == "failed" for _, end in SCENARIOS.values()) * FILES_PER_SCENARIO

                def settled() -> bool:
                    assert d.running(), d.log_tail()
                    left = d.incoming_files()
                    return all(any(f.startswith(f"{h}/") for h in held) for f in left) and len(
                        left
                    ) == FILES_PER_SCENARIO * len(held)

                wait_until(settled, timeout=60, what="every file but the held ones to leave")
                assert len(d.done_files()) == to_done, d.log_tail()
                assert len(d.failed_files()) == to_fail
                wait_until(
                    lambda: all(
                        d.status_json()["destinations"][h].get("state") == "down" for h in held
                    ),
                    timeout=10,
                    what="held destinations to show as down",
                )
                status = d.status_json()["destinations"]
                assert d.running()
            assert d.exit_codes[-1] == 0
            d.assert_no_phi()
        finally:
            for p in peers.values():
                p.stop()
    all_uids = {u for uids in dropped.values() for u in uids}
    assert good.uids() == all_uids, "the good destination must get every file"
    assert status["good"]["failed"] == 0 and status["good"]["pending"] == 0
    for name, (script, end) in SCENARIOS.items():
        st = status[name]
        assert st["in_flight"] == 0, (name, st)
        if end == "done":
            assert st["pending"] == 0, (name, st)
            assert peers[name].stored_uids() == set(dropped[name]), name
            assert st["done"] == FILES_PER_SCENARIO and st["failed"] == 0, (name, st)
        elif end == "held":
            assert st["pending"] == FILES_PER_SCENARIO, (name, st)
            assert st["done"] == 0 and st["failed"] == 0, (name, st)
            assert st["state"] == "down", (name, st)
            assert not peers[name].stored_uids(), name
        else:
            assert st["pending"] == 0, (name, st)
            assert st["failed"] == FILES_PER_SCENARIO and st["done"] == 0, (name, st)
            for i in range(FILES_PER_SCENARIO):
                doc = d.error_json(f"{name}/{name}{i:04d}.dcm")
                by_dest = {r["destination"]: r for r in doc["destinations"]}
                assert by_dest["good"]["outcome"] == "stored"
                assert by_dest[name]["outcome"] == "failed"
                assert by_dest[name]["attempts"] == 1, "a permanent failure is not retried"
        expected_words = EXPECTED.get(script[0], (None, ""))[1]
        if end == "done":
            # Retried and stored: the destination recovered, status no longer shows the error.
            assert st["last_error"] is None, (name, st)
        elif script[0] is not Act.STORE:
            assert st["last_error"] and expected_words in st["last_error"], (name, st)
    assert peers["slow"].connections >= 1
    log = d.log_text()
    assert "will retry" not in "\n".join(line for line in log.splitlines() if "-> slow:" in line), (
        "a slow peer within the response timeout must not cause retries"
    )


#: status -> where the file ends and after how many attempts (with max_attempts: 2)
STATUSES: dict[int, tuple[str, int]] = {
    0x0000: ("done", 1),  # Success
    0x0001: ("done", 1),  # Warning: some attributes coerced
    0xB000: ("done", 1),  # Warning: coercion of data elements
    0xB007: ("done", 1),  # Warning: data set does not match SOP class
    0xA700: ("failed", 2),  # Refused: out of resources -> transient
    0xA7FF: ("failed", 2),  # out of resources (any A7xx)
    0x0110: ("failed", 2),  # Processing failure -> transient
    0xFE00: ("failed", 2),  # Cancel -> transient
    0xA900: ("failed", 1),  # Error: data set does not match SOP class -> permanent
    0xC000: ("failed", 1),  # Error: cannot understand -> permanent
    0xC123: ("failed", 1),  # any Cxxx
    0x0122: ("failed", 1),  # SOP class not supported
    0x0124: ("failed", 1),  # not authorised
    0x0211: ("failed", 1),  # unrecognised operation
}


def test_every_status_class_is_classified(tmp_path: Path) -> None:
    """One file per DIMSE status: success and warnings are stored (done/), transient failures
    are retried (attempts 2 with max_attempts 2), permanent ones fail at once; error.json names
    the status in hex."""
    by_uid: dict[str, int] = {}

    def status_of(uid: str) -> int:
        return by_uid.get(uid, 0xC000)

    with HostilePeer([Act.STORE], status=status_of) as peer:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("pacs", peer.port, ae_title="HOSTILE")],
            retry={"initial_delay": "100ms", "max_delay": "200ms", "max_attempts": 2},
        )
        with d:
            names: dict[int, str] = {}
            for status in STATUSES:
                name = f"s{status:04X}.dcm"
                dropped = d.drop(name, rows=8, columns=8)
                by_uid[dropped.sop_instance_uid] = status
                names[status] = name
            d.wait_incoming_empty(timeout=30)
            assert d.running()
    for status, (where, attempts) in STATUSES.items():
        name = names[status]
        if where == "done":
            assert name in d.done_files(), f"0x{status:04X}"
            continue
        assert name in d.failed_files(), f"0x{status:04X}"
        (result,) = d.error_json(name)["destinations"]
        assert result["status"] == f"0x{status:04X}", result
        assert result["attempts"] == attempts, (f"0x{status:04X}", result)
    answered = [s for _, s in peer.answered]
    for status, (_, attempts) in STATUSES.items():
        assert answered.count(status) == attempts, f"0x{status:04X} sent {answered.count(status)}x"


def test_a_destination_nobody_listens_on_is_retried_without_slowing_the_others(
    tmp_path: Path,
) -> None:
    """Connection refused: RETRY with backoff; the other destination gets everything at once;
    status shows the pending files and why; when the peer comes up, they are delivered."""
    port = free_port()
    with ScriptedSCP() as good:
        d = Daemon(
            tmp_path / "d",
            destinations=[destination("good", good.port), destination("down", port)],
        )
        with d:
            files = d.drop_files(10, rows=8, columns=8)
            wait_until(lambda: len(good.uids()) == 10, 15, what="the good destination")
            doc = d.wait_status(
                lambda s: (
                    s["down"]["pending"] + s["down"]["in_flight"] == 10
                    and bool(s["down"]["last_error"])
                ),
                what="down's files pending with an error",
            )
            assert "cannot connect" in doc["destinations"]["down"]["last_error"]
            assert not d.done_files(), "a file is done only when every destination has it"
            with ScriptedSCP(port=port) as late:
                d.wait_done(10, timeout=30)
                assert late.uids() == {f.sop_instance_uid for f in files}
