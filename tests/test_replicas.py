"""Replicas: `magicmix serve` processes sharing one PostgreSQL and one S3-protocol store are
one service, and lose nothing when one of them is killed.

Real processes (`python -m magicmix serve`), a real PostgreSQL, the loopback S3 server for
outputs, a loopback webhook receiver. A burst is spread over two replicas; one is killed
with SIGKILL while it holds claims; every job ends once, successfully, with one output
object and its webhook delivered (at least once, by the Standard Webhooks rule; a second
POST can only be the one the killed replica had in flight). The longer rounds are in
`make test-slow`.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from magicmix.store.database import open_database
from magicmix.store.schema import jobs
from tests.http_fixtures import LoopbackServer, free_port, respond
from tests.s3_server import DUMMY_AWS_ENV
from tests.service_fixtures import MIX
from tests.test_restart import KEY, server_env, server_process

FETCH = "/api/v1/enterprise/image_editing/fetch"


def replica_env(
    tmp_path: Path, name: str, model_dir: Path, base: str, **extra: str
) -> dict[str, str]:
    return {
        **server_env(tmp_path / name, model_dir, base, **extra),
        **DUMMY_AWS_ENV,
        "MAGICMIX_ALLOW_PRIVATE_URLS": "true",  # the receiver and the S3 server are loopback
        "MAGICMIX_BATCH_SIZE": "2",
    }


def claimed_by(database_url: str, pid: int) -> int:
    """How many jobs the replica with this pid holds right now."""
    with open_database(database_url, migrate_schema=False).read() as connection:
        claimants = connection.scalars(
            select(jobs.c.claimant).where(jobs.c.status == "processing")
        ).all()
    return sum(1 for claimant in claimants if claimant and f":{pid}:" in claimant)


def wait_for(condition: Any, what: str) -> None:
    """Until `condition()` holds; pytest's timeout guards a hang (no budget of our own)."""
    while not condition():
        time.sleep(0.05)


def run_burst(
    tmp_path: Path,
    model_dir: Path,
    database_url: str,
    s3_server: str,
    bucket: str,
    receiver: LoopbackServer,
    jobs_count: int,
) -> tuple[list[int], dict[str, Any]]:
    """`jobs_count` jobs over two replicas, the first killed -9 while it holds claims."""
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    shared = {
        "MAGICMIX_DATABASE_URL": database_url,
        "MAGICMIX_STORE_URL": f"s3://{bucket}/outputs/",
        "MAGICMIX_S3_ENDPOINT_URL": s3_server,
    }
    envs = [
        replica_env(tmp_path, f"replica-{i}", model_dir, base, **shared)
        for i, base in enumerate(bases)
    ]
    body = {
        "key": KEY,
        "prompt": "Bed",
        "image": receiver.url("/layout.png"),
        "width": 256,
        "height": 256,
        "steps": 8,
        "kmax": 1.0,
        "webhook": receiver.url("/hook"),
    }
    with server_process(envs[0], ports[0]) as doomed, server_process(envs[1], ports[1]):
        ids = []
        for seed in range(jobs_count):
            reply = httpx.post(bases[seed % 2] + MIX, json={**body, "seed": seed}, timeout=30)
            assert reply.status_code == 200, reply.text
            ids.append(reply.json()["id"])
        wait_for(lambda: claimed_by(database_url, doomed.pid) > 0, "the first replica to claim")
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
        finals: dict[int, dict[str, Any]] = {}
        while len(finals) < len(ids):  # the survivor answers every job, and runs them
            for job_id in set(ids) - set(finals):
                reply = httpx.post(f"{bases[1]}{FETCH}/{job_id}", json={"key": KEY}, timeout=30)
                if reply.json()["status"] != "processing":
                    finals[job_id] = reply.json()
            time.sleep(0.2)
        wait_for(
            lambda: (
                len({r.headers["webhook-id"] for r in receiver.requests if r.path == "/hook"})
                == len(ids)
            ),
            "every webhook",
        )
    return ids, {"finals": finals}


@pytest.fixture
def receiver() -> Iterator[LoopbackServer]:
    from tests.conftest import make_layout_image
    from tests.service_fixtures import png

    with LoopbackServer() as server:
        server.route("/hook", respond(200))
        server.route(
            "/layout.png", respond(200, png(make_layout_image()), {"Content-Type": "image/png"})
        )
        yield server


def check_burst(
    ids: list[int], outcome: dict[str, Any], receiver: LoopbackServer, s3_client: Any, bucket: str
) -> None:
    finals = outcome["finals"]
    assert all(reply["status"] == "success" for reply in finals.values()), finals
    objects = s3_client.list_objects_v2(Bucket=bucket, Prefix="outputs/").get("Contents", [])
    names = sorted(item["Key"].removeprefix("outputs/").split("-")[0] for item in objects)
    assert names == sorted(str(job_id) for job_id in ids), "one output per job"
    posts = Counter(r.headers["webhook-id"] for r in receiver.requests if r.path == "/hook")
    assert set(posts) == {f"magicmix-job-{job_id}" for job_id in ids}, "a webhook for each job"
    assert sum(posts.values()) - len(ids) <= 1, posts  # only the killed one's in-flight POST


def test_two_replicas_survive_one_killed_mid_burst(
    tmp_path: Path,
    tiny_model_dir: Path,
    pg_url: str,
    s3_server: str,
    bucket: str,
    s3_client: Any,
    receiver: LoopbackServer,
) -> None:
    ids, outcome = run_burst(tmp_path, tiny_model_dir, pg_url, s3_server, bucket, receiver, 12)
    check_burst(ids, outcome, receiver, s3_client, bucket)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
def test_two_replicas_survive_one_killed_mid_burst_many_rounds(
    tmp_path: Path,
    tiny_model_dir: Path,
    pg_url: str,
    s3_server: str,
    make_bucket: Any,
    s3_client: Any,
    receiver: LoopbackServer,
    round_: int,
) -> None:
    bucket = make_bucket()
    ids, outcome = run_burst(tmp_path, tiny_model_dir, pg_url, s3_server, bucket, receiver, 40)
    check_burst(ids, outcome, receiver, s3_client, bucket)
