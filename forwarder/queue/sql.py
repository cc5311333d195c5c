"""The queue's schema and SQL statements (named parameters only, never formatted in)."""

from __future__ import annotations

# The status literals below must match JobStatus / FileState / Finish (tests check the CHECKs).
DDL = (
    """CREATE TABLE IF NOT EXISTS files (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sop_class_uid TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('QUEUED', 'FINISHING', 'FINISHED')),
        outcome TEXT CHECK (outcome IN ('done', 'failed')),
        final_path TEXT,
        retried_as INTEGER,
        created_at REAL NOT NULL,
        finished_at REAL,
        study_instance_uid TEXT,
        series_instance_uid TEXT,
        accession_number TEXT,
        calling_ae TEXT,
        called_ae TEXT,
        peer TEXT,
        association TEXT,
        dataset_offset INTEGER NOT NULL DEFAULT 0
    )""",
    # enqueue is idempotent per path while the file is unfinished; once finished, the same name
    # may be dropped into incoming again
    """CREATE UNIQUE INDEX IF NOT EXISTS files_unfinished_path
        ON files (path) WHERE state != 'FINISHED'""",
    "CREATE INDEX IF NOT EXISTS files_state ON files (state, finished_at)",
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        destination TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('READY', 'CLAIMED', 'DONE', 'FAILED')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        claimed_at REAL,
        last_status INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        finished_at REAL,
        -- the file was replaced while this job was CLAIMED: 1 send it again, 2 its new
        -- version is not routed here (the job is deleted when its claim ends)
        stale INTEGER NOT NULL DEFAULT 0,
        priority INTEGER NOT NULL DEFAULT 1,  -- 0 urgent, 1 normal, 2 low (schema 5)
        UNIQUE (file_id, destination)
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (destination, status, next_attempt_at)",
    """CREATE TABLE IF NOT EXISTS destination_stats (
        destination TEXT PRIMARY KEY,
        done_total INTEGER NOT NULL DEFAULT 0,
        failed_total INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at REAL
    )""",
    # Conditions the daemon cannot attach to a job (a file that cannot be moved out of
    # incoming), kept here so `forwarder status`, another process, can show them.
    """CREATE TABLE IF NOT EXISTS problems (
        key TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        at REAL NOT NULL
    )""",
)

# Schema version 4: the values `forwarder find` looks files up by, without a scan. Run after
# FIND_COLUMNS were added to a version 3 (or older) files table.
FIND_COLUMNS = ("study_instance_uid", "series_instance_uid", "accession_number")
FIND_INDEXES = (
    "CREATE INDEX IF NOT EXISTS files_sop_instance ON files (sop_instance_uid)",
    "CREATE INDEX IF NOT EXISTS files_study ON files (study_instance_uid)",
    "CREATE INDEX IF NOT EXISTS files_series ON files (series_instance_uid)",
    "CREATE INDEX IF NOT EXISTS files_accession ON files (accession_number)",
)

