"""Webhooks: Standard Webhooks signatures, bounded retries with backoff, no exceptions."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from http_fixtures import Handler, LoopbackServer, free_port, respond
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from magicmix.config import Settings
from magicmix.webhooks import DeliveryOutcome, deliver_webhook, new_signing_secret, sign_headers

PAYLOAD = {"status": "success", "id": 511, "output": ["http://x/511-0.png"], "track_id": "t-1"}
BACKOFF_S = 0.5


def statuses(*codes: int) -> Handler:
    """A handler answering the given status codes in turn, then 200."""
    remaining = list(codes)

    def handle(request: BaseHTTPRequestHandler) -> None:
        respond(remaining.pop(0) if remaining else 200)(request)

    return handle


def too_slow(request: BaseHTTPRequestHandler) -> None:
    time.sleep(1.0)
    respond(200)(request)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as running:
        running.route("/ok", respond(204))
        running.route("/flaky", statuses(500, 500))
        running.route("/busy", statuses(429))
        running.route("/bad", respond(400, b"nope"))
        running.route("/slow", too_slow)
        yield running


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        allow_private_urls=True,
        webhook_max_attempts=3,
        webhook_backoff_s=BACKOFF_S,
        webhook_timeout_s=0.3,
    )


class SleepLog:
    """Stands in for asyncio.sleep: records the delays, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def deliver(url: str, settings: Settings, sleep: SleepLog, secret: str) -> DeliveryOutcome:
    return asyncio.run(
        deliver_webhook(
            url, PAYLOAD, secret=secret, msg_id="msg_511", settings=settings, sleep=sleep
        )
    )


@pytest.fixture
def secret() -> str:
    return new_signing_secret()


def test_new_secret_has_the_spec_form() -> None:
    first, second = new_signing_secret(), new_signing_secret()
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert first != second


def test_signed_headers_verify_with_the_reference_library(secret: str) -> None:
    body = b'{"id":1,"status":"success"}'
    headers = sign_headers(secret, "msg_1", body, datetime.now(UTC))
    assert Webhook(secret).verify(body, headers) == {"id": 1, "status": "success"}
    assert headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(new_signing_secret()).verify(body, headers)


def test_signature_is_the_same_in_any_time_zone(secret: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    elsewhere = now.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert sign_headers(secret, "m", b"{}", now) == sign_headers(secret, "m", b"{}", elsewhere)


def test_delivered_and_verifiable(
    server: LoopbackServer, settings: Settings, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    sleep = SleepLog()
    with caplog.at_level(logging.INFO, logger="magicmix.webhooks"):
        outcome = deliver(server.url("/ok"), settings, sleep, secret)
    assert outcome == DeliveryOutcome(delivered=True, attempts=1, status_code=204, error=None)
    [request] = server.requests
    assert request.method == "POST"
    assert Webhook(secret).verify(request.body, request.headers) == PAYLOAD
    assert request.headers["webhook-id"] == "msg_511"
    assert sleep.delays == []
    assert "msg_511" in caplog.text
    assert secret not in caplog.text
    assert "track_id" not in caplog.text


def test_retries_server_errors_with_backoff(
    server: LoopbackServer, settings: Settings, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    sleep = SleepLog()
    with caplog.at_level(logging.INFO, logger="magicmix.webhooks"):
        outcome = deliver(server.url("/flaky"), settings, sleep, secret)
    assert outcome == DeliveryOutcome(delivered=True, attempts=3, status_code=200, error=None)
    assert len(server.requests) == 3
    for request in server.requests:
        Webhook(secret).verify(request.body, request.headers)
    first, second = sleep.delays
    assert BACKOFF_S <= first <= 2 * BACKOFF_S
    assert 2 * BACKOFF_S <= second <= 3 * BACKOFF_S
    assert len([r for r in caplog.records if "attempt" in r.getMessage()]) == 3


def test_retries_429(server: LoopbackServer, settings: Settings, secret: str) -> None:
    outcome = deliver(server.url("/busy"), settings, SleepLog(), secret)
    assert (outcome.delivered, outcome.attempts) == (True, 2)


def test_client_error_is_not_retried(
    server: LoopbackServer, settings: Settings, secret: str
) -> None:
    sleep = SleepLog()
    outcome = deliver(server.url("/bad"), settings, sleep, secret)
    assert outcome == DeliveryOutcome(
        delivered=False, attempts=1, status_code=400, error="the receiver answered HTTP 400"
    )
    assert len(server.requests) == 1
    assert sleep.delays == []


def test_receiver_down_gives_up_after_max_attempts(settings: Settings, secret: str) -> None:
    sleep = SleepLog()
    outcome = deliver(f"http://127.0.0.1:{free_port()}/hook", settings, sleep, secret)
    assert not outcome.delivered
    assert outcome.attempts == 3
    assert outcome.status_code is None
    assert outcome.error is not None and "could not connect" in outcome.error
    assert len(sleep.delays) == 2


def test_slow_receiver_times_out(server: LoopbackServer, settings: Settings, secret: str) -> None:
    once = settings.model_copy(update={"webhook_max_attempts": 1})
    started = time.monotonic()
    outcome = deliver(server.url("/slow"), once, SleepLog(), secret)
    assert time.monotonic() - started < 0.9
    assert outcome.error == "the receiver did not answer within 0.3 s"


@pytest.mark.parametrize("allow_private", [False, True])
def test_refused_url_sends_nothing(
    server: LoopbackServer, settings: Settings, secret: str, allow_private: bool
) -> None:
    """Loopback without the dev switch, and the metadata address with it: no request made."""
    url = server.url("/ok") if not allow_private else "http://169.254.169.254/hook"
    strict = settings.model_copy(update={"allow_private_urls": allow_private})
    outcome = deliver(url, strict, SleepLog(), secret)
    assert not outcome.delivered
    assert outcome.attempts == 0
    assert outcome.error is not None and outcome.error.startswith("webhook URL points to")
    assert server.requests == []
