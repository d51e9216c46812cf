"""Jobs: their states, their records, and the SQLite job store behind the local service.

Every state change of a local job happens in this module (the Modal store, with the same
interface, is `modal_state.py`), in one transaction each, so a crash at any point leaves a
job where it was or where it was going, never lost: queued -> processing -> success |
failed, queued | processing -> failed, processing -> queued (restart), queued -> cancelled,
success -> expired.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from enum import StrEnum
from typing import Literal, Protocol

from PIL import Image
from pydantic import BaseModel

from magicmix.db import Database
from magicmix.errors import Busy
from magicmix.mix_request import MixRequest

_NO_IMAGE = Image.new("RGB", (1, 1))  # stands in where only the schedule matters


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.PROCESSING)


class JobParams(BaseModel):
    """What to run, as validated at submission; `seed` is always resolved by then."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    kmin: float
    kmax: float
    mix_factor: float
    steps: int
    guidance_scale: float
    seed: int
    image_ref: str  # the input URL, or a short description of inline data
    webhook: str | None = None
    track_id: str | int | None = None

    def mix_request(self, image: Image.Image | None = None) -> MixRequest:
        """The engine's view of this job (`image` may be left out to compare schedules)."""
        return MixRequest(
            image=image or _NO_IMAGE,
            **self.model_dump(include=set(MixRequest.__dataclass_fields__) - {"image"}),
        )

    def batch_key(self) -> tuple[int, int, int, int, int]:
        """Jobs with equal keys share every timestep, so they can share UNet batches."""
        return self.mix_request().batch_key()


class JobResult(BaseModel):
    output: list[str]
    generation_time: float
    stored_in: Literal["user", "service"]
    object_names: list[str]
    note: str | None = None


class JobRecord(BaseModel):
    id: int
    key_id: str
    status: JobStatus
    params: JobParams
    output_token: str
    result: JobResult | None = None
    error: str | None = None
    webhook_state: str | None = None
    webhook_attempts: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def output_name(self) -> str:
        """The PNG's file name in a store: stable per job (a re-run overwrites)."""
        return f"{self.file_prefix}.png"

    @property
    def file_prefix(self) -> str:
        """Unguessable stem of this job's output names; fixed at creation, so a re-run
        after a crash overwrites its own output instead of making a second one."""
        return f"{self.id}-{self.output_token}"


class JobStore(Protocol):
    """Job state as the service sees it; SQLite locally, a Modal Dict on Modal."""

    def create(
        self, key_id: str, params: JobParams, image: bytes, *, max_queue: int, max_per_key: int
    ) -> JobRecord: ...
    def get(self, job_id: int) -> JobRecord | None: ...
    def image(self, job_id: int) -> bytes | None: ...
    def mark_processing(self, job_ids: list[int]) -> None: ...
    def finish(self, job_id: int, result: JobResult) -> JobRecord: ...
    def fail(self, job_id: int, message: str) -> JobRecord: ...
    def set_webhook_state(self, job_id: int, state: str, attempts: int) -> None: ...
    def cancel_queued(self) -> list[int]: ...
    def queue_length(self) -> int: ...
    def expire_service_outputs(self, finished_before: float) -> list[int]: ...


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        key_id=row["key_id"],
        status=JobStatus(row["status"]),
        params=JobParams.model_validate_json(row["params"]),
        output_token=row["output_token"],
        result=JobResult.model_validate_json(row["result"]) if row["result"] else None,
        error=row["error"],
        webhook_state=row["webhook_state"],
        webhook_attempts=row["webhook_attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


_COLUMNS = (
    "id, key_id, status, params, output_token, result, error, webhook_state,"
    " webhook_attempts, created_at, started_at, finished_at"
)
_ACTIVE = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value)


