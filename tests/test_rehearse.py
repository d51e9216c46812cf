"""The check on every landing: `make rehearse`, and modal_app.py under a burst that goes wrong.

One rehearsal for the module, started as `make rehearse` starts it (`python -m
rehearsal.local`: its own PostgreSQL and S3 store on loopback, the toy model): it serves
the playground, and the curl it prints answers `success`. Then, with two GPU containers
at most, one in three GPU batches killed mid-batch (`--crash-gpu-every 3`, Modal
reschedules its inputs), the sweep every 2 s and batches of four that collect for
200 ms, each round is a burst from two keys in
three sizes and two step counts (so Modal's batches mix schedule groups), some requests
sent twice at once with one Idempotency-Key, every job with a webhook, and clear_queue
landing mid-burst while batches collect and run. Afterwards every job must have ended
`success` or `cancelled`, with exactly one webhook POST that verifies with its key's
signing secret and says how it ended, and a fetchable PNG exactly for the successes
(nothing left in the bucket for the others). No Modal call is ever cancelled.

The job-lifecycle races of the SQL store (tests/test_lifecycle_races.py: cancel vs
claim, clear_queue vs a claiming worker, a finish vs a lapsed lease, submit vs
clear_queue, resends of one Idempotency-Key, two webhook senders) all meet here, across
real processes and crashes: the first round runs on every landing, many more under `slow`.
Last, Ctrl-C stops everything `make rehearse` started.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from standardwebhooks import Webhook

from magicmix.http.links import EDITING
from magicmix.jobs import JobStatus
from tests.http_fixtures import LoopbackServer, respond
from tests.rehearsal_fixtures import (
    ADMIN,
    OTHER,
    SECRET_KEY,
    Deployment,
    printed_curl,
    rehearsed_locally,
    s3_client,
    until,
    webhook_secret,
)
from tests.service_fixtures import MIX

PNG = b"\x89PNG\r\n\x1a\n"
FLAGS = ("--gpus", "2", "--crash-gpu-every", "3", "--sweep-every", "2")
KNOBS = {
    "MAGICMIX_BATCH_SIZE": "4",
    "MAGICMIX_BATCH_WAIT_MS": "200",
    "MAGICMIX_SYNC_WAIT_S": "0",
}  # `make rehearse` allows private URLs, as `make run` does: the receiver is on loopback
JOBS_PER_ROUND = 16
SLOW_ROUNDS = 25  # as tests/test_lifecycle_races.py ROUNDS


@pytest.fixture(scope="module")
def receiver() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        server.route("/hook", respond(200))
        yield server


@pytest.fixture(scope="module")
def app() -> Iterator[Deployment]:
    env = {"MAGICMIX_API_KEYS": f"{ADMIN},{OTHER}", "MAGICMIX_SECRET_KEY": SECRET_KEY, **KNOBS}
    with rehearsed_locally(env, *FLAGS) as running:
        yield running


def test_make_rehearse_serves_the_playground_and_its_printed_curl_answers_success(
    app: Deployment,
) -> None:
    page = app.http.get("/")
    assert page.status_code == 200 and "MagicMix playground" in page.text
    body = printed_curl(app.running.lines)
    reply = app.http.post(MIX, json=body).json()
    if reply["status"] == "processing":
        reply = app.until_done(reply["id"], body["key"], timeout=120)
    assert reply["status"] == "success", reply
    assert app.http.get(reply["output"][0]).content.startswith(PNG)


def submit(app: Deployment, body: dict[str, Any], resend: str | None) -> list[httpx.Response]:
    """One request, or (with `resend`) the same request twice at once with one
    Idempotency-Key."""
    if resend is None:
        return [app.http.post(MIX, json=body)]
    headers = {"Idempotency-Key": resend}
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: app.http.post(MIX, json=body, headers=headers), range(2)))


def burst(
    app: Deployment, receiver: LoopbackServer, rng: random.Random, tag: str
) -> dict[int, str]:
    """A round: the requests, clear_queue at a random moment among them; each job's key."""
    bodies = []
    for n in range(JOBS_PER_ROUND):
        key = (ADMIN, OTHER)[n % 2]
        size = rng.choice((256, 256, 264, 320))
        fields = {"width": size, "height": size, "steps": rng.choice((4, 4, 6)), "seed": n}
        body = app.body(key=key, webhook=receiver.url("/hook"), track_id=f"{tag}-{n}", **fields)
        bodies.append((body, f"{tag}-idem-{n}" if n % 5 == 0 else None))
    clear_after = rng.randrange(JOBS_PER_ROUND // 3, JOBS_PER_ROUND)
    with ThreadPoolExecutor(8) as pool:
        sent = [pool.submit(submit, app, body, resend) for body, resend in bodies[:clear_after]]
        cleared = pool.submit(app.post, f"{EDITING}/clear_queue", ADMIN)
        sent += [pool.submit(submit, app, body, resend) for body, resend in bodies[clear_after:]]
        replies = [future.result() for future in sent]
        assert cleared.result().status_code == 200
    keys = {}
    for (body, _), pair in zip(bodies, replies, strict=True):
        made = {r.json()["id"] for r in pair if r.status_code == 200}
        assert len(made) == 1 and all(r.status_code in (200, 409) for r in pair), "one job a key"
        keys[made.pop()] = body["key"]
    return keys


def check_round(app: Deployment, receiver: LoopbackServer, keys: dict[int, str]) -> dict[str, int]:
    """Every job ended well, once, with one signed webhook and its PNG; a tally by status."""
    jobs = {job_id: until(lambda i=job_id: ended(app, i), 120) for job_id in keys}
    posts = until(lambda: webhooks(receiver, list(keys)), 120)
    stored = bucket_objects(app)
    tally: dict[str, int] = {}
    for job_id, job in jobs.items():
        assert job.status in (JobStatus.SUCCESS, JobStatus.CANCELLED), (job_id, job.error)
        post = posts[job_id]
        body = Webhook(webhook_secret(keys[job_id])).verify(post.body, post.headers)
        assert body["id"] == job_id and body["track_id"] == job.params.track_id
        if job.status is JobStatus.SUCCESS:
            assert job.result is not None and body["status"] == "success"
            assert app.http.get(job.result.output[0]).content.startswith(PNG)
            assert stored.count(f"out/{job.result.object_names[0]}") == 1
        else:
            assert body["status"] == "failed" and "cancelled" in body["message"]
            assert not [name for name in stored if name.startswith(f"out/{job_id}-")]
        tally[job.status.value] = tally.get(job.status.value, 0) + 1
    return tally


def ended(app: Deployment, job_id: int) -> Any:
    job = app.job(job_id)
    return job if job.status.is_terminal else None


def webhooks(receiver: LoopbackServer, ids: list[int]) -> dict[int, Any] | None:
    """The one POST of each job, once every job has one (None before; more than one fails)."""
    found: dict[int, list[Any]] = {job_id: [] for job_id in ids}
    for request in receiver.requests:
        job_id = int(request.headers["webhook-id"].rpartition("-")[2])
        if job_id in found:
            found[job_id].append(request)
    assert all(len(posts) <= 1 for posts in found.values()), "a webhook was sent twice"
    if not all(found.values()):
        return None
    return {job_id: posts[0] for job_id, posts in found.items()}


def bucket_objects(app: Deployment) -> list[str]:
    bucket, _, _ = app.env["MAGICMIX_STORE_URL"].removeprefix("s3://").partition("/")
    listing = s3_client(app.env["MAGICMIX_S3_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_burst_with_crashing_gpus_and_clear_queue_ends_every_job_once_with_its_webhook(
    app: Deployment, receiver: LoopbackServer
) -> None:
    keys = burst(app, receiver, random.Random(0), "round-0")
    tally = check_round(app, receiver, keys)
    totals = app.control.counters()["totals"]
    assert totals.get("crashes_injected", 0) >= 1, "a GPU container died mid-batch"
    assert totals.get("modal.cancel", 0) == 0
    assert sum(tally.values()) == len(keys)


@pytest.mark.slow
def test_many_bursts_with_crashing_gpus_and_clear_queue_end_every_job_once(
    app: Deployment, receiver: LoopbackServer
) -> None:
    rng = random.Random(20241205)
    tally: dict[str, int] = {}
    for round_ in range(1, SLOW_ROUNDS + 1):
        keys = burst(app, receiver, rng, f"round-{round_}")
        for status, count in check_round(app, receiver, keys).items():
            tally[status] = tally.get(status, 0) + count
    assert tally.get("success", 0) and tally.get("cancelled", 0), tally
    assert app.control.counters()["totals"].get("modal.cancel", 0) == 0


def test_ctrl_c_stops_everything_make_rehearse_started(app: Deployment) -> None:
    entry = psutil.Process(app.running.proc.pid)
    started = entry.children(recursive=True)
    port = app.env["MAGICMIX_DATABASE_URL"].rpartition(":")[2].partition("/")[0]
    postgres = [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"-p {port}" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(started) >= 4 and len(postgres) == 1  # the rehearsal, its containers
    data_dir = Path(postgres[0].info["cmdline"][postgres[0].info["cmdline"].index("-D") + 1])
    app.running.proc.send_signal(signal.SIGINT)
    assert app.running.proc.wait(60) == 0
    _, alive = psutil.wait_procs([*started, *postgres], timeout=10)
    assert not alive and not data_dir.exists() and not app.running.state_dir.exists()
