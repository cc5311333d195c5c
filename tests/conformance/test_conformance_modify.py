"""Every DICOM file pydicom ships, sent by the daemon through a destination that changes what it
sends (``modify: {set: {InstitutionName: ...}}``), and through a route that de-identifies it
(``deidentify: basic``): the path that decodes and encodes the data set again
(``forwarder.dicom.edit``), where the byte-exact path does not, judged element by element
against the original (modify) and against the profile (deidentify).

How it runs: one daemon whose destination, a DCMTK storescp ``+xa +B +uf`` (every transfer
syntax), sets Institution Name (0008,0080); dcmsend pushing the file unchanged to a storescp
configured alike is the reference. The corpus goes in rounds without duplicate SOP Instance
UIDs (conformance_lib); per round the files are dropped into ``incoming/`` and the daemon runs
until it is empty.

The rules, per file:

1. In ``done/``: the PACS holds exactly one object for it, equal to the original
   (conformance_lib.compare: every element, pixels decoded) but for Institution Name, which is
   the configured value; in the original's transfer syntax (the edit re-encodes, it never
   converts).
2. In ``failed/``: its ``.error.json`` names the reason, and nothing of it reached the PACS.
3. A file dcmsend delivers intact is delivered changed: an edit that cannot re-encode a data
   set dcmsend can send is a defect.
4. Nothing stray, ``incoming/`` empties, no traceback, exit 0 on SIGTERM.

De-identified (the same run, a second daemon whose route has ``deidentify: basic``), rules 2-4
hold, and rule 1 becomes: in ``done/``, the PACS holds one object for it (matched by its new
SOP Instance UID, from the queue's UID map) in the original's transfer syntax, with no element
the profile removes at any level, no private element, Patient Identity Removed YES, new Study,
Series and SOP Instance UIDs, the SOP Class kept, and pixels that decode to the original's.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conformance_lib import (
    Outcome,
    Source,
    by_key,
    compare,
    corpus,
    match_arrivals,
    patient_data_in,
    pixels,
    quiet,
    read,
    rounds,
    run_dcmsend,
    take_folder,
    transfer_syntax_of,
)
from daemon import Daemon, destination, write_atomic
from peers import storescp
from pydicom.dataset import Dataset

from forwarder.dicom.deidentify import basic_profile

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

KEYS = [s.key for s in corpus()]
INSTITUTION = "Gateway Conformance Hospital"
INSTITUTION_NAME = 0x00080080
#: the two runs: a destination's modify, a route's deidentify
KINDS = ("modify", "deidentify")


@dataclass
class ModifyRun:
    kind: str = "modify"
    where: dict[str, str] = field(default_factory=dict)  # done / failed / elsewhere
    reasons: dict[str, str] = field(default_factory=dict)
    arrivals: dict[str, list[Path]] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)
    ref: dict[str, Outcome] = field(default_factory=dict)
    ref_arrivals: dict[str, list[Path]] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    log: str = ""
    exit_code: int | None = None


def _run(work: Path, kind: str) -> ModifyRun:
    run = ModifyRun(kind)
    options = ["+B", "+uf", "+xa"]
    t0 = time.monotonic()
    with (
        storescp(work / "pacs", ae_title="PACS", extra=options, log=work / "pacs.log") as pacs,
        storescp(work / "ref", ae_title="PACS", extra=options, log=work / "ref.log") as direct,
    ):
        dest = destination("pacs", pacs.port, ae_title="PACS", response_timeout="20s")
        routes = None
        if kind == "modify":
            dest["modify"] = {"set": {"InstitutionName": INSTITUTION}}
        else:
            routes = [{"name": "deid", "to": ["pacs"], "deidentify": "basic"}]
        with Daemon(
            work / "fw",
            destinations=[dest],
            routes=routes,
            retry={"initial_delay": "200ms", "max_delay": "500ms", "max_attempts": 2},
            watch={"settle": "100ms", "rescan_interval": "1s"},
        ) as d:
            for r, sources in enumerate(rounds()):
                base = work / f"r{r}"
                base.mkdir()
                ref, _, _ = run_dcmsend(sources, "PACS", direct.port, base, "direct")
                matched, _ = match_arrivals(sources, take_folder(direct.output, base / "direct"))
                run.ref.update(ref)
                run.ref_arrivals.update(matched)
                for s in sources:
                    write_atomic(d.incoming / s.key, s.path.read_bytes())
                try:
                    d.wait_incoming_empty(timeout=180)
                except AssertionError:
                    run.left.extend(f"round {r}: {p}" for p in d.incoming_files())
                for s in sources:
                    if (d.done / s.key).exists():
                        run.where[s.key] = "done"
                    elif (err := d.failed / f"{s.key}.error.json").exists():
                        run.where[s.key] = "failed"
                        doc = json.loads(err.read_text())
                        per = doc.get("destinations") or [{}]
                        run.reasons[s.key] = str(per[0].get("error") or doc.get("reason") or "")
                    else:
                        run.where[s.key] = "elsewhere"
                got = take_folder(pacs.output, base / "pacs")
                matched, stray = (
                    match_arrivals(sources, got)
                    if kind == "modify"
                    else _match_deidentified(d.queue, sources, got)
                )
                run.arrivals.update(matched)
                run.stray.extend(stray)
            run.exit_code = d.stop()
            run.log = d.log_text()
    done = sum(w == "done" for w in run.where.values())
    print(
        f"conformance: daemon with {kind} -> storescp: {time.monotonic() - t0:.1f}s, "
        f"{done} of {len(run.where)} in done/",
        file=sys.stderr,
    )
    return run


def _match_deidentified(
    queue: Path, sources: list[Source], arrivals: list[Path]
) -> tuple[dict[str, list[Path]], list[Path]]:
    """De-identified arrivals by source key: their SOP Instance UID is a replacement, mapped
    back to the original through the queue's UID map; the unmatched ones."""
    conn = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
    try:
        back = dict(conn.execute("SELECT replacement, original FROM uid_map").fetchall())
    finally:
        conn.close()
    by_uid = {u: s.key for s in sources for u in s.uids}
    matched: dict[str, list[Path]] = {}
    stray = []
    for a in arrivals:
        new = str(pydicom.dcmread(a, stop_before_pixels=True).get("SOPInstanceUID", ""))
        key = by_uid.get(back.get(new, ""))
        if key is None:
            stray.append(a)
        else:
            matched.setdefault(key, []).append(a)
    return matched, stray


