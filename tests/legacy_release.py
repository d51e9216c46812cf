"""A data dir as the previous release (main at 2957521) left it, made without its code.

Its `backends/local/db.py` created these tables (`SCHEMA`, its first version) and then ran
its numbered steps (`PRAGMA user_version`), which the first Alembic revision keeps as
`LEGACY_STEPS`; rows are written with the statements its stores used. The schema this
builds was compared with one made by that release's own code (`sqlite_master` alike).
"""

from __future__ import annotations

import importlib
import sqlite3
from pathlib import Path

from magicmix.crypto import SecretBox
from magicmix.jobs import JobParams, JobResult, WebhookState
from magicmix.keys import key_hash, mint_key

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        admin INTEGER NOT NULL DEFAULT 0,
        webhook_secret TEXT NOT NULL,
        s3_details TEXT,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        status TEXT NOT NULL,
        params TEXT NOT NULL,
        image BLOB,
        output_token TEXT NOT NULL,
        result TEXT,
        error TEXT,
        webhook_state TEXT,
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id)",
    "CREATE INDEX IF NOT EXISTS jobs_key_status ON jobs (key_id, status)",
]


def legacy_steps() -> list[list[str]]:
    baseline = importlib.import_module("magicmix.store.migrations.versions.0001_baseline")
    return list(baseline.LEGACY_STEPS)


def make_database(path: Path, *, user_version: int = 2) -> sqlite3.Connection:
    """The previous release's tables, at `user_version` (2: what it left; 0: its first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    for statement in SCHEMA:
        connection.execute(statement)
    for number, step in enumerate(legacy_steps()[:user_version], start=1):
        for statement in step:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {number}")
    return connection


def add_key(connection: sqlite3.Connection, secret: bytes, *, s3: str | None = None) -> str:
    """A key as `magicmix keys create` stored it; returns the key itself."""
    new = mint_key(admin=False)
    connection.execute(
        "INSERT INTO api_keys (key_id, key_hash, admin, webhook_secret, s3_details, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            new.key_id,
            key_hash(secret, new.key),
            0,
            SecretBox(secret).encrypt(new.webhook_secret),
            s3,
            new.created_at,
        ),
    )
    return new.key


def add_job(
    connection: sqlite3.Connection,
    key_id: str,
    params: JobParams,
    *,
    status: str,
    created_at: float,
    image: bytes | None = b"layout",
    claimant: str | None = None,
    result: JobResult | None = None,
    webhook: WebhookState | None = None,
) -> int:
    """A job row as that release's stores wrote it; returns its id."""
    cursor = connection.execute(
        "INSERT INTO jobs (key_id, status, params, image, output_token, result, webhook_phase,"
        " webhook_attempts, webhook_next_at, claimant, created_at, started_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key_id,
            status,
            params.model_dump_json(),
            image if status in ("queued", "processing") else None,
            "legacy-token-0123456789",
            result.model_dump_json() if result else None,
            webhook.phase if webhook else None,
            webhook.attempts if webhook else 0,
            webhook.next_at if webhook else None,
            claimant,
            created_at,
            created_at + 1 if status != "queued" else None,
            created_at + 2 if status not in ("queued", "processing") else None,
        ),
    )
    return int(cursor.lastrowid or 0)
