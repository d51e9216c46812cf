"""Hostile world, round three: each attack that worked before, as a regression test.

Numbered as in the issue (#22). Loopback only; waits are on events, not on the clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from magicmix.config import Settings
from magicmix.webhooks import MAX_RETRY_AFTER_S, _retry_after_s
from tests.http_fixtures import Handler, LoopbackServer, respond
from tests.test_jobs import Clock
from tests.test_webhooks import World

# -- 1. a receiver's Retry-After that made the whole sending pass fail ----------------------


def raw_answer(status_line: bytes, *headers: bytes) -> Handler:
    """A handler writing its status line and header bytes as given (UTF-8 included)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 " + status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
        request.wfile.write(head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    return handle


@pytest.fixture
def hook_world(tmp_path: Path) -> Iterator[tuple[World, LoopbackServer, Clock]]:
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, webhook_timeout_s=5)
    clock = Clock(1_000_000.0)
    with LoopbackServer() as receiver:
        yield World(tmp_path / "db.sqlite3", settings, clock), receiver, clock


NOT_DIGITS = ["²", "①", "٣", "５", "1e3", "-5", "5.5", "0x10", "+5", "5 s", "", " "]


@pytest.mark.parametrize("value", NOT_DIGITS + ["Wed, ١٢ Oct 2030 07:28:00 GMT"])
def test_1_retry_after_that_is_not_ascii_digits_or_a_date_is_ignored(value: str) -> None:
    assert _retry_after_s(value) is None


def test_1_retry_after_takes_ascii_digits_with_optional_whitespace_and_caps_huge_ones() -> None:
    assert _retry_after_s("120") == 120.0 and _retry_after_s(" \t5 ") == 5.0
    assert _retry_after_s("9" * 5000) == MAX_RETRY_AFTER_S  # int() refuses 4,300+ digits
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize(
    "header",
    [
        b"Retry-After: \xc2\xb2",  # '²' in UTF-8: str.isdigit() is true, float() raised
        b"Retry-After: \xe2\x91\xa0",  # '①'
        b"Retry-After: \xd9\xa3",  # Arabic-Indic three
        b"Retry-After: \xb2",  # Latin-1 '²'
        b"Retry-After: 1e3",
    ],
)
@pytest.mark.parametrize("status", [b"503 Service Unavailable", b"429 Too Many Requests"])
def test_1_a_strange_retry_after_is_recorded_as_one_failed_attempt(
    hook_world: tuple[World, LoopbackServer, Clock], header: bytes, status: bytes
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/strange", raw_answer(status, header))
    job = world.ended_job(receiver.url("/strange"))
    [state] = world.send_due()
    assert state.phase == "pending" and state.attempts == 1
    assert state.last_status == int(status[:3])
    assert world.webhook(job.id) == state  # recorded on the job
    assert state.next_at == clock.now + 5  # the schedule's, as if no Retry-After was sent
    assert world.send_due() == [] and len(receiver.requests) == 1  # not sent again at once


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 400, 401, 404, 405, 418, 451])
def test_1_every_non_2xx_but_410_is_retried_on_the_schedule(
    hook_world: tuple[World, LoopbackServer, Clock], status: int
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/elsewhere", respond(status, headers={"Location": receiver.url("/ok")}))
    receiver.route("/ok", respond(204))
    job = world.ended_job(receiver.url("/elsewhere"))
    schedule = world.sender._settings.webhook_schedule
    for offset in schedule:
        clock.now = (job.finished_at or 0) + offset
        [state] = world.send_due()
    assert state.phase == "failed" and state.attempts == len(schedule)
    assert state.last_error == f"the receiver answered HTTP {status}"
    assert {r.path for r in receiver.requests} == {"/elsewhere"}  # a redirect is not followed


def test_1_a_redirect_honours_its_retry_after(
    hook_world: tuple[World, LoopbackServer, Clock],
) -> None:
    world, receiver, clock = hook_world
    receiver.route("/moved", respond(307, headers={"Retry-After": "900", "Location": "/x"}))
    job = world.ended_job(receiver.url("/moved"))
    [state] = world.send_due()
    assert state.phase == "pending" and state.next_at == clock.now + 900
    assert world.webhook(job.id).last_status == 307


def test_1_an_unforeseen_error_in_an_attempt_is_recorded_not_raised(
    hook_world: tuple[World, LoopbackServer, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever raises inside one attempt (here the signer) fails that attempt only."""
    world, receiver, _ = hook_world
    receiver.route("/ok", respond(204))
    job = world.ended_job(receiver.url("/ok"))

    def broken(*args: object, **kwargs: object) -> dict[str, str]:
        raise LookupError("a corner nobody foresaw")

    monkeypatch.setattr("magicmix.webhooks.sign_headers", broken)
    [state] = world.send_due()
    assert state.phase == "pending" and state.attempts == 1
    assert state.last_error == "the attempt failed unexpectedly (LookupError)"
    assert world.webhook(job.id) == state
