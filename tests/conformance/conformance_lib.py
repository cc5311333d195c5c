"""The conformance corpus, the reference sender (DCMTK dcmsend) and the comparison rules.

Corpus: every regular file pydicom ships (``get_testdata_files()`` + ``get_charset_files()``)
that is DICOM by rule: ``DICM`` at offset 128, or a name ending in ``.dcm`` (files without a
preamble). That excludes README/.txt, .json, .dump, .icc and .gz by content, not by a list.

Rounds: pydicom's files share SOP Instance UIDs (``MR_small*.dcm`` are nine encodings of one
instance). A peer keeps one object per UID (Orthanc, ``forwarder receive``), and an arrival is
matched to its source by UID, so the corpus is sent in *rounds* in which no two files share a
UID; the peer is emptied between rounds. Round 0 holds about 140 files, the last few hold 1-4.

Comparison (``compare``): what arrived equals the original when

* every data set element (group 0002 excluded: the meta header is the receiver's; group
  length elements ``(gggg,0000)`` excluded: retired and recomputed by writers) has the same
  tag and the same value, compared in a canonical form: values of binary VRs (US, SS, UL, SL,
  FL, FD, AT, OW, OF, OL, OD, OV, SV, UV) from a big endian source are byte-swapped by element
  size to little endian; an odd-length source value may arrive with one padding byte; a
  sequence is compared item by item, element by element (an Implicit VR arrival whose private
  sequence pydicom can only read as UN bytes is parsed as a sequence);
* and, when the source has Pixel Data, both decode (pydicom ``pixel_array``; the pylibjpeg
  plugins are installed) to equal arrays. When the arrival's pixel data were decompressed from
  a lossless source, Pixel Data itself and the elements a lossless decompression must rewrite
  (Photometric Interpretation, Planar Configuration) are compared through the arrays only;
  this exclusion is listed in the returned notes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

REPO = Path(__file__).resolve().parents[2]
#: ``CONFORMANCE_FORWARDER="python -m forwarder"`` (with PYTHONPATH) runs ``send`` from another
#: tree, e.g. an old engine, to check that the suite catches its faults.
FORWARDER = shlex.split(
    os.environ.get("CONFORMANCE_FORWARDER") or str(REPO / ".venv" / "bin" / "forwarder")
)
DCMSEND = "/usr/bin/dcmsend"
STORESCU = "/usr/bin/storescu"

#: Success and the warnings a storage SCP stores with (PS3.4 B.2.3).
STORED_STATUSES = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}

_SWAP = {
    "US": 2, "SS": 2, "OW": 2, "AT": 2,
    "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4,
    "FD": 8, "OD": 8, "OV": 8, "SV": 8, "UV": 8,
}  # fmt: skip
_TEXT_VRS = {
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
    "UR", "UT",
}  # fmt: skip
_PIXEL_DATA = 0x7FE00010
#: transfer syntaxes whose pixel data may be lossy (PS3.5 Table A-1): JPEG baseline/extended,
#: JPEG-LS near-lossless, JPEG 2000 and HTJ2K that are not "lossless only", MPEG/HEVC video
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
}  # fmt: skip


class Text(bytes):
    """A text value's bytes (so a peer's padding normalisation can be told from corruption)."""


_LOSSLESS_REWRITES = {0x00280004, 0x00280006}  # Photometric Interpretation, Planar Configuration


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """pydicom warns on every odd file; the suite turns warnings into errors elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    key: str  # path relative to pydicom's data folder, e.g. "test_files/MR_small.dcm"
    path: Path
    uids: frozenset[str]  # SOP Instance UIDs it carries (data set and meta header)
    transfer_syntax: str  # from its meta header, "" if none
    round: int = 0
    #: the data set's SOP Class/Instance UID is written with VR UN (``rtdose_rle*.dcm``, by
    #: gdcmconv): pydicom reads the UIDs; DCMTK does not, and its C-STORE names SOP Class "31"
    uids_as_un: bool = False


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or path.name.endswith(".dcm")


def _uids(path: Path) -> tuple[frozenset[str], str]:
    return _header(path)[:2]


