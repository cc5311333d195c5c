"""Every DICOM file pydicom ships, pushed into the daemon's own Storage SCP (``listen:``) by DCMTK
dcmsend and by ``forwarder send``, and forwarded by the daemon to a PACS (DCMTK storescp
``+xa +B +uf``): the gateway path end to end, judged against what dcmsend delivers to the same
PACS directly and against the original.

How it runs: one daemon with ``listen:`` and one destination (the PACS) for the module; the
corpus in rounds without duplicate SOP Instance UIDs (conformance_lib). Per round: dcmsend
pushes straight to a storescp configured as the PACS is (the reference), then dcmsend and
``forwarder send`` push to the gateway, each followed by a wait until the daemon has emptied
``incoming/`` and a move aside of what the PACS got.

The rules, per pusher and file:

1. Success from the gateway: the file is in ``done/`` and the PACS holds exactly one object for
   it, equal (conformance_lib.compare) to what the pusher sent: the original for ``forwarder
   send``; DCMTK's own encoding of the original in the transfer syntax that arrived for dcmsend
   (DCMTK re-encodes what it sends; see test_conformance_receive).
2. The PACS holds what came over the modality's wire: from ``forwarder send``, the original's
   data set byte for byte; from dcmsend, the same bytes the PACS kept from dcmsend directly in
   the same syntax.
3. A failure from the gateway: nothing for it reaches the PACS, nothing of it is in ``done/``.
4. A file dcmsend delivers intact to the PACS directly is delivered through the gateway too
   (for dcmsend, except files whose SOP Class/Instance UIDs are written with VR UN, which
   DCMTK misnames on the wire: test_conformance_receive rule 4).
5. Nothing stray arrives, ``incoming/`` empties, and the daemon logs no traceback and exits 0 on
   SIGTERM.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from conformance_lib import (
    Outcome,
    Source,
    by_key,
    byte_exact,
    compare,
    corpus,
    dataset_bytes,
    dcmtk_encoding,
    dcmtk_problems,
    match_arrivals,
    patient_data_in,
    rounds,
    run_dcmsend,
    run_forwarder_send,
    take_folder,
    transfer_syntax_of,
)
from daemon import Daemon, destination
from peers import free_port, storescp

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

PUSHERS = ["dcmsend", "forwarder"]
KEYS = [s.key for s in corpus()]
GATEWAY = "GATEWAY"


@dataclass
class Push:
    """One pusher's answers from the gateway, what the PACS got, and where the daemon put it."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    arrivals: dict[str, list[Path]] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)
    #: per source key: the folders (done, failed) holding a file with its SOP Instance UID
    kept: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class GatewayRun:
    pushes: dict[str, Push]
    ref: dict[str, Outcome]  # dcmsend straight to the PACS
    ref_arrivals: dict[str, list[Path]]
    left: list[str]  # files still in incoming after a round
    log: str
    exit_code: int | None


def _kept(d: Daemon, sources: list[Source], into: Path) -> dict[str, list[str]]:
    """Where the daemon put each source's objects (done/ or failed/), by SOP Instance UID;
    the files are moved aside so that the next round starts empty."""
    by_uid = {u: s.key for s in sources for u in s.uids}
    out: dict[str, list[str]] = {}
    for folder in (d.done, d.failed):
        for p in sorted(x for x in folder.rglob("*") if x.is_file()):
            if p.name.endswith(".error.json"):
                continue
            uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            if uid in by_uid:
                out.setdefault(by_uid[uid], []).append(folder.name)
        target = into / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for child in list(folder.iterdir()):
            shutil.move(child, target / child.name)
    return out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRun]:
    work = tmp_path_factory.mktemp("gateway")
    pushes = {p: Push() for p in PUSHERS}
    ref: dict[str, Outcome] = {}
    ref_arrivals: dict[str, list[Path]] = {}
    left: list[str] = []
    # the reference is a second storescp like the PACS: storescp takes one association at a
    # time, and the daemon keeps its own open to the PACS between rounds
    options = ["+B", "+uf", "+xa"]
    with (
        storescp(work / "pacs", ae_title="PACS", extra=options, log=work / "pacs.log") as pacs,
        storescp(work / "ref", ae_title="PACS", extra=options, log=work / "ref.log") as direct_pacs,
    ):
        port = free_port()
        d = Daemon(
            work / "fw",
            destinations=[destination("pacs", pacs.port, ae_title="PACS", response_timeout="20s")],
            retry={"initial_delay": "200ms", "max_delay": "500ms", "max_attempts": 2},
            extra={
                "listen": {
                    "port": port,
                    "ae_title": GATEWAY,
                    "bind": "127.0.0.1",
                    "min_free_space": "1MB",
                }
            },
        )
        with d:
            for r, sources in enumerate(rounds()):
                base = work / f"r{r}"
                base.mkdir()
                direct, _, _ = run_dcmsend(sources, "PACS", direct_pacs.port, base, "direct")
                matched, _ = match_arrivals(
                    sources, take_folder(direct_pacs.output, base / "direct")
                )
                ref.update(direct)
                ref_arrivals.update(matched)
                for name in PUSHERS:
                    push = pushes[name]
                    t0 = time.monotonic()
                    runner = run_dcmsend if name == "dcmsend" else run_forwarder_send
                    outcomes, _, _ = runner(sources, GATEWAY, port, base, f"{name}.gw")
                    try:
                        d.wait_incoming_empty(timeout=180)
                    except AssertionError:
                        left.extend(f"round {r}, {name}: {p}" for p in d.incoming_files())
                    push.seconds += time.monotonic() - t0
                    matched, stray = match_arrivals(
                        sources, take_folder(pacs.output, base / f"{name}.pacs")
                    )
                    push.outcomes.update(outcomes)
                    push.arrivals.update(matched)
                    push.stray.extend(stray)
                    push.kept.update(_kept(d, sources, base / f"{name}.fw"))
            exit_code = d.stop()
            log = d.log_text()
    for name, p in pushes.items():
        stored = sum(o.stored for o in p.outcomes.values())
        done = sum(k == ["done"] for k in p.kept.values())
        print(
            f"conformance: {name} -> gateway -> storescp: {p.seconds:.1f}s, {stored} of "
            f"{len(p.outcomes)} answered Success, {done} in done/, "
            f"{sum(map(len, p.arrivals.values()))} at the PACS",
            file=sys.stderr,
        )
    yield GatewayRun(pushes, ref, ref_arrivals, left, log, exit_code)


