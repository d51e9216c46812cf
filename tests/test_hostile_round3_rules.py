"""Hostile world, round three (#22), point 9: the six rules a sabotage check got past.

Each test names, in its docstring, the one-line edit that broke its rule unnoticed before;
each was checked to fail under that edit, whatever other test files run beside it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import shutil
import subprocess  # nosec B404 - runs this repo's own code in a second process
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.engine import toy
from magicmix.engine.configure import load_engine
from magicmix.engine.toy import ToyModelError
from magicmix.http.schemas import MagicMixIn
from magicmix.jobs import JobResult, QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.store import LocalStore
from magicmix.outputs.user_bucket import S3Details
from magicmix.service import fingerprint
from magicmix.store.base import JobStore
from magicmix.store.database import open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.sweep import Sweeper
from tests.conftest import make_layout_image
from tests.db_fixtures import DIALECTS, url_for
from tests.http_fixtures import LoopbackServer, respond
from tests.service_fixtures import API, MIX, RunningService, png
from tests.test_jobs import Clock, params
from tests.test_webhooks import World

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600.0

# -- 1. retention counted in hours ---------------------------------------------------------------


def store_at(url: str) -> JobStore:
    return SqlJobStore(open_database(url))


def test_an_output_a_few_hours_old_is_kept_and_one_past_retention_goes(
    database_url: str, tmp_path: Path
) -> None:
    """Broken by `timedelta(minutes=settings.retention_hours)` in the sweep: the
    3-hour-old output went with the 25-hour-old one."""
    clock = Clock(time.time())
    lifecycle = Lifecycle(store_at(database_url), QueueLimits(9, 9), clock=clock)
    outputs = LocalStore(tmp_path / "outputs")
    made = {}
    for hours in (3, 23.5, 25):
        clock.now = time.time() - hours * HOUR
        [job] = lifecycle.claim({lifecycle.create("key-1", params(), b"png").id: "worker"})
        stored = JobResult(
            output=[job.output_name],
            generation_time=1.0,
            stored_in="service",
            object_names=[job.output_name],
        )
        lifecycle.finish(job, stored)
        outputs.put(job.output_name, b"png")
        os.utime(outputs.directory / job.output_name, (clock.now, clock.now))
        made[hours] = job
    sweeper = Sweeper(lifecycle, outputs, Settings(data_dir=tmp_path, retention_hours=24))
    report = asyncio.run(sweeper.run_once())
    assert (report.removed, report.expired) == ([made[25].output_name], [made[25].id])
    for hours in (3, 23.5):
        kept = lifecycle.store.get(made[hours].id)
        assert kept is not None and kept.status == "success"
        assert outputs.get(made[hours].output_name) == b"png"


# -- 2. the Idempotency-Key fingerprint covers every field but the key ---------------------------

OTHER_VALUES = {
    "prompt": "another prompt",
    "negative_prompt": "another negative",
    "image": "https://example.com/other.png",
    "width": 512,
    "height": 512,
    "kmin": 0.1,
    "kmax": 0.9,
    "mix_factor": 0.9,
    "steps": 7,
    "guidance_scale": 3.0,
    "seed": 99,
    "webhook": "https://example.com/hook",
    "track_id": "another-track",
}


def test_the_fingerprint_changes_with_every_body_field_but_the_key() -> None:
    """Broken by `exclude={"key", "image"}` in `service.fingerprint`: a resend with another
    layout replayed the first job. `samples` has one valid value (1), so it cannot differ."""
    assert set(OTHER_VALUES) == set(MagicMixIn.model_fields) - {"key", "samples"}
    base = {"key": "k", "prompt": "p", "image": "https://example.com/a.png"}
    first = fingerprint(MagicMixIn(**base))
    assert fingerprint(MagicMixIn(**{**base, "key": "another key"})) == first
    for field, value in OTHER_VALUES.items():
        assert fingerprint(MagicMixIn(**{**base, field: value})) != first, field


def test_a_resend_with_another_layout_under_the_same_idempotency_key_is_422(
    running: RunningService,
) -> None:
    def send(image_seed: int) -> tuple[int, dict[str, Any]]:
        layout = png(make_layout_image(64, 64, seed=image_seed))
        body = {
            "key": running.key,
            "prompt": "same prompt",
            "image": base64.b64encode(layout).decode(),
            "width": 256,
            "height": 256,
            "steps": 2,
            "seed": 1,
        }
        reply = running.http.post(
            running.base_url + MIX, json=body, headers={"Idempotency-Key": "layout-change-1"}
        )
        return reply.status_code, reply.json()

    assert send(1)[0] == 200
    status, other = send(2)
    assert status == 422 and "Idempotency-Key" in other["errors"]


# -- 3. output names are unguessable on every job store -------------------------------------------


def tokens_of(store: JobStore, count: int) -> list[str]:
    lifecycle = Lifecycle(store, QueueLimits(count, count))
    names = [lifecycle.create("key-1", params(), b"png").output_name for _ in range(count)]
    return [name.split("-", 1)[1].removesuffix(".png") for name in names]


def random_bits(tokens: list[str]) -> float:
    """A floor on the random bits per token: the positions whose characters vary freely
    across the tokens (8 or more values among them), times the bits of the alphabet used."""
    alphabet = {char for token in tokens for char in token}
    free = sum(1 for column in zip(*tokens, strict=False) if len(set(column)) >= 8)
    return free * math.log2(len(alphabet))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_output_names_are_random_and_differ_between_stores(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Broken by `output_token=f"{job_id:022d}"` on the Modal store: only the length of the
    name was checked there. Two stores number their jobs alike; their names must not."""
    urls = [url_for(dialect, tmp_path / name, request) for name in "ab"]
    first, second = (tokens_of(store_at(url), 32) for url in urls)
    assert len(set(first + second)) == 64
    assert random_bits(first + second) >= 96


