"""The JobStore seam: the same behaviour from every implementation.

`job_store` is parametrized over implementations; the Modal-backed store joins the list
(run here against an in-memory stand-in for `modal.Dict`, named so in its param id).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from magicmix.db import Database
from magicmix.errors import Busy
from magicmix.jobs import JobParams, JobResult, JobStatus, JobStore, SqliteJobStore
from tests.modal_standins import standin_job_store

STORE_FACTORIES: dict[str, Callable[[Path], JobStore]] = {
    "sqlite": lambda tmp: SqliteJobStore(Database(tmp / "jobs.sqlite3")),
    "modal-dict-inmemory-standin": lambda tmp: standin_job_store(),
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    return STORE_FACTORIES[request.param](tmp_path)


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


def create(store: JobStore, key_id: str = "k1", **overrides: object):  # type: ignore[no-untyped-def]
    return store.create(key_id, params(**overrides), b"image-bytes", max_queue=100, max_per_key=100)


def result(name: str = "x.png") -> JobResult:
    return JobResult(
        output=[f"http://o/{name}"], generation_time=1.5, stored_in="service", object_names=[name]
    )


def test_ids_are_unique_positive_and_increasing(job_store: JobStore) -> None:
    ids = [create(job_store).id for _ in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] >= 1


def test_new_job_is_queued_with_its_image(job_store: JobStore) -> None:
    job = create(job_store, seed=99)
    stored = job_store.get(job.id)
    assert stored is not None and stored.status is JobStatus.QUEUED
    assert stored.params.seed == 99 and stored.key_id == "k1"
    assert job_store.image(job.id) == b"image-bytes"
    assert len(stored.output_token) >= 16  # unguessable output names
    assert job_store.get(job.id + 1000) is None


def test_finish_records_the_result_and_drops_the_image(job_store: JobStore) -> None:
    job = create(job_store)
    job_store.mark_processing([job.id])
    assert job_store.get(job.id).status is JobStatus.PROCESSING  # type: ignore[union-attr]
    done = job_store.finish(job.id, result())
    assert done.status is JobStatus.SUCCESS and done.result == result()
    assert done.status.is_terminal and done.finished_at is not None
    assert job_store.image(job.id) is None


def test_fail_records_the_message(job_store: JobStore) -> None:
    job = create(job_store)
    failed = job_store.fail(job.id, "bad things")
    assert failed.status is JobStatus.FAILED and failed.error == "bad things"


def test_queue_is_bounded_overall_and_per_key(job_store: JobStore) -> None:
    for _ in range(3):
        job_store.create("k1", params(), b"x", max_queue=5, max_per_key=3)
    with pytest.raises(Busy) as per_key:
        job_store.create("k1", params(), b"x", max_queue=5, max_per_key=3)
    assert per_key.value.retry_after > 0
    for _ in range(2):
        job_store.create("k2", params(), b"x", max_queue=5, max_per_key=3)
    with pytest.raises(Busy):
        job_store.create("k3", params(), b"x", max_queue=5, max_per_key=3)
    assert job_store.queue_length() == 5


def test_finished_jobs_free_queue_room(job_store: JobStore) -> None:
    job = job_store.create("k1", params(), b"x", max_queue=1, max_per_key=1)
    job_store.finish(job.id, result())
    job_store.create("k1", params(), b"x", max_queue=1, max_per_key=1)


def test_cancel_queued_leaves_other_states_alone(job_store: JobStore) -> None:
    queued, running, done = create(job_store), create(job_store), create(job_store)
    job_store.mark_processing([running.id])
    job_store.finish(done.id, result())
    assert job_store.cancel_queued() == [queued.id]
    assert job_store.get(queued.id).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert job_store.get(running.id).status is JobStatus.PROCESSING  # type: ignore[union-attr]
    assert job_store.get(done.id).status is JobStatus.SUCCESS  # type: ignore[union-attr]


def test_expire_marks_only_old_service_store_successes(job_store: JobStore) -> None:
    old_service, old_user, fresh = create(job_store), create(job_store), create(job_store)
    job_store.finish(old_service.id, result("a.png"))
    job_store.finish(old_user.id, result("b.png").model_copy(update={"stored_in": "user"}))
    cutoff = time.time() + 0.001
    time.sleep(0.01)
    job_store.finish(fresh.id, result("c.png"))
    assert job_store.expire_service_outputs(cutoff) == [old_service.id]
    assert job_store.get(old_service.id).status is JobStatus.EXPIRED  # type: ignore[union-attr]
    assert job_store.get(old_user.id).status is JobStatus.SUCCESS  # type: ignore[union-attr]


def test_webhook_state_is_recorded(job_store: JobStore) -> None:
    job = create(job_store, webhook="http://hook.invalid/")
    assert job.webhook_state == "pending"
    job_store.set_webhook_state(job.id, "delivered", 2)
    stored = job_store.get(job.id)
    assert stored is not None and stored.webhook_state == "delivered"
    assert stored.webhook_attempts == 2


# --- SQLite-only: the local worker's queue -----------------------------------------


def test_claim_takes_the_oldest_job_and_compatible_ones(tmp_path: Path) -> None:
    store = SqliteJobStore(Database(tmp_path / "jobs.sqlite3"))
    a = create(store)
    b = create(store, width=512)
    c = create(store, kmin=0.31)  # int(0.31 * 20) == int(0.3 * 20): same schedule
    d = create(store)
    batch = store.claim(limit=3)
    assert [j.id for j in batch] == [a.id, c.id, d.id]
    assert all(j.status is JobStatus.PROCESSING for j in batch)
    assert [j.id for j in store.claim(limit=3)] == [b.id]
    assert store.claim(limit=3) == []


def test_requeue_interrupted_puts_processing_jobs_back(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(Database(path))
    job = create(store)
    store.claim(limit=1)
    reopened = SqliteJobStore(Database(path))  # as after a crash and restart
    assert reopened.requeue_interrupted() == 1
    assert reopened.get(job.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert reopened.image(job.id) == b"image-bytes"


def test_concurrent_writers_do_not_fail(tmp_path: Path) -> None:
    """WAL plus BEGIN IMMEDIATE: writers from many threads queue instead of erroring."""
    from concurrent.futures import ThreadPoolExecutor

    store = SqliteJobStore(Database(tmp_path / "jobs.sqlite3"))
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: create(store).id, range(80)))
    assert len(set(ids)) == 80