def _what_was_sent(pusher: str, key: str, arrival: Path) -> tuple[Path | None, str]:
    if pusher == "dcmsend":
        ts = transfer_syntax_of(arrival)
        enc = dcmtk_encoding(key, ts, arrival.parent.parent)
        if enc is None:
            return None, f"dcmconv cannot encode the original in {ts}, yet dcmsend sent it so"
        return enc, f"DCMTK's encoding in {ts}"
    return by_key()[key].path, "the original"


def _not_as_pushed(run: GatewayRun, pusher: str, key: str, arrival: Path) -> list[str]:
    """Rule 2: the PACS holds the bytes the modality sent."""
    if pusher == "forwarder":
        diff = byte_exact(key, arrival)
        return [f"the PACS does not hold the bytes pushed: {diff}"] if diff else []
    mine = dataset_bytes(arrival)
    for ref in run.ref_arrivals.get(key, []):
        theirs = dataset_bytes(ref)
        if mine and theirs and mine[0] == theirs[0] and mine[1] != theirs[1]:
            return [
                f"the data set at the PACS through the gateway ({len(mine[1])} bytes) differs "
                f"from the one dcmsend delivered directly in {mine[0]} ({len(theirs[1])} bytes)"
            ]
    return []


@pytest.mark.parametrize("pusher", PUSHERS)
@pytest.mark.parametrize("key", KEYS)
def test_gateway(gateway: GatewayRun, pusher: str, key: str) -> None:
    """Rules 1-4 of the module docstring for one file and one pusher."""
    push = gateway.pushes[pusher]
    got, ref = push.outcomes[key], gateway.ref[key]
    arrivals = push.arrivals.get(key, [])
    kept = push.kept.get(key, [])
    problems: list[str] = []
    if got.stored:
        if len(arrivals) != 1:
            problems.append(f"the gateway answered Success, and the PACS holds {len(arrivals)}")
        if kept != ["done"]:
            problems.append(f"the gateway answered Success; the daemon put it in {kept}")
        for a in arrivals:
            sent, what = _what_was_sent(pusher, key, a)
            if sent is None:
                problems.append(what)
                continue
            bad, _ = compare(key, a, reference=sent)
            problems.extend(f"at the PACS different from {what}: {b}" for b in bad[:8])
            problems.extend(_not_as_pushed(gateway, pusher, key, a))
    else:
        if arrivals:
            problems.append(f"the gateway answered a failure, yet the PACS holds {arrivals}")
        if "done" in kept:
            problems.append("the gateway answered a failure, yet the file is in done/")
    ref_intact = ref.stored and any(
        not dcmtk_problems(key, a) for a in gateway.ref_arrivals.get(key, [])
    )
    dcmtk_mismatch = pusher == "dcmsend" and by_key()[key].uids_as_un
    if ref_intact and not got.stored and not dcmtk_mismatch:
        problems.append(f"dcmsend delivers it intact directly; the gateway refused: {got.reason}")
    assert not problems, (
        f"{pusher} -> gateway -> PACS, {key}: " + "; ".join(problems) + f"\n  gateway: "
        f"stored={got.stored} reason={got.reason!r}\n  direct: stored={ref.stored} "
        f"broken={ref.broken} reason={ref.reason!r}"
    )


def test_gateway_nothing_stray_nothing_left(gateway: GatewayRun) -> None:
    """Rule 5: nothing arrives that matches no pushed file; incoming empties every round."""
    stray = {n: p.stray for n, p in gateway.pushes.items() if p.stray}
    assert not stray, stray
    assert not gateway.left, gateway.left


def test_gateway_survives_everything(gateway: GatewayRun) -> None:
    """Rule 5: after the whole corpus the daemon exits 0 on SIGTERM with no traceback logged."""
    assert gateway.exit_code == 0, gateway.log[-3000:]
    assert "Traceback" not in gateway.log, gateway.log[gateway.log.index("Traceback") :][:3000]


def test_gateway_no_patient_data_logged(gateway: GatewayRun) -> None:
    """The daemon logs each received object and each send, never a patient's name or ID."""
    found = patient_data_in(gateway.log)
    assert not found, "\n".join(found[:20])