def _header(path: Path) -> tuple[frozenset[str], str, bool]:
    """(SOP Instance UIDs, transfer syntax, SOP Class/Instance UID written as UN)."""
    with quiet():
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            return frozenset(), "", False
        raw = [ds.get_item(t) for t in (0x00080016, 0x00080018) if t in ds]
        as_un = any(getattr(r, "VR", None) == "UN" for r in raw)
        found = set()
        for value in (
            getattr(ds, "SOPInstanceUID", None),
            getattr(ds.file_meta, "MediaStorageSOPInstanceUID", None),
        ):
            if value:
                found.add(str(value).strip("\0 "))
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
        return frozenset(found), ts, as_un


@cache
def corpus() -> tuple[Source, ...]:
    """Every DICOM file pydicom ships, each assigned to a round (see the module docstring)."""
    paths = sorted(
        {Path(p) for p in [*get_testdata_files(), *get_charset_files()] if os.path.isfile(p)}
    )
    root = Path(pydicom.data.__file__).parent
    rounds: list[set[str]] = []
    out = []
    for path in paths:
        if not _is_dicom(path):
            continue
        uids, ts, mismatch = _header(path)
        r = next((i for i, taken in enumerate(rounds) if not taken & uids), len(rounds))
        if r == len(rounds):
            rounds.append(set())
        rounds[r] |= uids
        out.append(Source(path.relative_to(root).as_posix(), path, uids, ts, r, mismatch))
    return tuple(out)


def by_key() -> dict[str, Source]:
    return {s.key: s for s in corpus()}


def rounds() -> list[list[Source]]:
    n = max(s.round for s in corpus()) + 1
    return [[s for s in corpus() if s.round == r] for r in range(n)]


def take_folder(folder: Path, into: Path) -> list[Path]:
    """Move every file directly in ``folder`` (what a storescp wrote) into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(x for x in folder.iterdir() if x.is_file()):
        shutil.move(p, into / p.name)
        out.append(into / p.name)
    return out


def arrival_uids(path: Path) -> set[str]:
    return set(_uids(path)[0])


def match_arrivals(
    sources: Sequence[Source], arrivals: Sequence[Path]
) -> tuple[dict[str, list[Path]], list[Path]]:
    """Arrivals of one round by source key (by SOP Instance UID); the unmatched ones."""
    by_uid = {u: s.key for s in sources for u in s.uids}
    matched: dict[str, list[Path]] = {}
    stray = []
    for a in arrivals:
        keys = {by_uid[u] for u in arrival_uids(a) if u in by_uid}
        if len(keys) == 1:
            matched.setdefault(keys.pop(), []).append(a)
        else:
            stray.append(a)
    return matched, stray


# -- outcomes -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one sender said about one file (``stored``), and why not (``reason``)."""

    stored: bool
    reason: str = ""
    status: int | None = None
    #: dcmsend only: it refused the file because of its data set (not the peer).
    broken: bool = False
    sent_transfer_syntax: str | None = None


@dataclass
class Delivery:
    """One sender's run over the corpus to one peer configuration."""

    sender: str
    peer: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    arrivals: dict[str, list[Path]] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    logs: list[str] = field(default_factory=list)


def env_nodelay() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FORWARDER_", "NOTIFY_", "WATCHDOG_", "JOURNAL_", "LISTEN_"))
    }
    env["TCP_NODELAY"] = "1"  # DCMTK: without it each small store waits for a delayed ACK
    env["PYTHONUNBUFFERED"] = "1"
    return env


_ADD_ERR = re.compile(r"^E: cannot add DICOM file to the transfer list: (.*?): (.*)$")
_READ_ERR = re.compile(r"^E: cannot send SOP instance from file: (.*?): (.*)$")


