"""The status documents: what ``forwarder status`` and ``find`` print and the status page serves.

:func:`read_status` reads the queue database (counts per destination, each destination's last
recorded up/down state, files waiting to be moved out of incoming), so ``forwarder status`` in
another process and the daemon's own page tell the same story. :func:`recent_failures` reads the
``NAME.error.json`` reports in ``failed/`` (the files still there: ``forwarder retry`` removes a
report with its file). :class:`RateMeter` turns samples of the cumulative done counters into
files stored per minute. :func:`find_document` is what ``forwarder find --json`` prints and
``/api/find`` serves: the files :meth:`Queue.find` found, as plain values; :func:`job_summary`
says one destination's state of such a file in words, for ``find``'s text and the page alike.

Rendering (text, HTML) is not here: the text is :mod:`forwarder.cli.status`'s and
:mod:`forwarder.cli.find`'s, the page and ``/api/status`` are
:mod:`forwarder.daemon.status_page`'s (its search box :mod:`forwarder.daemon.status_find`'s).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forwarder.queue import FileState, FoundFile, FoundJob, JobStatus, Queue

ERROR_SUFFIX = ".error.json"
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_REPORT_BYTES = 256 * 1024  # a report is a few hundred bytes; never read a huge file whole


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """What the queue database says, per destination and about files waiting to be moved."""

    destinations: dict[str, dict[str, Any]]  # name -> the contract's ``status --json`` object
    since: dict[str, float]  # name -> epoch seconds of its recorded state (absent: never)
    waiting_to_move: int  # files delivered or failed but not yet out of incoming
    finishing_error: str | None  # why the last such move failed, if one did

    def document(self) -> dict[str, Any]:
        """Exactly the contract's ``forwarder status --json`` shape."""
        return {"destinations": self.destinations}


def _empty() -> dict[str, Any]:
    return {
        "pending": 0,
        "in_flight": 0,
        "done": 0,
        "failed": 0,
        "oldest_pending_seconds": None,
        "last_error": None,
    }


def read_status(
    queue: Queue | None, destination_names: Sequence[str], proof: Sequence[str] = ()
) -> QueueStatus:
    """The status of every configured destination (zeros when ``queue`` is None: the daemon
    never ran) and of every destination the queue has rows for. Destinations in ``proof``
    (storage commitment or verify_by_query) and any with commitment activity also show
    ``stored`` (what the peer answered Success for, the same as ``done``), ``awaiting_commitment``,
    ``committed`` and ``commitment_failures`` (instances reported not committed, each time:
    sent again or failed). Raises ForwarderError when the database cannot be read."""
    result: dict[str, dict[str, Any]] = {}
    states: dict[str, Any] = {}
    paused: dict[str, float] = {}
    waiting = 0
    finishing_error: str | None = None
    commitment: dict[str, Any] = {}
    if queue is not None:
        commitment = queue.commitment_counts()
        stats = queue.stats(destinations=destination_names)
        waiting = queue.waiting_to_move()
        problem = queue.problems().get("finish")
        states = queue.destination_states()
        paused = queue.paused()
        if problem is not None:
            finishing_error = problem[0]
        for name, s in stats.items():
            result[name] = {
                "pending": s.pending,
                "in_flight": s.in_flight,
                "done": s.done,
                "failed": s.failed,
                "oldest_pending_seconds": s.oldest_pending_seconds,
                "last_error": s.last_error,
            }
    for name in destination_names:
        result.setdefault(name, _empty())
    for name in set(proof) | set(commitment):
        r = result.setdefault(name, _empty())
        c = commitment.get(name)
        r["stored"] = r["done"]
        r["awaiting_commitment"] = c.awaiting if c else 0
        r["committed"] = c.committed if c else 0
        r["commitment_failures"] = c.uncommitted if c else 0
    since: dict[str, float] = {}
    for name, r in result.items():
        # Never recorded: the daemon has not needed an association yet, nothing says it is down.
        st = states.get(name)
        r["state"] = st.state if st is not None else "up"
        r["state_since"] = iso_local(st.since) if st is not None else None
        if st is not None:
            since[name] = st.since
            if st.state == "down" and st.error:
                r["last_error"] = st.error  # what holds every file, not one file's last failure
        if name in paused:  # `forwarder pause`: shown at once, whether the daemon runs or not
            # since the pause itself (a daemon started later records its start)
            since[name] = paused[name]
            r["state_since"] = iso_local(paused[name])
            r["state"] = "paused"
        elif r["state"] == "paused":  # `forwarder resume`: at once too (the daemon may be off)
            since.pop(name, None)
            r["state"], r["state_since"] = "up", None
    return QueueStatus(result, since, waiting, finishing_error)


def status_document(queue: Queue | None, destination_names: Sequence[str]) -> dict[str, Any]:
    """``forwarder status --json``'s document (see :func:`read_status`)."""
    return read_status(queue, destination_names).document()


