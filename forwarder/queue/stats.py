"""Statistics and problems: what ``forwarder status`` and the metrics read about the queue.

Per destination: jobs pending and in flight, the cumulative done and failed counters (bumped by
:mod:`~forwarder.queue.jobs` in the same commit as each ack, and kept across pruning), the age
of the oldest pending job and the last error. Besides those, the problems table holds what the
daemon cannot attach to a job (a file that cannot be moved out of incoming) and each
destination's last up/down state, so another process can show them.

None of this changes a job: the state machine is :mod:`~forwarder.queue.jobs`.

:meth:`~Statistics.stats` and :meth:`~Statistics.waiting_to_move` count the backlog (0.2-0.4 s
at 200k pending jobs), for every status line, scrape and page view: each keeps its last reading
with the database's ``PRAGMA data_version`` (it changes with every commit of any connection, in
this process or another), and answers from it while the database is unchanged. The answer is
what a new reading would say (the age of the oldest pending job is computed anew each time).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from forwarder.queue.records import DestinationState, DestinationStats, JobStatus
from forwarder.queue.sql import JOB_DESTINATIONS, LIVE_JOBS, UNFINISHED_JOB
from forwarder.queue.store import Store, clock

_STATE_PREFIX = "state:"  # problems-table keys of destination states
_LiveRows = list[tuple[str, str, int, float]]  # destination, status, jobs, oldest created_at
_TotalRows = list[tuple[str, int, int, str | None]]  # destination, done, failed, last error


class Statistics(Store):
    """Statistics and problems (a part of :class:`forwarder.queue.Queue`)."""

    # (scan connection, its data_version, what was read) of the last stats() and
    # waiting_to_move(); only read and set under the scan lock.
    _stats_memo: tuple[sqlite3.Connection, int, tuple[_LiveRows, _TotalRows]] | None = None
    _waiting_memo: tuple[sqlite3.Connection, int, int] | None = None

    def stats(
        self, *, now: float | None = None, destinations: Sequence[str] = ()
    ) -> dict[str, DestinationStats]:
        """Per destination (every one with rows, plus those named), sorted by name."""
        at = clock(now)
        with self._scan("reading destination statistics") as conn:
            version = _data_version(conn)
            memo = self._stats_memo
            if memo is not None and memo[0] is conn and memo[1] == version:
                live, totals = memo[2]
            else:
                # Per destination, by index: a GROUP BY over the whole table read every
                # finished job of the last 7 days (0.1-0.4 s at 200k jobs) each time.
                live = [
                    (name, *row)
                    for (name,) in conn.execute(JOB_DESTINATIONS).fetchall()
                    for row in conn.execute(LIVE_JOBS, {"destination": name}).fetchall()
                ]
                totals = conn.execute(
                    "SELECT destination, done_total, failed_total, last_error "
                    "FROM destination_stats"
                ).fetchall()
                self._stats_memo = (conn, version, (live, totals))
        pending: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        oldest: dict[str, float] = {}
        for destination, status, n, first in live:
            (pending if status == JobStatus.READY else in_flight)[destination] = n
            oldest[destination] = min(first, oldest.get(destination, first))
        by_total = {r[0]: r for r in totals}
        names = set(destinations) | set(pending) | set(in_flight) | set(by_total)
        result: dict[str, DestinationStats] = {}
        for name in sorted(names):
            total = by_total.get(name)
            result[name] = DestinationStats(
                pending=pending.get(name, 0),
                in_flight=in_flight.get(name, 0),
                done=total[1] if total else 0,
                failed=total[2] if total else 0,
                oldest_pending_seconds=max(0.0, at - oldest[name]) if name in oldest else None,
                last_error=total[3] if total else None,
            )
        return result

    def counts(self) -> dict[str, int]:
        """Rows per job status (every JobStatus value present) — pruned rows not included."""
        with self._scan("counting jobs") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = {s.value: 0 for s in JobStatus}
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def set_problem(self, key: str, text: str, *, now: float | None = None) -> None:
        """Record a condition for ``forwarder status`` (replaces the previous one of ``key``)."""
        with self._write(f"recording problem {key}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO problems (key, text, at) VALUES (:key, :text, :at)",
                {"key": key, "text": text, "at": clock(now)},
            )

    def clear_problem(self, key: str) -> None:
        with self._write(f"clearing problem {key}") as conn:
            conn.execute("DELETE FROM problems WHERE key = :key", {"key": key})

    def problems(self) -> dict[str, tuple[str, float]]:
        """key -> (text, time) of every recorded problem."""
        with self._read("reading problems") as conn:
            rows = conn.execute("SELECT key, text, at FROM problems").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def set_destination_state(
        self, destination: str, state: str, error: str | None, *, since: float | None = None
    ) -> None:
        """Record that ``destination`` is ``state`` ("up" or "down", with why) since ``since``,
        for ``forwarder status`` in another process (kept in the problems table)."""
        text = json.dumps({"state": state, "error": error})
        self.set_problem(f"{_STATE_PREFIX}{destination}", text, now=since)

    def clear_destination_state(self, destination: str) -> None:
        """Forget ``destination``'s recorded state (it is no longer configured)."""
        self.clear_problem(f"{_STATE_PREFIX}{destination}")

    def destination_states(self) -> dict[str, DestinationState]:
        """destination -> its last recorded state (destinations never recorded are absent)."""
        states: dict[str, DestinationState] = {}
        for key, (text, at) in self.problems().items():
            if not key.startswith(_STATE_PREFIX):
                continue
            try:
                value = json.loads(text)
                state = DestinationState(str(value["state"]), value.get("error"), float(at))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # written by a different version: not worth failing status for
            states[key[len(_STATE_PREFIX) :]] = state
        return states

    def waiting_to_move(self) -> int:
        """Files whose jobs are all terminal but which are not yet out of incoming."""
        with self._scan("counting files waiting to be moved") as conn:
            version = _data_version(conn)
            memo = self._waiting_memo
            if memo is not None and memo[0] is conn and memo[1] == version:
                return memo[2]
            row = conn.execute(
                f"""SELECT COUNT(*) FROM files AS f WHERE f.state = 'FINISHING'
                    OR (f.state = 'QUEUED' AND NOT EXISTS ({UNFINISHED_JOB}))"""
            ).fetchone()
            self._waiting_memo = (conn, version, int(row[0]))
        return int(row[0])


def _data_version(conn: sqlite3.Connection) -> int:
    """The database's version as ``conn`` sees it (it begins the read transaction: what is
    read next in it is of this version). Another connection's commit changes it; ``conn``,
    the query-only scan connection, commits nothing."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
