"""Least privilege: per-key limits, constant-time keys, secrets kept out of every output.

What `tests/test_server.py` already proves is not repeated here (admin routes need an
admin key; a key sees only its own jobs; the request body limit). This adds:

- a key over MAGICMIX_MAX_QUEUED_PER_KEY gets 429 with `retry_after` while another key
  still gets in;
- key comparison goes through `hmac.compare_digest`;
- one full flow (update_s3 on the loopback S3 server, mixes with a webhook, fetch,
  system_details, a near-miss key, an update_s3 with another secret, reset_s3) with every log record
  captured: the API keys (user, admin, operator), the S3 access key id and secret, and
  the webhook secret appear in no log record, in no reply (body or headers; the webhook
  secret only in system_details, to its own key, by contract; the access key id only as
  the X-Amz-Credential of a presigned URL, which SigV4 requires), in no webhook sent, and
  not in clear in the database files (including the WAL);
- output names carry at least 128 random bits, and knowing a job id is not enough to
  fetch its image.
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from magicmix.backends.local.compose import open_key_store
from magicmix.crypto import SecretBox
from magicmix.store.database import open_database
from magicmix.store.keys import SqlKeyStore
from tests.http_fixtures import LoopbackServer, respond
from tests.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION
from tests.service_fixtures import API, MIX, RunningService, serve, service_settings

FAST = {"steps": 2, "width": 256, "height": 256}
OPERATOR_KEY = "operator-static-key-6f1d2c9a7b"
OTHER_SECRET = "another-s3-secret-9c8b7a6d5e4f"


# --- per-key queue limit ------------------------------------------------------------------


def test_a_key_over_its_queue_share_gets_429_while_another_key_gets_in(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    # the worker waits 3 s before claiming, so submitted jobs stay queued meanwhile
    settings = service_settings(
        tmp_path, tiny_model_dir, sync_wait_s=0, batch_wait_ms=3000, max_queued_per_key=2
    )
    with serve(settings) as app:
        other = open_key_store(settings).create().key
        image = image_host.url("/layout.png")
        for seed in range(2):
            assert app.mix(image=image, seed=seed, **FAST).json()["status"] == "processing"
        refused = app.mix(image=image, seed=9, **FAST)
        assert refused.status_code == 429, refused.text
        body = refused.json()
        assert body["status"] == "error" and body["retry_after"] > 0
        assert refused.headers["Retry-After"] == str(int(body["retry_after"]))
        assert "limit 2" in body["message"]
        admitted = app.mix(key=other, image=image, seed=9, **FAST)
        assert admitted.status_code == 200 and admitted.json()["status"] == "processing"
        cleared = app.post(f"{API}/image_editing/clear_queue", {"key": app.admin_key}).json()
        assert cleared["message"] == "cancelled 3 queued jobs"


# --- constant-time comparison ---------------------------------------------------------------


def test_keys_are_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Static keys go through hmac.compare_digest; stored keys are looked up by keyed hash."""
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    secret = b"unit-secret"
    keys = SqlKeyStore(
        open_database(f"sqlite:///{tmp_path / 'k.sqlite3'}"),
        SecretBox(secret),
        secret,
        [OPERATOR_KEY],
    )
    assert keys.authenticate(OPERATOR_KEY).admin
    with pytest.raises(Exception, match="invalid API key"):
        keys.authenticate(OPERATOR_KEY[:-1] + "x")
    assert len(calls) >= 2
    assert all(OPERATOR_KEY not in pair for pair in calls)  # digests compared, never keys
    stored = keys.create()
    assert keys.authenticate(stored.key).key_id == stored.key_id
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("k.sqlite3*"))
    assert stored.key.encode() not in raw and OPERATOR_KEY.encode() not in raw


# --- secrets absent from logs, replies, webhooks and the database ---------------------------


@pytest.fixture
def flow_app(tmp_path: Path, tiny_model_dir: Path) -> Iterator[RunningService]:
    settings = service_settings(tmp_path, tiny_model_dir, api_keys=OPERATOR_KEY)
    with serve(settings) as running:
        yield running