def iso_local(at: float) -> str:
    """Local time with its UTC offset, to the second (ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))


def iso_utc(at: float) -> str:
    """UTC to the second, ``Z`` suffix (as ``NAME.error.json`` writes its times)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_age(seconds: float) -> str:
    """``42s``, ``17m``, ``3h05m``, ``2d4h``."""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


# -- find -------------------------------------------------------------------------------------

# A job's status as an operator says it.
_JOB_STATES = {
    JobStatus.READY: "pending",
    JobStatus.CLAIMED: "sending",
    JobStatus.DONE: "stored",
    JobStatus.FAILED: "failed",
}


def _where(f: FoundFile) -> str:
    """``incoming``, ``done``, ``failed``, or ``moving to done`` / ``moving to failed``."""
    if f.state is FileState.QUEUED or f.outcome is None:
        return "incoming"
    if f.state is FileState.FINISHING:
        return f"moving to {f.outcome.value}"
    return f.outcome.value


def _dicom_status(status: int | None) -> str | None:
    return None if status is None else f"0x{status:04X}"


def _job(j: FoundJob) -> dict[str, Any]:
    return {
        "destination": j.destination,
        "state": _JOB_STATES[j.status],
        "status": j.status.value,
        "attempts": j.attempts,
        "next_attempt_at": None if j.next_attempt_at is None else iso_local(j.next_attempt_at),
        "last_status": _dicom_status(j.last_status),
        "last_error": j.last_error,
        "finished_at": None if j.finished_at is None else iso_local(j.finished_at),
    }


def _origin(f: FoundFile) -> dict[str, str] | None:
    """Where a file received through ``listen`` came from (None: the watch folder)."""
    if f.origin is None:
        return None
    calling, called, peer, association = f.origin
    return {"calling_ae": calling, "called_ae": called, "peer": peer, "association": association}


def origin_text(origin: dict[str, str] | None) -> str | None:
    """``received from CT01 (10.1.2.3:5104, association 1f2e-7)``, or None."""
    if not origin:
        return None
    details = [x for x in (origin["peer"], origin["association"]) if x]
    if origin["association"]:
        details[-1] = f"association {origin['association']}"
    return f"received from {origin['calling_ae']}" + (f" ({', '.join(details)})" if details else "")


def listen_status(listen: Any, incoming: Path, ae_title: str) -> dict[str, Any] | None:
    """``status --json``'s ``listen`` object: the listener's port and AE title, the free space
    on the incoming filesystem and whether it is above ``min_free_space`` (the listener answers
    0xA700 to every object while it is not). None when ``listen`` is not configured."""
    if listen is None:
        return None
    try:
        st = os.statvfs(incoming)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    return {
        "port": listen.port,
        "ae_title": listen.ae_title or ae_title,
        "free_space": free,
        "min_free_space": listen.min_free_space,
        "accepting": free is None or free >= listen.min_free_space,
    }


def find_document(keys: Sequence[str], found: Sequence[FoundFile]) -> dict[str, Any]:
    """``forwarder find --json`` and ``/api/find``: the keys asked and, per file found, where it
    is now (``where``: incoming, done, failed; ``path``), its UIDs, the keys it matched (an
    Accession Number appears only there, as the key given) and its state per destination
    (``state``: pending, sending, stored or failed; the job's ``status``; ``last_status`` as
    hex)."""
    return {
        "keys": list(keys),
        "files": [
            {
                "file_id": f.file_id,
                "path": f.path,
                "rel_path": f.rel_path,
                "where": _where(f),
                "state": f.state.value,
                "matched": [{"key": key, "as": kind.value} for key, kind in f.matched],
                "sop_instance_uid": f.sop_instance_uid,
                "study_instance_uid": f.study_instance_uid,
                "series_instance_uid": f.series_instance_uid,
                "queued_at": iso_local(f.created_at),
                "finished_at": None if f.finished_at is None else iso_local(f.finished_at),
                "retried_as": f.retried_as,
                "origin": _origin(f),
                "destinations": [_job(j) for j in f.jobs],
            }
            for f in found
        ],
    }


def job_summary(d: dict[str, Any]) -> str:
    """One destination of a :func:`find_document` file in words: ``stored at T (status 0x0000,
    1 attempt)``, ``pending, next attempt at T (2 attempts): connection refused``..."""
    attempts = d["attempts"]
    details = [f"{attempts} attempt{'' if attempts == 1 else 's'}"]
    if d["last_status"]:
        details.insert(0, f"status {d['last_status']}")
    state = d["state"]
    if state == "pending" and d["next_attempt_at"]:
        head = f"pending, next attempt at {d['next_attempt_at']}"
    elif state in ("stored", "failed") and d["finished_at"]:
        head = f"{state} at {d['finished_at']}"
    else:
        head = state
    line = f"{head} ({', '.join(details)})"
    if d["last_error"] and state != "stored":
        line += f": {d['last_error']}"
    return line


