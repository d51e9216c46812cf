"""Errors to HTTP in one place: domain errors carry no status, `http.errors.STATUS` maps
each class, and every error reply (the middleware's, 413, 429 and 501 included) is made
by `http.errors.error_response`."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from magicmix import errors
from magicmix.errors import Busy, MagicMixError, NotSupported, PayloadTooLarge
from magicmix.http import middleware
from magicmix.http.errors import STATUS, error_response, status_of
from tests.service_fixtures import API, MIX, RunningService

DOMAIN_ERRORS = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, MagicMixError) and cls is not MagicMixError
]


def test_domain_errors_carry_no_http_status() -> None:
    assert DOMAIN_ERRORS
    for cls in [MagicMixError, *DOMAIN_ERRORS]:
        assert not hasattr(cls, "status_code"), cls


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda cls: cls.__name__)
def test_every_domain_error_has_its_own_entry_in_the_one_table(cls: type[MagicMixError]) -> None:
    assert cls in STATUS
    assert 400 <= STATUS[cls] < 600


def test_a_subclass_takes_its_parents_status_and_the_rest_are_500() -> None:
    class Refused(PayloadTooLarge):
        pass

    assert status_of(Refused("x")) == STATUS[PayloadTooLarge] == 413
    assert status_of(MagicMixError("x")) == 500


async def answer_of(err: MagicMixError) -> tuple[int, dict[str, str], dict[str, Any]]:
    """What `BodyGuard` sends for `err`, before the app runs: status, headers, body."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def never_reached(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the guard let a refused request through")

    async def refuse(scope: Scope, receive: Receive) -> bytes:
        raise err

    guard = middleware.BodyGuard(
        never_reached, max_bytes=100, timeout_s=1.0, max_containers=10, authenticate=str
    )
    guard._read = refuse  # type: ignore[method-assign]  # the body read refuses with `err`
    await guard({"type": "http", "method": "POST", "headers": []}, receive, send)
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body["body"])


def test_the_body_guard_answers_through_the_mapping_with_retry_after() -> None:
    """Its own body once dropped `retry_after` on a 429; now it is the app's reply."""
    status, headers, body = asyncio.run(answer_of(Busy("slow down", retry_after=7)))
    assert (status, headers["retry-after"], body["retry_after"]) == (429, "7", 7)
    assert body == json.loads(error_response(Busy("slow down", retry_after=7)).body)


def test_413_from_the_body_guard_is_the_mappings(running: RunningService) -> None:
    limit = running.settings.max_body_bytes
    reply = running.http.post(
        running.base_url + MIX,
        content=b"{" + b" " * limit + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == STATUS[PayloadTooLarge]
    assert reply.json() == {"status": "error", "message": f"request body is over {limit} bytes"}


def test_update_server_is_a_501_through_the_mapping(running: RunningService) -> None:
    reply = running.post(f"{API}/image_editing/update_server", {"key": running.admin_key})
    assert reply.status_code == STATUS[NotSupported] == 501
    assert reply.json()["status"] == "error" and "redeploy" in reply.json()["message"]


def test_an_unknown_route_and_a_wrong_method_answer_in_our_body(running: RunningService) -> None:
    missing = running.http.get(running.base_url + "/no/such/route")
    assert missing.status_code == 404 and missing.json()["status"] == "error"
    wrong = running.http.put(running.base_url + MIX, json={})
    assert wrong.status_code == 405 and wrong.json()["status"] == "error"
    assert "POST" in wrong.headers["allow"]
