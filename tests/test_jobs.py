"""The store conformance suite: the job lifecycle on SQLite and on PostgreSQL.

The same test functions run on both dialects (`database_url` is parametrised): every
transition of `lifecycle.TRANSITIONS` and every refused one, the bulk statements
(clear_queue, lapsed claims), batch claims, leases, webhook leases and Idempotency-Keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from magicmix.errors import Busy, Conflict
from magicmix.jobs import (
    Idempotency,
    IdempotencyClaim,
    JobParams,
    JobRecord,
    JobResult,
    JobStatus,
    QueueLimits,
    WebhookState,
)
from magicmix.lifecycle import TRANSITIONS, Leases, Lifecycle
from magicmix.store.base import JobStore
from magicmix.store.database import Database, open_database
from magicmix.store.jobs import SqlJobStore

Q, P, S, F, C, X = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.SUCCESS,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
    JobStatus.EXPIRED,
)
LEASES = Leases(lease_s=30, max_attempts=2)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A `Notifier` that keeps what it was told."""

    def __init__(self) -> None:
        self.jobs: list[JobRecord] = []

    def ended(self, jobs: object) -> None:
        self.jobs.extend(jobs)  # type: ignore[call-overload]


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = open_database(database_url)
    yield db
    db.close()


@pytest.fixture
def job_store(database: Database) -> JobStore:
    return SqlJobStore(database)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def ended(recorder: Recorder) -> list[JobRecord]:
    return recorder.jobs


@pytest.fixture
def lifecycle(job_store: JobStore, clock: Clock, recorder: Recorder) -> Lifecycle:
    return Lifecycle(
        job_store, QueueLimits(100, 100), notifier=recorder, leases=LEASES, clock=clock
    )


@contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements run on `database` inside the block (transaction control aside)."""
    seen: list[str] = []

    def record(conn: object, cursor: object, sql: str, *args: object) -> None:
        if not sql.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "SELECT PG_")):
            seen.append(sql)

    event.listen(database.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(database.engine, "before_cursor_execute", record)


def params(**overrides: object) -> JobParams:
    values: dict[str, object] = {
        "prompt": "Bed",
        "negative_prompt": "",
        "width": 256,
        "height": 256,
        "kmin": 0.3,
        "kmax": 0.5,
        "mix_factor": 0.5,
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 1,
        "image_ref": "http://example.invalid/a.png",
    }
    values.update(overrides)
    return JobParams.model_validate(values)


def result(name: str = "x.png", stored_in: str = "service") -> JobResult:
    return JobResult.model_validate(
        {
            "output": [f"http://o/{name}"],
            "generation_time": 1.5,
            "stored_in": stored_in,
            "object_names": [name],
        }
    )


def create(lifecycle: Lifecycle, key_id: str = "k1", **overrides: object) -> JobRecord:
    return lifecycle.create(key_id, params(**overrides), b"image-bytes")


def claim(lifecycle: Lifecycle, job_id: int, claimant: str = "worker-1") -> JobRecord | None:
    claimed = lifecycle.claim({job_id: claimant})
    return claimed[0] if claimed else None


def running(lifecycle: Lifecycle, **overrides: object) -> JobRecord:
    job = claim(lifecycle, create(lifecycle, **overrides).id)
    assert job is not None
    return job


def status(lifecycle: Lifecycle, job_id: int) -> JobStatus:
    job = lifecycle.store.get(job_id)
    assert job is not None
    return job.status


# -- create --------------------------------------------------------------------------------


def test_ids_are_unique_positive_and_increasing(lifecycle: Lifecycle) -> None:
    ids = [create(lifecycle).id for _ in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] >= 1


def test_a_new_job_is_queued_with_its_image_and_owes_its_webhook(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    plain, hooked = create(lifecycle, seed=99), create(lifecycle, webhook="http://h.invalid/")
    stored = lifecycle.store.get(plain.id)
    assert stored is not None and stored.status is Q and stored.params.seed == 99
    assert stored.key_id == "k1" and stored.created_at == clock.now and stored.webhook is None
    assert lifecycle.store.image(plain.id) == b"image-bytes"
    assert len(stored.output_token) >= 16  # unguessable output names
    assert lifecycle.store.get(hooked.id).webhook == WebhookState()  # type: ignore[union-attr]
    assert lifecycle.store.get(plain.id + 1000) is None
    assert [job.id for job in lifecycle.store.active()] == [plain.id, hooked.id]
    assert [job.id for job in lifecycle.store.active(limit=1)] == [plain.id]


def test_the_queue_is_bounded_overall_and_per_key(job_store: JobStore) -> None:
    lifecycle = Lifecycle(job_store, QueueLimits(max_queue=5, max_per_key=3))
    for _ in range(3):
        create(lifecycle, "k1")
    with pytest.raises(Busy) as per_key:
        create(lifecycle, "k1")
    assert per_key.value.retry_after > 0 and "this key" in per_key.value.message
    for _ in range(2):
        create(lifecycle, "k2")
    with pytest.raises(Busy, match="queue is full"):
        create(lifecycle, "k3")
    assert job_store.queue_length() == 5


def test_ended_jobs_free_their_queue_room(job_store: JobStore) -> None:
    lifecycle = Lifecycle(job_store, QueueLimits(max_queue=1, max_per_key=1))
    first = create(lifecycle)
    lifecycle.cancel(first.id)
    second = create(lifecycle)
    claimed = claim(lifecycle, second.id)
    assert claimed is not None and lifecycle.finish(claimed, result()) is not None
    create(lifecycle)
    assert job_store.queue_length() == 1


def test_a_refused_insert_leaves_nothing_behind(lifecycle: Lifecycle, job_store: JobStore) -> None:
    full = Lifecycle(job_store, QueueLimits(max_queue=1, max_per_key=1))
    kept = create(full)
    with pytest.raises(Busy):
        create(full)
    assert [job.id for job in job_store.active()] == [kept.id]
    assert create(lifecycle).id > kept.id  # ids move on; none was half-made


# -- each allowed transition -----------------------------------------------------------


def test_claim_takes_a_queued_job_once_with_a_lease(lifecycle: Lifecycle, clock: Clock) -> None:
    job = create(lifecycle)
    clock.now += 5
    claimed = claim(lifecycle, job.id, "worker-1")
    assert claimed is not None and claimed.status is P
    assert claimed.claimant == "worker-1" and claimed.started_at == clock.now
    assert claimed.lease_until == clock.now + LEASES.lease_s and claimed.run_attempts == 1
    assert lifecycle.store.get(job.id) == claimed
    assert claim(lifecycle, job.id, "worker-2") is None  # a second runner is refused
    again = claim(lifecycle, job.id, "worker-1")  # the same input, retried by Modal
    assert again is not None and again.run_attempts == 2
    assert claim(lifecycle, job.id + 99, "worker-1") is None


def test_claim_takes_each_job_for_its_own_claimant(lifecycle: Lifecycle) -> None:
    a, b, c = create(lifecycle), create(lifecycle), create(lifecycle)
    lifecycle.cancel(c.id)
    claimed = lifecycle.claim({a.id: "input-a", b.id: "input-b", c.id: "input-c"})
    assert [(job.id, job.claimant) for job in claimed] == [(a.id, "input-a"), (b.id, "input-b")]


def test_finish_records_the_result_drops_the_image_and_tells_listeners(
    lifecycle: Lifecycle, ended: list[JobRecord], clock: Clock
) -> None:
    job = running(lifecycle)
    clock.now += 3
    done = lifecycle.finish(job, result())
    assert done is not None and done.status is S and done.result == result()
    assert done.finished_at == clock.now and done.error is None and done.lease_until is None
    assert lifecycle.store.get(job.id) == done and lifecycle.store.image(job.id) is None
    assert ended == [done] and lifecycle.store.active() == []


def test_a_success_fixes_its_webhook_body_when_it_is_recorded(lifecycle: Lifecycle) -> None:
    job = running(lifecycle, webhook="http://h.invalid/", track_id="t-1")
    done = lifecycle.finish(job, result())
    assert done is not None and done.webhook_body is not None
    assert '"status":"success"' in done.webhook_body and '"track_id":"t-1"' in done.webhook_body
    assert lifecycle.expire(done.finished_at + 1) == [job.id]  # the outputs go later...
    expired = lifecycle.store.get(job.id)
    assert expired is not None and expired.webhook_body == done.webhook_body  # ...not the body


@pytest.mark.parametrize("start", [Q, P])
def test_fail_ends_a_queued_or_running_job(
    lifecycle: Lifecycle, ended: list[JobRecord], start: JobStatus
) -> None:
    job = create(lifecycle) if start is Q else running(lifecycle)
    failed = lifecycle.fail(job.id, "bad things")
    assert failed is not None and failed.status is F and failed.error == "bad things"
    assert status(lifecycle, job.id) is F and ended == [failed]


def test_cancel_ends_a_queued_job(lifecycle: Lifecycle, ended: list[JobRecord]) -> None:
    job = create(lifecycle, webhook="http://h.invalid/")
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None and cancelled.status is C
    assert cancelled.error == "cancelled by clear_queue" and ended == [cancelled]
    assert lifecycle.store.image(job.id) is None
    leased = lifecycle.store.lease_webhooks(now=1e12, lease_until=1e12 + 60, limit=10)
    assert [j.id for j in leased] == [job.id]


def test_requeue_puts_a_running_job_back(lifecycle: Lifecycle) -> None:
    job = running(lifecycle)
    again = lifecycle.requeue(job)
    assert again is not None and again.status is Q and again.claimant is None
    assert again.lease_until is None and lifecycle.store.image(job.id) == b"image-bytes"
    claimed = claim(lifecycle, job.id, "worker-2")
    assert claimed is not None and claimed.claimant == "worker-2"
    assert lifecycle.requeue(job) is None  # worker-1 holds it no more


def test_expire_marks_only_old_service_store_successes(
    lifecycle: Lifecycle, ended: list[JobRecord], clock: Clock
) -> None:
    old_service, old_user, old_failed = running(lifecycle), running(lifecycle), create(lifecycle)
    lifecycle.finish(old_service, result("a.png"))
    lifecycle.finish(old_user, result("b.png", stored_in="user"))
    lifecycle.fail(old_failed.id, "no")
    cutoff = clock.now + 1
    clock.now += 2
    fresh = running(lifecycle)
    lifecycle.finish(fresh, result("c.png"))
    ended.clear()
    assert lifecycle.expire(cutoff) == [old_service.id]
    assert [status(lifecycle, j.id) for j in (old_service, old_user, old_failed, fresh)] == [
        X,
        S,
        F,
        S,
    ]
    assert ended == []  # expiry is no end: it sends no webhook
    assert lifecycle.expire(cutoff) == []


# -- refused transitions ---------------------------------------------------------------


def test_exactly_one_ended_state_first_writer_wins(
    lifecycle: Lifecycle, ended: list[JobRecord]
) -> None:
    job = running(lifecycle)
    assert lifecycle.fail(job.id, "the sweep got there first") is not None
    assert lifecycle.finish(job, result()) is None
    assert lifecycle.fail(job.id, "again") is None
    assert lifecycle.requeue(job) is None
    assert status(lifecycle, job.id) is F and len(ended) == 1


def test_a_finish_after_a_cancel_is_refused_and_sends_nothing(
    lifecycle: Lifecycle, ended: list[JobRecord]
) -> None:
    job = create(lifecycle)
    claimed_view = job.model_copy(update={"status": P, "claimant": "w"})
    assert lifecycle.cancel(job.id) is not None
    assert lifecycle.finish(claimed_view, result()) is None
    assert claim(lifecycle, job.id, "w") is None  # a cancelled job never starts
    assert status(lifecycle, job.id) is C and [j.status for j in ended] == [C]


def test_a_claimant_whose_claim_passed_on_cannot_end_the_job(
    lifecycle: Lifecycle, clock: Clock, ended: list[JobRecord]
) -> None:
    first = running(lifecycle)
    clock.now += LEASES.lease_s + 1  # worker-1 hung: its lease lapsed
    requeued, failed = lifecycle.release_lapsed()
    assert [j.id for j in requeued] == [first.id] and failed == []
    second = claim(lifecycle, first.id, "worker-2")
    assert second is not None
    assert lifecycle.finish(first, result()) is None  # worker-1 wakes up: refused
    assert lifecycle.fail(first.id, "late", claimant=first.claimant) is None
    assert lifecycle.finish(second, result()) is not None and len(ended) == 1


def test_refusals_from_each_state(lifecycle: Lifecycle) -> None:
    queued, run = create(lifecycle), running(lifecycle)
    assert lifecycle.finish(queued, result()) is None  # finish needs a claim
    assert lifecycle.requeue(queued) is None
    assert lifecycle.cancel(run.id) is None  # a running job is left to finish
    done = lifecycle.finish(run, result())
    assert done is not None
    assert claim(lifecycle, done.id, "w") is None and lifecycle.cancel(done.id) is None
    assert lifecycle.fail(done.id, "late") is None
    assert (status(lifecycle, queued.id), status(lifecycle, run.id)) == (Q, S)


def test_the_transition_table_is_enforced(lifecycle: Lifecycle) -> None:
    job = create(lifecycle)
    for source, target in itertools.product(JobStatus, JobStatus):
        if target in TRANSITIONS[source]:
            continue
        with pytest.raises(ValueError, match="no transition"):
            lifecycle._move(job.id, target, {source})
    assert status(lifecycle, job.id) is Q


# -- batches, clear_queue, leases ---------------------------------------------------------


def test_claim_next_takes_the_oldest_job_and_compatible_ones(lifecycle: Lifecycle) -> None:
    a = create(lifecycle)
    b = create(lifecycle, width=512)
    c = create(lifecycle, kmin=0.31)  # int(0.31 * 20) == int(0.3 * 20): same schedule
    d = create(lifecycle)
    batch = lifecycle.claim_next(3, "w")
    assert [j.id for j in batch] == [a.id, c.id, d.id] and all(j.status is P for j in batch)
    assert all(j.claimant == "w" and j.lease_until for j in batch)
    assert [j.id for j in lifecycle.claim_next(3, "w")] == [b.id]
    assert lifecycle.claim_next(3, "w") == []


def test_cancel_queued_is_one_statement_and_leaves_other_states_alone(
    lifecycle: Lifecycle, database: Database, ended: list[JobRecord]
) -> None:
    queued = [create(lifecycle, webhook="http://h.invalid/") for _ in range(40)]
    run, done = running(lifecycle), running(lifecycle)
    lifecycle.finish(done, result())
    ended.clear()
    with statements(database) as ran:
        cancelled = lifecycle.cancel_queued()
    assert len(ran) == 1 and ran[0].lstrip().upper().startswith("UPDATE")
    assert [job.id for job in cancelled] == [job.id for job in queued]
    assert sorted(j.id for j in ended) == [job.id for job in queued]  # one notification each
    assert [status(lifecycle, j.id) for j in (run, done)] == [P, S]
    assert all(lifecycle.store.image(job.id) is None for job in queued)


def test_renew_extends_only_claims_still_held(lifecycle: Lifecycle, clock: Clock) -> None:
    mine, lost = running(lifecycle), running(lifecycle)
    clock.now += LEASES.lease_s - 1
    assert lifecycle.renew([mine]) == [mine.id]  # renewed before it lapsed
    clock.now += 2
    lifecycle.release_lapsed()  # `lost` lapsed; `mine` was renewed
    assert status(lifecycle, mine.id) is P and status(lifecycle, lost.id) is Q
    assert lifecycle.renew([mine, lost]) == [mine.id]


def test_lapsed_claims_are_requeued_then_failed_after_max_attempts(
    lifecycle: Lifecycle, clock: Clock, ended: list[JobRecord]
) -> None:
    job = create(lifecycle, webhook="http://h.invalid/")
    for attempt in range(1, LEASES.max_attempts + 1):
        claimed = claim(lifecycle, job.id, f"worker-{attempt}")
        assert claimed is not None and claimed.run_attempts == attempt
        clock.now += LEASES.lease_s + 1
        requeued, failed = lifecycle.release_lapsed()
        if attempt < LEASES.max_attempts:
            assert [j.id for j in requeued] == [job.id] and failed == []
    assert requeued == [] and [j.id for j in failed] == [job.id]
    gone = lifecycle.store.get(job.id)
    assert gone is not None and gone.status is F and "stopped 2 times" in (gone.error or "")
    assert [j.id for j in ended] == [job.id]  # its webhook is owed once


def test_fail_unstarted_fails_only_old_queued_jobs(lifecycle: Lifecycle, clock: Clock) -> None:
    old_queued, old_running = create(lifecycle), running(lifecycle)
    clock.now += 101
    fresh = create(lifecycle)
    assert [j.id for j in lifecycle.fail_unstarted(100)] == [old_queued.id]
    failed = lifecycle.store.get(old_queued.id)
    assert failed is not None and failed.status is F and "did not start" in (failed.error or "")
    assert status(lifecycle, fresh.id) is Q and status(lifecycle, old_running.id) is P


def test_queued_lists_old_queued_jobs_for_respawns(lifecycle: Lifecycle, clock: Clock) -> None:
    old, taken = create(lifecycle), running(lifecycle)
    clock.now += 10
    create(lifecycle)
    lifecycle.store.set_call(old.id, "fc-1")
    found = lifecycle.store.queued(created_before=clock.now - 5, limit=10)
    assert [(job.id, job.call_id) for job in found] == [(old.id, "fc-1")] and taken


def test_exclusive_has_one_holder_at_a_time(job_store: JobStore) -> None:
    with (
        job_store.exclusive("sweep") as first,
        job_store.exclusive("sweep") as second,
        job_store.exclusive("other") as other,
    ):
        assert (first, second, other) == (True, False, True)
    with job_store.exclusive("sweep") as again:
        assert again


# -- webhooks -------------------------------------------------------------------------


def lease(store: JobStore, now: float, limit: int = 10) -> list[int]:
    return [j.id for j in store.lease_webhooks(now=now, lease_until=now + 60, limit=limit)]


def test_webhooks_are_due_once_ended_leased_to_one_sender_and_recorded_once(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    hooked, plain = create(lifecycle, webhook="http://h.invalid/"), create(lifecycle)
    store = lifecycle.store
    assert lease(store, clock.now) == [] and store.next_webhook_at() is None  # not ended yet
    lifecycle.fail(hooked.id, "x")
    lifecycle.fail(plain.id, "x")
    assert store.next_webhook_at() == 0  # due at once
    assert lease(store, clock.now) == [hooked.id]
    assert store.next_webhook_at() == clock.now + 60  # not before its sender's lease ends
    assert lease(store, clock.now) == []  # leased: a second sender gets nothing
    retry = WebhookState(phase="pending", attempts=1, next_at=clock.now + 5, last_status=503)
    assert store.record_webhook(hooked.id, retry, attempts_before=0)
    assert not store.record_webhook(hooked.id, retry, attempts_before=0)  # a late twin
    assert store.get(hooked.id).webhook == retry  # type: ignore[union-attr]
    assert lease(store, clock.now) == [] and store.next_webhook_at() == clock.now + 5
    assert lease(store, clock.now + 5) == [hooked.id]
    delivered = WebhookState(phase="delivered", attempts=2, last_status=200)
    assert store.record_webhook(hooked.id, delivered, attempts_before=1)
    assert store.get(hooked.id).webhook == delivered  # type: ignore[union-attr]
    assert lease(store, clock.now + 1e6) == [] and store.next_webhook_at() is None


def test_a_lapsed_webhook_lease_is_taken_again(lifecycle: Lifecycle, clock: Clock) -> None:
    job = create(lifecycle, webhook="http://h.invalid/")
    lifecycle.fail(job.id, "x")
    assert lease(lifecycle.store, clock.now) == [job.id]  # its sender died mid-attempt
    assert lease(lifecycle.store, clock.now + 59) == []
    assert lease(lifecycle.store, clock.now + 61) == [job.id]


def test_webhook_leases_respect_the_limit_and_each_keys_share(lifecycle: Lifecycle) -> None:
    for key in ("k1", "k1", "k1", "k2", "k2", "k3"):
        lifecycle.fail(create(lifecycle, key, webhook="http://h.invalid/").id, "x")
    store = lifecycle.store
    some = store.lease_webhooks(
        now=1e12, lease_until=2e12, limit=10, per_key=2, in_flight={"k2": 2, "k3": 1}
    )
    assert [job.key_id for job in some] == ["k1", "k1", "k3"]  # k2 has its share in flight
    assert len(lease(store, 1e12, limit=2)) == 2  # of the three left


# -- Idempotency-Key ---------------------------------------------------------------------

IDEM = Idempotency("client-key-1", "fingerprint-a")


def begin(
    store: JobStore, clock: Clock, idem: Idempotency = IDEM, key_id: str = "k1"
) -> IdempotencyClaim:
    return store.begin_idempotent(key_id, idem, now=clock.now, ttl_s=86400, lease_s=120)


def unowned(fingerprint: str, job_id: int | None) -> IdempotencyClaim:
    return IdempotencyClaim(False, fingerprint, job_id)


def test_an_idempotency_key_is_claimed_once_then_answers_with_its_job(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    store = lifecycle.store
    mine = begin(store, clock)
    assert mine.owned and mine.token
    assert begin(store, clock) == unowned("fingerprint-a", None)  # 409 case
    other = Idempotency("client-key-1", "fingerprint-b")
    assert begin(store, clock, other).fingerprint == "fingerprint-a"  # 422 case
    assert begin(store, clock, key_id="k2").owned  # per API key
    job = lifecycle.create("k1", params(), b"img", idempotency=mine)
    assert begin(store, clock) == unowned("fingerprint-a", job.id)
    lifecycle.release_idempotent("k1", mine)  # a bound key is never released
    assert begin(store, clock).job_id == job.id


def test_a_refused_request_releases_its_key_and_stale_claims_are_taken_over(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    store = lifecycle.store
    first = begin(store, clock)
    lifecycle.release_idempotent("k1", first)
    assert begin(store, clock).owned  # free again after the release
    clock.now += 121  # the accepting request died: its lease ran out
    taken = begin(store, clock)
    assert taken.owned
    job = lifecycle.create("k1", params(), b"img", idempotency=taken)
    clock.now += 86400 + 1  # past 24 hours even a bound key starts afresh
    claim_ = begin(store, clock)
    assert claim_.owned and claim_.job_id is None and job.id


def test_a_claim_taken_over_makes_no_job(lifecycle: Lifecycle, clock: Clock) -> None:
    slow = begin(lifecycle.store, clock)
    clock.now += 121  # the first request is slow, past its lease: a resend takes the key
    fast = begin(lifecycle.store, clock)
    job = lifecycle.create("k1", params(), b"img", idempotency=fast)
    with pytest.raises(Conflict):
        lifecycle.create("k1", params(), b"img", idempotency=slow)
    assert [j.id for j in lifecycle.store.active()] == [job.id]  # one job for one key
    lifecycle.release_idempotent("k1", slow)  # the loser cannot free the winner's key
    assert begin(lifecycle.store, clock).job_id == job.id