class SqliteJobStore:
    """The local job table (WAL SQLite); also the local worker's queue."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self, key_id: str, params: JobParams, image: bytes, *, max_queue: int, max_per_key: int
    ) -> JobRecord:
        """Insert a queued job, or raise `Busy` when the queue (or this key's share) is full."""
        with self._db.transaction() as connection:
            total, mine = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(key_id = ?), 0) FROM jobs WHERE status IN (?, ?)",
                (key_id, *_ACTIVE),
            ).fetchone()
            if total >= max_queue:
                raise Busy(f"the queue is full ({total} jobs); retry shortly", retry_after=10)
            if mine >= max_per_key:
                raise Busy(
                    f"this key already has {mine} jobs in flight (limit {max_per_key});"
                    " retry when some finish",
                    retry_after=10,
                )
            cursor = connection.execute(
                "INSERT INTO jobs (key_id, status, params, image, output_token, webhook_state,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    JobStatus.QUEUED.value,
                    params.model_dump_json(),
                    image,
                    secrets.token_urlsafe(16),
                    "pending" if params.webhook else None,
                    time.time(),
                ),
            )
            job_id = cursor.lastrowid
        job = self.get(int(job_id or 0))
        assert job is not None  # nosec B101 - just inserted in this process
        return job

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

    def claim(self, limit: int) -> list[JobRecord]:
        """Take the oldest queued job and up to `limit - 1` queued jobs that batch with it."""
        with self._db.transaction() as connection:
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = ? ORDER BY id LIMIT 256",  # nosec B608
                (JobStatus.QUEUED.value,),
            ).fetchall()
            if not rows:
                return []
            jobs = [_record(row) for row in rows]
            key = jobs[0].params.batch_key()
            batch = [job for job in jobs if job.params.batch_key() == key][:limit]
            now = time.time()
            connection.executemany(
                "UPDATE jobs SET status = ?, started_at = ? WHERE id = ?",
                [(JobStatus.PROCESSING.value, now, job.id) for job in batch],
            )
        return [
            job.model_copy(update={"status": JobStatus.PROCESSING, "started_at": now})
            for job in batch
        ]

    def mark_processing(self, job_ids: list[int]) -> None:
        with self._db.transaction() as connection:
            connection.executemany(
                "UPDATE jobs SET status = ?, started_at = ? WHERE id = ? AND status = ?",
                [
                    (JobStatus.PROCESSING.value, time.time(), i, JobStatus.QUEUED.value)
                    for i in job_ids
                ],
            )

    def finish(self, job_id: int, result: JobResult) -> JobRecord:
        return self._end(job_id, JobStatus.SUCCESS, result=result.model_dump_json())

    def fail(self, job_id: int, message: str) -> JobRecord:
        return self._end(job_id, JobStatus.FAILED, error=message)

    def _end(
        self, job_id: int, status: JobStatus, *, result: str | None = None, error: str | None = None
    ) -> JobRecord:
        """Terminal state; the layout image is no longer needed and is dropped."""
        with self._db.transaction() as connection:
            connection.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, image = NULL,"
                " finished_at = ? WHERE id = ?",
                (status.value, result, error, time.time(), job_id),
            )
        job = self.get(job_id)
        assert job is not None  # nosec B101 - jobs are never deleted
        return job

    def set_webhook_state(self, job_id: int, state: str, attempts: int) -> None:
        with self._db.transaction() as connection:
            connection.execute(
                "UPDATE jobs SET webhook_state = ?, webhook_attempts = ? WHERE id = ?",
                (state, attempts, job_id),
            )

    def pending_webhooks(self) -> list[JobRecord]:
        """Finished jobs whose webhook was not delivered yet (e.g. the process died)."""
        rows = (
            self._db.connection()
            .execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE webhook_state = 'pending'"  # nosec B608
                " AND status IN (?, ?) ORDER BY id",
                (JobStatus.SUCCESS.value, JobStatus.FAILED.value),
            )
            .fetchall()
        )
        return [_record(row) for row in rows]

    def requeue_interrupted(self) -> int:
        """At start-up: jobs left `processing` by a dead worker go back to the queue."""
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE jobs SET status = ?, started_at = NULL WHERE status = ?",
                (JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
            )
        return cursor.rowcount

    def cancel_queued(self) -> list[int]:
        """Cancel every queued job; returns their ids (their webhooks are owed)."""
        with self._db.transaction() as connection:
            ids = [
                row[0]
                for row in connection.execute(
                    "SELECT id FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)
                )
            ]
            connection.executemany(
                "UPDATE jobs SET status = ?, image = NULL, finished_at = ?,"
                " error = 'cancelled by clear_queue' WHERE id = ?",
                [(JobStatus.CANCELLED.value, time.time(), job_id) for job_id in ids],
            )
        return ids

    def queue_length(self) -> int:
        row = (
            self._db.connection()
            .execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", _ACTIVE)
            .fetchone()
        )
        return int(row[0])

    def expire_service_outputs(self, finished_before: float) -> list[int]:
        """Mark successful jobs whose outputs lived in the service store as expired."""
        with self._db.transaction() as connection:
            rows = connection.execute(
                "SELECT id, result FROM jobs WHERE status = ? AND finished_at < ?",
                (JobStatus.SUCCESS.value, finished_before),
            ).fetchall()
            expired = [
                row["id"] for row in rows if json.loads(row["result"]).get("stored_in") == "service"
            ]
            connection.executemany(
                "UPDATE jobs SET status = ? WHERE id = ?",
                [(JobStatus.EXPIRED.value, job_id) for job_id in expired],
            )
        return expired
