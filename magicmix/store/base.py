"""The store's contracts: what the lifecycle, the service and the senders may ask of it.

Every method is one statement or one transaction, so two processes (replicas, Modal
containers) calling at once never see half of a change. The implementations are
`store.jobs.SqlJobStore` and `store.keys.SqlKeyStore`; behaviour (which state may follow
which, and what each change sets off) is the lifecycle's, not the store's.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from magicmix.jobs import (
    Change,
    Idempotency,
    IdempotencyClaim,
    JobRecord,
    NewJob,
    QueueLimits,
    WebhookState,
)
from magicmix.keys import KeyInfo, NewKey, Principal


class JobStore(Protocol):
    """Where job records live."""

    def insert(self, job: NewJob, image: bytes, limits: QueueLimits) -> JobRecord:
        """Store a queued job, or raise `Busy` (via `limits.check`, counted exactly in the
        same transaction) when over a limit; an owned Idempotency-Key claim is bound to
        the job in that transaction too (`Conflict` if the claim was taken over)."""
        ...

    def get(self, job_id: int) -> JobRecord | None: ...

    def image(self, job_id: int) -> bytes | None:
        """The layout image of an active job; None once the job ended."""
        ...

    def transition(self, job_id: int, change: Change) -> JobRecord | None:
        """Apply `change` if the job's status is one of `change.expected` (and, with
        `change.claimant`, that claimant holds it). Returns the changed record, or None
        when the job is missing or in another state. An ended state is won at most once
        per job: first writer wins."""
        ...

    def claim_next(
        self, limit: int, claimant: str, *, now: float, lease_until: float
    ) -> list[JobRecord]:
        """Claim the oldest queued job and up to `limit - 1` queued jobs that batch with
        it (same `batch_key`), skipping jobs another claimer is taking at this moment."""
        ...

    def claim(
        self, claims: Mapping[int, str], *, now: float, lease_until: float
    ) -> list[JobRecord]:
        """Claim these jobs, each for its claimant: queued ones, or ones their claimant
        already holds (a retried input re-claims its own job). Each claim counts a run
        attempt. Returns the jobs claimed."""
        ...

    def renew(self, claims: Mapping[int, str], lease_until: float) -> list[int]:
        """Extend the leases still held by these claimants; the ids still held."""
        ...

    def cancel_queued(self, *, reason: str, now: float) -> list[JobRecord]:
        """Cancel every queued job in one statement; the cancelled records."""
        ...

    def release_lapsed(
        self, *, now: float, max_attempts: int, message: str
    ) -> tuple[list[JobRecord], list[JobRecord]]:
        """Claims whose lease lapsed: requeued, or failed with `message` once they used
        `max_attempts` runs. Returns (requeued, failed)."""
        ...

    def fail_unstarted(self, *, created_before: float, now: float, message: str) -> list[JobRecord]:
        """Fail queued jobs created before the cutoff (nothing could start them)."""
        ...

    def queued(self, *, created_before: float, limit: int) -> list[JobRecord]:
        """The oldest queued jobs created before the cutoff (the Modal sweep re-spawns)."""
        ...

    def set_call(self, job_id: int, call_id: str) -> None:
        """Remember the dispatcher's handle of the job's run."""
        ...

    def active(self, limit: int | None = None) -> list[JobRecord]:
        """Queued and processing jobs, oldest first (the first `limit` of them)."""
        ...

    def queue_length(self) -> int: ...

    def lease_webhooks(
        self,
        *,
        now: float,
        lease_until: float,
        limit: int,
        per_key: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[JobRecord]:
        """Take up to `limit` due webhooks (ended jobs, pending, next attempt due, not
        leased by another sender), oldest due first, leasing each until `lease_until`;
        with `per_key`, no API key gets more than that counting its `in_flight` ones."""
        ...

    def next_webhook_at(self) -> float | None:
        """When the next webhook attempt owed falls due (its lease, if any, over); None
        when none is owed."""
        ...

    def record_webhook(self, job_id: int, state: WebhookState, *, attempts_before: int) -> bool:
        """Record an attempt's outcome (and free the lease) if no other sender recorded
        one since (`attempts_before` is the count the attempt started from)."""
        ...

    def expirable(self, finished_before: float) -> list[JobRecord]:
        """Successes stored in the service store that finished before the cutoff."""
        ...

    def begin_idempotent(
        self, key_id: str, idempotency: Idempotency, *, now: float, ttl_s: float, lease_s: float
    ) -> IdempotencyClaim:
        """Claim the key for a request about to be accepted, or say whose it is. An entry
        older than `ttl_s`, or one still unbound after `lease_s` (its request died while
        being accepted), is taken over, atomically."""
        ...

    def release_idempotent(self, key_id: str, claim: IdempotencyClaim) -> None:
        """Give back an owned claim whose request made no job (it was refused)."""
        ...

    def forget_idempotent(self, created_before: float) -> int:
        """Drop keys older than the cutoff; how many."""
        ...

    def exclusive(self, name: str) -> AbstractContextManager[bool]:
        """Whether this process is now the one holder of `name`, across processes."""
        ...


class KeyStore(Protocol):
    """Issues, authenticates and revokes keys; keeps each key's encrypted S3 details."""

    def create(self, *, admin: bool = False) -> NewKey: ...
    def list(self) -> list[KeyInfo]: ...
    def revoke(self, key_id: str) -> bool: ...
    def authenticate(self, key: str) -> Principal: ...
    def webhook_secret(self, key_id: str) -> str: ...
    def get_s3(self, key_id: str) -> str | None: ...
    def set_s3(self, key_id: str, blob: str) -> None: ...
    def delete_s3(self, key_id: str) -> bool: ...
