"""The queue's SQLite connection: opening it, pragmas, schema, and transactions under one lock.

:class:`Store` is the base every part of :class:`forwarder.queue.Queue` builds on: it opens the
database file (creating and migrating the schema), sets the pragmas durability relies on, and
hands its parts one write or read transaction at a time (``_write``, ``_read``; long reads,
``_scan``, on a second connection that never holds up the writer), turning any
SQLite error into a :class:`~forwarder.errors.QueueError` that names the file and the
operation. It also holds the small helpers the parts share to build statement parameters.

It holds no statement of the state machine and no query: those live in the parts
(:mod:`~forwarder.queue.jobs`, :mod:`~forwarder.queue.finishing`, ...) and in
:mod:`~forwarder.queue.sql`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Self

from forwarder.errors import QueueError, QueueSchemaError
from forwarder.queue.records import NORMAL_RANK, FileEntry
from forwarder.queue.sql import (
    COMMITMENT_DDL,
    COMMITMENT_JOB_COLUMNS,
    COMMITMENT_STATS_COLUMNS,
    DDL,
    FIND_COLUMNS,
    FIND_INDEXES,
    ORIGIN_COLUMNS,
    PAUSED_TABLE,
    PRIORITY_INDEX,
    SENT_UIDS_COLUMN,
    UID_MAP_DDL,
)

logger = logging.getLogger(__name__)

# 2: the problems table; 3: jobs.stale; 4: the Study/Series UIDs and Accession Number of files;
# 5: the origin of files received through `listen` (calling/called AE, peer, association);
# 6: the uid_map table (deidentify, issue 15);
# 7: jobs.priority and the paused_destinations table (issue 16, flow control)
# 8: proof of delivery (jobs.commitment, commit_txn, resends; the commitments table; issue 14)
# 9: files.dataset_offset (the sender takes the meta header from the queue; issue 13)
# 10: jobs.sent_uids (the proof of delivery asks by the UIDs a job was sent with)
SCHEMA_VERSION = 10

_FIRST_NAP = 50e-6  # seconds: the first wait for another process's write lock
_LAST_NAP = 2e-3  # and the longest, while it is held longer
# Between the transactions of a long job cut into slices (prune, failing a removed
# destination's jobs): longer than a writer of another process naps between two tries, so the
# listener's receiving process gets in, and the daemon's own threads take the lock meanwhile.
SLICE_PAUSE = 2.5 * _LAST_NAP


def clock(now: float | None) -> float:
    """``now``, or the current time when the caller gave none."""
    return time.time() if now is None else now


def ids_json(ids: Iterable[int]) -> str:
    return json.dumps([int(i) for i in ids])


def file_values(entry: FileEntry) -> dict[str, object]:
    """The statement parameters of a file's row (INSERT_FILES' objects, a replacement's
    UPDATE)."""
    return {
        "path": entry.path,
        "rel_path": entry.rel_path,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "sop_class_uid": entry.sop_class_uid,
        "sop_instance_uid": entry.sop_instance_uid,
        "transfer_syntax": entry.transfer_syntax,
        "dataset_offset": entry.dataset_offset,
        **find_values(entry),
        **origin_values(entry),
    }


def find_values(entry: FileEntry) -> dict[str, str | None]:
    """The statement parameters of what ``forwarder find`` looks a file up by (NULL: none)."""
    return {
        "study_instance_uid": _text(entry.study_instance_uid),
        "series_instance_uid": _text(entry.series_instance_uid),
        "accession_number": _text(entry.accession_number),
    }


def origin_values(entry: FileEntry) -> dict[str, str | None]:
    """The statement parameters of where a file came from (NULL: the watch folder)."""
    return {
        "calling_ae": _text(entry.calling_ae),
        "called_ae": _text(entry.called_ae),
        "peer": _text(entry.peer),
        "association": _text(entry.association),
    }


def _text(value: str) -> str | None:
    """A recorded value: NULL for none; without NUL characters (a malformed header's), which
    the batch statements' JSON would cut the value at (enqueue_many)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value or None


#: Where a file goes: destination names (normal priority), or name -> priority rank
#: (:data:`~forwarder.queue.records.PRIORITY_RANK`), in order.
Routed = Sequence[str] | Mapping[str, int]


def routed_to(destinations: Routed) -> list[str]:
    """The destinations in order, without duplicates; a file must go somewhere."""
    unique = list(dict.fromkeys(destinations))
    if not unique:
        raise ValueError("a file must be enqueued for at least one destination")
    return unique


def ranked(destinations: Routed) -> dict[str, int]:
    """``{destination: priority rank}`` (names alone are normal priority); a file must go
    somewhere."""
    if isinstance(destinations, Mapping):
        ranks = {str(k): int(v) for k, v in destinations.items()}
    else:
        ranks = dict.fromkeys(destinations, NORMAL_RANK)
    routed_to(ranks)
    return ranks


def ranked_json(destinations: Routed) -> str:
    """:func:`ranked` as JSON."""
    return json.dumps(ranked(destinations))


class Store:
    """One SQLite connection shared by many threads, serialized by one lock; close it (or use
    ``with``). ``create=False`` refuses to create a missing database (for ``forwarder status``).
    ``read_only=True`` (``forwarder status``, ``find``) opens an existing database to read it
    and never writes, creates or migrates it: one of an older schema version is read as it
    is, since a daemon of an older forwarder may be running on it (until it is restarted, it
    would find its schema changed under it); a statement that version cannot answer raises
    :class:`~forwarder.errors.QueueSchemaError`, which says so and how to upgrade it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        create: bool = True,
        migrate: bool = True,
        read_only: bool = False,
        sync_commits: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
        if read_only:
            create = migrate = False
        # The version found on opening: older than SCHEMA_VERSION only when read_only.
        self._schema_version = SCHEMA_VERSION
        # False (SQLite's synchronous = NORMAL): a commit is not fsynced, only the log's next
        # sync makes it durable (any commit of a connection that syncs, or a checkpoint). A
        # process crash loses nothing either way; a power loss may drop its last commits. Only
        # for rows rebuilt from durable files after such a loss: the listener's receiving
        # process, whose objects are fsynced under incoming/.listen before their row is
        # written, and queued again by Listener.recover at the daemon's start when it is not
        # in the queue. One fsync fewer an object a modality waits for.
        self._sync_commits = sync_commits
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # Long reads (statistics, sweeps) run on a second connection with a lock of its own.
        self._scan_lock = threading.Lock()
        self._scanner: sqlite3.Connection | None = None
        self._busy_timeout = busy_timeout
        # Since when this connection's writer has waited for another connection's write lock
        # (None: not waiting): lock_waited(), for the daemon's watch on its child processes.
        self._waiting_since: float | None = None
        # False: a database of another schema version is refused, never upgraded (a process
        # that only adds rows beside the daemon, which may be of another version of forwarder)
        self._migrate = migrate
        if not create and not os.path.exists(self._path):
            raise QueueError(
                f"queue database {self._path} does not exist: check the 'queue' key of the "
                "config, or start the daemon once to create it"
            )
        self._busy_pragma = f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}"
        try:
            # timeout= is SQLite's busy timeout: wait for another writer instead of failing.
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False:
            # worker threads share this connection, serialized by self._lock.
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "opening it") from exc
        try:
            self._configure(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "opening it") from exc
            raise
        self._conn = conn

    @property
    def path(self) -> str:
        return self._path

    @property
    def schema_version(self) -> int:
        """The schema version of the database as opened (older than :data:`SCHEMA_VERSION`
        only when read_only)."""
        return self._schema_version

    def _error(self, exc: sqlite3.Error, what: str) -> QueueError:
        if (
            self._schema_version < SCHEMA_VERSION
            and isinstance(exc, sqlite3.OperationalError)
            and str(exc).startswith("no such ")
        ):
            # A table or column this version has not (yet): read_only leaves it as it is.
            return self._older_error(f"cannot read it as it is ({exc} while {what})")
        hint = ""
        if "unable to open" in str(exc):
            directory = os.path.dirname(os.path.abspath(self._path))
            hint = f" (does {directory} exist, and may this user write to it?)"
        elif "not a database" in str(exc):
            hint = " (is the 'queue' key pointing at some other file?)"
        return QueueError(f"queue database {self._path}: {exc} while {what}{hint}")

    def _older_error(self, why: str) -> QueueSchemaError:
        return QueueSchemaError(
            f"queue database {self._path} is at schema {self._schema_version}, this forwarder "
            f"reads {SCHEMA_VERSION} and {why}; restart the daemon (systemctl restart "
            "forwarder) to upgrade it",
            found=self._schema_version,
            wanted=SCHEMA_VERSION,
        )

    def _configure(self, conn: sqlite3.Connection) -> None:
        if self._read_only:
            self._configure_reader(conn)
            return
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Must be chosen before the first table exists (and before WAL): lets prune() hand
            # freed pages back to the filesystem without a VACUUM that locks out the daemon.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # WAL: readers (forwarder status) and the daemon's writer do not block each other, and a
        # commit is one append to the log. The mode is stored in the file.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueError(
                f"queue database {self._path}: cannot use write-ahead logging (journal mode "
                f"stays {mode!r}); put the queue on a local filesystem"
            )
        # FULL: fsync the log on every commit. With NORMAL a power loss can drop the last commits:
        # a lost ack would make a job look READY for a file already moved to done/. (NORMAL only
        # where the caller says its rows can be rebuilt: ``sync_commits``.)
        conn.execute("PRAGMA synchronous = " + ("FULL" if self._sync_commits else "NORMAL"))
        # prune() relies on ON DELETE CASCADE from files to jobs; SQLite leaves it off by default.
        conn.execute("PRAGMA foreign_keys = ON")
        # After a checkpoint, shrink the -wal file back to 64 MiB so a burst does not pin the disk.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"queue database {self._path} has schema version {version}, newer than this "
                f"forwarder understands ({SCHEMA_VERSION}); upgrade forwarder"
            )
        if version < SCHEMA_VERSION and not self._migrate:
            raise QueueSchemaError(
                f"queue database {self._path} has schema version {version}, this forwarder "
                f"writes {SCHEMA_VERSION}; not upgrading it here",
                found=version,
                wanted=SCHEMA_VERSION,
            )
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in DDL:
                    conn.execute(statement)
                columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                if "stale" not in columns:  # a version 1 or 2 database
                    conn.execute("ALTER TABLE jobs ADD COLUMN stale INTEGER NOT NULL DEFAULT 0")
                present = {r[1] for r in conn.execute("PRAGMA table_info(files)")}
                for column in FIND_COLUMNS:  # a version 1 to 3 database: NULL for its files
                    if column not in present:
                        conn.execute(f"ALTER TABLE files ADD COLUMN {column} TEXT")
                for statement in FIND_INDEXES:
                    conn.execute(statement)
                # -- schema version 5 (listen: where a file came from) ------------------------
                # A version 1 to 4 database: NULL for its files (they came from the watch folder).
                present = {r[1] for r in conn.execute("PRAGMA table_info(files)")}
                for column in ORIGIN_COLUMNS:
                    if column not in present:
                        conn.execute(f"ALTER TABLE files ADD COLUMN {column} TEXT")
                # -- end of schema version 5 ------------------------------------------------------
                # -- schema version 6 (issue 15, deidentify): the UID map; a new table, so an
                # older database only gains it (CREATE ... IF NOT EXISTS).
                conn.execute(UID_MAP_DDL)
                # -- end of schema version 6
                # -- schema version 7 (issue 16, flow control): a priority per job (older jobs are
                # normal) and the destinations an operator paused.
                if "priority" not in columns:
                    conn.execute(
                        "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL "
                        f"DEFAULT {NORMAL_RANK}"
                    )
                conn.execute(PRIORITY_INDEX)
                conn.execute(PAUSED_TABLE)
                # -- end of schema version 7
                # -- schema version 8 (issue 14): proof of delivery; idempotent --------------
                job_columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                for name, decl in COMMITMENT_JOB_COLUMNS:
                    if name not in job_columns:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
                stats_columns = {r[1] for r in conn.execute("PRAGMA table_info(destination_stats)")}
                for name, decl in COMMITMENT_STATS_COLUMNS:
                    if name not in stats_columns:
                        conn.execute(f"ALTER TABLE destination_stats ADD COLUMN {name} {decl}")
                for statement in COMMITMENT_DDL:
                    conn.execute(statement)
                # -- end of schema version 8 --------------------------------------------------
                # -- schema version 9: where each file's data set starts, so the sender need
                # not read the meta header again (0 for older files: it does).
                present = {r[1] for r in conn.execute("PRAGMA table_info(files)")}
                if "dataset_offset" not in present:
                    conn.execute(
                        "ALTER TABLE files ADD COLUMN dataset_offset INTEGER NOT NULL DEFAULT 0"
                    )
                # -- end of schema version 9 --------------------------------------------------
                # -- schema version 10: the UIDs a job was sent with (NULL for the jobs of an
                # older database: their proof works them out from the routes, as before).
                job_columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                name, decl = SENT_UIDS_COLUMN
                if name not in job_columns:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
                # -- end of schema version 10 -------------------------------------------------
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    def _configure_reader(self, conn: sqlite3.Connection) -> None:
        """read_only: no pragma that writes the file (journal mode, auto_vacuum), no schema
        change, and query_only so that nothing this connection runs writes either."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueSchemaError(
                f"queue database {self._path} has schema version {version}, newer than this "
                f"forwarder understands ({SCHEMA_VERSION}); upgrade forwarder",
                found=version,
                wanted=SCHEMA_VERSION,
            )
        self._schema_version = version
        conn.execute("PRAGMA query_only = ON")

    # -- connection plumbing ---------------------------------------------------------------

    def _connection(self, what: str) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"queue database {self._path}: closed, while {what}")
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; any sqlite3 error becomes a QueueError."""
        with self._lock:
            conn = self._connection(what)
            try:
                self._begin_immediate(conn)
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc

    def _in_slices(self, what: str, step: Callable[[sqlite3.Connection], bool]) -> None:
        """A long job cut into slices: ``step`` runs in one write transaction after another,
        :data:`SLICE_PAUSE` apart, until it says (returns True) that its slice was the last.
        A job stopped half way has committed its slices and leaves the rest for its next call."""
        while True:
            with self._write(what) as conn:
                last = step(conn)
            if last:
                return
            time.sleep(SLICE_PAUSE)

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``: take the write lock now, so reads inside see what they will
        update. While another process writes (the daemon's receiving process queues what it
        received, a command pauses a destination), wait in naps of 50 us growing to 2 ms, up to
        the busy timeout: SQLite's own busy handler first sleeps a whole millisecond, longer
        than most transactions here hold the lock, and a modality waits for each object's."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            nap, deadline = _FIRST_NAP, time.monotonic() + self._busy_timeout
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    # The extended code: SQLITE_BUSY_RECOVERY (another connection rebuilds
                    # the WAL index) is a wait too, as for SQLite's own busy handler.
                    code = getattr(exc, "sqlite_errorcode", None)
                    busy = code is not None and code & 0xFF == sqlite3.SQLITE_BUSY
                    if not busy or time.monotonic() >= deadline:
                        raise
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                time.sleep(nap)
                nap = min(nap * 2, _LAST_NAP)
        finally:
            self._waiting_since = None
            conn.execute(self._busy_pragma)

    def lock_waited(self) -> float:
        """Seconds this connection's writer has been waiting for another connection (another
        process) to let go of the write lock; 0.0 when it is not waiting. Thread-safe: what
        the daemon's supervision of its child processes reads, to tell a child stopped inside
        a transaction (SIGSTOP, a hang) from one merely quiet."""
        since = self._waiting_since
        return 0.0 if since is None else max(time.monotonic() - since, 0.0)

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A short read transaction (one snapshot across statements) under the lock."""
        with self._lock, self._snapshot(lambda: self._connection(what), what) as conn:
            yield conn

    @contextmanager
    def _scan(self, what: str) -> Iterator[sqlite3.Connection]:
        """A long read (statistics, counts, sweeps over every queued file) in one snapshot, on a
        second connection: it never holds the lock every claim, ack and enqueue takes, and with
        write-ahead logging a reader does not block the writer. Scans wait for one another."""
        with self._scan_lock, self._snapshot(lambda: self._scan_connection(what), what) as conn:
            yield conn

    @contextmanager
    def _snapshot(
        self, connection: Callable[[], sqlite3.Connection], what: str
    ) -> Iterator[sqlite3.Connection]:
        """One read transaction on ``connection()`` (its caller holds the right lock)."""
        try:
            conn = connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error(exc, what) from exc

    def _scan_connection(self, what: str) -> sqlite3.Connection:
        self._connection(what)  # closed: say so
        if self._scanner is None:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            self._scanner = conn
        return self._scanner

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback failed; SQLite rolls back when the connection closes")

    def close(self) -> None:
        with self._scan_lock:
            if self._scanner is not None:
                scanner, self._scanner = self._scanner, None
                try:
                    scanner.close()
                except sqlite3.Error as exc:
                    raise self._error(exc, "closing it") from exc
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise self._error(exc, "closing it") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