def parse_dcmsend(sources: Sequence[Source], log: str, report: str) -> dict[str, Outcome]:
    """Per-file outcome of a dcmsend run, from its log and ``--create-report-file``.

    * "cannot add DICOM file to the transfer list" (checked before any association) and
      "cannot send SOP instance from file" (failed to read it) are refusals for the data set;
    * a report entry ``<not sent>`` whose presentation context was accepted is a refusal for
      the data set too ("missing information": no SOP Class/Instance UID in the data set);
    * ``<not sent>`` without an accepted presentation context is the peer's refusal;
    * otherwise the DIMSE status decides.
    """
    by_path = {str(s.path): s.key for s in sources}
    out: dict[str, Outcome] = {}
    for line in log.splitlines():
        for rx in (_ADD_ERR, _READ_ERR):
            m = rx.match(line)
            if m and m.group(1) in by_path:
                out[by_path[m.group(1)]] = Outcome(False, f"dcmsend: {m.group(2)}", broken=True)
    for block in report.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (ln.partition(":") for ln in block.splitlines())
            if _
        )
        path = fields.get("Filename")
        if path not in by_path:
            continue
        key = by_path[path]
        status = fields.get("DIMSE Status", "")
        m = re.match(r"0x([0-9A-Fa-f]{4})", status)
        if m:
            code = int(m.group(1), 16)
            out[key] = Outcome(
                code in STORED_STATUSES,
                "" if code in STORED_STATUSES else f"dcmsend: status {status}",
                code,
                sent_transfer_syntax=fields.get("Network Xfer", "").split(" ")[0] or None,
            )
        elif key not in out:
            context = fields.get("Pres. Context", "")
            out[key] = Outcome(
                False,
                f"dcmsend: {status or 'no status'} (pres. context {context or 'none'})",
                broken=status == "<not sent>",  # not "<no acceptable presentation context>"
            )
    for s in sources:
        out.setdefault(s.key, Outcome(False, "dcmsend: no trace of the file in its log or report"))
    return out