def test_no_secret_in_logs_replies_webhooks_or_database(
    flow_app: RunningService,
    s3_server: str,
    bucket: str,
    image_host: LoopbackServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = flow_app
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="magicmix")
    replies: list[httpx.Response] = []

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        replies.append(app.post(path, body))
        return replies[-1]

    s3 = {
        "deploy_type": "image_editing",
        "endpoint_url": s3_server,
        "bucket": bucket,
        "region_name": REGION,
        "aws_access_key_id": DUMMY_KEY_ID,
        "aws_secret_access_key": DUMMY_SECRET,
        "image_directory": "secret-flow",
    }
    details = post(f"{API}/image_editing/system_details", {"key": app.key})
    webhook_secret = details.json()["webhook_secret"]
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200, b"ok"))
        assert post(f"{API}/update_s3", {"key": app.key, **s3}).status_code == 200
        assert post(f"{API}/update_s3", {"key": OPERATOR_KEY, **s3}).status_code == 200
        body = {"image": image_host.url("/layout.png"), "prompt": "Bed", **FAST}
        hook = {"webhook": receiver.url("/hook"), "track_id": "t-1"}
        for key in (app.key, OPERATOR_KEY, app.admin_key):
            mixed = post(MIX, {"key": key, **body, **hook})
            assert mixed.json()["status"] == "success", mixed.text
            post(f"{API}/image_editing/fetch/{mixed.json()['id']}", {"key": key})
        post(f"{API}/image_editing/system_details", {"key": app.key})  # now with masked S3
        post(f"{API}/image_editing/fetch/1", {"key": app.key[:-2] + "xx"})  # a near-miss key
        post(f"{API}/update_s3", {"key": app.key, **s3, "aws_secret_access_key": OTHER_SECRET})
        post(f"{API}/reset_s3", {"key": app.key, "deploy_type": "image_editing"})
        _wait(lambda: len(receiver.requests) >= 3)
        sent = receiver.requests

    api_keys = [app.key, app.admin_key, OPERATOR_KEY, app.key[:-2] + "xx"]
    secrets = {
        *api_keys,
        DUMMY_SECRET,
        DUMMY_KEY_ID,
        OTHER_SECRET,
        webhook_secret,
        webhook_secret[6:],
    }
    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records
    )
    assert len(caplog.records) > 20  # the flow was logged
    for secret in secrets:
        assert secret not in logged, f"a secret ({secret[:4]}...) is in the logs"
        for reply in replies:
            seen = _without_presigned_credential(reply.text + str(reply.headers))
            if secret in (webhook_secret, webhook_secret[6:]) and _is_details(reply):
                continue  # system_details shows a key its own webhook secret, by contract
            assert secret not in seen, f"a secret ({secret[:4]}...) in a reply: {reply.url}"
        for request in sent:
            seen = _without_presigned_credential(request.body.decode() + str(request.headers))
            assert secret not in seen
    database = app.settings.database_path
    files = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert files, "no database files found"
    stored = _without_presigned_credential(files.decode("latin-1"))  # jobs keep output URLs
    for secret in secrets:
        assert secret not in stored, f"a secret ({secret[:4]}...) in the database"


def _is_details(reply: httpx.Response) -> bool:
    return reply.url.path.endswith("/system_details") and reply.status_code == 200


def _without_presigned_credential(text: str) -> str:
    """A presigned output URL names the access key id (SigV4 requires it); it is the owner's
    own identifier, sent only to the owner, and never the secret; nothing else may name it."""
    return re.sub(r"X-Amz-Credential=[^&\"]*", "X-Amz-Credential=...", text)


def _wait(condition: Any, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- unguessable output names --------------------------------------------------------------


def test_output_names_carry_at_least_128_random_bits(
    running: RunningService, image_host: LoopbackServer
) -> None:
    names = []
    with ThreadPoolExecutor(4) as pool:  # together, so they share one UNet batch
        replies = list(
            pool.map(
                lambda seed: running.mix(image=image_host.url("/layout.png"), seed=seed, **FAST),
                range(4),
            )
        )
    for reply in (r.json() for r in replies):
        assert reply["status"] == "success", reply
        name = reply["output"][0].rsplit("/", 1)[1]
        match = re.fullmatch(rf"{reply['id']}-([A-Za-z0-9_-]+)\.png", name)
        assert match, name
        names.append((reply["id"], match.group(1)))
        # the id alone (or with a wrong token) finds nothing
        for guess in (f"{reply['id']}.png", f"{reply['id']}-{'A' * len(match.group(1))}.png"):
            assert running.http.get(f"{running.base_url}/outputs/{guess}").status_code == 404
    tokens = [token for _, token in names]
    assert len(set(tokens)) == len(tokens)
    assert all(len(token) * math.log2(64) >= 128 for token in tokens)
    # urlsafe base64 of random bytes: decodes to >= 16 bytes that look random
    raw = b"".join(base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)) for t in tokens)
    assert len(raw) >= 16 * len(tokens)
    assert len(set(raw)) > len(raw) // 3  # not a counter, a timestamp or a constant
    shared = [len(_common_prefix(a, b)) for a in tokens for b in tokens if a != b]
    assert max(shared) <= 4


def _common_prefix(a: str, b: str) -> str:
    prefix = ""
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        prefix += x
    return prefix
