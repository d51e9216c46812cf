"""Today's `modal_app.py`, unmodified, under `scripts/modal-rehearsal`.

The bucket is the loopback moto server, the model the tiny one, keys static
(`MAGICMIX_API_KEYS`, admins). Everything Modal would do (containers, Dicts, batches,
cancellation) is the rehearsal's emulation; see tests/test_rehearsal_runtime.py for it.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from magicmix.http.links import EDITING
from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.store.testing import TempPostgres
from rehearsal.fake_modal import Dict
from tests.conftest import make_layout_image
from tests.rehearsal_fixtures import Rehearsal, rehearsing, until
from tests.s3_server import DUMMY_AWS_ENV, REGION
from tests.service_fixtures import MIX, png

pytestmark = pytest.mark.slow  # each cold-starts torch in several processes
ADMIN, OTHER = "mm_static_rehearsal_key_one", "mm_static_rehearsal_key_two"
LAYOUT = "data:image/png;base64," + base64.b64encode(png(make_layout_image(256, 256))).decode()


def app_env(s3_server: str, model_dir: Path, database_url: str, **knobs: str) -> dict[str, str]:
    """The `magicmix` and `magicmix-s3` secrets and the deploy-time knobs, as environment."""
    bucket = f"rehearsal-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=REGION, **_credentials()).create_bucket(
        Bucket=bucket
    )
    return {
        **DUMMY_AWS_ENV,
        "HF_HUB_OFFLINE": "1",
        "MAGICMIX_MODEL": str(model_dir),
        "MAGICMIX_SECRET_KEY": "rehearsal-secret-key-0123456789",
        "MAGICMIX_DATABASE_URL": database_url,
        "MAGICMIX_STORE_URL": f"s3://{bucket}/out",
        "MAGICMIX_S3_ENDPOINT_URL": s3_server,
        "MAGICMIX_API_KEYS": f"{ADMIN},{OTHER}",
        **knobs,
    }


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def mix(http: httpx.Client, key: str) -> dict[str, Any]:
    body = {**SEED_EXAMPLE, "key": key, "width": 256, "height": 256, "steps": 4, "image": LAYOUT}
    reply = http.post(MIX, json=body)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def fetch(http: httpx.Client, job_id: int, key: str) -> dict[str, Any]:
    return dict(http.post(f"{EDITING}/fetch/{job_id}", json={"key": key}).json())


def until_done(http: httpx.Client, job_id: int, key: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    reply = fetch(http, job_id, key)
    while reply["status"] == "processing" and time.monotonic() < deadline:
        time.sleep(0.5)
        reply = fetch(http, job_id, key)
    return reply


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: str,
    tiny_model_dir: Path,
    postgres: TempPostgres,
) -> Iterator[Rehearsal]:
    env = app_env(s3_server, tiny_model_dir, postgres.fresh_url())
    with rehearsing(tmp_path_factory.mktemp("rehearsal"), env=env, app="modal_app") as running:
        yield running


def test_a_magic_mix_request_through_the_rehearsed_web_function_answers_a_png(
    deployed: Rehearsal,
) -> None:
    with httpx.Client(base_url=deployed.base_url, timeout=200, follow_redirects=True) as http:
        reply = mix(http, ADMIN)
        if reply["status"] == "processing":
            reply = until_done(http, reply["id"], ADMIN, timeout=200)
        assert reply["status"] == "success", reply
        image = http.get(reply["output"][0])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG\r\n\x1a\n")
    totals = deployed.control.counters()["totals"]
    assert totals["modal.spawn"] >= 1 and totals["batches"] >= 1


@pytest.mark.xfail(
    strict=True,
    reason="issue 24 finding 1: clear_queue cancels the Modal calls of queued jobs whose"
    " inputs sit in a running batch, which terminates the whole batch; a job the batch had"
    " claimed goes back to the queue and its call is never spawned again",
)
def test_clear_queue_mid_batch_leaves_the_batchs_running_job_to_finish(
    tmp_path: Path, s3_server: str, tiny_model_dir: Path
) -> None:
    """Six queued jobs of one key wait in a GPU container for a batch of seven;
    clear_queue reads the queue and starts cancelling them (every Modal, database and
    bucket call pays 200 ms); a seventh job, of another key, arrives after that read and
    fills the batch, which claims it. clear_queue then cancels the six jobs' calls. The
    seventh was never cancelled: it must end `success`."""
    knobs = {"MAGICMIX_BATCH_SIZE": "7", "MAGICMIX_BATCH_WAIT_MS": "600000"}
    env = app_env(s3_server, tiny_model_dir, MAGICMIX_SYNC_WAIT_S="0", **knobs)
    flags = ("--gpus", "1", "--latency-ms", "200")
    with (
        rehearsing(tmp_path, *flags, env=env, app="modal_app") as running,
        httpx.Client(base_url=running.base_url, timeout=200, follow_redirects=True) as http,
        ThreadPoolExecutor(6) as pool,
    ):
        queued = [reply["id"] for reply in pool.map(lambda _: mix(http, OTHER), range(6))]
        jobs = Dict.from_name("magicmix-jobs")
        first_call = until(lambda: jobs.get(f"call:{queued[0]}"), timeout=120)
        running.control.wait_input(first_call, "collecting", timeout=300)
        cleared = pool.submit(http.post, f"{EDITING}/clear_queue", json={"key": ADMIN})
        until(lambda: any(jobs.get(f"end:{job_id}") for job_id in queued), timeout=120)
        last = mix(http, ADMIN)["id"]  # after clear_queue's read: not among its cancels
        assert cleared.result().json()["message"].startswith("cancelled")
        reply = until_done(http, last, ADMIN, timeout=60)
        stats = running.control.function_counters("MagicMix")
    assert reply["status"] == "success", f"job {last} is {reply['status']}; GPU class: {stats}"