def run_dcmsend(
    sources: Sequence[Source], peer_ae: str, port: int, work: Path, tag: str
) -> tuple[dict[str, Outcome], int, str]:
    report = work / f"{tag}.dcmsend-report.txt"
    proc = subprocess.run(
        [
            DCMSEND,
            "-nh",
            "--create-report-file",
            str(report),
            "-aec",
            peer_ae,
            "127.0.0.1",
            str(port),
            *[str(s.path) for s in sources],
        ],
        capture_output=True,
        text=True,
        env=env_nodelay(),
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    (work / f"{tag}.dcmsend.log").write_text(log)
    text = report.read_text(errors="replace") if report.exists() else ""
    return parse_dcmsend(sources, log, text), proc.returncode, log


def run_forwarder_send(
    sources: Sequence[Source],
    peer_ae: str,
    port: int,
    work: Path,
    tag: str,
    extra: Sequence[str] = (),
    target: str | None = None,
) -> tuple[dict[str, Outcome], int, str]:
    """``forwarder send --report`` with every file of the round in one run; ``target`` (a
    STOW-RS URL) instead of ``peer_ae@127.0.0.1:port``."""
    report = work / f"{tag}.forwarder-report.json"
    proc = subprocess.run(
        [
            *FORWARDER,
            "send",
            "--no-progress",
            "--report",
            str(report),
            *extra,
            target or f"{peer_ae}@127.0.0.1:{port}",
            *[str(s.path) for s in sources],
        ],
        capture_output=True,
        text=True,
        env=env_nodelay(),
        timeout=300,
        cwd=work,  # not the repository: "python -m forwarder" would import it first
    )
    log = proc.stdout + proc.stderr
    (work / f"{tag}.forwarder.log").write_text(log)
    by_path = {str(s.path): s.key for s in sources}
    out: dict[str, Outcome] = {}
    if report.exists():
        for rec in json.loads(report.read_text())["files"]:
            key = by_path.get(rec["path"])
            if key is None:
                continue
            status = int(rec["status"], 16) if rec.get("status") else None
            out[key] = Outcome(
                rec["outcome"] in ("stored", "warning"),
                rec.get("error") or "",
                status,
                sent_transfer_syntax=rec.get("sent_transfer_syntax"),
            )
    for s in sources:
        out.setdefault(s.key, Outcome(False, ""))  # no record at all: not stored, no reason
    return out, proc.returncode, log


_SENDING = re.compile(r"^I: Sending file: (.*)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.*)\)")
_IGNORED = re.compile(r"^W: .*(?:in|file): (/.*?), ignoring file$")


def run_storescu(
    sources: Sequence[Source], peer_ae: str, port: int, work: Path, tag: str
) -> tuple[dict[str, Outcome], int, str]:
    """DCMTK storescu (``-R``: a context per file's SOP class and transfer syntax; ``-nh``:
    go on after a failure); per-file outcome from its ``-v`` log."""
    proc = subprocess.run(
        [
            STORESCU,
            "-v",
            "-nh",
            "-R",
            "-aec",
            peer_ae,
            "127.0.0.1",
            str(port),
            *[str(s.path) for s in sources],
        ],
        capture_output=True,
        text=True,
        env=env_nodelay(),
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    (work / f"{tag}.storescu.log").write_text(log)
    by_path = {str(s.path): s.key for s in sources}
    out: dict[str, Outcome] = {}
    current: str | None = None
    for line in log.splitlines():
        m = _IGNORED.match(line)
        if m and m.group(1) in by_path:
            out[by_path[m.group(1)]] = Outcome(False, f"storescu: {line[3:]}", broken=True)
            continue
        m = _SENDING.match(line)
        if m:
            current = by_path.get(m.group(1))
            if current is not None:
                out[current] = Outcome(False, "storescu: no response")
            continue
        m = _RESPONSE.match(line)
        if m and current is not None:
            text = m.group(1)
            stored = text.startswith(("Success", "Warning"))
            out[current] = Outcome(stored, "" if stored else f"storescu: {text}")
            current = None
        elif line.startswith("E: ") and current is not None and not out[current].stored:
            out[current].reason = f"storescu: {line[3:]}"
    for s in sources:
        out.setdefault(s.key, Outcome(False, "storescu: no trace of the file in its log"))
    return out, proc.returncode, log


# -- comparison ---------------------------------------------------------------------------------


def read(path: Path) -> Dataset:
    with quiet():
        return pydicom.dcmread(path, force=True)


def _vr_of(raw: RawDataElement) -> str:
    if raw.VR:
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return "UN"


def _swap(value: bytes, size: int) -> bytes:
    n = len(value) - len(value) % size
    if size == 1 or n == 0:
        return value
    arr = np.frombuffer(value[:n], dtype=f">u{size}").astype(f"<u{size}")
    return arr.tobytes() + value[n:]


def _as_sequence(ds: Dataset, tag: int, raw: RawDataElement) -> list[dict[int, Any]] | None:
    """The element as a sequence (canonical items), or None if it is not one."""
    vr = _vr_of(raw)
    if (
        vr != "SQ"
        and not (vr == "UN" and raw.length == 0xFFFFFFFF)
        and not (
            vr == "UN" and raw.value and raw.value[:4] in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")
        )
    ):
        return None
    with quiet():
        if vr == "UN" and raw.value is not None and raw.length != 0xFFFFFFFF:
            from pydicom.filebase import DicomBytesIO
            from pydicom.filereader import read_sequence

            items = read_sequence(
                DicomBytesIO(raw.value), True, True, len(raw.value), ds._character_set
            )
        else:
            elem = ds[tag]
            if elem.VR != "SQ":
                return None
            items = elem.value
    return [canonical(item) for item in items]


def canonical(ds: Dataset) -> dict[int, Any]:
    """tag -> canonical value (bytes in little endian order, or a list of item dicts)."""
    out: dict[int, Any] = {}
    for tag in list(ds.keys()):
        t = int(tag)
        if (t >> 16) == 0x0002 or (t & 0xFFFF) == 0:
            continue
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):  # already converted by pydicom
            elem = ds[tag]
            if elem.VR == "SQ":
                out[t] = [canonical(i) for i in elem.value]
            else:
                out[t] = _encode(elem, ds)
            continue
        seq = _as_sequence(ds, t, raw) if t != _PIXEL_DATA else None
        if seq is not None:
            out[t] = seq
            continue
        value = bytes(raw.value or b"")
        if not raw.is_little_endian:
            if t == _PIXEL_DATA:
                # big endian pixel data: word order depends on Bits Allocated, so the
                # pixels are compared as decoded arrays, not as bytes
                out[t] = ("big endian pixel data", None)
                continue
            value = _swap(value, _SWAP.get(_vr_of(raw), 1))
        out[t] = Text(value) if _vr_of(raw) in _TEXT_VRS else value
    return out


def _encode(elem: Any, ds: Dataset) -> bytes:
    """The little endian value bytes of an element pydicom has already converted (it converts
    empty values and the pixel description at once)."""
    if elem.value in (None, "", b"") or elem.value == []:
        return b""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, elem, ds._character_set)
    return bytes(fp.getvalue()[8:])


