"""The service's state on Modal: jobs and S3 details in Modal Dicts.

The stores take any object with `modal.Dict`'s methods (`DictLike`), so tests run them on
an in-memory stand-in. Trade-offs of a Dict without transactions or compare-and-swap:
- ids are claimed with `put(..., skip_if_exists=True)` (atomic), from a hint that may
  lag, so they are unique and increase in claim order;
- queued and processing jobs are listed in their own small Dict (`active`, at most
  `max_queue` entries), so limits are one read; two submissions racing may both pass a
  limit, so the limits are soft by at most the number of concurrent submissions;
- service-store successes are listed in `expiring` until the cleanup expires them.
Dict entries vanish after 7 days untouched: the hourly cleanup reads the id hint and the
S3 details so they stay, while old job records are allowed to lapse.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from magicmix.errors import Busy, NotFound, Unauthorized
from magicmix.jobs import JobParams, JobRecord, JobResult, JobStatus
from magicmix.keys import Principal, StaticKeys

_NEXT_ID = "next_id"
_MISSING = object()


class DictLike(Protocol):
    """The part of `modal.Dict` the stores use; the stand-in in tests has the same signatures."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool: ...
    def pop(self, key: Any, default: Any = ...) -> Any: ...
    def items(self) -> Iterable[tuple[Any, Any]]: ...
    def len(self) -> int: ...


@dataclass(frozen=True)
class ModalState:
    """The Dicts holding the service's state on Modal (see the module docstring)."""

    jobs: DictLike  # "job:{id}" -> record JSON, "image:{id}" -> layout bytes, the id hint
    active: DictLike  # job id -> key id, for queued and processing jobs
    expiring: DictLike  # job id -> finished_at, for successes in the service store
    keys: DictLike  # key id -> encrypted S3 details


# -- job state ---------------------------------------------------------------------------


