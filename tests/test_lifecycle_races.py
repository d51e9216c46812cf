"""Races: every pair of writers that can meet, run at once many times, on both dialects.

Each round starts the writers together (a barrier) with Python's thread switch interval
at a microsecond and a random pause before every statement, so they interleave between
statements. After each test: one ended state per job (the notifier fired once), one
webhook owed, at most one output, and an output only for a success. Writers in separate
processes race on both dialects too. Counts: `rounds` per pair and dialect: 10 in the
default suite, 100 in `make test-slow`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from magicmix.config import Settings
from magicmix.jobs import Idempotency, JobRecord, JobStatus
from magicmix.lifecycle import Leases
from magicmix.outputs.store import LocalStore
from magicmix.store.database import open_database
from magicmix.sweep import Sweeper
from magicmix.webhooks import WebhookDelivery, WebhookSender
from tests.http_fixtures import LoopbackServer, respond
from tests.lifecycle_harness import World, make_world
from tests.test_jobs import claim, lease, params


@pytest.fixture(params=[10, pytest.param(100, marks=pytest.mark.slow)], ids=["10", "100"])
def rounds(request: pytest.FixtureRequest) -> int:
    """How many times each race runs: a slice by default, the long rounds when slow."""
    return int(request.param)


LAPSED = Leases(lease_s=-1.0)  # every claim has already lapsed: the sweep may take any


@pytest.fixture(autouse=True)
def tight_thread_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


RNG = random.Random(20221029)


def world_for(url: str, tmp_path: Path, **options: object) -> World:
    return make_world(url, tmp_path, jitter=random.Random(RNG.random()), **options)  # type: ignore[arg-type]


def race(*writers: Callable[[], object]) -> list[object]:
    """Run the writers in threads started together (each after a random moment of up to
    2 ms, so any one may go first); their results, errors re-raised."""
    barrier = threading.Barrier(len(writers))
    results: list[object] = [None] * len(writers)
    errors: list[BaseException] = []
    delays = [RNG.uniform(0, 0.002) for _ in writers]

    def go(index: int, writer: Callable[[], object]) -> None:
        barrier.wait()
        time.sleep(delays[index])
        try:
            results[index] = writer()
        except BaseException as err:  # surfaced below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=go, args=(i, w)) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        raise errors[0]
    return results


def owed_webhooks(world: World) -> list[int]:
    return sorted(lease(world.store, 1e12, 10_000))


def check(world: World, jobs: list[JobRecord]) -> dict[JobStatus, int]:
    """Every job ended exactly once, owes one webhook, and has an output iff it succeeded."""
    world.drain(8, "drainer")  # what a worker does after the race
    ended_ids = [job.id for job in world.ended]
    assert sorted(ended_ids) == sorted(job.id for job in jobs), "one won end per job"
    assert owed_webhooks(world) == sorted(job.id for job in jobs), "one webhook per job"
    tally: dict[JobStatus, int] = {}
    for job in jobs:
        stored = world.store.get(job.id)
        assert stored is not None and stored.status.is_terminal
        outputs = world.outputs_of(job.id)
        assert len(outputs) == (1 if stored.status is JobStatus.SUCCESS else 0), stored
        tally[stored.status] = tally.get(stored.status, 0) + 1
    return tally


def test_cancel_vs_claim_and_run(database_url: str, tmp_path: Path, rounds: int) -> None:
    world = world_for(database_url, tmp_path)
    jobs = []
    for _ in range(rounds):
        job = world.create()
        jobs.append(job)

        def run_it(job: JobRecord = job) -> None:
            claimed = claim(world.lifecycle, job.id, "gpu-1")
            if claimed is not None:
                world.run([claimed])

        race(lambda job=job: world.lifecycle.cancel(job.id), run_it)
    tally = check(world, jobs)
    assert set(tally) <= {JobStatus.CANCELLED, JobStatus.SUCCESS}
    cancelled = [j.params.seed for j in jobs if world.store.get(j.id).status is JobStatus.CANCELLED]  # type: ignore[union-attr]
    assert not set(cancelled) & set(world.engine.ran), "a cancel that won never lets a run start"


def test_clear_queue_vs_a_worker_claiming(database_url: str, tmp_path: Path, rounds: int) -> None:
    world = world_for(database_url, tmp_path)
    jobs = []
    for _ in range(rounds):
        batch = [world.create() for _ in range(3)]
        jobs += batch

        def work() -> None:
            world.run(world.lifecycle.claim_next(2, "worker"))

        race(world.lifecycle.cancel_queued, work)
    tally = check(world, jobs)
    assert set(tally) <= {JobStatus.CANCELLED, JobStatus.SUCCESS}


def test_two_replicas_claim_batches_from_one_queue(
    database_url: str, tmp_path: Path, rounds: int
) -> None:
    world = world_for(database_url, tmp_path)
    jobs = [world.create() for _ in range(rounds * 4)]
    taken: dict[str, list[int]] = {"a": [], "b": []}

    def replica(name: str) -> None:
        while batch := world.lifecycle.claim_next(3, name):
            taken[name] += [job.id for job in batch]
            world.run(batch)

    race(lambda: replica("a"), lambda: replica("b"))
    assert sorted(taken["a"] + taken["b"]) == [job.id for job in jobs], "each job claimed once"
    assert check(world, jobs) == {JobStatus.SUCCESS: len(jobs)}


def test_two_gpu_inputs_claim_one_job(database_url: str, tmp_path: Path, rounds: int) -> None:
    world = world_for(database_url, tmp_path)
    jobs, runs = [], []
    for _ in range(rounds):
        job = world.create()
        jobs.append(job)

        def container(token: str, job: JobRecord = job) -> int:
            claimed = claim(world.lifecycle, job.id, token)
            if claimed is None:
                return 0
            world.run([claimed])
            return 1

        runs.append(sum(race(lambda: container("a"), lambda: container("b"))))  # type: ignore[arg-type]
    assert runs == [1] * rounds, "exactly one container ran each job"
    assert check(world, jobs) == {JobStatus.SUCCESS: rounds}


def test_finish_vs_lease_expiry(database_url: str, tmp_path: Path, rounds: int) -> None:
    world = world_for(database_url, tmp_path, leases=LAPSED)
    jobs = []
    for _ in range(rounds):
        claimed = claim(world.lifecycle, world.create().id, "gpu")
        assert claimed is not None
        jobs.append(claimed)
        race(lambda claimed=claimed: world.run([claimed]), world.lifecycle.release_lapsed)
    assert check(world, jobs) == {JobStatus.SUCCESS: rounds}  # requeued ones ran again


def test_submit_vs_clear_queue(database_url: str, tmp_path: Path, rounds: int) -> None:
    world = world_for(database_url, tmp_path)
    made: list[JobRecord] = []
    for _ in range(rounds):
        created, _ = race(world.create, world.lifecycle.cancel_queued)
        assert isinstance(created, JobRecord)
        made.append(created)
    tally = check(world, made)
    assert set(tally) <= {JobStatus.CANCELLED, JobStatus.SUCCESS}


def test_two_resends_of_one_idempotency_key_make_one_job(
    database_url: str, tmp_path: Path, rounds: int
) -> None:
    world = world_for(database_url, tmp_path)
    for round_ in range(rounds):
        key = Idempotency(f"client-key-{round_}", "fingerprint")

        def resend(key: Idempotency = key) -> int | None:
            held = world.lifecycle.begin_idempotent(world.key_id, key)
            if not held.owned:
                return None
            return world.lifecycle.create(world.key_id, params(seed=1), b"x", idempotency=held).id

        made = [job_id for job_id in race(resend, resend) if job_id is not None]
        assert len(made) == 1, "one job per key"
        again = world.lifecycle.begin_idempotent(world.key_id, key)
        assert not again.owned and again.job_id == made[0]


def test_two_senders_make_one_attempt_per_webhook(
    database_url: str, tmp_path: Path, rounds: int
) -> None:
    world = world_for(database_url, tmp_path)
    settings = Settings(allow_private_urls=True, webhook_schedule=(0.0, 3600.0))
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200))
        jobs = [world.create(webhook=receiver.url("/hook")) for _ in range(rounds)]
        for job in jobs:
            world.lifecycle.fail(job.id, "failed on purpose")

        def sender() -> int:
            delivery = WebhookDelivery(
                WebhookSender(world.store, world.keys, settings), world.store, settings
            )
            return asyncio.run(delivery.run(until=0))

        attempts = race(sender, sender)
        assert sum(attempts) == rounds  # type: ignore[arg-type]
        posted = sorted(r.headers["webhook-id"] for r in receiver.requests)
        assert posted == sorted(f"magicmix-job-{job.id}" for job in jobs), "one POST each"
    for job in jobs:
        stored = world.store.get(job.id)
        assert stored is not None and stored.webhook is not None
        assert (stored.webhook.phase, stored.webhook.attempts) == ("delivered", 1)


def test_two_sweeps_release_each_lapsed_claim_once(database_url: str, tmp_path: Path) -> None:
    world = world_for(database_url, tmp_path, leases=LAPSED)
    settings = Settings(data_dir=tmp_path, allow_private_urls=True)
    outputs = LocalStore(tmp_path / "outputs")
    for _ in range(5):
        claimed = [claim(world.lifecycle, world.create().id, "dead") for _ in range(4)]
        sweeps = [Sweeper(world.lifecycle, outputs, settings) for _ in range(2)]
        reports = race(*(lambda s=s: asyncio.run(s.run_once()) for s in sweeps))
        requeued = [i for report in reports for i in report.requeued]  # type: ignore[attr-defined]
        assert sorted(requeued) == sorted(job.id for job in claimed if job), "released once"
        world.drain(8, "drainer")


# -- across processes --------------------------------------------------------------------


def _process_worker(
    url: str, directory: str, role: str, job_ids: list[int], results: object
) -> None:
    """A separate process racing on the same database: claim and finish, or cancel."""
    world = make_world(url, Path(directory))
    won = []
    if role == "cancel":
        for _ in range(20):
            won += [job.id for job in world.lifecycle.cancel_queued()]
    else:
        for job_id in job_ids:
            claimed = claim(world.lifecycle, job_id, role)
            if claimed is not None:
                won += [job.id for job in world.run([claimed])]
    results.put((role, won))  # type: ignore[attr-defined]


def test_writers_in_separate_processes(database_url: str, tmp_path: Path) -> None:
    world = make_world(database_url, tmp_path)
    jobs = [world.create() for _ in range(60)]
    ids = [job.id for job in jobs]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    plan = [("worker-a", ids), ("worker-b", ids[::-1]), ("cancel", [])]
    processes = [
        context.Process(
            target=_process_worker, args=(database_url, str(tmp_path), role, order, results)
        )
        for role, order in plan
    ]
    for process in processes:
        process.start()
    wins = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    everyone = wins["worker-a"] + wins["worker-b"] + wins["cancel"]
    assert sorted(everyone) == sorted(ids), "each job ended once, by exactly one process"
    for job in jobs:
        stored = world.store.get(job.id)
        assert stored is not None and stored.status.is_terminal
        assert len(world.outputs_of(job.id)) == (stored.status is JobStatus.SUCCESS)
    assert owed_webhooks(world) == sorted(ids)


def _hold_the_sweep(url: str, ready: Any) -> None:
    """A process that takes the sweep's lock and dies holding it (killed by the test)."""
    database = open_database(url)
    with database.exclusive("sweep") as held:
        ready.put(held)
        time.sleep(600)


def test_a_sweep_killed_mid_pass_leaves_the_lock_to_the_next(database_url: str) -> None:
    """kill -9 while sweeping: the server (PostgreSQL) or the kernel (SQLite's file lock)
    lets the lock go with the process, so another replica's next sweep runs."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    sweeper = context.Process(target=_hold_the_sweep, args=(database_url, ready))
    sweeper.start()
    try:
        assert ready.get(timeout=60) is True
        database = open_database(database_url)
        with database.exclusive("sweep") as held:
            assert not held  # one sweep at a time
        os.kill(sweeper.pid or 0, signal.SIGKILL)
        sweeper.join(30)
        with database.exclusive("sweep") as held:
            assert held
    finally:
        if sweeper.is_alive():
            sweeper.kill()
