"""Webhooks: Standard Webhooks signatures, one attempt per due time, a persisted schedule.

Real HTTP to a loopback receiver, a real SQLite job store, and a fake clock for the
schedule: the retry schedule is exercised to its end, across a restart (a new store and
sender over the same database), without waiting for it. The delivery loop itself (leases,
attempts independent of each other, per-key fairness) is tested at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from magicmix.config import WEBHOOK_SCHEDULE, Settings
from magicmix.crypto import SecretBox
from magicmix.jobs import JobRecord, JobResult, QueueLimits, WebhookState
from magicmix.keys import new_signing_secret
from magicmix.lifecycle import Lifecycle
from magicmix.store.database import open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.store.keys import SqlKeyStore
from magicmix.webhooks import Attempt, WebhookDelivery, WebhookSender, next_state, sign_headers
from tests.http_fixtures import Handler, LoopbackServer, free_port, respond
from tests.test_jobs import Clock, params

SECRET = b"webhook-test-secret"
OPERATOR = "operator-key"


def statuses(*codes: int, headers: dict[str, str] | None = None) -> Handler:
    """A handler answering the given status codes in turn, then 200."""
    remaining = list(codes)

    def handle(request: BaseHTTPRequestHandler) -> None:
        respond(remaining.pop(0) if remaining else 200, headers=headers)(request)

    return handle


def too_slow(request: BaseHTTPRequestHandler) -> None:
    """Answers after a minute: a sender that returns before that cut the receiver off."""
    time.sleep(60)
    respond(200)(request)


@pytest.fixture
def receiver() -> Iterator[LoopbackServer]:
    with LoopbackServer() as running:
        running.route("/ok", respond(204))
        running.route("/down", respond(503))
        running.route("/gone", respond(410))
        running.route("/bad", respond(400, b"nope"))
        running.route("/slow", too_slow)
        yield running


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, allow_private_urls=True, webhook_timeout_s=10)


class World:
    """A job store, keys and a sender over one SQLite file, on a fake clock."""

    def __init__(self, path: Path, settings: Settings, clock: Clock) -> None:
        db = open_database(f"sqlite:///{path}")
        self.jobs = SqlJobStore(db)
        self.keys = SqlKeyStore(db, SecretBox(SECRET), SECRET, [OPERATOR])
        self.lifecycle = Lifecycle(self.jobs, QueueLimits(99, 99), clock=clock)
        self.sender = WebhookSender(self.jobs, self.keys, settings, clock=clock)
        self.clock = clock
        self.principal = self.keys.authenticate(OPERATOR)

    def ended_job(self, url: str) -> JobRecord:
        job = self.lifecycle.create(self.principal.key_id, params(webhook=url, track_id=9), b"i")
        ended = self.lifecycle.fail(job.id, "it broke")
        assert ended is not None
        return ended

    def send_due(self) -> list[WebhookState]:
        """One attempt for each webhook due now (what one round of the delivery loop does)."""
        now = self.clock()
        due = self.jobs.lease_webhooks(now=now, lease_until=now + 60, limit=100)

        async def attempts() -> list[WebhookState | None]:
            return list(await asyncio.gather(*(self.sender.send(job) for job in due)))

        return [state for state in asyncio.run(attempts()) if state is not None]

    def webhook(self, job_id: int) -> WebhookState:
        job = self.jobs.get(job_id)
        assert job is not None and job.webhook is not None
        return job.webhook


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def world(tmp_path: Path, settings: Settings, clock: Clock) -> World:
    return World(tmp_path / "db.sqlite3", settings, clock)


# -- signing ------------------------------------------------------------------------------


def test_new_secret_has_the_spec_form() -> None:
    first, second = new_signing_secret(), new_signing_secret()
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert first != second


def test_signed_headers_verify_with_the_reference_library() -> None:
    secret = new_signing_secret()
    body = b'{"id":1,"status":"success"}'
    headers = sign_headers(secret, "msg_1", body, datetime.now(UTC))
    assert Webhook(secret).verify(body, headers) == {"id": 1, "status": "success"}
    assert headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(new_signing_secret()).verify(body, headers)


def test_signature_is_the_same_in_any_time_zone() -> None:
    secret = new_signing_secret()
    now = datetime.now(UTC).replace(microsecond=0)
    elsewhere = now.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert sign_headers(secret, "m", b"{}", now) == sign_headers(secret, "m", b"{}", elsewhere)


# -- the schedule, as a function ------------------------------------------------------------


def test_the_schedule_is_standard_webhooks_offsets_after_the_end() -> None:
    assert WEBHOOK_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    state, ended_at, times = WebhookState(), 1000.0, []
    failure = Attempt(503, "down", retry=True)
    while state.phase == "pending":
        now = state.next_at if state.next_at is not None else ended_at
        times.append(now - ended_at)
        state = next_state(state, failure, ended_at=ended_at, now=now, schedule=WEBHOOK_SCHEDULE)
    assert times == list(WEBHOOK_SCHEDULE) and state.phase == "failed"
    assert state.attempts == 10 and state.last_status == 503


def test_retry_after_pushes_the_next_attempt_gone_stops_and_4xx_is_final() -> None:
    first = WebhookState()
    later = next_state(
        first,
        Attempt(429, "busy", retry=True, retry_after_s=120),
        ended_at=0,
        now=0,
        schedule=WEBHOOK_SCHEDULE,
    )
    assert later.phase == "pending" and later.next_at == 120  # not 5 s: the receiver asked
    soon = next_state(
        first,
        Attempt(503, "x", retry=True, retry_after_s=1),
        ended_at=0,
        now=0,
        schedule=WEBHOOK_SCHEDULE,
    )
    assert soon.next_at == 5  # a Retry-After never brings an attempt forward
    gone = next_state(first, Attempt(410, "gone", gone=True), ended_at=0, now=0, schedule=(0, 5))
    bad = next_state(first, Attempt(400, "bad"), ended_at=0, now=0, schedule=(0, 5))
    ok = next_state(first, Attempt(200, None), ended_at=0, now=0, schedule=(0, 5))
    assert (gone.phase, bad.phase, ok.phase) == ("stopped", "failed", "delivered")


# -- delivery over HTTP ---------------------------------------------------------------------


def test_delivered_signed_with_the_keys_secret_and_logged_without_secrets(
    world: World,
    receiver: LoopbackServer,
    caplog: pytest.LogCaptureFixture,
    raw_log_records: None,
) -> None:
    job = world.ended_job(receiver.url("/ok?token=s3cr3t"))
    with caplog.at_level(logging.INFO, logger="magicmix.webhooks"):
        assert [s.phase for s in world.send_due()] == ["delivered"]
    [request] = receiver.requests
    payload = Webhook(world.principal.webhook_secret).verify(request.body, request.headers)
    assert payload == {"status": "failed", "id": job.id, "message": "it broke", "track_id": 9}
    assert request.headers["webhook-id"] == f"magicmix-job-{job.id}"
    assert world.webhook(job.id) == WebhookState(phase="delivered", attempts=1, last_status=204)
    assert world.send_due() == []  # delivered once
    assert f"job {job.id}" in caplog.text
    for secret in ("s3cr3t", world.principal.webhook_secret, "it broke"):
        assert secret not in caplog.text


def test_the_schedule_runs_to_its_end_across_a_restart(
    tmp_path: Path, settings: Settings, clock: Clock, receiver: LoopbackServer
) -> None:
    """Same webhook-id every time; a new process resumes where the last one stopped."""
    path = tmp_path / "db.sqlite3"
    world = World(path, settings, clock)
    job = world.ended_job(receiver.url("/down"))
    ended_at = clock.now
    for attempt, offset in enumerate(WEBHOOK_SCHEDULE):
        if attempt == 4:  # a restart: nothing in memory survives
            world = World(path, settings, clock)
        if attempt:
            clock.now = ended_at + offset - 0.5
            assert world.send_due() == [], f"attempt {attempt} ran before it was due"
        clock.now = ended_at + offset
        [state] = world.send_due()
    assert state.phase == "failed" and state.attempts == len(WEBHOOK_SCHEDULE)
    assert len(receiver.requests) == len(WEBHOOK_SCHEDULE)
    assert {r.headers["webhook-id"] for r in receiver.requests} == {f"magicmix-job-{job.id}"}
    clock.now += 10**6
    assert world.send_due() == []


def test_a_receiver_back_up_gets_it_on_the_next_attempt(
    world: World, receiver: LoopbackServer, clock: Clock
) -> None:
    receiver.route("/flaky", statuses(500, 500))
    job = world.ended_job(receiver.url("/flaky"))
    world.send_due()
    clock.now += 5
    world.send_due()
    clock.now += 300
    [state] = world.send_due()
    assert state.phase == "delivered" and state.attempts == 3
    assert world.webhook(job.id).phase == "delivered"


def test_retry_after_header_is_honoured(
    world: World, receiver: LoopbackServer, clock: Clock
) -> None:
    receiver.route("/busy", statuses(429, headers={"Retry-After": "600"}))
    later = datetime.now(UTC) + timedelta(seconds=900)
    receiver.route("/dated", statuses(503, headers={"Retry-After": format_datetime(later, True)}))
    busy, dated = world.ended_job(receiver.url("/busy")), world.ended_job(receiver.url("/dated"))
    world.send_due()
    assert world.webhook(busy.id).next_at == pytest.approx(clock.now + 600)
    assert world.webhook(dated.id).next_at == pytest.approx(clock.now + 900, abs=2)


def test_410_stops_deliveries_and_a_4xx_is_retried(
    world: World, receiver: LoopbackServer, clock: Clock
) -> None:
    gone, bad = world.ended_job(receiver.url("/gone")), world.ended_job(receiver.url("/bad"))
    world.send_due()
    assert world.webhook(gone.id).phase == "stopped"
    assert world.webhook(bad.id) == WebhookState(
        phase="pending",
        attempts=1,
        next_at=clock.now + 5,
        last_status=400,
        last_error="the receiver answered HTTP 400",
    )
    clock.now += 10**6
    assert [s.phase for s in world.send_due()] == ["pending"]  # only /bad, once more
    assert len(receiver.requests) == 3


def test_receiver_down_or_slow_is_retried(
    tmp_path: Path, settings: Settings, receiver: LoopbackServer, clock: Clock
) -> None:
    cut_off = settings.model_copy(update={"webhook_timeout_s": 0.3})  # the receiver holds 60 s
    world = World(tmp_path / "db.sqlite3", cut_off, clock)
    down = world.ended_job(f"http://127.0.0.1:{free_port()}/hook")
    slow = world.ended_job(receiver.url("/slow"))
    watch = receiver.watch("/slow")
    world.send_due()
    assert watch.entered.is_set() and not watch.completed.is_set()  # cut off, not waited out
    down_state, slow_state = world.webhook(down.id), world.webhook(slow.id)
    assert down_state.phase == "pending" and "could not connect" in (down_state.last_error or "")
    assert slow_state.last_error == "the receiver did not answer within 0.3 s"
    assert down_state.next_at == pytest.approx(clock.now + 5)


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_refused_url_sends_nothing(
    tmp_path: Path, receiver: LoopbackServer, clock: Clock, allow_private: bool
) -> None:
    """Loopback without the dev switch, and the metadata address with it: no request made."""
    strict = Settings(data_dir=tmp_path, allow_private_urls=allow_private)
    world = World(tmp_path / "db.sqlite3", strict, clock)
    url = receiver.url("/ok") if not allow_private else "http://169.254.169.254/hook"
    job = world.ended_job(url)
    world.send_due()
    state = world.webhook(job.id)
    assert state.phase == "failed" and (state.last_error or "").startswith("webhook URL points to")
    assert receiver.requests == []


# -- the delivery loop ------------------------------------------------------------------


@contextmanager
def delivering(world: World, settings: Settings, **options: Any) -> Iterator[WebhookDelivery]:
    """The delivery loop running in a thread of its own, as a server runs it."""
    delivery = WebhookDelivery(world.sender, world.jobs, settings, idle_s=0.05, **options)
    loop = asyncio.new_event_loop()
    task = loop.create_task(delivery.run_forever())

    def serve() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield delivery
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)


def test_stalling_receivers_of_one_key_never_hold_up_another_keys_webhook(
    tmp_path: Path, receiver: LoopbackServer
) -> None:
    """64 receivers of one key that hold every attempt open: another key's webhook still
    goes at once (the loop never waits for a slow attempt, and one key may hold only
    `per_key` attempts), and no attempt in flight is sent a second time."""
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, webhook_timeout_s=60)
    world = World(tmp_path / "db.sqlite3", settings, Clock(time.time()))
    stalls = receiver.watch("/slow")
    healthy = receiver.watch("/ok")
    other = world.keys.create()
    for _ in range(64):
        world.ended_job(receiver.url("/slow"))
    with delivering(world, settings, concurrency=12, per_key=8):
        assert stalls.entered.wait(30)
        job = world.lifecycle.create(other.key_id, params(webhook=receiver.url("/ok")), b"i")
        world.lifecycle.fail(job.id, "it broke")
        assert healthy.completed.wait(30), "the other key's webhook was held up"
        assert not stalls.completed.is_set()  # every stalled attempt is still in flight
        slow = [r for r in receiver.requests if r.path == "/slow"]
        assert len(slow) == 8 and len({r.headers["webhook-id"] for r in slow}) == 8
        deadline = time.monotonic() + 30  # the outcome is recorded just after the reply
        while world.webhook(job.id).phase != "delivered" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert world.webhook(job.id).phase == "delivered"


def test_the_body_is_the_same_on_every_attempt_even_after_the_outputs_expire(
    world: World, receiver: LoopbackServer, clock: Clock
) -> None:
    receiver.route("/flaky", statuses(503))
    job = world.lifecycle.create(
        world.principal.key_id, params(webhook=receiver.url("/flaky")), b"i"
    )
    [claimed] = world.lifecycle.claim({job.id: "worker"})
    result = JobResult(
        output=["http://o/x.png"], generation_time=1.0, stored_in="service", object_names=["x"]
    )
    assert world.lifecycle.finish(claimed, result) is not None
    world.send_due()  # 503
    assert world.lifecycle.expire(clock.now + 1) == [job.id]  # the outputs are deleted
    clock.now += 5
    [state] = world.send_due()
    first, second = (r.body for r in receiver.requests)
    assert state.phase == "delivered" and first == second
    assert b'"status":"success"' in first