# Schema version 5: where a file received through `listen` came from (NULL: the watch folder).
# Added to an older files table by store.py's migration.
ORIGIN_COLUMNS = ("calling_ae", "called_ae", "peer", "association")
# -- Schema version 8 (issue 14, proof of delivery): its own block, for the integrator --------
# jobs.commitment: 0 not required (or not yet stored), 1 stored and awaiting a commitment request
# (or a verifying query), 2 requested (in the transaction jobs.commit_txn), 3 committed. A DONE
# job with commitment 1 or 2 is not finished: its file stays in incoming. jobs.resends counts the
# times an uncommitted instance was sent again.
COMMITMENT_JOB_COLUMNS = (
    ("commitment", "INTEGER NOT NULL DEFAULT 0"),
    ("commit_txn", "TEXT"),
    ("resends", "INTEGER NOT NULL DEFAULT 0"),
)
COMMITMENT_STATS_COLUMNS = (
    ("committed_total", "INTEGER NOT NULL DEFAULT 0"),
    ("uncommitted_total", "INTEGER NOT NULL DEFAULT 0"),
)
COMMITMENT_DDL = (
    """CREATE TABLE IF NOT EXISTS commitments (
        uid TEXT PRIMARY KEY,
        destination TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('stgcmt', 'query')),
        state TEXT NOT NULL CHECK (state IN ('REQUESTED', 'RESOLVED', 'CANCELLED')),
        created_at REAL NOT NULL,
        deadline REAL NOT NULL,
        resolved_at REAL,
        outcome TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS commitments_open ON commitments (state, deadline)",
    """CREATE INDEX IF NOT EXISTS jobs_awaiting_commitment ON jobs (destination, commitment)
        WHERE commitment IN (1, 2)""",
    "CREATE INDEX IF NOT EXISTS jobs_commit_txn ON jobs (commit_txn) WHERE commit_txn IS NOT NULL",
)
# -- end of schema version 8 ------------------------------------------------------------------
# -- Schema version 10: the UIDs a job was sent with, for its proof of delivery ---------------
# jobs.sent_uids, set when a job is acked DONE: '' sent with the file's own Study, Series and
# SOP Instance UID; a JSON array of the three when its changes (deidentify, modify) made any
# differ; NULL not recorded (stored before version 10, or not DONE): the proof works them out
# from the routes in force, as before. The proof asks the destination by these, never by what
# a reload or restart since would send.
SENT_UIDS_COLUMN = ("sent_uids", "TEXT")
# The jobs of an ack sent with other UIDs than their file's: :sent is a JSON array of
# [job id, [Study, Series, SOP Instance UID]]; run after ACK_TERMINAL in its transaction
# (only the jobs it made DONE: a stale one went back to READY).
RECORD_SENT_UIDS = """
    UPDATE jobs SET sent_uids = json_extract(m.value, '$[1]')
    FROM json_each(:sent) AS m
    WHERE jobs.id = json_extract(m.value, '$[0]') AND jobs.status = 'DONE'"""
# Before a QUEUED file's row takes a replacing version's header values (replace_file): its
# DONE jobs recorded as sent with the file's own UIDs ('') get those UIDs written out, the
# old version's. A destination the new version is not routed to keeps what it stored (DONE,
# maybe awaiting its proof), and '' would otherwise read as the new version's UIDs: its proof
# would ask for an object it was never sent ("not held": sent again, or failed).
FREEZE_OWN_SENT_UIDS = """
    UPDATE jobs SET sent_uids = (
        SELECT json_array(COALESCE(f.study_instance_uid, ''),
                          COALESCE(f.series_instance_uid, ''), f.sop_instance_uid)
        FROM files AS f WHERE f.id = jobs.file_id)
    WHERE file_id IN (SELECT id FROM files
                      WHERE path = :path AND state != 'FINISHED' AND +state = 'QUEUED')
      AND status = 'DONE' AND sent_uids = ''"""
# -- end of schema version 10 -----------------------------------------------------------------

# Every destination with a job row, one index seek each (SELECT DISTINCT walks the whole index:
# 7 days of finished jobs, every few seconds for the status line and every page and scrape).
JOB_DESTINATIONS = """
    WITH RECURSIVE d(name) AS (
        SELECT MIN(destination) FROM jobs
        UNION ALL
        SELECT (SELECT MIN(destination) FROM jobs WHERE destination > d.name)
        FROM d WHERE d.name IS NOT NULL)
    SELECT name FROM d WHERE name IS NOT NULL"""

# One destination's jobs pending and in flight, by the claim index: as many rows as are live.
LIVE_JOBS = """
    SELECT status, COUNT(*), MIN(created_at) FROM jobs
    WHERE destination = :destination AND status IN ('READY', 'CLAIMED')
    GROUP BY status"""

UNFINISHED_JOB = (
    "SELECT 1 FROM jobs AS u WHERE u.file_id = f.id AND (u.status IN ('READY', 'CLAIMED') "
    "OR (u.status = 'DONE' AND u.commitment IN (1, 2)))"
)

# Files in one statement (enqueue_many): :rows is a JSON array of objects named as the
# columns. Enqueue is idempotent per path while the file is unfinished: a path with an
# unfinished row (an earlier copy in the same array included) is skipped; RETURNING says
# which paths were inserted.
INSERT_FILES = """
    INSERT INTO files (path, rel_path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                       transfer_syntax, study_instance_uid, series_instance_uid,
                       accession_number, calling_ae, called_ae, peer, association, state,
                       created_at, dataset_offset)
    SELECT json_extract(value, '$.path'), json_extract(value, '$.rel_path'),
           json_extract(value, '$.size'), json_extract(value, '$.mtime_ns'),
           json_extract(value, '$.sop_class_uid'), json_extract(value, '$.sop_instance_uid'),
           json_extract(value, '$.transfer_syntax'),
           json_extract(value, '$.study_instance_uid'),
           json_extract(value, '$.series_instance_uid'),
           json_extract(value, '$.accession_number'), json_extract(value, '$.calling_ae'),
           json_extract(value, '$.called_ae'), json_extract(value, '$.peer'),
           json_extract(value, '$.association'), 'QUEUED', :now,
           json_extract(value, '$.dataset_offset')
    FROM json_each(:rows) WHERE true ORDER BY key
    ON CONFLICT (path) WHERE state != 'FINISHED' DO NOTHING
    RETURNING id, path"""

# One file (a received object is queued alone while its modality waits for the answer):
# bound directly, not through JSON, which costs this process a third of its enqueue.
INSERT_FILE = """
    INSERT INTO files (path, rel_path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                       transfer_syntax, study_instance_uid, series_instance_uid,
                       accession_number, calling_ae, called_ae, peer, association, state,
                       created_at, dataset_offset)
    VALUES (:path, :rel_path, :size, :mtime_ns, :sop_class_uid, :sop_instance_uid,
            :transfer_syntax, :study_instance_uid, :series_instance_uid, :accession_number,
            :calling_ae, :called_ae, :peer, :association, 'QUEUED', :now, :dataset_offset)
    ON CONFLICT (path) WHERE state != 'FINISHED' DO NOTHING
    RETURNING id"""

# The jobs of many files: :jobs is a JSON array of [file_id, destination, priority rank].
INSERT_JOBS_MANY = """
    INSERT INTO jobs (file_id, destination, status, next_attempt_at, created_at, priority)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 'READY', :now, :now,
           json_extract(value, '$[2]')
    FROM json_each(:jobs) ORDER BY key"""

# :destinations is a JSON object, destination -> priority rank (PRIORITY_RANK)
INSERT_JOBS = """
    INSERT INTO jobs (file_id, destination, status, next_attempt_at, created_at, priority)
    SELECT :file_id, key, 'READY', :now, :now, value FROM json_each(:destinations)"""

# Schema version 7 (issue 16): each job's priority, and the index claiming by it. Run after
# the column was added to an older jobs table.
PRIORITY_INDEX = """CREATE INDEX IF NOT EXISTS jobs_claim_priority
    ON jobs (destination, status, priority, next_attempt_at, id)"""
# Destinations an operator paused (forwarder pause): kept across restarts.
PAUSED_TABLE = """CREATE TABLE IF NOT EXISTS paused_destinations (
        destination TEXT PRIMARY KEY,
        at REAL NOT NULL
    )"""

# Due jobs by priority (urgent first), then due time and queue order (FIFO, so a study keeps
# its order within one priority). :max_rank limits the claim to urgent jobs (0) when a window
# is closed but lets urgent jobs through; 2 takes every priority.
CLAIM = """
    UPDATE jobs SET status = 'CLAIMED', claimed_at = :now
    WHERE id IN (SELECT id FROM jobs
                 WHERE destination = :destination AND status = 'READY'
                   AND next_attempt_at <= :now AND priority <= :max_rank
                 ORDER BY priority, next_attempt_at, id LIMIT :limit)
    RETURNING id"""

# The same, oldest first whatever the priority: the share reserved so low never starves.
CLAIM_OLDEST = """
    UPDATE jobs SET status = 'CLAIMED', claimed_at = :now
    WHERE id IN (SELECT id FROM jobs
                 WHERE destination = :destination AND status = 'READY'
                   AND next_attempt_at <= :now AND priority <= :max_rank
                 ORDER BY next_attempt_at, id LIMIT :limit)
    RETURNING id"""

# Job's fields in order
CLAIMED_JOBS = """
    SELECT j.id, j.file_id, j.destination, f.path, f.rel_path, f.sop_class_uid,
           f.sop_instance_uid, f.transfer_syntax, f.size, j.attempts, j.created_at, f.mtime_ns,
           COALESCE(f.calling_ae, ''), j.priority, f.dataset_offset
    FROM jobs AS j JOIN files AS f ON f.id = j.file_id
    WHERE j.id IN (SELECT value FROM json_each(:ids))
    ORDER BY j.priority, j.next_attempt_at, j.id"""

# A stale job (its file was replaced while it was being sent) goes back to READY instead: what
# the peer stored was the old content. (stale = 2 rows are deleted by DROP_CLAIMED first.)
ACK_TERMINAL = """
    UPDATE jobs SET status = CASE WHEN stale THEN 'READY' ELSE :status END,
                    commitment = CASE WHEN NOT stale AND :status = 'DONE' THEN :commit ELSE 0 END,
                    commit_txn = NULL,
                    attempts = CASE WHEN stale THEN 0 ELSE attempts + 1 END,
                    next_attempt_at = CASE WHEN stale THEN :now ELSE next_attempt_at END,
                    finished_at = CASE WHEN stale THEN NULL ELSE :now END,
                    last_status = :last_status,
                    -- stored: an earlier attempt's error is not the outcome's (a warning's is)
                    last_error = CASE WHEN NOT stale AND :status = 'DONE' THEN :error
                                      ELSE COALESCE(:error, last_error) END,
                    -- :own, '' (sent with the file's own UIDs) or NULL (the caller does not
                    -- say); RECORD_SENT_UIDS then sets those of the jobs sent with others
                    sent_uids = CASE WHEN NOT stale AND :status = 'DONE' THEN :own END,
                    claimed_at = NULL, stale = 0
    WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'CLAIMED'
    RETURNING id, file_id, destination"""

# A claim ending (ack, retry, release) on a job whose destination the replaced file no longer
# routes to: the job is deleted, whatever the peer answered.
DROP_CLAIMED = """
    DELETE FROM jobs
    WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'CLAIMED' AND stale = 2
    RETURNING id, file_id, destination"""

ACK_RETRY = """
    UPDATE jobs SET status = 'READY', attempts = attempts + :charge,
                    next_attempt_at = :next_attempt_at, last_status = :last_status,
                    last_error = :error, claimed_at = NULL
    WHERE id = :id AND status = 'CLAIMED'
    RETURNING id, file_id, destination"""

# A removed destination's pending jobs, a slice at a time (by the claim index).
FAIL_PENDING = """
    UPDATE jobs SET status = 'FAILED', last_error = :error, finished_at = :now
    WHERE id IN (SELECT id FROM jobs WHERE destination = :destination AND status = 'READY'
                 LIMIT :batch)
    RETURNING file_id"""

RELEASE = """
    UPDATE jobs SET status = 'READY', claimed_at = NULL
    WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'CLAIMED'
    RETURNING id, file_id, destination"""

BUMP_STATS = """
    INSERT INTO destination_stats (destination, done_total, failed_total, last_error,
                                   last_error_at)
    VALUES (:destination, :done, :failed, :error, CASE WHEN :error IS NULL THEN NULL ELSE :now END)
    ON CONFLICT (destination) DO UPDATE SET
        done_total = done_total + excluded.done_total,
        failed_total = failed_total + excluded.failed_total,
        -- A file stored after an error means the destination recovered: the last error is
        -- the last one since then (a permanent failure stays counted in failed_total).
        last_error = CASE WHEN excluded.last_error IS NOT NULL THEN excluded.last_error
                          WHEN excluded.done_total > 0 THEN NULL ELSE last_error END,
        last_error_at = CASE WHEN excluded.last_error IS NOT NULL THEN excluded.last_error_at
                             WHEN excluded.done_total > 0 THEN NULL ELSE last_error_at END"""

# The files are looked up by id: ``+f.state`` keeps SQLite from choosing the files_state index
# instead, which walks every QUEUED file (milliseconds a call with a deep queue).
TERMINAL_FILES = f"""
    SELECT f.id FROM files AS f
    WHERE f.id IN (SELECT value FROM json_each(:ids)) AND +f.state = 'QUEUED'
      AND NOT EXISTS ({UNFINISHED_JOB})
    ORDER BY f.id"""

TO_FINISH_ALL = f"""
    SELECT f.id, f.path, f.rel_path, f.state, f.final_path, COALESCE(f.calling_ae, ''),
           f.size, f.mtime_ns
    FROM files AS f
    WHERE f.state IN ('QUEUED', 'FINISHING') AND NOT EXISTS ({UNFINISHED_JOB})
    ORDER BY f.id LIMIT :limit"""

# The daemon's periodic sweep, a slice of the files table at a time (rowid ranges): files left
# FINISHING (a move that failed) are few and indexed; QUEUED files whose jobs all ended without
# the finisher being told (a replaced file's job dropped) are looked for among SPAN files only.
SWEEP_UPTO = "SELECT id FROM files WHERE id > :after ORDER BY id LIMIT 1 OFFSET :offset"

TO_FINISH_FINISHING = """
    SELECT f.id, f.path, f.rel_path, f.state, f.final_path, COALESCE(f.calling_ae, ''),
           f.size, f.mtime_ns
    FROM files AS f
    WHERE f.state = 'FINISHING' ORDER BY f.id LIMIT :limit"""

TO_FINISH_SLICE = f"""
    SELECT f.id, f.path, f.rel_path, f.state, f.final_path, COALESCE(f.calling_ae, ''),
           f.size, f.mtime_ns
    FROM files AS f
    WHERE f.id > :after AND f.id <= :upto AND +f.state = 'QUEUED'
      AND NOT EXISTS ({UNFINISHED_JOB})
    ORDER BY f.id LIMIT :limit"""

TO_FINISH_IDS = f"""
    SELECT f.id, f.path, f.rel_path, f.state, f.final_path, COALESCE(f.calling_ae, ''),
           f.size, f.mtime_ns
    FROM files AS f
    WHERE f.id IN (SELECT value FROM json_each(:ids)) AND +f.state IN ('QUEUED', 'FINISHING')
      AND NOT EXISTS ({UNFINISHED_JOB})
    ORDER BY f.id LIMIT :limit"""

# file_id, then JobResult's fields in order
RESULTS = """
    SELECT file_id, destination, status, attempts, last_status, last_error, created_at,
           finished_at
    FROM jobs WHERE file_id IN (SELECT value FROM json_each(:ids))
    ORDER BY file_id, destination"""

# Files, each with where it goes: :items is a JSON array of [file id, final path]. One
# statement for a batch (the finisher's); RETURNING says which files it began to finish.
# "+files.state": not by the files_state index (every QUEUED file), by id.
BEGIN_FINISH = """
    UPDATE files SET state = 'FINISHING', final_path = json_extract(m.value, '$[1]'),
        outcome = CASE WHEN EXISTS (SELECT 1 FROM jobs AS j
                                    WHERE j.file_id = files.id AND j.status != 'DONE')
                       THEN 'failed' ELSE 'done' END
    FROM json_each(:items) AS m
    WHERE files.id = json_extract(m.value, '$[0]') AND +files.state = 'QUEUED' AND NOT EXISTS (
        SELECT 1 FROM jobs AS u WHERE u.file_id = files.id AND (u.status IN ('READY', 'CLAIMED')
            OR (u.status = 'DONE' AND u.commitment IN (1, 2))))
    RETURNING files.id"""

# :ids, a JSON array of file ids, moved to their final paths ("+state": by id, not by state).
COMPLETE_FINISH = """
    UPDATE files SET state = 'FINISHED', finished_at = :now
    WHERE id IN (SELECT value FROM json_each(:ids)) AND +state = 'FINISHING'
    RETURNING id"""

FAILED_FILES = """
    SELECT f.id, f.final_path, f.rel_path, f.finished_at, j.destination
    FROM files AS f JOIN jobs AS j ON j.file_id = f.id AND j.status = 'FAILED'
    WHERE f.state = 'FINISHED' AND f.outcome = 'failed' AND f.retried_as IS NULL
      AND (:destination IS NULL OR EXISTS (
            SELECT 1 FROM jobs AS d
            WHERE d.file_id = f.id AND d.destination = :destination AND d.status = 'FAILED'))
    ORDER BY f.id, j.destination"""

REQUEUE_FILE = """
    INSERT INTO files (path, rel_path, size, mtime_ns, sop_class_uid, sop_instance_uid,
                       transfer_syntax, study_instance_uid, series_instance_uid,
                       accession_number, calling_ae, called_ae, peer, association, state,
                       created_at, dataset_offset)
    SELECT :new_path, :rel_path, size, mtime_ns, sop_class_uid, sop_instance_uid,
           transfer_syntax, study_instance_uid, series_instance_uid, accession_number,
           calling_ae, called_ae, peer, association, 'QUEUED', :now, dataset_offset
    FROM files
    WHERE id = :id AND state = 'FINISHED' AND outcome = 'failed' AND retried_as IS NULL
    RETURNING id"""

# The FAILED jobs of a file `forwarder retry` puts back, for the destinations it does not
# retry (:keep, a JSON list): copied as they are to the new row, so the file is not taken for
# delivered once the others store it (it goes back to failed/, retryable for them later).
KEEP_FAILED_JOBS = """
    INSERT INTO jobs (file_id, destination, status, attempts, next_attempt_at, last_status,
                      last_error, created_at, finished_at, priority)
    SELECT :new_id, destination, 'FAILED', attempts, next_attempt_at, last_status, last_error,
           created_at, finished_at, priority
    FROM jobs
    WHERE file_id = :id AND status = 'FAILED'
      AND destination IN (SELECT value FROM json_each(:keep))"""

# Files put back by `forwarder retry` and still queued (a retried row points at them): their
# file is in incoming unless that retry was killed before it moved the file back.
RETRIED_QUEUED = """
    SELECT new.id, new.path, new.rel_path, new.size, new.mtime_ns
    FROM files AS old JOIN files AS new ON new.id = old.retried_as
    WHERE new.state = 'QUEUED'"""

# Where the files a file was retried from were put in failed/, their SOP Instance UIDs, sizes
# and mtimes, the nearest first.
RETRIED_FROM = """
    WITH RECURSIVE back(id, final_path, sop_instance_uid, size, mtime_ns, depth) AS (
        SELECT id, final_path, sop_instance_uid, size, mtime_ns, 1
        FROM files WHERE retried_as = :id
        UNION ALL
        SELECT f.id, f.final_path, f.sop_instance_uid, f.size, f.mtime_ns, back.depth + 1
        FROM files AS f JOIN back ON f.retried_as = back.id
    )
    SELECT final_path, sop_instance_uid, size, mtime_ns FROM back WHERE final_path IS NOT NULL
    ORDER BY depth"""

# The ids of the files one key matches, and as what (one indexed lookup per column).
FIND_KEY = """
    SELECT id, 'SOPInstanceUID' FROM files WHERE sop_instance_uid = :key
    UNION ALL SELECT id, 'StudyInstanceUID' FROM files WHERE study_instance_uid = :key
    UNION ALL SELECT id, 'SeriesInstanceUID' FROM files WHERE series_instance_uid = :key
    UNION ALL SELECT id, 'AccessionNumber' FROM files WHERE accession_number = :key"""

# FoundFile's file fields, for the ids found
FOUND_FILES = """
    SELECT id, rel_path, path, final_path, state, outcome, sop_instance_uid, study_instance_uid,
           series_instance_uid, created_at, finished_at, retried_as, calling_ae, called_ae, peer,
           association, size
    FROM files WHERE id IN (SELECT value FROM json_each(:ids))
    ORDER BY id"""

# file_id, then FoundJob's fields in order
FOUND_JOBS = """
    SELECT file_id, destination, status, attempts,
           CASE WHEN status = 'READY' THEN next_attempt_at END, last_status, last_error,
           finished_at
    FROM jobs WHERE file_id IN (SELECT value FROM json_each(:ids))
    ORDER BY file_id, destination"""

# The oldest first, in the files_state index's order: a batch reads only the rows it deletes
# (ORDER BY id sorted every finished file past the cutoff, every batch, under the write lock).
PRUNE = """
    DELETE FROM files WHERE id IN (
        SELECT id FROM files WHERE state = 'FINISHED' AND finished_at < :cutoff
        ORDER BY finished_at LIMIT :batch)"""

# Schema 5 (issue 15, deidentify): original UID -> its replacement (queue.uidmap).
UID_MAP_DDL = """CREATE TABLE IF NOT EXISTS uid_map (
    original TEXT PRIMARY KEY,
    replacement TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
) WITHOUT ROWID"""