def _same_value(a: Any, b: Any, relaxed: bool = False) -> bool:
    if isinstance(a, bytes) and isinstance(b, bytes):
        if a == b:
            return True
        if relaxed and isinstance(a, Text) and a.rstrip(b" \0") == b.rstrip(b" \0"):
            return True
        return len(a) % 2 == 1 and len(b) == len(a) + 1 and b[:-1] == a and b[-1:] in b"\0 "
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            not diff_datasets(x, y, relaxed=relaxed) for x, y in zip(a, b, strict=True)
        )
    return bool(a == b)


def diff_datasets(
    a: dict[int, Any],
    b: dict[int, Any],
    skip: frozenset[int] = frozenset(),
    path: str = "",
    relaxed: bool = False,
) -> list[str]:
    """Differences between two canonical data sets, as readable lines (empty: equal)."""
    out = []
    for t in sorted(set(a) | set(b)):
        if t in skip:
            continue
        where = f"{path}({t >> 16:04X},{t & 0xFFFF:04X})"
        if t not in b:
            out.append(f"{where} missing in the arrival")
        elif t not in a:
            out.append(f"{where} added by the arrival")
        elif isinstance(a[t], list) and isinstance(b[t], list) and len(a[t]) == len(b[t]):
            for i, (x, y) in enumerate(zip(a[t], b[t], strict=True)):
                out.extend(diff_datasets(x, y, path=f"{where}[{i}]", relaxed=relaxed))
        elif not _same_value(a[t], b[t], relaxed):
            out.append(f"{where} differs: {_short(a[t])} -> {_short(b[t])}")
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 60 else f"{text[:40]}...({len(v) if hasattr(v, '__len__') else ''})"


def _compressed(ts: str) -> bool:
    try:
        return bool(UID(ts).is_compressed)
    except Exception:
        return False


def pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    with quiet():
        return np.asarray(ds.pixel_array)