# -- recent failures ---------------------------------------------------------------------------


def _reports(folder: Path) -> Iterator[tuple[float, str]]:
    """(mtime, path) of every ``NAME.error.json`` under ``folder`` (unreadable parts skipped)."""
    for dirpath, _dirnames, filenames in os.walk(folder, onerror=lambda _exc: None):
        for name in filenames:
            if name.endswith(ERROR_SUFFIX) and not name.startswith("."):
                path = os.path.join(dirpath, name)
                try:
                    yield os.stat(path).st_mtime, path
                except OSError:
                    continue  # retried (removed) meanwhile


def recent_failures(failed: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The ``limit`` newest reports in ``failed/``, newest first: ``path`` (of the failed file,
    relative to ``failed/``), ``failed_at``, ``reason``, ``sop_instance_uid`` and ``calling_ae``
    (received through ``listen``; when the report has them) and per destination its
    ``outcome``, DICOM ``status`` (hex), ``error`` and ``attempts``. Costs one stat per report
    in the folder and one read per report shown (the daemon's page keeps the folder's listing:
    :class:`forwarder.daemon.failed_folder.FailedFolder`)."""
    return failure_entries(failed, heapq.nlargest(limit, _reports(failed)))


def failure_entries(failed: Path, reports: Iterable[tuple[float, str]]) -> list[dict[str, Any]]:
    """:func:`recent_failures`'s entries of ``reports``, (mtime, path) pairs in order."""
    out: list[dict[str, Any]] = []
    for mtime, path in reports:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.loads(f.read(_MAX_REPORT_BYTES))
        except (OSError, ValueError):
            doc = None  # removed meanwhile, being replaced, or not ours: still a failed file
        if not isinstance(doc, dict):
            doc = {"reason": "(unreadable report)"}
        rel = _shown(Path(path).relative_to(failed).as_posix()[: -len(ERROR_SUFFIX)])
        entry: dict[str, Any] = {
            "path": rel,
            "failed_at": _text(doc.get("failed_at")) or iso_utc(mtime),
            "reason": _text(doc.get("reason")),
            "sop_instance_uid": _text(doc.get("sop_instance_uid")),
            "destinations": [],
        }
        calling_ae = _text(doc.get("calling_ae"))
        if calling_ae:  # received through listen
            entry["calling_ae"] = calling_ae
        results = doc.get("destinations")
        for r in results if isinstance(results, list) else []:
            if isinstance(r, dict):
                attempts = r.get("attempts")
                entry["destinations"].append(
                    {
                        "destination": _text(r.get("destination")),
                        "outcome": _text(r.get("outcome")),
                        "status": _text(r.get("status")),
                        "error": _text(r.get("error")),
                        "attempts": attempts if isinstance(attempts, int) else None,
                    }
                )
        out.append(entry)
    return out


def _text(value: object) -> str | None:
    return None if value is None else _shown(str(value))


def _shown(text: str) -> str:
    """``text`` with each lone surrogate (a byte of a file name that is not UTF-8, which the
    daemon sends to failed/ for that reason) as U+FFFD: what the page can encode."""
    return _SURROGATE.sub("\ufffd", text)


# -- rates -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float  # monotonic seconds
    done: Mapping[str, int]


class RateMeter:
    """Files stored per minute per destination, over the last ``window`` seconds, from samples
    of the cumulative done counters (the daemon samples every few seconds, and each page view
    adds one). Thread-safe: sampled by the service and read by the HTTP server's threads."""

    def __init__(
        self,
        window: float = 300.0,
        *,
        min_span: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._min_span = min_span  # closer samples replace each other: bounded memory
        self._clock = clock
        self._samples: deque[_Sample] = deque()
        self._lock = threading.Lock()

    def sample(self, done: Mapping[str, int], *, now: float | None = None) -> None:
        at = self._clock() if now is None else now
        with self._lock:
            s = self._samples
            if len(s) >= 2 and at - s[-2].at < self._min_span:
                s.pop()  # keep the first of a burst and the freshest
            s.append(_Sample(at, dict(done)))
            # Keep one sample at or before the window's start, so the span covers the window.
            while len(s) >= 2 and s[1].at <= at - self.window:
                s.popleft()

    def rates(self) -> tuple[dict[str, float | None], float | None]:
        """(destination -> files per minute, or None without two samples far enough apart;
        the seconds the rates are over)."""
        with self._lock:
            if len(self._samples) < 2:
                return {}, None
            first, last = self._samples[0], self._samples[-1]
        span = last.at - first.at
        if span < self._min_span:
            return {}, None
        rates: dict[str, float | None] = {}
        for name, done in last.done.items():
            before = first.done.get(name)
            rates[name] = None if before is None else max(0, done - before) * 60.0 / span
        return rates, span
