"""`JobStore` over SQLAlchemy Core: the same statements on SQLite and PostgreSQL.

Each method is one statement or one transaction (`Database.transaction`: on SQLite the
write lock is taken first, so transactions never interleave; on PostgreSQL the rows a
statement must own are locked by it):

- a status change is a conditional `UPDATE … WHERE status IN (…) RETURNING …`: of two
  writers racing for one job, the second finds the status changed and matches nothing;
- a batch claim takes the oldest queued job and the queued jobs that batch with it in
  one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)`, so two workers never
  take the same job and neither waits for the other;
- an insert counts the active jobs exactly inside its transaction, under a lock that
  orders inserts (PostgreSQL: an advisory lock; SQLite: its write lock), and binds an
  Idempotency-Key in that same transaction;
- webhooks are leased (`webhook_lease_until`) to one sender at a time, and an outcome is
  recorded only if no other sender recorded one since.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from magicmix.errors import Conflict
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
from magicmix.store.database import Database
from magicmix.store.schema import idempotency, jobs

Q, P = JobStatus.QUEUED.value, JobStatus.PROCESSING.value
_ACTIVE = sorted(s.value for s in ACTIVE)
_OWED = sorted(s.value for s in ENDED | {JobStatus.EXPIRED})  # may still owe a webhook
# Everything but the layout image, which only the runner reads (`image`).
_RECORD = [column for column in jobs.c if column.name != "image"]
# JobRecord fields a transition may set, besides the status.
_SETTABLE = {
    "result",
    "error",
    "claimant",
    "started_at",
    "finished_at",
    "lease_until",
    "webhook_body",
}


def _record(row: Row[Any]) -> JobRecord:
    m = row._mapping
    webhook = None
    if m["webhook_phase"] is not None:
        webhook = WebhookState(
            phase=m["webhook_phase"],
            attempts=m["webhook_attempts"],
            next_at=m["webhook_next_at"],
            last_status=m["webhook_last_status"],
            last_error=m["webhook_last_error"],
        )
    return JobRecord(
        id=m["id"],
        key_id=m["key_id"],
        status=JobStatus(m["status"]),
        params=JobParams.model_validate_json(m["params"]),
        output_token=m["output_token"],
        result=JobResult.model_validate_json(m["result"]) if m["result"] else None,
        error=m["error"],
        webhook=webhook,
        claimant=m["claimant"],
        lease_until=m["lease_until"],
        run_attempts=m["run_attempts"],
        call_id=m["call_id"],
        webhook_body=m["webhook_body"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def _records(rows: Sequence[Row[Any]]) -> list[JobRecord]:
    return sorted(map(_record, rows), key=lambda job: job.id)  # RETURNING has no order


def _column(value: Any) -> Any:
    return value.model_dump_json() if isinstance(value, JobResult) else value


def _claimant_of(claims: Mapping[int, str]) -> ColumnElement[Any]:
    """Each job's own claimant, in one expression (`CASE id WHEN … THEN … END`)."""
    return case(dict(claims), value=jobs.c.id)


_ENDING = {"image": None, "lease_until": None}  # what every end drops


def _ended(status: JobStatus, error: str, now: float) -> dict[str, Any]:
    """The columns a bulk end sets (cancel_queued, release_lapsed, fail_unstarted)."""
    return {"status": status.value, "error": error, "finished_at": now, **_ENDING}


