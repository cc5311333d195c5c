"""Every DICOM file pydicom ships, sent by ``forwarder send`` and by the daemon to DCMTK storescp
(every syntax / uncompressed only / Implicit VR only), Orthanc, and by STOW-RS to Orthanc's
DICOMweb plugin (``orthanc-stow``, where dcmsend, the reference, sends by C-STORE), judged
against DCMTK dcmsend on the same peer and against the original file.

How it runs (see README.md): the five peers are started (and stopped) together, once for the
module; the corpus is sent in rounds without duplicate SOP Instance UIDs (conformance_lib). Each
peer gets its rounds in a thread of its own (the peers are independent; most of a run is
waiting): in each round dcmsend, then ``forwarder send`` (one run with all the round's files),
each followed by emptying the peer into a folder per sender, round and peer. Then the daemon
(every file dropped in ``incoming/``, one daemon whose destinations are the five peers) sends
every round, after which the peers are emptied, each in a thread, into a folder per round and
peer.

The rules, per file and peer:

1. A file the sender reports stored (``--report`` outcome stored/warning; the daemon: the file
   is in ``done/``, or its ``.error.json`` says that destination stored it) is held by the peer,
   equal to the original (conformance_lib.compare: element by element, pixel arrays equal);
   at storescp, whose meta header records the C-STORE's Affected SOP Class/Instance UID, the
   command named the data set's own UIDs (dcmsend names "31" for ``rtdose_rle*.dcm``). At
   Orthanc text values are compared without trailing spaces/NULs: Orthanc trims over-long
   padding in what it stores, dcmsend's objects alike (the only peer-specific exclusion).
2. A file not stored has a named reason (``--report`` error; ``failed/NAME.error.json``).
3. Every file dcmsend delivers is delivered by forwarder. "Delivers" means: a stored status, and
   the peer holds an object equal to the original by the same comparison as rule 1, except for
   what DCMTK always changes when it sends (it drops Data Set Trailing Padding (FFFC,FFFC) and
   trims over-long text padding: ``CT_small.dcm``, ``MR_small*.dcm``, ``SC_rgb_gdcm_KY.dcm``,
   ``examples_ybr_color.dcm``; forwarder's own arrivals get no such allowance). dcmsend
   sometimes answers a stored status with something else at the peer: nothing (exit 0, nothing
   stored), or a different object (``rtdose_expb*.dcm`` to an Implicit VR peer: DCMTK swaps
   32-bit OW pixel data per 16-bit word, and the pixels no longer decode as the original's).
   Such files are noted, not required of forwarder: it may refuse them with a reason, and if it
   stores them rule 1 still holds.
4. Every file dcmsend refuses for its data set (before any association, when reading it, or
   "missing information": no SOP Class/Instance UID of its own) is not stored by forwarder.
   A file dcmsend could not send because the peer accepts no context for it (JPEG 2000 to an
   uncompressed-only peer: DCMTK has no codec) may be delivered by forwarder: allowed, noted.
5. Lossy sources: the suite never sets ``--allow-lossy-decompress`` / ``allow_lossy_decompress``
   (both default off), so a lossy JPEG to an uncompressed-only peer must be refused with a reason
   (dcmsend's default ``+dls`` refuses it as well). conformance_lib.compare flags any arrival
   decompressed from a possibly lossy syntax (JPEG baseline/extended, JPEG-LS near-lossless,
   JPEG 2000 / HTJ2K that are not lossless-only, video) or from a data set marked Lossy Image
   Compression "01": pixel equality alone cannot catch it, since the arrival's pixels are exactly
   what the lossy original decodes to.
6. Byte-exact forwarding: at a storescp (``+B``: it writes the data set as it came over the
   wire) an object forwarder sent in the original's transfer syntax carries the original's data
   set byte for byte (one NUL may follow an odd-length data set: PS3.5 wants even lengths; the
   deflated ``image_dfl.dcm`` is 4,303 bytes). dcmsend is not held to this: it re-encodes about 50
   of the corpus's objects even when it converts nothing (trailing padding dropped, sequences and
   items re-lengthed, deflate re-compressed).
7. ``forwarder send`` exits 0 only when every file of the run was stored (and rule 1 holds for
   each); nothing arrives at a peer that matches no file of the round.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conformance_lib import (
    Delivery,
    Outcome,
    Source,
    by_key,
    byte_exact,
    command_mismatch,
    compare,
    corpus,
    dcmtk_problems,
    match_arrivals,
    patient_data_in,
    rounds,
    run_dcmsend,
    run_forwarder_send,
)
from daemon import Daemon, destination, route, write_atomic
from peers import OrthancPeer, StoreSCP, all_entered, orthanc, orthanc_dicomweb_url, storescp

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

#: peer name -> storescp options (None: Orthanc; STOW: Orthanc's DICOMweb plugin, which
#: forwarder reaches by STOW-RS and dcmsend, the reference, by C-STORE). Every storescp runs +B
#: (bit-preserving: the file is what came over the wire) and +uf (unique file names).
STOW = ["stow"]
PEERS: dict[str, list[str] | None] = {
    "storescp-all": ["+xa"],
    "storescp-uncompressed": [],
    "storescp-implicit": ["+xi"],
    "orthanc": None,
    "orthanc-stow": STOW,
}
KEYS = [s.key for s in corpus()]
#: every judgement of this module (file, peer, problems, notes), written to notes.json and
#: printed at the end of the module, for the findings list
NOTES: list[dict[str, Any]] = []


@dataclass
class Peer:
    name: str
    ae_title: str
    port: int
    scp: StoreSCP | None = None
    orthanc: OrthancPeer | None = None
    url: str | None = None  # forwarder sends by STOW-RS to this service root

    def take(self, into: Path) -> list[Path]:
        """Move everything the peer holds into ``into``; the peer is empty afterwards."""
        into.mkdir(parents=True, exist_ok=True)
        if self.orthanc is not None:
            return self.orthanc.take_all(into)
        assert self.scp is not None
        out = []
        for p in self.scp.files():
            target = into / p.name
            shutil.move(p, target)
            out.append(target)
        return out


def _start(name: str, opts: list[str] | None, root: Path) -> AbstractContextManager[Peer]:
    """The peer ``name`` as a context manager (started on enter, stopped on exit)."""

    @contextmanager
    def start() -> Iterator[Peer]:
        if opts is None or opts is STOW:
            with orthanc(root / name, ae_title="ORTHANC", dicomweb=opts is STOW) as o:
                url = orthanc_dicomweb_url(o) if opts is STOW else None
                yield Peer(name, o.ae_title, o.port, orthanc=o, url=url)
        else:
            with storescp(
                root / name,
                ae_title="STORESCP",
                extra=["+B", "+uf", *opts],
                log=root / f"{name}.log",
            ) as s:
                yield Peer(name, s.ae_title, s.port, scp=s)

    return start()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Peer]]:
    """The five peers, started (and stopped) together: each start and stop waits, Orthanc's
    stop for seconds."""
    root = tmp_path_factory.mktemp("peers")
    with all_entered({name: _start(name, opts, root) for name, opts in PEERS.items()}) as out:
        yield {name: out[name] for name in PEERS}
    path = root / "notes.json"
    path.write_text(json.dumps([n for n in NOTES if n["problems"] or n["notes"]], indent=1))
    print(f"conformance: judgements with problems or notes in {path}", file=sys.stderr)


@dataclass
class Campaign:
    dcmsend: dict[str, Delivery]
    send: dict[str, Delivery]
    work: Path


def _collect(
    delivery: Delivery, peer: Peer, sources: list[Source], into: Path, outcomes: dict[str, Outcome]
) -> None:
    arrivals = peer.take(into)
    matched, stray = match_arrivals(sources, arrivals)
    delivery.outcomes.update(outcomes)
    delivery.arrivals.update(matched)
    delivery.stray.extend(stray)


def _campaign_at(peer: Peer, work: Path, ref: Delivery, fwd: Delivery) -> None:
    """Every round to one peer: dcmsend, then ``forwarder send``, each followed by emptying the
    peer into ``work/SENDER/PEER/rROUND``. Touches only this peer and its two deliveries."""
    for r, sources in enumerate(rounds()):
        for sender, runner, d in (
            ("dcmsend", run_dcmsend, ref),
            ("forwarder", run_forwarder_send, fwd),
        ):
            t0 = time.monotonic()
            outcomes, rc, log = runner(
                sources,
                peer.ae_title,
                peer.port,
                work,
                f"{peer.name}.r{r}.{sender}",
                **({"target": peer.url} if peer.url and sender == "forwarder" else {}),
            )
            d.seconds += time.monotonic() - t0
            d.exit_codes.append(rc)
            d.logs.append(log)
            _collect(d, peer, sources, work / sender / peer.name / f"r{r}", outcomes)


@pytest.fixture(scope="module")
def campaign(peers: dict[str, Peer], tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """The peers are independent (own process, port, folder, deliveries), so each gets its
    campaign in a thread of its own: most of a run is waiting (dcmsend to Orthanc waits on
    Nagle for every object), and the waits overlap. Each thread's seconds include the others'
    competition for the CPU."""
    work = tmp_path_factory.mktemp("send")
    ref = {n: Delivery("dcmsend", n) for n in peers}
    fwd = {n: Delivery("forwarder send", n) for n in peers}
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(peers), thread_name_prefix="campaign") as pool:
        runs = [pool.submit(_campaign_at, p, work, ref[n], fwd[n]) for n, p in peers.items()]
    for run in runs:
        run.result()  # the first peer's failure, after every peer's campaign has ended
    for d in [*ref.values(), *fwd.values()]:
        print(f"conformance: {d.sender} -> {d.peer}: {d.seconds:.1f}s", file=sys.stderr)
    print(f"conformance: send campaign: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    _summary(work / "summary.json", ref, fwd)
    return Campaign(ref, fwd, work)


def _summary(path: Path, ref: dict[str, Delivery], fwd: dict[str, Delivery]) -> None:
    doc: dict[str, Any] = {}
    for group in (ref, fwd):
        for name, d in group.items():
            doc[f"{d.sender} -> {name}"] = {
                "seconds": round(d.seconds, 2),
                "exit_codes": d.exit_codes,
                "stray": [str(p) for p in d.stray],
                "files": {
                    k: {
                        "stored": o.stored,
                        "reason": o.reason,
                        "status": o.status,
                        "broken": o.broken,
                        "arrived": len(d.arrivals.get(k, [])),
                    }
                    for k, o in d.outcomes.items()
                },
            }
    path.write_text(json.dumps(doc, indent=1))
    print(f"conformance: summary in {path}", file=sys.stderr)


@cache
def _dcmsend_diffs(key: str, arrival: Path, at_storescp: bool) -> tuple[str, ...]:
    """What differs in dcmsend's ``arrival`` of ``key`` from the original (forgiving what DCMTK
    always changes), and at storescp a C-STORE that misnamed its data set. The same arrival is
    the reference of ``forwarder send`` and of the daemon: judged once, read twice."""
    bad = dcmtk_problems(key, arrival)
    if at_storescp and (m := command_mismatch(arrival)):
        bad += (m,)
    return bad


def judge(
    key: str,
    got: Outcome,
    arrivals: list[Path],
    ref: Outcome,
    ref_arrivals: list[Path],
    peer: str,
    who: str,
) -> tuple[list[str], list[str]]:
    """(problems, notes) for one file at one peer: the module docstring's rules 1-4 and 6.

    Orthanc is compared with ``relaxed`` text padding (conformance_lib.compare says why)."""
    relaxed = peer.startswith("orthanc")
    problems: list[str] = []
    notes: list[str] = []
    ref_diffs = [list(_dcmsend_diffs(key, a, peer.startswith("storescp"))) for a in ref_arrivals]
    dcmsend_delivered = ref.stored and any(not d for d in ref_diffs)
    if got.stored:
        if not arrivals:
            problems.append("reported stored, but the peer holds nothing")
        elif len(arrivals) > 1:
            problems.append(f"stored {len(arrivals)} times in one run: {arrivals}")
        for a in arrivals:
            bad, why = compare(key, a, relaxed=relaxed)
            notes.extend(why)
            problems.extend(f"arrived different from the original: {b}" for b in bad[:8])
            if peer.startswith("storescp") and (diff := byte_exact(key, a)):
                problems.append(diff)
            if peer.startswith("storescp") and (diff := command_mismatch(a)):
                problems.append(diff)
        if ref.broken:
            problems.append(f"dcmsend refuses this data set ({ref.reason}); forwarder stored it")
        if not ref.stored:
            notes.append(f"delivered where dcmsend did not ({ref.reason})")
    else:
        if not got.reason:
            problems.append("not stored and no reason given")
        if dcmsend_delivered:
            problems.append(f"dcmsend delivered it; forwarder did not: {got.reason}")
        if arrivals:
            notes.append(f"not reported stored, yet the peer holds {len(arrivals)} object(s)")
    if ref.stored and not ref_arrivals:
        notes.append(f"dcmsend: status 0x{ref.status or 0:04X} but the peer holds nothing")
    for bad in ref_diffs:
        if bad:
            notes.append(f"dcmsend's arrival differs from the original: {bad[0]}")
    NOTES.append({"who": who, "key": key, "peer": peer, "problems": problems, "notes": notes})
    return problems, notes


def _fail_text(
    who: str, key: str, peer: str, got: Outcome, ref: Outcome, problems: list[str]
) -> str:
    return (
        f"{who} {key} -> {peer}: " + "; ".join(problems) + f"\n  forwarder: stored={got.stored} "
        f"status={got.status} reason={got.reason!r}\n  dcmsend: stored={ref.stored} "
        f"status={ref.status} reason={ref.reason!r}"
    )


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("key", KEYS)
def test_forwarder_send(campaign: Campaign, peer: str, key: str) -> None:
    """``forwarder send`` against dcmsend and the original, per file and peer (rules 1-6)."""
    d, ref = campaign.send[peer], campaign.dcmsend[peer]
    got, r = d.outcomes[key], ref.outcomes[key]
    problems, _ = judge(
        key, got, d.arrivals.get(key, []), r, ref.arrivals.get(key, []), peer, "send"
    )
    assert not problems, _fail_text("forwarder send", key, peer, got, r, problems)


@pytest.mark.parametrize("peer", list(PEERS))
def test_forwarder_send_exit_code_and_nothing_stray(campaign: Campaign, peer: str) -> None:
    """Rule 7: exit 0 exactly when every file of the round was stored; no stray arrival."""
    d = campaign.send[peer]
    problems = []
    for r, (sources, rc) in enumerate(zip(rounds(), d.exit_codes, strict=True)):
        not_stored = [s.key for s in sources if not d.outcomes[s.key].stored]
        if rc == 0 and not_stored:
            problems.append(f"round {r}: exit 0 with {len(not_stored)} not stored: {not_stored}")
        if rc not in (0, 1, 3):
            problems.append(f"round {r}: exit {rc}\n{d.logs[r][-2000:]}")
        if rc != 0 and not not_stored:
            problems.append(f"round {r}: exit {rc} although every file was stored")
    if d.stray:
        problems.append(f"objects at the peer that match no file: {d.stray}")
    assert not problems, "\n".join(problems)


# -- the daemon ---------------------------------------------------------------------------------


@dataclass
class DaemonRun:
    outcomes: dict[str, dict[str, Outcome]]  # peer -> key -> outcome
    arrivals: dict[str, dict[str, list[Path]]]
    stray: dict[str, list[Path]]
    where: dict[str, str]  # key -> done / failed / incoming
    seconds: float
    log: str
    exit_code: int  # after SIGTERM


def _daemon_outcomes(
    d: Daemon, sources: list[Source]
) -> tuple[dict[str, dict[str, Outcome]], dict[str, str]]:
    out: dict[str, dict[str, Outcome]] = {p: {} for p in PEERS}
    where: dict[str, str] = {}
    for s in sources:
        if (d.done / s.key).exists():
            where[s.key] = "done"
            for p in PEERS:
                out[p][s.key] = Outcome(True)
            continue
        err = d.failed / f"{s.key}.error.json"
        if not err.exists():
            where[s.key] = "incoming" if (d.incoming / s.key).exists() else "nowhere"
            for p in PEERS:
                out[p][s.key] = Outcome(False, "")
            continue
        where[s.key] = "failed"
        doc = json.loads(err.read_text())
        per = {x["destination"]: x for x in doc.get("destinations", [])}
        for p in PEERS:
            x = per.get(p)
            if x is None:
                out[p][s.key] = Outcome(False, str(doc.get("reason") or ""))
            else:
                status = int(x["status"], 16) if x.get("status") else None
                out[p][s.key] = Outcome(
                    x["outcome"] == "stored",
                    ""
                    if x["outcome"] == "stored"
                    else str(x.get("error") or doc.get("reason") or ""),
                    status,
                )
    return out, where


@pytest.fixture(scope="module")
def daemon_run(
    peers: dict[str, Peer], campaign: Campaign, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonRun]:
    root = tmp_path_factory.mktemp("daemon")
    dests = [
        {"name": name, "url": p.url, "response_timeout": "20s"}
        if p.url
        else destination(name, p.port, ae_title=p.ae_title, response_timeout="20s")
        for name, p in peers.items()
    ]
    outcomes: dict[str, dict[str, Outcome]] = {p: {} for p in PEERS}
    arrivals: dict[str, dict[str, list[Path]]] = {p: {} for p in PEERS}
    stray: dict[str, list[Path]] = {p: [] for p in PEERS}
    where: dict[str, str] = {}
    t0 = time.monotonic()
    with Daemon(
        root,
        destinations=dests,
        retry={"initial_delay": "200ms", "max_delay": "500ms", "max_attempts": 2},
        watch={"settle": "100ms", "rescan_interval": "1s"},
    ) as d:
        for r, sources in enumerate(rounds()):
            for s in sources:
                write_atomic(d.incoming / s.key, s.path.read_bytes())
            d.wait_incoming_empty(timeout=180)
            o, w = _daemon_outcomes(d, sources)
            where.update(w)
            # each peer emptied in a thread of its own (Orthanc's by REST, one object a call)
            with ThreadPoolExecutor(len(peers), thread_name_prefix="take") as pool:
                taken = {
                    name: pool.submit(peer.take, root / "arrived" / name / f"r{r}")
                    for name, peer in peers.items()
                }
            for name in peers:
                outcomes[name].update(o[name])
                matched, st = match_arrivals(sources, taken[name].result())
                arrivals[name].update(matched)
                stray[name].extend(st)
        exit_code = d.stop()
        log = d.log_text()
    seconds = time.monotonic() - t0
    print(f"conformance: daemon -> 4 peers: {seconds:.1f}s", file=sys.stderr)
    yield DaemonRun(outcomes, arrivals, stray, where, seconds, log, exit_code)


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("key", KEYS)
def test_daemon(daemon_run: DaemonRun, campaign: Campaign, peer: str, key: str) -> None:
    """The daemon, one destination per peer, against dcmsend and the original (rules 1-6): a file
    in ``done/`` was stored by every peer; a file in ``failed/`` has a reason per destination."""
    ref = campaign.dcmsend[peer]
    got, r = daemon_run.outcomes[peer][key], ref.outcomes[key]
    problems, _ = judge(
        key,
        got,
        daemon_run.arrivals[peer].get(key, []),
        r,
        ref.arrivals.get(key, []),
        peer,
        "daemon",
    )
    if daemon_run.where[key] not in ("done", "failed"):
        problems.append(f"left in {daemon_run.where[key]} after incoming was empty")
    assert not problems, _fail_text("daemon", key, peer, got, r, problems)


def test_daemon_nothing_stray(daemon_run: DaemonRun) -> None:
    """Nothing arrives at a peer from the daemon that matches no file dropped in the round."""
    assert not any(daemon_run.stray.values()), daemon_run.stray


def test_corpus_is_whole() -> None:
    """The corpus rule keeps every DICOM file pydicom ships (about 180) and only those."""
    keys = by_key()
    assert len(keys) >= 180
    assert not [k for k in keys if k.endswith((".txt", ".json", ".dump", ".icc", ".gz"))]
    assert "test_files/MR_small_bigendian.dcm" in keys and "test_files/image_dfl.dcm" in keys


def test_patient_data_check_sees_a_daemon_that_logs_it(tmp_path: Path) -> None:
    """The check of the ``no_patient_data`` tests finds a patient's name in a real log line:
    with ``log_phi: true`` a "no route" reason shows the values the routes looked at."""
    source = by_key()["test_files/CT_small.dcm"]
    with Daemon(
        tmp_path,
        destinations=[destination("pacs", 9)],
        routes=[route("nobody", ["pacs"], PatientName="Nobody^Here")],
        extra={"log_phi": True},
    ) as d:
        write_atomic(d.incoming / "ct.dcm", source.path.read_bytes())
        d.wait_failed(1)
        log = d.log_text()
    assert any(line.startswith("'CompressedSamples'") for line in patient_data_in(log)), log


def test_daemon_survives_everything(daemon_run: DaemonRun) -> None:
    """After the whole corpus the daemon exits 0 on SIGTERM and its log holds no traceback (a
    worker that died would leave one, from the safety net or the thread)."""
    assert daemon_run.exit_code == 0, daemon_run.log[-3000:]
    log = daemon_run.log
    assert "Traceback" not in log, log[log.index("Traceback") :][:3000]


def test_no_patient_data_logged(campaign: Campaign, daemon_run: DaemonRun) -> None:
    """Logs never show patient names or IDs by default: neither ``forwarder send`` (every round,
    every peer, STOW-RS included, refusals and their reasons too) nor the daemon, with the
    corpus's real names in every character set."""
    logs = [("daemon", daemon_run.log)]
    for name, d in campaign.send.items():
        logs += [(f"send -> {name} round {r}", log) for r, log in enumerate(d.logs)]
    found = [f"{where}: {line}" for where, log in logs for line in patient_data_in(log)]
    assert not found, "\n".join(found[:20])
