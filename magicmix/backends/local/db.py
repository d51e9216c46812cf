"""SQLite, set up for a service: WAL, a busy timeout, one connection per thread, private files.

The schema is the first version's tables plus numbered migrations (`PRAGMA user_version`
says how many ran), so opening an old database brings it up to date. The file holds
prompts, layout images and presigned URLs: it is created 0600 in a 0700 directory, and
SQLite gives its -wal and -shm files the same mode.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from magicmix.errors import Busy

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        admin INTEGER NOT NULL DEFAULT 0,
        webhook_secret TEXT NOT NULL,          -- encrypted with the service secret
        s3_details TEXT,                       -- encrypted JSON, NULL when not set
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after deletes
        key_id TEXT NOT NULL,
        status TEXT NOT NULL,
        params TEXT NOT NULL,                  -- JSON of jobs.JobParams
        image BLOB,                            -- layout image bytes, dropped when finished
        output_token TEXT NOT NULL,
        result TEXT,                           -- JSON of jobs.JobResult
        error TEXT,
        webhook_state TEXT,                    -- pending | delivered | failed
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id)",
    "CREATE INDEX IF NOT EXISTS jobs_key_status ON jobs (key_id, status)",
]
# Each entry runs once, in order, in one transaction with the user_version bump.
MIGRATIONS: list[list[str]] = [
    [  # 1: webhooks on a persisted retry schedule; who claimed a running job; key revocation
        "ALTER TABLE jobs RENAME COLUMN webhook_state TO webhook_phase",
        "ALTER TABLE jobs ADD COLUMN webhook_next_at REAL",
        "ALTER TABLE jobs ADD COLUMN webhook_last_status INTEGER",
        "ALTER TABLE jobs ADD COLUMN webhook_last_error TEXT",
        "ALTER TABLE jobs ADD COLUMN claimant TEXT",
        "CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs (webhook_phase, webhook_next_at)",
        "ALTER TABLE api_keys ADD COLUMN revoked_at REAL",
    ],
    [  # 2: Idempotency-Key: one row per (API key, client key), bound to the job it made
        """CREATE TABLE IF NOT EXISTS idempotency (
            key_id TEXT NOT NULL,
            idem_hash TEXT NOT NULL,           -- sha256 of the client's Idempotency-Key
            fingerprint TEXT NOT NULL,         -- sha256 of the request body
            job_id INTEGER,                    -- NULL while the request is being accepted
            created_at REAL NOT NULL,
            PRIMARY KEY (key_id, idem_hash)
        )""",
    ],
]


class Database:
    """Thread-local connections to one SQLite file; `transaction()` is BEGIN IMMEDIATE."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        _private_file(path)
        with self.transaction() as connection:
            for statement in SCHEMA:
                connection.execute(statement)
            done = connection.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[done:], start=done + 1):
                for statement in migration:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number}")

    def connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front, so concurrent writers queue instead of fail."""
        connection = self.connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:  # still locked after the busy timeout
            raise Busy("the job database is busy; retry shortly", retry_after=1) from err
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


def _private_file(path: Path) -> None:
    """Create the database file (and its directory) readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(OSError):  # a directory we do not own keeps its mode
        if path.parent.stat().st_uid == os.getuid():
            path.parent.chmod(0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)  # also for a file made by an older version