@cache
def _original(path: Path) -> tuple[Dataset | None, dict[int, Any] | None, str]:
    try:
        ds = read(path)
        return ds, canonical(ds), ""
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def compare(
    key: str,
    arrival: Path,
    *,
    relaxed: bool = False,
    reference: Path | None = None,
    dcmtk: bool = False,
    ignore: frozenset[int] = frozenset(),
) -> tuple[list[str], list[str]]:
    """(problems, notes) comparing ``arrival`` with source ``key`` (module docstring rules).

    ``relaxed``: text values are equal when they differ only in trailing spaces/NULs. Orthanc
    (DCMTK inside) rewrites what it stores and trims over-long padding (``examples_ybr_color.dcm``
    (0010,2160), ``SC_rgb_gdcm_KY.dcm`` (0008,0008)), for dcmsend's objects as for ours.
    ``reference``: compare with this file instead of the original (what a pusher sent).
    ``dcmtk``: the arrival was sent by DCMTK (dcmsend, storescu), which re-encodes what it sends:
    it drops Data Set Trailing Padding (FFFC,FFFC) and trims over-long text padding, so both are
    forgiven (``relaxed`` and (FFFC,FFFC) skipped). Used only to decide whether DCMTK delivered a
    file intact, never to judge what forwarder delivered.
    ``ignore``: top-level tags not compared (those a ``modify`` changed on purpose).
    """
    relaxed = relaxed or dcmtk
    src = by_key()[key]
    ref_path = reference or src.path
    ds_a, canon_a, err = _original(ref_path)
    notes: list[str] = []
    if ds_a is None or canon_a is None:
        return [f"pydicom cannot read the original ({err}): nothing can prove the arrival"], notes
    try:
        ds_b = read(arrival)
        canon_b = canonical(ds_b)
    except Exception as exc:
        return [f"pydicom cannot read the arrival: {type(exc).__name__}: {exc}"], notes
    ts_b = str(getattr(ds_b.file_meta, "TransferSyntaxUID", "") or "")
    skip: set[int] = set(ignore)
    ts_a = str(getattr(ds_a.file_meta, "TransferSyntaxUID", "") or "") or src.transfer_syntax
    decompressed = _compressed(ts_a) and not _compressed(ts_b)
    if decompressed:
        skip |= {_PIXEL_DATA, *_LOSSLESS_REWRITES}
        notes.append(
            f"decompressed {ts_a} -> {ts_b}: Pixel Data, Photometric "
            "Interpretation, Planar Configuration compared as decoded arrays"
        )
    if isinstance(canon_a.get(_PIXEL_DATA), tuple) or isinstance(canon_b.get(_PIXEL_DATA), tuple):
        skip.add(_PIXEL_DATA)
        notes.append("big endian pixel data: compared as decoded arrays")
    if dcmtk:
        skip.add(0xFFFCFFFC)
    problems = diff_datasets(canon_a, canon_b, frozenset(skip), relaxed=relaxed)
    lossy_mark = canon_a.get(0x00282110, b"")
    if decompressed and (ts_a in LOSSY_SYNTAXES or bytes(lossy_mark)[:2] == b"01"):
        problems.append(
            f"a lossy source ({ts_a}, Lossy Image Compression {lossy_mark!r}) arrived "
            f"decompressed ({ts_b}); the suite never allows lossy decompression"
        )
    if _PIXEL_DATA in canon_a:
        try:
            px_a = pixels(ds_a)
        except Exception as exc:
            px_a = None
            if _PIXEL_DATA in skip:
                problems.append(
                    f"pydicom cannot decode the original's pixels ({type(exc).__name__}), "
                    f"yet it arrived converted to {ts_b}"
                )
            else:
                notes.append("original pixels not decodable by pydicom; compared as bytes")
        if px_a is not None:
            try:
                px_b = pixels(ds_b)
            except Exception as exc:
                problems.append(f"the arrival's pixels do not decode: {type(exc).__name__}: {exc}")
            else:
                if px_a.shape != px_b.shape or not np.array_equal(px_a, px_b):
                    bad = int(np.count_nonzero(px_a != px_b)) if px_a.shape == px_b.shape else "all"
                    problems.append(
                        f"pixel arrays differ ({bad} values; shapes {px_a.shape} {px_b.shape})"
                    )
    return problems, notes


@cache
def dcmtk_problems(key: str, arrival: Path) -> tuple[str, ...]:
    """The problems of ``compare(key, arrival, dcmtk=True)``: whether DCMTK delivered ``key``
    intact. The same reference arrival is judged in the tests of several senders (and of
    forwarder send and the daemon), so it is compared once and the answer kept."""
    return tuple(compare(key, arrival, dcmtk=True)[0])


def tag_text(t: int) -> str:
    return str(Tag(t))


DCMCONV = "/usr/bin/dcmconv"
_DCMCONV_TS = {
    "1.2.840.10008.1.2": "+ti",
    "1.2.840.10008.1.2.1": "+te",
    "1.2.840.10008.1.2.2": "+tb",
    "1.2.840.10008.1.2.1.99": "+td",
}


def transfer_syntax_of(path: Path) -> str:
    with quiet():
        meta = pydicom.dcmread(path, force=True, stop_before_pixels=True).file_meta
    return str(getattr(meta, "TransferSyntaxUID", "") or "")


def dcmtk_encoding(key: str, transfer_syntax: str, work: Path) -> Path | None:
    """DCMTK's own encoding of source ``key`` in ``transfer_syntax`` (dcmconv, the same library
    dcmsend and storescu convert with), or None if dcmconv cannot write it."""
    src = by_key()[key]
    out = work / "dcmconv" / f"{key.replace('/', '__')}.{transfer_syntax}.dcm"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flag = _DCMCONV_TS.get(transfer_syntax)
    if flag is None and transfer_syntax != src.transfer_syntax:
        return None  # a compressed syntax the pusher did not start from: not DCMTK's doing
    proc = subprocess.run(
        # -p: no Data Set Trailing Padding; a network sender's data set has none (dcmsend and
        # storescu send the data set without it)
        [DCMCONV, "-p", *([flag] if flag else []), str(src.path), str(out)],
        capture_output=True,
        timeout=60,
    )
    return out if proc.returncode == 0 and out.exists() else None