class SqlJobStore:
    """`store.base.JobStore` on a `Database` (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def database(self) -> Database:
        return self._db

    # -- create -------------------------------------------------------------------------

    def insert(self, job: NewJob, image: bytes, limits: QueueLimits) -> JobRecord:
        mine = func.coalesce(func.sum(case((jobs.c.key_id == job.key_id, 1), else_=0)), 0)
        with self._db.transaction() as connection:
            self._db.lock(connection, "queue")  # inserts counted one at a time
            total, own = connection.execute(
                select(func.count(), mine).where(jobs.c.status.in_(_ACTIVE))
            ).one()
            limits.check(int(total), int(own))
            row = connection.execute(
                insert(jobs)
                .values(
                    key_id=job.key_id,
                    status=Q,
                    params=job.params.model_dump_json(),
                    batch_key=job.params.batch_key_text(),
                    image=image,
                    output_token=secrets.token_urlsafe(16),
                    webhook_phase="pending" if job.webhook else None,
                    created_at=job.created_at,
                )
                .returning(*_RECORD)
            ).one()
            claim = job.idempotency
            if claim is not None and claim.key is not None:
                bound = connection.execute(
                    update(idempotency)
                    .where(
                        idempotency.c.key_id == job.key_id,
                        idempotency.c.idem_hash == claim.key.key_hash,
                        idempotency.c.claim_token == claim.token,
                        idempotency.c.job_id.is_(None),
                    )
                    .values(job_id=row.id)
                )
                if bound.rowcount != 1:  # the claim lapsed and another request took it over
                    raise Conflict(
                        "a request with this Idempotency-Key is still being accepted; retry shortly"
                    )
            return _record(row)

    # -- read ---------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        with self._db.read() as connection:
            row = connection.execute(select(*_RECORD).where(jobs.c.id == job_id)).first()
        return _record(row) if row else None

    def image(self, job_id: int) -> bytes | None:
        with self._db.read() as connection:
            data = connection.scalar(select(jobs.c.image).where(jobs.c.id == job_id))
        return bytes(data) if data is not None else None

    def active(self, limit: int | None = None) -> list[JobRecord]:
        query = select(*_RECORD).where(jobs.c.status.in_(_ACTIVE)).order_by(jobs.c.id)
        with self._db.read() as connection:
            rows = connection.execute(query.limit(limit)).all()
        return [_record(row) for row in rows]

    def queued(self, *, created_before: float, limit: int) -> list[JobRecord]:
        query = (
            select(*_RECORD)
            .where(jobs.c.status == Q, jobs.c.created_at < created_before)
            .order_by(jobs.c.id)
            .limit(limit)
        )
        with self._db.read() as connection:
            return [_record(row) for row in connection.execute(query).all()]

    def queue_length(self) -> int:
        with self._db.read() as connection:
            return int(
                connection.scalar(
                    select(func.count()).select_from(jobs).where(jobs.c.status.in_(_ACTIVE))
                )
                or 0
            )

    def expirable(self, finished_before: float) -> list[JobRecord]:
        query = (
            select(*_RECORD)
            .where(jobs.c.status == JobStatus.SUCCESS.value, jobs.c.finished_at < finished_before)
            .order_by(jobs.c.id)
        )
        with self._db.read() as connection:
            found = [_record(row) for row in connection.execute(query).all()]
        return [job for job in found if job.result and job.result.stored_in == "service"]

    # -- status changes -----------------------------------------------------------------

    def transition(self, job_id: int, change: Change) -> JobRecord | None:
        unknown = set(change.fields) - _SETTABLE
        if unknown:
            raise ValueError(f"a transition cannot set {sorted(unknown)}")
        values = {name: _column(value) for name, value in change.fields.items()}
        if change.to.is_terminal:
            values |= _ENDING
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in change.expected]))
            .values(status=change.to.value, **values)
            .returning(*_RECORD)
        )
        if change.claimant is not None:
            statement = statement.where(jobs.c.claimant == change.claimant)
        with self._db.transaction() as connection:
            row = connection.execute(statement).first()
        return _record(row) if row else None

    def claim_next(
        self, limit: int, claimant: str, *, now: float, lease_until: float
    ) -> list[JobRecord]:
        queued = jobs.c.status == Q
        with self._db.transaction() as connection:
            first = connection.execute(
                select(jobs.c.batch_key)
                .where(queued)
                .order_by(jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return []
            batch = (
                select(jobs.c.id)
                .where(queued, jobs.c.batch_key == first.batch_key)
                .order_by(jobs.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = connection.execute(
                update(jobs)
                .where(jobs.c.id.in_(batch.scalar_subquery()), queued)
                .values(self._claimed(claimant, now, lease_until))
                .returning(*_RECORD)
            ).all()
        return _records(rows)

    def claim(
        self, claims: Mapping[int, str], *, now: float, lease_until: float
    ) -> list[JobRecord]:
        if not claims:
            return []
        claimant = _claimant_of(claims)
        mine = or_(jobs.c.status == Q, and_(jobs.c.status == P, jobs.c.claimant == claimant))
        with self._db.transaction() as connection:
            rows = connection.execute(
                update(jobs)
                .where(jobs.c.id.in_(list(claims)), mine)
                .values(self._claimed(claimant, now, lease_until))
                .returning(*_RECORD)
            ).all()
        return _records(rows)

    @staticmethod
    def _claimed(claimant: Any, now: float, lease_until: float) -> dict[Any, Any]:
        return {
            jobs.c.status: P,
            jobs.c.claimant: claimant,
            jobs.c.started_at: now,
            jobs.c.lease_until: lease_until,
            jobs.c.run_attempts: jobs.c.run_attempts + 1,
        }

    def renew(self, claims: Mapping[int, str], lease_until: float) -> list[int]:
        if not claims:
            return []
        with self._db.transaction() as connection:
            held = connection.execute(
                update(jobs)
                .where(
                    jobs.c.id.in_(list(claims)),
                    jobs.c.status == P,
                    jobs.c.claimant == _claimant_of(claims),
                )
                .values(lease_until=lease_until)
                .returning(jobs.c.id)
            ).scalars()
            return sorted(held)

    def cancel_queued(self, *, reason: str, now: float) -> list[JobRecord]:
        with self._db.transaction() as connection:
            rows = connection.execute(
                update(jobs)
                .where(jobs.c.status == Q)
                .values(_ended(JobStatus.CANCELLED, reason, now))
                .returning(*_RECORD)
            ).all()
        return _records(rows)

    def release_lapsed(
        self, *, now: float, max_attempts: int, message: str
    ) -> tuple[list[JobRecord], list[JobRecord]]:
        lapsed = and_(jobs.c.status == P, jobs.c.lease_until < now)
        with self._db.transaction() as connection:
            requeued = connection.execute(
                update(jobs)
                .where(lapsed, jobs.c.run_attempts < max_attempts)
                .values(status=Q, claimant=None, started_at=None, lease_until=None)
                .returning(*_RECORD)
            ).all()
            failed = connection.execute(
                update(jobs)
                .where(lapsed, jobs.c.run_attempts >= max_attempts)
                .values(_ended(JobStatus.FAILED, message, now))
                .returning(*_RECORD)
            ).all()
        return _records(requeued), _records(failed)

    def fail_unstarted(self, *, created_before: float, now: float, message: str) -> list[JobRecord]:
        with self._db.transaction() as connection:
            rows = connection.execute(
                update(jobs)
                .where(jobs.c.status == Q, jobs.c.created_at < created_before)
                .values(_ended(JobStatus.FAILED, message, now))
                .returning(*_RECORD)
            ).all()
        return _records(rows)

    def set_call(self, job_id: int, call_id: str) -> None:
        with self._db.transaction() as connection:
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(call_id=call_id))

    # -- webhooks -----------------------------------------------------------------------

    def lease_webhooks(
        self,
        *,
        now: float,
        lease_until: float,
        limit: int,
        per_key: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[JobRecord]:
        due_at = func.coalesce(jobs.c.webhook_next_at, 0)
        is_due = and_(
            jobs.c.webhook_phase == "pending",
            jobs.c.status.in_(_OWED),
            due_at <= now,
            func.coalesce(jobs.c.webhook_lease_until, 0) <= now,
        )
        taken = dict(in_flight or {})
        full = [key for key, n in taken.items() if per_key is not None and n >= per_key]
        candidates = select(jobs.c.id, jobs.c.key_id).where(is_due).order_by(due_at, jobs.c.id)
        if full:
            candidates = candidates.where(jobs.c.key_id.not_in(full))
        with self._db.transaction() as connection:
            chosen: list[int] = []
            for job_id, key_id in connection.execute(candidates.limit(limit * 4)):
                if per_key is not None and taken.get(key_id, 0) >= per_key:
                    continue  # this key has its share in flight: the others go first
                taken[key_id] = taken.get(key_id, 0) + 1
                chosen.append(job_id)
                if len(chosen) == limit:
                    break
            if not chosen:
                return []
            rows = connection.execute(  # a row another sender leased meanwhile is not due now
                update(jobs)
                .where(jobs.c.id.in_(chosen), is_due)
                .values(webhook_lease_until=lease_until)
                .returning(*_RECORD)
            ).all()
        leased = [_record(row) for row in rows]
        return sorted(leased, key=lambda job: ((job.webhook and job.webhook.next_at) or 0, job.id))

    def next_webhook_at(self) -> float | None:
        due_at = func.coalesce(jobs.c.webhook_next_at, 0)
        leased = func.coalesce(jobs.c.webhook_lease_until, 0)
        not_before = case((leased > due_at, leased), else_=due_at)
        query = select(func.min(not_before)).where(
            jobs.c.webhook_phase == "pending", jobs.c.status.in_(_OWED)
        )
        with self._db.read() as connection:
            found = connection.scalar(query)
        return None if found is None else float(found)

    def record_webhook(self, job_id: int, state: WebhookState, *, attempts_before: int) -> bool:
        with self._db.transaction() as connection:
            done = connection.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.webhook_phase == "pending",
                    jobs.c.webhook_attempts == attempts_before,
                )
                .values(
                    webhook_phase=state.phase,
                    webhook_attempts=state.attempts,
                    webhook_next_at=state.next_at,
                    webhook_last_status=state.last_status,
                    webhook_last_error=state.last_error,
                    webhook_lease_until=None,
                )
            )
        return done.rowcount == 1

    # -- Idempotency-Key ----------------------------------------------------------------

    def begin_idempotent(
        self, key_id: str, idempotency_key: Idempotency, *, now: float, ttl_s: float, lease_s: float
    ) -> IdempotencyClaim:
        token = secrets.token_urlsafe(16)
        fresh = self._db.insert(idempotency).values(
            key_id=key_id,
            idem_hash=idempotency_key.key_hash,
            fingerprint=idempotency_key.fingerprint,
            job_id=None,
            created_at=now,
            claim_token=token,
        )
        stale = or_(
            idempotency.c.created_at < now - ttl_s,
            and_(idempotency.c.job_id.is_(None), idempotency.c.created_at < now - lease_s),
        )
        take_over = fresh.on_conflict_do_update(
            index_elements=[idempotency.c.key_id, idempotency.c.idem_hash],
            set_={
                "fingerprint": fresh.excluded.fingerprint,
                "job_id": None,
                "created_at": fresh.excluded.created_at,
                "claim_token": fresh.excluded.claim_token,
            },
            where=stale,
        ).returning(idempotency.c.claim_token)
        with self._db.transaction() as connection:
            if connection.scalar(take_over) == token:
                return IdempotencyClaim(
                    True, idempotency_key.fingerprint, None, key=idempotency_key, token=token
                )
            fingerprint, job_id = connection.execute(
                select(idempotency.c.fingerprint, idempotency.c.job_id).where(
                    idempotency.c.key_id == key_id,
                    idempotency.c.idem_hash == idempotency_key.key_hash,
                )
            ).one()
        return IdempotencyClaim(False, fingerprint, job_id)

    def release_idempotent(self, key_id: str, claim: IdempotencyClaim) -> None:
        if claim.key is None or claim.token is None:
            return
        with self._db.transaction() as connection:
            connection.execute(
                delete(idempotency).where(
                    idempotency.c.key_id == key_id,
                    idempotency.c.idem_hash == claim.key.key_hash,
                    idempotency.c.claim_token == claim.token,
                    idempotency.c.job_id.is_(None),
                )
            )

    def forget_idempotent(self, created_before: float) -> int:
        with self._db.transaction() as connection:
            gone = connection.execute(
                delete(idempotency).where(idempotency.c.created_at < created_before)
            )
        return int(gone.rowcount)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        with self._db.exclusive(name) as held:
            yield held
