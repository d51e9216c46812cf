"""Crash points: the process dies right after each storage write of create, claim, finish
and the webhook's delivery; recovery must end every job, with its webhook sent.

A `Budget` counts every write (a Dict put or pop, a blob or output file write or delete,
a committed SQLite transaction) and raises `Crash` (a BaseException, like a kill) right
after the chosen one. Then the world restarts over the same state and recovers as the
backend does: locally, the worker's start requeues what was running; on Modal, the sweep
repairs interrupted writes and Modal re-delivers the input (same claim token). The
webhook sender then runs until nothing is due. Asserted for every crash point: each job
that exists has ended successfully with exactly one output and its webhook delivered
(same `webhook-id` on every attempt); a create that died before its record left nothing
behind (no index entry, no layout image).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magicmix.backends.modal.state import DictJobStore
from magicmix.config import Settings
from magicmix.jobs import JobStatus
from magicmix.webhooks import WebhookSender
from tests.http_fixtures import LoopbackServer, respond
from tests.lifecycle_harness import KINDS, Budget, Crash, World, make_world
from tests.modal_standins import standin_dicts

TOKEN = "input-token-1"  # the claim token of the one spawned input


@pytest.fixture(scope="module")
def receiver() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        server.route("/hook", respond(200))
        yield server


def one_life(world: World, hook: str) -> None:
    """Create a job, claim it, run it, deliver its webhook: the whole path, once."""
    job = world.create(webhook=hook)
    claimed = world.lifecycle.claim(job.id, TOKEN)
    assert claimed is not None
    world.run([claimed])
    send_webhooks(world)


def send_webhooks(world: World) -> None:
    settings = Settings(allow_private_urls=True)
    sender = WebhookSender(world.store, world.keys, settings, clock=lambda: 1e12)
    while asyncio.run(sender.send_due()):
        pass


def recover(world: World) -> None:
    """What the backend does after a crash, then a webhook pass."""
    if isinstance(world.store, DictJobStore):
        world.store.repair(now=1e12, grace_s=0)  # the sweep, long after the crash
        for job in world.store.active():  # Modal re-delivers the input: same token
            claimed = world.lifecycle.claim(job.id, TOKEN)
            if claimed is not None:
                world.run([claimed])
    else:
        for job in world.store.active():  # the local worker's start, then its loop
            if job.claimant:
                world.lifecycle.requeue(job.id)
        while batch := world.lifecycle.claim_batch(4, "restarted"):
            world.run(batch)
    send_webhooks(world)


def writes_in_one_life(kind: str, tmp_path: Path, hook: str) -> int:
    budget = Budget()
    one_life(make_world(kind, tmp_path, budget=budget), hook)
    return budget.writes


@pytest.mark.parametrize("kind", KINDS)
def test_every_crash_point_recovers(kind: str, tmp_path: Path, receiver: LoopbackServer) -> None:
    hook = receiver.url("/hook")
    total = writes_in_one_life(kind, tmp_path / "count", hook)
    assert total >= (5 if kind == "sqlite" else 15)
    for point in range(1, total + 1):
        where = tmp_path / f"crash-{point}"
        dicts = standin_dicts()
        before = len(receiver.requests)
        with pytest.raises(Crash):
            one_life(make_world(kind, where, dicts=dicts, budget=Budget(point)), hook)
        world = make_world(kind, where, dicts=dicts)
        recover(world)
        sent = receiver.requests[before:]
        job = world.store.get(1)
        if job is None:  # died inside create before the record: nothing may be left
            assert world.store.active() == [] and sent == [], point
            if isinstance(world.store, DictJobStore):  # an image written just before dying
                world.store._state.layouts.delete_older_than(datetime.now(UTC) + timedelta(1))
            assert not list((where / "layouts").glob("*")), point
            continue
        assert job.status is JobStatus.SUCCESS, (point, job)
        assert len(world.outputs_of(job.id)) == 1, point
        assert job.webhook is not None and job.webhook.phase == "delivered", (point, job)
        assert 1 <= len(sent) <= 2, point  # at least once; twice if it died mid-delivery
        assert {r.headers["webhook-id"] for r in sent} == {"magicmix-job-1"}, point
        assert world.store.active() == [] and world.store.queue_length() == 0, point