def dataset_bytes(path: Path) -> tuple[str, bytes] | None:
    """(transfer syntax, the bytes after the meta header) of a Part 10 file, or None."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return None
    pos, ts = 132, ""
    while pos + 8 <= len(data) and int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        elem = int.from_bytes(data[pos + 2 : pos + 4], "little")
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            start = pos + 12
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            start = pos + 8
        if elem == 0x0010:
            ts = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    return ts, data[pos:]


def byte_exact(key: str, arrival: Path) -> str:
    """ "" when ``arrival`` (a bit-preserving storescp file) carries the original's data set byte
    for byte, or the arrival is in another transfer syntax (a conversion: compare() judges it);
    otherwise what differs. One trailing NUL after an odd-length data set is allowed (PS3.5
    even lengths on the wire)."""
    a, b = dataset_bytes(by_key()[key].path), dataset_bytes(arrival)
    if a is None or b is None or a[0] != b[0]:
        return ""
    x, y = a[1], b[1]
    if x == y or (len(x) % 2 == 1 and y == x + b"\0"):
        return ""
    first = next(
        (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y))
    )
    return (
        f"same transfer syntax {a[0]} but the data set is not byte-exact: {len(x)} bytes sent "
        f"from the file, {len(y)} stored, first difference at data set offset {first}"
    )


def command_mismatch(arrival: Path) -> str:
    """ "" when a storescp file's meta header (written from the C-STORE command's Affected SOP
    Class/Instance UID) names the data set's own SOP Class/Instance UID; otherwise both."""
    ds = read(arrival)
    meta = (
        str(ds.file_meta.get("MediaStorageSOPClassUID", "")),
        str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")),
    )
    own = (str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")))
    if meta == own:
        return ""
    return f"the C-STORE named SOP Class/Instance {meta}, the data set is {own}"


# -- patient data in logs ---------------------------------------------------------------------

#: Parts of the corpus's patient names that are words of any log, not a patient's.
_NOT_NAMES = frozenset(
    {"anonymized", "anonymous", "last", "first", "name", "lastname", "firstname", "test"}
)


@cache
def patient_values() -> tuple[str, ...]:
    """What would identify a patient of the corpus if a log showed it: each part of every
    Patient's Name (the family, given, ... components of each representation: four characters
    or more in ASCII, two or more otherwise, generic words left out), and every Patient ID and
    Other Patient ID of five characters or more (digits only: eight or more, shorter numbers
    are sizes and ports). A value that is part of a corpus file's path is left out: paths are
    logged, by design."""
    found: set[str] = set()
    for source in corpus():
        with quiet():
            try:
                ds = pydicom.dcmread(source.path, force=True, stop_before_pixels=True)
            except Exception:
                continue
            names = [ds.get("PatientName"), *(ds.get("OtherPatientNames") or [])]
            ids = [ds.get("PatientID"), *(ds.get("OtherPatientIDs") or [])]
        for name in names:
            for part in re.split(r"[\^=]", str(name or "")):
                part = part.strip()
                if part.lower() in _NOT_NAMES:
                    continue
                if len(part) >= (4 if part.isascii() else 2):
                    found.add(part)
        for value in ids:
            text = str(value or "").strip()
            if len(text) >= (8 if text.isdigit() else 5):
                found.add(text)
    paths = " ".join(s.key for s in corpus())
    return tuple(sorted(v for v in found if v not in paths))


def patient_data_in(log: str) -> list[str]:
    """The lines of ``log`` that show a value of :func:`patient_values` (as a word, for ASCII
    values), each with the value: empty when forwarder kept patient data out of its log."""
    found = []
    for value in patient_values():
        pattern = re.escape(value)
        if value.isascii():
            pattern = rf"(?<![\w.]){pattern}(?![\w.])"
        for match in re.finditer(pattern, log):
            start = log.rfind("\n", 0, match.start()) + 1
            end = log.find("\n", match.end())
            found.append(f"{value!r}: {log[start : end if end >= 0 else None][:300]}")
    return found
