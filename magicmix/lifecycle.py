"""The job lifecycle: every state change of every job, on any backend, goes through here.

    queued ──claim──▶ processing ──finish──▶ success ──expire──▶ expired
      │  ▲                │
      │  └───requeue──────┤ (restart, or a claim whose worker died)
      ├──cancel──▶ cancelled
      └──fail────▶ failed ◀──fail──┘

Correct by construction, because each change is one atomic compare-and-set on the store
(`JobStore.transition`) checked against `TRANSITIONS`:
- exactly one ended state per job, first writer wins: a finish after a cancel, or after
  the sweep failed the job, is refused (`None`) and sets nothing off;
- a job's webhook is owed from its creation (the record is born with a pending
  `WebhookState`), so winning an ended state is what makes it due: nothing between the
  change and the delivery can lose it, and the sender's periodic pass finds it;
- the side effects of winning (waking waiters, nudging the webhook sender) are the
  listeners, called once per won change, never for a refused one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from magicmix.jobs import (
    ACTIVE,
    Change,
    Idempotency,
    IdempotencyClaim,
    JobParams,
    JobRecord,
    JobResult,
    JobStatus,
    JobStore,
    NewJob,
    QueueLimits,
)

log = logging.getLogger(__name__)

Q, P = JobStatus.QUEUED, JobStatus.PROCESSING
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({P, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.PROCESSING: frozenset({JobStatus.SUCCESS, JobStatus.FAILED, Q}),
    JobStatus.SUCCESS: frozenset({JobStatus.EXPIRED}),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}

IDEMPOTENCY_TTL_S = 24 * 3600.0  # an Idempotency-Key answers with its job for this long
IDEMPOTENCY_LEASE_S = 120.0  # a request being accepted holds its key this long at most
Listener = Callable[[list[JobRecord]], None]
"""Called (from any thread) with jobs that just ended: wake waiters, nudge webhooks."""


@dataclass(frozen=True)
class StaleAfter:
    """How long a job may stay queued or processing before the sweep fails it."""

    queued_s: float
    processing_s: float


class Lifecycle:
    """The allowed transitions and their side effects, over any `JobStore`."""

    def __init__(
        self,
        store: JobStore,
        limits: QueueLimits,
        *,
        listeners: Sequence[Listener] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self._listeners = list(listeners)
        self._clock = clock

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- transitions ------------------------------------------------------------------

    def create(
        self,
        key_id: str,
        params: JobParams,
        image: bytes,
        *,
        idempotency: Idempotency | None = None,
    ) -> JobRecord:
        """A queued job, its image stored; `Busy` when a queue limit is reached.

        With `idempotency` (claimed by `begin_idempotent`), the key is bound to the job.
        """
        new = NewJob(key_id, params, self._clock(), idempotency)
        job = self.store.insert(new, image, self.limits)
        log.info(
            "job %s queued key=%s size=%dx%d steps=%d",
            job.id,
            key_id,
            params.width,
            params.height,
            params.steps,
        )
        return job

    def begin_idempotent(self, key_id: str, idempotency: Idempotency) -> IdempotencyClaim:
        """Before accepting a request with an Idempotency-Key: is it ours, or a resend?"""
        return self.store.begin_idempotent(
            key_id,
            idempotency,
            now=self._clock(),
            ttl_s=IDEMPOTENCY_TTL_S,
            lease_s=IDEMPOTENCY_LEASE_S,
        )

    def release_idempotent(self, key_id: str, idempotency: Idempotency) -> None:
        self.store.release_idempotent(key_id, idempotency)

    def claim(self, job_id: int, claimant: str) -> JobRecord | None:
        """Take a queued job to run it; None when it is gone, ended or taken by another.

        A claimant may take back its own claim: that is a retry of the same input after
        its first attempt died (Modal re-delivers it), not a second runner.
        """
        job = self._move(job_id, P, {Q}, claimant=claimant, started_at=self._clock())
        if job is None and (current := self.store.get(job_id)) is not None:
            return current if current.status is P and current.claimant == claimant else None
        return job

    def claim_batch(self, limit: int, claimant: str) -> list[JobRecord]:
        """The oldest queued job and up to `limit - 1` queued jobs that batch with it."""
        queued = [job for job in self.store.active(limit=256) if job.status is Q]
        if not queued:
            return []
        key = queued[0].params.batch_key()
        batch = [job for job in queued if job.params.batch_key() == key][:limit]
        return [job for job in (self.claim(j.id, claimant) for j in batch) if job is not None]

    def finish(self, job: JobRecord, result: JobResult) -> JobRecord | None:
        """Record a success; None (and nothing sent) when the job ended another way first."""
        return self._move(job.id, JobStatus.SUCCESS, {P}, result=result, finished_at=self._clock())

    def fail(
        self, job_id: int, message: str, *, expected: Iterable[JobStatus] = ACTIVE
    ) -> JobRecord | None:
        return self._move(
            job_id, JobStatus.FAILED, set(expected), error=message, finished_at=self._clock()
        )

    def cancel(self, job_id: int, reason: str = "cancelled by clear_queue") -> JobRecord | None:
        """Cancel a job that has not started; a job already running is left to finish."""
        return self._move(job_id, JobStatus.CANCELLED, {Q}, error=reason, finished_at=self._clock())

    def cancel_queued(self) -> list[JobRecord]:
        """Cancel every queued job; each cancel that wins wakes its waiters and webhook."""
        queued = [job for job in self.store.active() if job.status is Q]
        return [job for job in (self.cancel(j.id) for j in queued) if job is not None]

    def requeue(self, job_id: int) -> JobRecord | None:
        """Put a processing job whose worker is gone back in the queue, to run again."""
        return self._move(job_id, Q, {P}, claimant=None, started_at=None)

    def expire(self, finished_before: float) -> list[int]:
        """The 24-hour rule on records: service-store successes older than the cutoff."""
        return [
            job.id
            for job in self.store.expirable(finished_before)
            if self._move(job.id, JobStatus.EXPIRED, {JobStatus.SUCCESS}) is not None
        ]

    def sweep(self, stale: StaleAfter) -> list[JobRecord]:
        """Fail jobs stuck past `stale` (a lost spawn, a dead worker); returns them."""
        now = self._clock()
        failed = []
        for job in self.store.active():
            if job.status is Q and job.created_at < now - stale.queued_s:
                why = f"the job did not start within {stale.queued_s:g} s; please submit it again"
            elif job.status is P and (job.started_at or job.created_at) < now - stale.processing_s:
                why = "the worker running this job stopped; please submit it again"
            else:
                continue
            ended = self.fail(job.id, why, expected={job.status})
            if ended is not None:
                failed.append(ended)
        if failed:
            log.warning("sweep failed %d stuck jobs: %s", len(failed), [j.id for j in failed])
        self.store.forget_idempotent(now - IDEMPOTENCY_TTL_S)
        return failed

    # -- the one place a status changes -----------------------------------------------

    def _move(
        self, job_id: int, to: JobStatus, expected: set[JobStatus], **fields: object
    ) -> JobRecord | None:
        illegal = [state for state in expected if to not in TRANSITIONS[state]]
        if illegal:
            raise ValueError(f"no transition {illegal} -> {to}")
        job = self.store.transition(job_id, Change(frozenset(expected), to, fields))
        if job is not None and to.is_terminal and expected & ACTIVE:
            for listener in self._listeners:
                try:
                    listener([job])
                except Exception:  # a listener's failure must not undo a recorded change
                    log.exception("listener failed for job %s", job_id)
        return job