_ONE_NAME = """
import sys
from pathlib import Path
from magicmix.jobs import QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.store.database import open_database
from magicmix.store.jobs import SqlJobStore
from tests.test_jobs import params
store = SqlJobStore(open_database(sys.argv[1]))
print(Lifecycle(store, QueueLimits(1, 1)).create("key-1", params(), b"png").output_name)
"""


@pytest.mark.parametrize("dialect", DIALECTS)
def test_output_names_differ_between_processes(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A generator seeded alike in every process would pass the test above, not this one."""
    names = [
        subprocess.run(  # nosec B603 - this interpreter, this repo's code
            [sys.executable, "-c", _ONE_NAME, url_for(dialect, tmp_path / str(run), request)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout.strip()
        for run in range(2)
    ]
    assert names[0].startswith("1-") and names[1].startswith("1-") and names[0] != names[1]


# -- 4. system_details shows no part of the S3 secret ----------------------------------------------

SECRET = "Qv7Zr2Kx9Lm4Tp8Wb3Nc6Hd1Fg5Js0Yq"


def test_system_details_shows_no_piece_of_the_s3_secret(running: RunningService) -> None:
    """Broken by masking the secret like the key id (`abcd****wxyz`): the tests only looked
    for the whole secret. No four characters of it in a row may appear."""
    principal = running.service.keys.authenticate(running.key)
    details = S3Details(
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key=SECRET,
        bucket="user-bucket",
    )
    box = SecretBox(running.settings.secret_key_bytes())
    running.service.keys.set_s3(principal.key_id, details.to_encrypted(box))
    try:
        reply = running.post(f"{API}/image_editing/system_details", {"key": running.key}).json()
    finally:
        running.service.keys.delete_s3(principal.key_id)
    assert reply["s3"]["bucket"] == "user-bucket"  # the details are there, masked
    shown = str({k: v for k, v in reply.items() if k != "webhook_secret"})
    pieces = {SECRET[i : i + 4] for i in range(len(SECRET) - 3)}
    assert not [piece for piece in pieces if piece in shown]


# -- 5. the toy model is hash-checked on the real load path ----------------------------------------


@pytest.fixture
def damaged_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped toy model with one bit of one weight flipped, standing in for
    the shipped one wherever the loader looks for it."""
    copy = Path(shutil.copytree(toy.MODEL_DIR, tmp_path / "toy"))
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(toy, "MODEL_DIR", copy)
    monkeypatch.setattr(toy.verified_model_dir, "__defaults__", (copy,))
    return copy


def test_magicmix_model_toy_refuses_a_damaged_copy_when_the_engine_loads(
    damaged_toy: Path, tmp_path: Path
) -> None:
    """Broken by loading the toy model without `verified_model_dir` on the way that
    `MAGICMIX_MODEL=toy` takes (`load_engine`): only the verifier itself was tested."""
    settings = Settings(model="toy", data_dir=tmp_path / "data", device="cpu")
    with pytest.raises(ToyModelError, match="do not match"):
        load_engine(settings)


# -- 6. the webhook log line has no raw URL, whatever ran before -----------------------------------


def test_the_webhook_log_line_never_has_the_raw_url(
    raw_log_records: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken by logging `url` instead of `redact_url(url)` in `WebhookSender.send`: caught
    only when the webhook tests ran alone, before another file installed the redaction."""
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, webhook_timeout_s=5)
    world = World(tmp_path / "db.sqlite3", settings, Clock(time.time()))
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(204))
        job = world.ended_job(receiver.url("/hook?token=s3cr3t-t0ken#frag"))
        with caplog.at_level(logging.INFO, logger="magicmix.webhooks"):
            [state] = world.send_due()
    assert state.phase == "delivered"
    line = next(r.getMessage() for r in caplog.records if f"job {job.id}" in r.getMessage())
    assert receiver.url("/hook") in line and "s3cr3t" not in line and "frag" not in line
