"""The job lifecycle: every state change of every job, on any deployment, goes through here.

    queued ──claim──▶ processing ──finish──▶ success ──expire──▶ expired
      │  ▲                │
      │  └───requeue──────┤ (its claim lapsed: the worker died or hung)
      ├──cancel──▶ cancelled
      └──fail────▶ failed ◀──fail──┘

Correct by construction, because each change is one conditional statement on the store
(`JobStore.transition` and its bulk forms) checked against `TRANSITIONS`:
- exactly one ended state per job, first writer wins: a finish after a cancel, or after
  the sweep failed the job, is refused (`None`) and sets nothing off;
- a claim is a lease: the claimant renews it while it runs (`renew`); a claim whose lease
  lapsed is requeued by whichever process sweeps (`release_lapsed`), or failed once the
  job used `max_attempts` runs; a lapsed claimant can no longer end the job;
- a job's webhook is owed from its creation (the record is born with a pending
  `WebhookState`), so winning an ended state is what makes it due; a success's webhook
  body is fixed in the same statement that records it, so every attempt sends the same
  bytes whatever happens to the outputs later;
- the consequences of winning an end (waking waiters, nudging the webhook sender) are the
  `Notifier`'s, called once per won change, never for a refused one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from magicmix.config import Settings
from magicmix.jobs import (
    ACTIVE,
    Change,
    Idempotency,
    IdempotencyClaim,
    JobParams,
    JobRecord,
    JobResult,
    JobStatus,
    NewJob,
    QueueLimits,
)
from magicmix.replies import webhook_json
from magicmix.store.base import JobStore

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


class Notifier(Protocol):
    """The consequences of jobs ending, wherever the lifecycle runs: wake the requests
    waiting on them, and nudge the webhook sender. Called from any thread, once per job
    that ended; it must not raise for a job's sake (a recorded end is never undone)."""

    def ended(self, jobs: Sequence[JobRecord]) -> None: ...