class DictJobStore:
    """`JobStore` on Modal Dicts; records are JSON so they outlive code changes."""

    def __init__(self, jobs: DictLike, active: DictLike, expiring: DictLike) -> None:
        self._jobs = jobs
        self._active = active
        self._expiring = expiring

    def create(
        self, key_id: str, params: JobParams, image: bytes, *, max_queue: int, max_per_key: int
    ) -> JobRecord:
        """Claim the next free id for a queued job, or raise `Busy` when over a limit."""
        owners = [owner for _, owner in self._active.items()]
        if len(owners) >= max_queue:
            raise Busy(f"the queue is full ({len(owners)} jobs); retry shortly", retry_after=10)
        mine = owners.count(key_id)
        if mine >= max_per_key:
            raise Busy(
                f"this key already has {mine} jobs in flight (limit {max_per_key});"
                " retry when some finish",
                retry_after=10,
            )
        job_id = max(int(self._jobs.get(_NEXT_ID, 1)), 1)
        while True:
            job = JobRecord(
                id=job_id,
                key_id=key_id,
                status=JobStatus.QUEUED,
                params=params,
                output_token=secrets.token_urlsafe(16),
                webhook_state="pending" if params.webhook else None,
                created_at=time.time(),
            )
            if self._jobs.put(f"job:{job_id}", job.model_dump_json(), skip_if_exists=True):
                break
            job_id += 1  # another container took this id first
        self._jobs.put(_NEXT_ID, job_id + 1)
        self._jobs.put(f"image:{job_id}", image)
        self._active.put(job_id, key_id)
        return job

    def get(self, job_id: int) -> JobRecord | None:
        data = self._jobs.get(f"job:{job_id}")
        return JobRecord.model_validate_json(data) if data is not None else None

    def image(self, job_id: int) -> bytes | None:
        data = self._jobs.get(f"image:{job_id}")
        return bytes(data) if data is not None else None

    def mark_processing(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._save(
                    job.model_copy(
                        update={"status": JobStatus.PROCESSING, "started_at": time.time()}
                    )
                )

    def finish(self, job_id: int, result: JobResult) -> JobRecord:
        job = self._end(job_id, JobStatus.SUCCESS, result=result)
        if result.stored_in == "service":
            self._expiring.put(job_id, job.finished_at)
        return job

    def fail(self, job_id: int, message: str) -> JobRecord:
        return self._end(job_id, JobStatus.FAILED, error=message)

    def set_webhook_state(self, job_id: int, state: str, attempts: int) -> None:
        job = self._load(job_id)
        self._save(job.model_copy(update={"webhook_state": state, "webhook_attempts": attempts}))

    def cancel_queued(self) -> list[int]:
        cancelled = []
        for job_id, _ in list(self._active.items()):
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._end(job_id, JobStatus.CANCELLED, error="cancelled by clear_queue")
                cancelled.append(job_id)
        return cancelled

    def queue_length(self) -> int:
        return self._active.len()

    def expire_service_outputs(self, finished_before: float) -> list[int]:
        expired = []
        for job_id, finished_at in list(self._expiring.items()):
            if finished_at >= finished_before:
                continue
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.SUCCESS:
                self._save(job.model_copy(update={"status": JobStatus.EXPIRED}))
                expired.append(int(job_id))
            self._expiring.pop(job_id, None)
        return sorted(expired)

    def fail_stale(self, created_before: float) -> list[int]:
        """Fail active jobs created before `created_before`: nothing will finish them now."""
        failed = []
        for job_id, _ in list(self._active.items()):
            job = self.get(job_id)
            if job is None:  # the record lapsed; only the index entry is left
                self._active.pop(job_id, None)
            elif job.created_at < created_before:
                self.fail(job.id, "the job was lost by the GPU worker; please submit it again")
                failed.append(job.id)
        return sorted(failed)

    def keep_alive(self) -> None:
        """Read the id hint, so a week without jobs does not reset ids to 1."""
        self._jobs.get(_NEXT_ID)

    def _load(self, job_id: int) -> JobRecord:
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return job

    def _save(self, job: JobRecord) -> None:
        self._jobs.put(f"job:{job.id}", job.model_dump_json())

    def _end(
        self,
        job_id: int,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: str | None = None,
    ) -> JobRecord:
        """Terminal state: record it, drop the layout image and the index entry."""
        job = self._load(job_id).model_copy(
            update={"status": status, "result": result, "error": error, "finished_at": time.time()}
        )
        self._save(job)
        self._jobs.pop(f"image:{job_id}", None)
        self._active.pop(job_id, None)
        return job


# -- keys --------------------------------------------------------------------------------


class DictKeyStore:
    """`KeyStore` on Modal: the operator's keys from the Secret, S3 details in a Dict.

    `magicmix keys create` writes the local SQLite database, which Modal never sees, so
    every key here is a static (admin) key from `MAGICMIX_API_KEYS`.
    """

    def __init__(self, s3_details: DictLike, secret: bytes, static_keys: list[str]) -> None:
        self._s3 = s3_details
        self._static = StaticKeys(static_keys, secret)

    def authenticate(self, key: str) -> Principal:
        principal = self._static.find(key)
        if principal is None:
            raise Unauthorized("invalid API key")
        return principal

    def webhook_secret(self, key_id: str) -> str:
        principal = self._static.by_id(key_id)
        if principal is None:
            raise Unauthorized("the key of this job no longer exists")
        return principal.webhook_secret

    def get_s3(self, key_id: str) -> str | None:
        blob = self._s3.get(key_id)
        return str(blob) if blob is not None else None

    def set_s3(self, key_id: str, blob: str) -> None:
        self._s3.put(key_id, blob)

    def delete_s3(self, key_id: str) -> bool:
        return self._s3.pop(key_id, _MISSING) is not _MISSING

    def keep_alive(self) -> None:
        """Read every entry, so S3 details of a key unused for a week do not lapse."""
        for key_id, _ in list(self._s3.items()):
            self._s3.get(key_id)
