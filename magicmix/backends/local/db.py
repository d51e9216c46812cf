"""SQLite, set up for a service: WAL, a busy timeout, one connection per thread.

The schema is a list of statements applied in order; each is idempotent, so opening an
old database brings it up to date.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


class Database:
    """Thread-local connections to one SQLite file; `transaction()` is BEGIN IMMEDIATE."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.transaction() as connection:
            for statement in SCHEMA:
                connection.execute(statement)

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