@pytest.fixture(scope="module", params=KINDS)
def modified(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModifyRun:
    kind = str(request.param)
    return _run(tmp_path_factory.mktemp(kind), kind)


def _not_modified(key: str, arrival: Path) -> list[str]:
    bad, _ = compare(key, arrival, ignore=frozenset({INSTITUTION_NAME}))
    problems = [f"arrived different from the original: {b}" for b in bad[:8]]
    got = pydicom.dcmread(arrival, stop_before_pixels=True).get("InstitutionName")
    if got != INSTITUTION:
        problems.append(f"Institution Name arrived as {got!r}, not {INSTITUTION!r}")
    return problems


def _walk(ds: Dataset) -> Iterator[int]:
    for elem in ds:
        yield int(elem.tag)
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _not_deidentified(key: str, arrival: Path) -> list[str]:
    with quiet():  # pydicom warns of the corpus's invalid values as it decodes them
        return _deidentification_problems(key, arrival)


def _deidentification_problems(key: str, arrival: Path) -> list[str]:
    original, got = read(by_key()[key].path), read(arrival)
    removed = {t for t, a in basic_profile().exact.items() if a == "X"}
    tags = list(_walk(got))
    problems = [f"({t >> 16:04X},{t & 0xFFFF:04X}) arrived, the profile removes it" for t in tags
                if t in removed][:4]  # fmt: skip
    problems += [f"private ({t >> 16:04X},{t & 0xFFFF:04X}) arrived" for t in tags if t >> 16 & 1][
        :4
    ]
    if got.get("PatientIdentityRemoved") != "YES":
        problems.append("Patient Identity Removed is not YES")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        old, new = str(original.get(keyword, "")), str(got.get(keyword, ""))
        if old and (new == old or not new.startswith("2.25.")):
            problems.append(f"{keyword} {new!r} not replaced (was {old!r})")
    if str(got.get("SOPClassUID", "")) != str(original.get("SOPClassUID", "")):
        problems.append("the SOP Class UID changed")
    if "PixelData" in original:
        try:
            want = pixels(original)
        except Exception:
            want = None  # pydicom cannot decode the original: the bytes are compared
            if got.get("PixelData") != original.get("PixelData"):
                problems.append("Pixel Data differs from the original's")
        if want is not None:
            try:
                have = pixels(got)
            except Exception as exc:
                problems.append(f"the pixels do not decode: {type(exc).__name__}: {exc}")
            else:
                if want.shape != have.shape or not np.array_equal(want, have):
                    problems.append("the pixels differ from the original's")
    return problems


@pytest.mark.parametrize("key", KEYS)
def test_modify(modified: ModifyRun, key: str) -> None:
    """Rules 1-3 of the module docstring for one file."""
    where, arrivals = modified.where.get(key, "elsewhere"), modified.arrivals.get(key, [])
    ref = modified.ref[key]
    problems: list[str] = []
    if where == "done":
        if len(arrivals) != 1:
            problems.append(f"in done/, and the PACS holds {len(arrivals)} objects")
        for a in arrivals:
            if modified.kind == "modify":
                problems.extend(_not_modified(key, a))
            else:
                problems.extend(_not_deidentified(key, a))
            sent, original = transfer_syntax_of(a), by_key()[key].transfer_syntax
            if original and sent != original:
                problems.append(f"the edit converted {original} to {sent}")
    elif where == "failed":
        if not modified.reasons.get(key):
            problems.append("in failed/ with no reason")
        if arrivals:
            problems.append(f"in failed/, yet the PACS holds {len(arrivals)} objects")
    else:
        problems.append("neither in done/ nor in failed/ after incoming emptied")
    intact = ref.stored and any(
        not compare(key, a, dcmtk=True)[0] for a in modified.ref_arrivals.get(key, [])
    )
    if intact and where != "done":
        problems.append(
            f"dcmsend delivers it intact; with modify it went to {where}: "
            f"{modified.reasons.get(key, '')}"
        )
    assert not problems, f"daemon with {modified.kind}, {key}: " + "; ".join(problems)


def test_modify_nothing_stray_nothing_left(modified: ModifyRun) -> None:
    """Rule 4: nothing arrives that matches no dropped file; incoming empties every round."""
    assert not modified.stray, modified.stray
    assert not modified.left, modified.left


def test_modify_survives_everything(modified: ModifyRun) -> None:
    """Rule 4: after the whole corpus the daemon exits 0 on SIGTERM with no traceback logged."""
    assert modified.exit_code == 0, modified.log[-3000:]
    assert "Traceback" not in modified.log, modified.log[modified.log.index("Traceback") :][:3000]


def test_modify_no_patient_data_logged(modified: ModifyRun) -> None:
    """Changing or de-identifying the corpus's objects, and refusing those it cannot, the
    daemon logs no patient's name or ID."""
    found = patient_data_in(modified.log)
    assert not found, "\n".join(found[:20])
