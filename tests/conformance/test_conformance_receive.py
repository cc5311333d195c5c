"""Every DICOM file pydicom ships, pushed into ``forwarder receive`` by DCMTK dcmsend, DCMTK
storescu, Orthanc, ``forwarder send`` and ``forwarder send --no-check`` (which sends broken
files as they are),
judged against what the same pusher delivers to DCMTK storescp (``+xa +B``) and against the
original.

How it runs: one ``forwarder receive``, one storescp (the reference) and one Orthanc for the
module; the corpus in rounds without duplicate SOP Instance UIDs (conformance_lib). Per round:
dcmsend and storescu push to storescp and to receive; ``forwarder send --no-check`` pushes to
receive; dcmsend loads Orthanc (in a thread, while the others push: the load touches neither
receive nor storescp) and then Orthanc pushes each instance it holds to receive
(``POST /modalities/fwd/store``). After each push, what receive wrote is moved aside.

The rules, per pusher and file:

1. Success (or a warning) from receive: receive holds exactly one object for the file, equal
   (conformance_lib.compare) to what the pusher sent: the original for ``forwarder send``;
   Orthanc's stored copy for Orthanc; for dcmsend and storescu, DCMTK's own encoding of the
   original in the transfer syntax receive stored (dcmconv, the same library), because DCMTK
   re-encodes what it sends: it drops Data Set Trailing Padding (FFFC,FFFC) (``CT_small.dcm``,
   ``MR_small*.dcm``), trims over-long text padding (``SC_rgb_gdcm_KY.dcm``,
   ``examples_ybr_color.dcm``) and converts 32-bit big endian OW pixel data per 16-bit word
   (``rtdose_expb*.dcm``: the pixels no longer decode as pydicom decodes the original).
2. A failure from receive: receive holds nothing for it (no half-written or refused object left
   where a PACS-side reader would take it).
3. A file whose data set dcmsend refuses (conformance_lib.parse_dcmsend: broken), pushed as it
   is by ``forwarder send --no-check``, is never answered Success.
4. A file the pusher delivers to storescp, equal to the original, is delivered to receive too
   (for ``forwarder send``: a file dcmsend delivers to storescp; for Orthanc: an instance Orthanc
   holds equal to the original). "Equal" forgives what DCMTK and Orthanc always change (Data Set
   Trailing Padding dropped, over-long text padding trimmed: conformance_lib.compare ``dcmtk``).
   Receive does not promise private SOP classes
   (no ``--promiscuous`` here): storescp without ``-pm`` refuses them too. One exception: a file
   whose SOP Class/Instance UID elements are written with VR UN (``rtdose_rle*.dcm``, by
   gdcmconv): DCMTK does not read them as UIDs, so dcmsend's C-STORE names SOP Class "31" on the
   RT Dose context; storescp does not check and stores it; receive answers 0x0122, which is
   what issue 12 item 5 requires of it. pydicom (and forwarder) read those UIDs.
5. A re-send replaces: round 0 is pushed twice by dcmsend; every object is held once.
6. Receive keeps what came over the wire: from ``forwarder send`` (no conversion: receive
   accepts every syntax) the original's data set byte for byte; from dcmsend and storescu the
   same bytes the bit-preserving storescp kept from the same pusher in the same syntax.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conformance_lib import (
    FORWARDER,
    Outcome,
    Source,
    arrival_uids,
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
    run_storescu,
    take_folder,
    transfer_syntax_of,
)
from peers import ForwarderReceive, OrthancPeer, StoreSCP, forwarder_receive, orthanc, storescp

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

PUSHERS = ["dcmsend", "storescu", "forwarder", "forwarder-no-check", "orthanc"]
KEYS = [s.key for s in corpus()]


@dataclass
class Push:
    """One pusher's outcomes at receive, what receive held afterwards, and the reference."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    arrivals: dict[str, list[Path]] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)
    #: the same pusher's outcome at storescp (the reference), and what storescp held
    ref: dict[str, Outcome] = field(default_factory=dict)
    ref_arrivals: dict[str, list[Path]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ReceiveRun:
    pushes: dict[str, Push]
    resend_problems: list[str]
    log: str
    alive: bool  # still running after every push
    exit_code: int | None  # after SIGTERM


def _take_receive(recv: ForwarderReceive, into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(recv.files()):
        target = into / f"{i:04d}.{p.name}"
        shutil.move(p, target)
        out.append(target)
    for d in sorted(recv.output.iterdir(), reverse=True):
        if d.is_dir():
            shutil.rmtree(d)
    return out


def _record(
    push: Push, sources: list[Source], outcomes: dict[str, Outcome], got: list[Path]
) -> None:
    matched, stray = match_arrivals(sources, got)
    push.outcomes.update(outcomes)
    push.arrivals.update(matched)
    push.stray.extend(stray)


def _load_orthanc(
    sources: list[Source], peer: OrthancPeer, base: Path
) -> tuple[dict[str, Outcome], float]:
    """dcmsend's outcomes loading Orthanc, and the seconds it took."""
    t0 = time.monotonic()
    loaded, _, _ = run_dcmsend(sources, peer.ae_title, peer.port, base, "orthanc.load")
    return loaded, time.monotonic() - t0


def _push_direct(
    pushes: dict[str, Push],
    sources: list[Source],
    recv: ForwarderReceive,
    scp: StoreSCP,
    base: Path,
    r: int,
    resend: list[str],
) -> None:
    """One round of dcmsend and storescu (each to storescp, the reference, then to receive;
    dcmsend's round 0 twice) and of ``forwarder send`` with and without ``--no-check``."""
    for name, runner in (("dcmsend", run_dcmsend), ("storescu", run_storescu)):
        push = pushes[name]
        t0 = time.monotonic()
        ref, _, _ = runner(sources, scp.ae_title, scp.port, base, f"{name}.storescp")
        m, _ = match_arrivals(sources, take_folder(scp.output, base / f"{name}.storescp"))
        push.ref.update(ref)
        push.ref_arrivals.update(m)
        outcomes, _, _ = runner(sources, recv.ae_title, recv.port, base, f"{name}.recv")
        if name == "dcmsend" and r == 0:
            before = recv.files()
            again, _, _ = runner(sources, recv.ae_title, recv.port, base, "dcmsend.again")
            after = recv.files()
            if len(after) != len(before):
                resend.append(
                    f"round 0 pushed twice: {len(before)} files after the first push, "
                    f"{len(after)} after the second: "
                    f"{sorted({str(p) for p in after} - {str(p) for p in before})[:10]}"
                )
            for k, o in again.items():
                if o.stored != outcomes[k].stored:
                    resend.append(f"{k}: stored={outcomes[k].stored}, then {o.stored}")
        _record(push, sources, outcomes, _take_receive(recv, base / f"{name}.recv"))
        push.seconds += time.monotonic() - t0
    # forwarder send, and with --no-check (broken files as they are); the reference is
    # dcmsend's
    for name, extra in (("forwarder", []), ("forwarder-no-check", ["--no-check"])):
        push = pushes[name]
        t0 = time.monotonic()
        outcomes, _, _ = run_forwarder_send(
            sources, recv.ae_title, recv.port, base, f"{name}.recv", extra=extra
        )
        _record(push, sources, outcomes, _take_receive(recv, base / f"{name}.recv"))
        push.seconds += time.monotonic() - t0


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiveRun]:
    work = tmp_path_factory.mktemp("receive")
    pushes = {p: Push() for p in PUSHERS}
    resend: list[str] = []
    with ExitStack() as stack:
        recv = stack.enter_context(forwarder_receive(work / "received", command=FORWARDER))
        scp = stack.enter_context(
            storescp(
                work / "storescp",
                ae_title="STORESCP",
                extra=["+B", "+uf", "+xa"],
                log=work / "storescp.log",
            )
        )
        orth = stack.enter_context(orthanc(work / "orthanc", ae_title="ORTHANC"))
        orth.add_modality("fwd", recv.ae_title, recv.port)
        for r, sources in enumerate(rounds()):
            base = work / f"r{r}"
            base.mkdir()
            # Orthanc is loaded (by dcmsend: it waits on Orthanc's Nagle for every object) while
            # the other pushers push to receive: the load touches neither receive nor storescp
            with ThreadPoolExecutor(1, thread_name_prefix="orthanc-load") as loader:
                loading = loader.submit(_load_orthanc, sources, orth, base)
                _push_direct(pushes, sources, recv, scp, base, r, resend)
            loaded, load_seconds = loading.result()
            # Orthanc: pushes every instance it holds
            push = pushes["orthanc"]
            t0 = time.monotonic()
            outcomes = {}
            for iid in orth.instances():
                held = base / "orthanc.held" / f"{iid}.dcm"
                held.parent.mkdir(exist_ok=True)
                held.write_bytes(orth.instance_file(iid))
                uids = arrival_uids(held)  # once, not once per source: a header read each
                keys = [s.key for s in sources if s.uids & uids]
                ok, why = orth.push("fwd", iid)
                for k in keys:
                    outcomes[k] = Outcome(ok, why)
                    push.ref[k] = Outcome(True)
                    push.ref_arrivals[k] = [held]
            for s in sources:
                push.ref.setdefault(s.key, Outcome(False, loaded[s.key].reason or "not held"))
                outcomes.setdefault(s.key, Outcome(False, "Orthanc does not hold it: not pushed"))
            orth.take_all(base / "orthanc.taken")
            _record(push, sources, outcomes, _take_receive(recv, base / "orthanc.recv"))
            push.seconds += load_seconds + time.monotonic() - t0
        # dcmsend's outcomes at storescp are the reference for forwarder send
        for name in ("forwarder", "forwarder-no-check"):
            pushes[name].ref = pushes["dcmsend"].ref
            pushes[name].ref_arrivals = pushes["dcmsend"].ref_arrivals
        alive = recv.proc.poll() is None
    log = recv.log.read_text(errors="replace")
    for name, p in pushes.items():
        print(f"conformance: {name} -> forwarder receive: {p.seconds:.1f}s", file=sys.stderr)
    summary = {
        name: {
            k: {"stored": o.stored, "reason": o.reason, "arrived": len(p.arrivals.get(k, []))}
            for k, o in p.outcomes.items()
        }
        for name, p in pushes.items()
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"conformance: receive summary in {work / 'summary.json'}", file=sys.stderr)
    yield ReceiveRun(pushes, resend, log, alive, recv.proc.returncode)


def _fail_text(pusher: str, key: str, got: Outcome, ref: Outcome, problems: list[str]) -> str:
    return (
        f"{pusher} -> forwarder receive, {key}: " + "; ".join(problems) + f"\n  at receive: "
        f"stored={got.stored} reason={got.reason!r}\n  reference: stored={ref.stored} "
        f"broken={ref.broken} reason={ref.reason!r}"
    )


def _not_as_received(push: Push, pusher: str, key: str, stored: Path) -> list[str]:
    """Rule 6: receive keeps the data set as it came over the wire. For forwarder send (which
    sends the file's own bytes when the syntax is unchanged) that is the original's data set;
    for dcmsend and storescu it is what the bit-preserving storescp got from the same pusher in
    the same transfer syntax."""
    if pusher in ("forwarder", "forwarder-no-check"):
        diff = byte_exact(key, stored)
        return [f"receive did not keep the bytes it got: {diff}"] if diff else []
    if pusher in ("dcmsend", "storescu"):
        mine = dataset_bytes(stored)
        for ref in push.ref_arrivals.get(key, []):
            theirs = dataset_bytes(ref)
            if mine and theirs and mine[0] == theirs[0] and mine[1] != theirs[1]:
                return [
                    f"receive's data set ({len(mine[1])} bytes) differs from the one storescp +B "
                    f"kept from the same {pusher} in {mine[0]} ({len(theirs[1])} bytes)"
                ]
    return []


def _what_was_sent(push: Push, pusher: str, key: str, stored: Path) -> tuple[Path | None, str]:
    """The file receive's object must equal (rule 1), and what it is, in words."""
    if pusher == "orthanc":
        held = push.ref_arrivals.get(key, [])
        return (held[0], "Orthanc's copy") if held else (None, "")
    if pusher in ("dcmsend", "storescu"):
        ts = transfer_syntax_of(stored)
        enc = dcmtk_encoding(key, ts, stored.parent.parent)
        if enc is None:
            return None, f"dcmconv cannot encode the original in {ts}, yet {pusher} sent it so"
        return enc, f"DCMTK's encoding in {ts}"
    return by_key()[key].path, "the original"


@pytest.mark.parametrize("pusher", PUSHERS)
@pytest.mark.parametrize("key", KEYS)
def test_receive(received: ReceiveRun, pusher: str, key: str) -> None:
    """Rules 1-4 of the module docstring for one file and one pusher."""
    push = received.pushes[pusher]
    got, ref = push.outcomes[key], push.ref[key]
    arrivals = push.arrivals.get(key, [])
    problems: list[str] = []
    if got.stored:
        if len(arrivals) != 1:
            problems.append(f"answered Success, and receive holds {len(arrivals)} objects")
        for a in arrivals:
            sent, what = _what_was_sent(push, pusher, key, a)
            if sent is None and what:
                problems.append(what)
                continue
            bad, _ = compare(key, a, reference=sent)
            problems.extend(f"stored different from {what}: {b}" for b in bad[:8])
            problems.extend(_not_as_received(push, pusher, key, a))
        if ref.broken:
            problems.append(f"Success for a data set dcmsend refuses ({ref.reason})")
    else:
        if arrivals:
            problems.append(f"answered a failure, yet receive holds {[str(a) for a in arrivals]}")
    ref_intact = ref.stored and any(
        not dcmtk_problems(key, a) for a in push.ref_arrivals.get(key, [])
    )
    dcmtk_mismatch = pusher in ("dcmsend", "storescu") and by_key()[key].uids_as_un
    if ref_intact and not got.stored and not dcmtk_mismatch:
        problems.append(f"{pusher} delivers it intact to storescp; receive refused: {got.reason}")
    assert not problems, _fail_text(pusher, key, got, ref, problems)


def test_receive_resend_replaces(received: ReceiveRun) -> None:
    """Rule 5: the same objects pushed twice are held once, with the same answers."""
    assert not received.resend_problems, "\n".join(received.resend_problems)


@pytest.mark.parametrize("pusher", PUSHERS)
def test_receive_nothing_stray(received: ReceiveRun, pusher: str) -> None:
    """Receive writes nothing that matches no pushed file (no temporary file left behind)."""
    stray: list[Any] = received.pushes[pusher].stray
    assert not stray, f"{pusher}: {stray}\n{received.log[-3000:]}"


def test_receive_survives_everything(received: ReceiveRun) -> None:
    """Receive is still running after every push, logs no traceback, and exits 0 on SIGTERM."""
    assert received.alive, received.log[-3000:]
    assert "Traceback" not in received.log, received.log[received.log.index("Traceback") :][:3000]
    assert received.exit_code == 0, received.log[-3000:]


def test_receive_no_patient_data_logged(received: ReceiveRun) -> None:
    """``forwarder receive -v`` logs one line per object and every refusal with its reason,
    never a patient's name or ID."""
    found = patient_data_in(received.log)
    assert not found, "\n".join(found[:20])
