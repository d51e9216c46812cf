"""The job lifecycle on every store: the same test functions, parametrized over stores.

Every transition of `lifecycle.TRANSITIONS` and every refused one is exercised on SQLite
and on the Modal Dict store (run against the in-memory stand-in for `modal.Dict`, named
so in its param id).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from magicmix.backends.local.db import Database
from magicmix.backends.local.jobs import SqliteJobStore
from magicmix.errors import Busy
from magicmix.jobs import (
    Idempotency,
    IdempotencyClaim,
    JobParams,
    JobRecord,
    JobResult,
    JobStatus,
    JobStore,
    QueueLimits,
    WebhookState,
)
from magicmix.lifecycle import TRANSITIONS, Lifecycle, StaleAfter
from tests.modal_standins import standin_job_store

STORE_FACTORIES: dict[str, Callable[[Path], JobStore]] = {
    "sqlite": lambda tmp: SqliteJobStore(Database(tmp / "jobs.sqlite3")),
    "modal-dict-inmemory-standin": lambda tmp: standin_job_store(tmp / "layouts"),
}
Q, P, S, F, C, X = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.SUCCESS,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
    JobStatus.EXPIRED,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=sorted(STORE_FACTORIES))
def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    return STORE_FACTORIES[request.param](tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ended() -> list[JobRecord]:
    return []


@pytest.fixture
def lifecycle(job_store: JobStore, clock: Clock, ended: list[JobRecord]) -> Lifecycle:
    return Lifecycle(job_store, QueueLimits(100, 100), listeners=[ended.extend], clock=clock)


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


def running(lifecycle: Lifecycle, **overrides: object) -> JobRecord:
    job = lifecycle.claim(create(lifecycle, **overrides).id, "worker-1")
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
    claimed = lifecycle.claim(second.id, "w")
    assert claimed is not None and lifecycle.finish(claimed, result()) is not None
    create(lifecycle)
    assert job_store.queue_length() == 1


# -- each allowed transition -----------------------------------------------------------


def test_claim_takes_a_queued_job_once(lifecycle: Lifecycle, clock: Clock) -> None:
    job = create(lifecycle)
    clock.now += 5
    claimed = lifecycle.claim(job.id, "worker-1")
    assert claimed is not None and claimed.status is P
    assert claimed.claimant == "worker-1" and claimed.started_at == clock.now
    assert lifecycle.store.get(job.id) == claimed
    assert lifecycle.claim(job.id, "worker-2") is None  # a second runner is refused
    assert lifecycle.claim(job.id, "worker-1") == claimed  # the same input, retried
    assert lifecycle.claim(job.id + 99, "worker-1") is None


def test_finish_records_the_result_drops_the_image_and_tells_listeners(
    lifecycle: Lifecycle, ended: list[JobRecord], clock: Clock
) -> None:
    job = running(lifecycle)
    clock.now += 3
    done = lifecycle.finish(job, result())
    assert done is not None and done.status is S and done.result == result()
    assert done.finished_at == clock.now and done.error is None
    assert lifecycle.store.get(job.id) == done and lifecycle.store.image(job.id) is None
    assert ended == [done] and lifecycle.store.active() == []


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
    assert [j.id for j in lifecycle.store.webhooks_due(1e12, 10)] == [job.id]


def test_requeue_puts_a_running_job_back(lifecycle: Lifecycle) -> None:
    job = running(lifecycle)
    again = lifecycle.requeue(job.id)
    assert again is not None and again.status is Q and again.claimant is None
    assert lifecycle.store.image(job.id) == b"image-bytes"
    claimed = lifecycle.claim(job.id, "worker-2")
    assert claimed is not None and claimed.claimant == "worker-2"


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
    assert lifecycle.requeue(job.id) is None
    assert status(lifecycle, job.id) is F and len(ended) == 1


def test_a_finish_after_a_cancel_is_refused_and_sends_nothing(
    lifecycle: Lifecycle, ended: list[JobRecord]
) -> None:
    job = create(lifecycle)
    claimed_view = job.model_copy(update={"status": P, "claimant": "w"})
    assert lifecycle.cancel(job.id) is not None
    assert lifecycle.finish(claimed_view, result()) is None
    assert lifecycle.claim(job.id, "w") is None  # a cancelled job never starts
    assert status(lifecycle, job.id) is C and [j.status for j in ended] == [C]


def test_refusals_from_each_state(lifecycle: Lifecycle) -> None:
    queued, run = create(lifecycle), running(lifecycle)
    assert lifecycle.finish(queued, result()) is None  # finish needs a claim
    assert lifecycle.requeue(queued.id) is None
    assert lifecycle.cancel(run.id) is None  # a running job is left to finish
    done = lifecycle.finish(run, result())
    assert done is not None
    assert lifecycle.claim(done.id, "w") is None and lifecycle.cancel(done.id) is None
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


# -- batches, cancel_queued, the sweep ---------------------------------------------------


def test_claim_batch_takes_the_oldest_job_and_compatible_ones(lifecycle: Lifecycle) -> None:
    a = create(lifecycle)
    b = create(lifecycle, width=512)
    c = create(lifecycle, kmin=0.31)  # int(0.31 * 20) == int(0.3 * 20): same schedule
    d = create(lifecycle)
    batch = lifecycle.claim_batch(3, "w")
    assert [j.id for j in batch] == [a.id, c.id, d.id] and all(j.status is P for j in batch)
    assert [j.id for j in lifecycle.claim_batch(3, "w")] == [b.id]
    assert lifecycle.claim_batch(3, "w") == []


def test_cancel_queued_leaves_other_states_alone(lifecycle: Lifecycle) -> None:
    queued, run, done = create(lifecycle), running(lifecycle), running(lifecycle)
    lifecycle.finish(done, result())
    assert [job.id for job in lifecycle.cancel_queued()] == [queued.id]
    assert [status(lifecycle, j.id) for j in (queued, run, done)] == [C, P, S]


def test_the_sweep_fails_only_stuck_jobs(lifecycle: Lifecycle, clock: Clock) -> None:
    stale = StaleAfter(queued_s=100, processing_s=50)
    old_queued, old_running = create(lifecycle), running(lifecycle)
    clock.now += 60
    fresh_queued, fresh_running = create(lifecycle), running(lifecycle)
    assert [j.id for j in lifecycle.sweep(stale)] == [old_running.id]
    clock.now += 41  # old_queued is 101 s old, fresh ones 41 s
    assert [j.id for j in lifecycle.sweep(stale)] == [old_queued.id]
    failed = lifecycle.store.get(old_queued.id)
    assert failed is not None and failed.status is F and "did not start" in (failed.error or "")
    assert status(lifecycle, fresh_queued.id) is Q and status(lifecycle, fresh_running.id) is P


# -- webhooks -------------------------------------------------------------------------


def test_webhooks_are_due_once_ended_until_recorded(lifecycle: Lifecycle, clock: Clock) -> None:
    hooked, plain = create(lifecycle, webhook="http://h.invalid/"), create(lifecycle)
    store = lifecycle.store
    assert store.webhooks_due(clock.now, 10) == []  # owed, but the job has not ended
    lifecycle.fail(hooked.id, "x")
    lifecycle.fail(plain.id, "x")
    assert [j.id for j in store.webhooks_due(clock.now, 10)] == [hooked.id]
    retry = WebhookState(phase="pending", attempts=1, next_at=clock.now + 5, last_status=503)
    store.record_webhook(hooked.id, retry)
    assert store.get(hooked.id).webhook == retry  # type: ignore[union-attr]
    assert store.webhooks_due(clock.now, 10) == []
    assert [j.id for j in store.webhooks_due(clock.now + 5, 10)] == [hooked.id]
    delivered = WebhookState(phase="delivered", attempts=2, last_status=200)
    store.record_webhook(hooked.id, delivered)
    assert store.get(hooked.id).webhook == delivered  # type: ignore[union-attr]
    assert store.webhooks_due(clock.now + 1e6, 10) == []


def test_webhooks_due_respects_the_limit(lifecycle: Lifecycle) -> None:
    for _ in range(5):
        lifecycle.fail(create(lifecycle, webhook="http://h.invalid/").id, "x")
    assert len(lifecycle.store.webhooks_due(1e12, 3)) == 3


# -- Idempotency-Key ---------------------------------------------------------------------

IDEM = Idempotency("client-key-1", "fingerprint-a")


def begin(store: JobStore, clock: Clock, idem: Idempotency = IDEM, key_id: str = "k1"):  # type: ignore[no-untyped-def]
    return store.begin_idempotent(key_id, idem, now=clock.now, ttl_s=86400, lease_s=120)


def test_an_idempotency_key_is_claimed_once_then_answers_with_its_job(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    store = lifecycle.store
    assert begin(store, clock).owned
    assert begin(store, clock) == IdempotencyClaim(False, "fingerprint-a", None)  # 409 case
    other = Idempotency("client-key-1", "fingerprint-b")
    assert begin(store, clock, other).fingerprint == "fingerprint-a"  # 422 case
    assert begin(store, clock, key_id="k2").owned  # per API key
    job = lifecycle.create("k1", params(), b"img", idempotency=IDEM)
    assert begin(store, clock) == IdempotencyClaim(False, "fingerprint-a", job.id)
    lifecycle.release_idempotent("k1", IDEM)  # a bound key is never released
    assert begin(store, clock).job_id == job.id


def test_a_refused_request_releases_its_key_and_stale_claims_are_taken_over(
    lifecycle: Lifecycle, clock: Clock
) -> None:
    store = lifecycle.store
    assert begin(store, clock).owned
    lifecycle.release_idempotent("k1", IDEM)
    assert begin(store, clock).owned  # free again after the release
    clock.now += 121  # the accepting request died: its lease ran out
    assert begin(store, clock).owned
    job = lifecycle.create("k1", params(), b"img", idempotency=IDEM)
    clock.now += 86400 + 1  # past 24 hours even a bound key starts afresh
    claim = begin(store, clock)
    assert claim.owned and claim.job_id is None and job.id
