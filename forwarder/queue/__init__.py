"""The persistent job queue (SQLite): one row per file and destination,
claimed then acknowledged."""
