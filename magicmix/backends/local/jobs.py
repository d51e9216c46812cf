"""The local job store: one SQLite table, every write one transaction.

`insert` counts and inserts in one `BEGIN IMMEDIATE` transaction, so queue limits are
exact; `transition` is a conditional `UPDATE ... WHERE status IN (...)`, so two writers
racing for a job (two processes, the worker and clear_queue, a finish and the sweep)
cannot both win. The layout image lives in the job's row and is dropped when it ends.
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any

from magicmix.backends.local.db import Database
from magicmix.jobs import (
    ACTIVE,
    ENDED,
    Change,
    Idempotency,
    IdempotencyClaim,
    JobParams,
    JobRecord,
    JobResult,
    JobStatus,
    NewJob,
    QueueLimits,
    WebhookState,
)

_COLUMNS = (
    "id, key_id, status, params, output_token, result, error, claimant, created_at,"
    " started_at, finished_at, webhook_phase, webhook_attempts, webhook_next_at,"
    " webhook_last_status, webhook_last_error"
)
_ACTIVE = tuple(sorted(s.value for s in ACTIVE))
_ENDED = tuple(sorted(s.value for s in ENDED | {JobStatus.EXPIRED}))
_ENDED_MARKS = ", ".join("?" * len(_ENDED))
# JobRecord fields a transition may set, and how each is stored.
_SETTABLE = {"result", "error", "claimant", "started_at", "finished_at"}


def _record(row: sqlite3.Row) -> JobRecord:
    webhook = None
    if row["webhook_phase"] is not None:
        webhook = WebhookState(
            phase=row["webhook_phase"],
            attempts=row["webhook_attempts"],
            next_at=row["webhook_next_at"],
            last_status=row["webhook_last_status"],
            last_error=row["webhook_last_error"],
        )
    return JobRecord(
        id=row["id"],
        key_id=row["key_id"],
        status=JobStatus(row["status"]),
        params=JobParams.model_validate_json(row["params"]),
        output_token=row["output_token"],
        result=JobResult.model_validate_json(row["result"]) if row["result"] else None,
        error=row["error"],
        webhook=webhook,
        claimant=row["claimant"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _column_value(name: str, value: Any) -> Any:
    return value.model_dump_json() if isinstance(value, JobResult) else value


class SqliteJobStore:
    """`JobStore` on the local SQLite database (also the local worker's queue)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, job: NewJob, image: bytes, limits: QueueLimits) -> JobRecord:
        with self._db.transaction() as connection:
            total, mine = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(key_id = ?), 0) FROM jobs WHERE status IN (?, ?)",
                (job.key_id, *_ACTIVE),
            ).fetchone()
            limits.check(total, mine)
            cursor = connection.execute(
                "INSERT INTO jobs (key_id, status, params, image, output_token, webhook_phase,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.key_id,
                    JobStatus.QUEUED.value,
                    job.params.model_dump_json(),
                    image,
                    secrets.token_urlsafe(16),
                    "pending" if job.webhook else None,
                    job.created_at,
                ),
            )
            job_id = int(cursor.lastrowid or 0)
            if job.idempotency is not None:  # bound in the same transaction: a kill -9
                connection.execute(  # after it leaves a key that answers with this job
                    "UPDATE idempotency SET job_id = ? WHERE key_id = ? AND idem_hash = ?",
                    (job_id, job.key_id, job.idempotency.key_hash),
                )
            return self._select(connection, job_id)

    def begin_idempotent(
        self, key_id: str, idempotency: Idempotency, *, now: float, ttl_s: float, lease_s: float
    ) -> IdempotencyClaim:
        with self._db.transaction() as connection:
            row = connection.execute(
                "SELECT fingerprint, job_id, created_at FROM idempotency"
                " WHERE key_id = ? AND idem_hash = ?",
                (key_id, idempotency.key_hash),
            ).fetchone()
            stale = row is not None and (
                row["created_at"] < now - ttl_s
                or (row["job_id"] is None and row["created_at"] < now - lease_s)
            )
            if row is not None and not stale:
                return IdempotencyClaim(False, row["fingerprint"], row["job_id"])
            connection.execute(
                "INSERT OR REPLACE INTO idempotency (key_id, idem_hash, fingerprint, job_id,"
                " created_at) VALUES (?, ?, ?, NULL, ?)",
                (key_id, idempotency.key_hash, idempotency.fingerprint, now),
            )
        return IdempotencyClaim(True, idempotency.fingerprint, None)

    def release_idempotent(self, key_id: str, idempotency: Idempotency) -> None:
        with self._db.transaction() as connection:
            connection.execute(
                "DELETE FROM idempotency WHERE key_id = ? AND idem_hash = ? AND job_id IS NULL",
                (key_id, idempotency.key_hash),
            )

    def forget_idempotent(self, created_before: float) -> int:
        """Drop keys past their 24 hours."""
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "DELETE FROM idempotency WHERE created_at < ?", (created_before,)
            )
        return cursor.rowcount

    def get(self, job_id: int) -> JobRecord | None:
        row = (
            self._db.connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",  # nosec B608 - constant
                (job_id,),
            )
            .fetchone()
        )
        return _record(row) if row else None

    def image(self, job_id: int) -> bytes | None:
        row = (
            self._db.connection()
            .execute("SELECT image FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return bytes(row["image"]) if row and row["image"] is not None else None

    def transition(self, job_id: int, change: Change) -> JobRecord | None:
        unknown = set(change.fields) - _SETTABLE
        if unknown:
            raise ValueError(f"a transition cannot set {sorted(unknown)}")
        names = sorted(change.fields)
        assignments = "".join(f", {name} = ?" for name in names)
        if change.to.is_terminal:
            assignments += ", image = NULL"  # the layout image is not needed any more
        expected = sorted(s.value for s in change.expected)
        with self._db.transaction() as connection:
            cursor = connection.execute(
                f"UPDATE jobs SET status = ?{assignments} WHERE id = ?"  # nosec B608 - names
                f" AND status IN ({', '.join('?' * len(expected))})",  # checked above
                (
                    change.to.value,
                    *(_column_value(n, change.fields[n]) for n in names),
                    job_id,
                    *expected,
                ),
            )
            return self._select(connection, job_id) if cursor.rowcount == 1 else None

    def active(self, limit: int | None = None) -> list[JobRecord]:
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN (?, ?) ORDER BY id"  # nosec B608
                " LIMIT ?",
                (*_ACTIVE, -1 if limit is None else limit),
            )
            .fetchall()
        )
        return [_record(row) for row in rows]

    def queue_length(self) -> int:
        row = (
            self._db.connection()
            .execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", _ACTIVE)
            .fetchone()
        )
        return int(row[0])

    def webhooks_due(self, now: float, limit: int) -> list[JobRecord]:
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE webhook_phase = 'pending'"  # nosec B608
                f" AND COALESCE(webhook_next_at, 0) <= ? AND status IN ({_ENDED_MARKS})"
                " ORDER BY COALESCE(webhook_next_at, 0), id LIMIT ?",
                (now, *_ENDED, limit),
            )
            .fetchall()
        )
        return [_record(row) for row in rows]

    def record_webhook(self, job_id: int, state: WebhookState) -> None:
        with self._db.transaction() as connection:
            connection.execute(
                "UPDATE jobs SET webhook_phase = ?, webhook_attempts = ?, webhook_next_at = ?,"
                " webhook_last_status = ?, webhook_last_error = ? WHERE id = ?",
                (
                    state.phase,
                    state.attempts,
                    state.next_at,
                    state.last_status,
                    state.last_error,
                    job_id,
                ),
            )

    def expirable(self, finished_before: float) -> list[JobRecord]:
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = ? AND finished_at < ?"  # nosec B608
                " ORDER BY id",
                (JobStatus.SUCCESS.value, finished_before),
            )
            .fetchall()
        )
        return [
            job for job in map(_record, rows) if job.result and job.result.stored_in == "service"
        ]

    @staticmethod
    def _select(connection: sqlite3.Connection, job_id: int) -> JobRecord:
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",  # nosec B608 - constant
            (job_id,),
        ).fetchone()
        return _record(row)
