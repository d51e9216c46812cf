"""Crash points: the process dies right after each storage write of create, claim, finish
and the webhook's delivery; recovery must end every job, with its webhook sent.

A `Budget` counts every write (a committed transaction, an output file written or
deleted) and raises `Crash` (a BaseException, like a kill) right after the chosen one.
Then the world restarts over the same database and recovers as every deployment does:
the dead worker's claim lapses and the sweep requeues it (`release_lapsed`), a worker
runs it, and the webhook sender runs until nothing is due. Asserted for every crash
point, on SQLite and PostgreSQL: each job that exists has ended successfully with exactly
one output and its webhook delivered (same `webhook-id` on every attempt); a create that
died before its commit left nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from magicmix.config import Settings
from magicmix.jobs import JobStatus
from magicmix.webhooks import WebhookDelivery, WebhookSender
from tests.http_fixtures import LoopbackServer, respond
from tests.lifecycle_harness import Budget, Crash, World, make_world

TOKEN = "input-token-1"  # the claim token of the one spawned input
LATER = 3600.0  # the restarted world runs this much later: the dead claim has lapsed


@pytest.fixture(scope="module")
def receiver() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        server.route("/hook", respond(200))
        yield server


def one_life(world: World, hook: str) -> None:
    """Create a job, claim it, run it, deliver its webhook: the whole path, once (the
    delivery as one lease and one attempt, so the writes come in a fixed order)."""
    job = world.create(webhook=hook)
    [claimed] = world.lifecycle.claim({job.id: TOKEN})
    world.run([claimed])
    settings = Settings(allow_private_urls=True)
    [due] = world.store.lease_webhooks(now=1e12, lease_until=1e12 + 60, limit=1)
    asyncio.run(WebhookSender(world.store, world.keys, settings, clock=lambda: 1e12).send(due))


def send_webhooks(world: World, now: float = 1e12) -> None:
    """The sender, at a moment when every attempt is due (and a dead sender's lease over)."""
    settings = Settings(allow_private_urls=True)
    sender = WebhookSender(world.store, world.keys, settings, clock=lambda: now)
    delivery = WebhookDelivery(sender, world.store, settings, clock=lambda: now)
    while asyncio.run(delivery.run(until=0)):
        pass


def recover(world: World) -> None:
    """What every deployment does after a crash: the sweep, a worker, the sender."""
    world.lifecycle.release_lapsed()
    world.drain(4, "restarted")
    send_webhooks(world, 1e12 + LATER)


def writes_in_one_life(url: str, tmp_path: Path, hook: str) -> int:
    budget = Budget()
    one_life(make_world(url, tmp_path, budget=budget), hook)
    return budget.writes


def test_every_crash_point_recovers(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, receiver: LoopbackServer
) -> None:
    from tests.db_fixtures import url_for

    dialect = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    hook = receiver.url("/hook")
    total = writes_in_one_life(database_url, tmp_path / "count", hook)
    assert total >= 5
    for point in range(1, total + 1):
        where = tmp_path / f"crash-{point}"
        where.mkdir()
        url = url_for(dialect, where, request)
        before = len(receiver.requests)
        with pytest.raises(Crash):
            one_life(make_world(url, where, budget=Budget(point)), hook)
        world = make_world(url, where, clock=lambda: time.time() + LATER)
        recover(world)
        sent = receiver.requests[before:]
        job = world.store.get(1)
        if job is None:  # died inside create before its commit: nothing may be left
            assert world.store.active() == [] and sent == [], point
            continue
        assert job.status is JobStatus.SUCCESS, (point, job)
        assert len(world.outputs_of(job.id)) == 1, point
        assert job.webhook is not None and job.webhook.phase == "delivered", (point, job)
        assert 1 <= len(sent) <= 2, point  # at least once; twice if it died mid-delivery
        assert {r.headers["webhook-id"] for r in sent} == {"magicmix-job-1"}, point
        assert world.store.active() == [] and world.store.queue_length() == 0, point