class Notifiers:
    """Several notifiers as one (e.g. this process's waiters and its webhook sender)."""

    def __init__(self, *notifiers: Notifier) -> None:
        self._notifiers = list(notifiers)

    def add(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def ended(self, jobs: Sequence[JobRecord]) -> None:
        for notifier in self._notifiers:
            try:
                notifier.ended(jobs)
            except Exception:  # a notifier's failure must not undo a recorded change
                log.exception("notifier failed for jobs %s", [job.id for job in jobs])


@dataclass(frozen=True)
class Leases:
    """How claims are held: for `lease_s` at a time, renewed every `renew_s`; a job whose
    claims lapsed `max_attempts` times is failed instead of run again."""

    lease_s: float = 60.0
    max_attempts: int = 3

    @property
    def renew_s(self) -> float:
        return self.lease_s / 3


class Lifecycle:
    """The allowed transitions and their side effects, over any `JobStore`."""

    def __init__(
        self,
        store: JobStore,
        limits: QueueLimits,
        *,
        notifier: Notifier | None = None,
        leases: Leases | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self.notifiers = Notifiers(*([notifier] if notifier else []))
        self.leases = leases or Leases()
        self._clock = clock

    @classmethod
    def configured(
        cls, store: JobStore, settings: Settings, *, notifier: Notifier | None = None
    ) -> Lifecycle:
        """The lifecycle a deployment runs: its configured queue limits and leases."""
        return cls(
            store,
            QueueLimits(settings.max_queue, settings.max_queued_per_key),
            notifier=notifier,
            leases=Leases(lease_s=settings.lease_s, max_attempts=settings.max_run_attempts),
        )

    # -- accepting --------------------------------------------------------------------

    def create(
        self,
        key_id: str,
        params: JobParams,
        image: bytes,
        *,
        idempotency: IdempotencyClaim | None = None,
    ) -> JobRecord:
        """A queued job, its image stored; `Busy` when a queue limit is reached.

        With an owned `idempotency` claim (from `begin_idempotent`), the key is bound to
        the job in the same transaction.
        """
        job = self.store.insert(
            NewJob(key_id, params, self._clock(), idempotency), image, self.limits
        )
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

    def release_idempotent(self, key_id: str, claim: IdempotencyClaim) -> None:
        self.store.release_idempotent(key_id, claim)

    # -- running ----------------------------------------------------------------------

    def claim_next(self, limit: int, claimant: str) -> list[JobRecord]:
        """The oldest queued job and up to `limit - 1` queued jobs that batch with it."""
        now = self._clock()
        return self.store.claim_next(
            limit, claimant, now=now, lease_until=now + self.leases.lease_s
        )

    def claim(self, claims: Mapping[int, str]) -> list[JobRecord]:
        """Take these jobs, each for its claimant, if still queued (or already theirs:
        a retried Modal input re-claims its own job); the jobs taken."""
        now = self._clock()
        return self.store.claim(claims, now=now, lease_until=now + self.leases.lease_s)

    def renew(self, jobs: Sequence[JobRecord]) -> list[int]:
        """Extend the claims on `jobs` (each by its claimant); the ids still held."""
        claims = {job.id: job.claimant for job in jobs if job.claimant}
        return self.store.renew(claims, self._clock() + self.leases.lease_s)

    @contextmanager
    def holding(self, jobs: Sequence[JobRecord]) -> Iterator[None]:
        """Keep the claims on `jobs` alive while the block runs (a thread renews them
        every `renew_s`); a worker that dies stops renewing, and its claims lapse."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.leases.renew_s):
                try:
                    held = self.renew(jobs)
                except Exception:  # the database is briefly away: the lease has margin
                    log.warning("could not renew the claims on jobs %s", [j.id for j in jobs])
                    continue
                if lost := sorted({job.id for job in jobs} - set(held)):
                    log.warning("claims on jobs %s lapsed while running", lost)

        thread = threading.Thread(target=renew, name="magicmix-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def finish(self, job: JobRecord, result: JobResult) -> JobRecord | None:
        """Record a success, and fix its webhook body with it; None (and nothing sent)
        when the job ended another way first or its claim passed to another worker."""
        finished_at = self._clock()
        body = None
        if job.webhook is not None:
            done = job.model_copy(
                update={"status": JobStatus.SUCCESS, "result": result, "finished_at": finished_at}
            )
            body = webhook_json(done)
        return self._move(
            job.id,
            JobStatus.SUCCESS,
            {P},
            held_by=job.claimant,
            result=result,
            finished_at=finished_at,
            webhook_body=body,
        )

    def fail(
        self,
        job_id: int,
        message: str,
        *,
        expected: Iterable[JobStatus] = ACTIVE,
        claimant: str | None = None,
    ) -> JobRecord | None:
        """End a job as failed; with `claimant`, only while that claimant holds it."""
        return self._move(
            job_id,
            JobStatus.FAILED,
            set(expected),
            held_by=claimant,
            error=message,
            finished_at=self._clock(),
        )

    def requeue(self, job: JobRecord) -> JobRecord | None:
        """Give a claimed job back to the queue (its claimant cannot run it now)."""
        return self._move(
            job.id, Q, {P}, held_by=job.claimant, claimant=None, started_at=None, lease_until=None
        )

    def give_back(self, job: JobRecord, message: str) -> JobRecord | None:
        """A claimed job whose run was cut short: requeued for another run, or failed with
        `message` (and its webhook) once it used `max_attempts` runs, as lapsed claims are."""
        if job.run_attempts >= self.leases.max_attempts:
            return self.fail(job.id, message, expected={P}, claimant=job.claimant)
        return self.requeue(job)

    # -- cancelling, expiring, repairing ------------------------------------------------

    def cancel(self, job_id: int, reason: str = "cancelled by clear_queue") -> JobRecord | None:
        """Cancel a job that has not started; a job already running is left to finish."""
        return self._move(job_id, JobStatus.CANCELLED, {Q}, error=reason, finished_at=self._clock())

    def cancel_queued(self) -> list[JobRecord]:
        """Cancel every queued job at once; their waiters wake, their webhooks go."""
        cancelled = self.store.cancel_queued(reason="cancelled by clear_queue", now=self._clock())
        self._ended(cancelled)
        return cancelled

    def expire(self, finished_before: float) -> list[int]:
        """The 24-hour rule on records: service-store successes older than the cutoff."""
        return [
            job.id
            for job in self.store.expirable(finished_before)
            if self._move(job.id, JobStatus.EXPIRED, {JobStatus.SUCCESS}) is not None
        ]

    def release_lapsed(self) -> tuple[list[JobRecord], list[JobRecord]]:
        """Claims whose worker stopped renewing them: requeued, or failed after
        `max_attempts` runs. Returns (requeued, failed)."""
        attempts = self.leases.max_attempts
        requeued, failed = self.store.release_lapsed(
            now=self._clock(),
            max_attempts=attempts,
            message=f"the worker running this job stopped {attempts} times; please submit it again",
        )
        if requeued or failed:
            log.warning(
                "lapsed claims: requeued %s, failed %s",
                [j.id for j in requeued],
                [j.id for j in failed],
            )
        self._ended(failed)
        return requeued, failed

    def fail_unstarted(self, queued_s: float) -> list[JobRecord]:
        """Fail jobs queued longer than `queued_s` (nothing could start them)."""
        now = self._clock()
        failed = self.store.fail_unstarted(
            created_before=now - queued_s,
            now=now,
            message=f"the job did not start within {queued_s:g} s; please submit it again",
        )
        if failed:
            log.warning(
                "failed %d jobs that never started: %s", len(failed), [j.id for j in failed]
            )
        self._ended(failed)
        return failed

    def forget_idempotent(self) -> int:
        return self.store.forget_idempotent(self._clock() - IDEMPOTENCY_TTL_S)

    # -- the one place a status changes -----------------------------------------------

    def _move(
        self,
        job_id: int,
        to: JobStatus,
        expected: set[JobStatus],
        *,
        held_by: str | None = None,
        **fields: object,
    ) -> JobRecord | None:
        """Change `job_id` to `to` if it is in one of `expected` (and, with `held_by`,
        that claimant holds it), setting `fields` with it; tell the notifier of an end."""
        illegal = [state for state in expected if to not in TRANSITIONS[state]]
        if illegal:
            raise ValueError(f"no transition {illegal} -> {to}")
        job = self.store.transition(job_id, Change(frozenset(expected), to, fields, held_by))
        if job is not None and to.is_terminal and expected & ACTIVE:
            self._ended([job])
        return job

    def _ended(self, jobs: Sequence[JobRecord]) -> None:
        if jobs:
            self.notifiers.ended(jobs)
