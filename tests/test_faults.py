"""Faults injected under a running service: nothing accepted is lost, nothing answers 500.

Each test breaks one dependency while real requests run, then checks the job's fate and
that the service keeps serving:

- the user's S3 server stops while a job is queued (a private moto server, stopped): the
  image goes to the service store and the reply says why;
- a webhook receiver slower than `webhook_timeout_s`: bounded attempts, job intact
  (the failing receiver is `test_server.py::test_webhook_receiver_down_is_retried...`);
- SQLite busy: another connection holds the write lock, shorter than the busy timeout
  (requests wait and succeed) and longer than it (a clear error, and the worker survives);
- the output store's disk is full (a 16 KiB tmpfs; a read-only directory where mounting is
  not possible): the job fails with a clear reason, the webhook reports it, the service
  keeps serving and recovers once there is room.

The worker process killed mid-job is `tests/test_restart.py` (SIGKILL, restart, all jobs
finish exactly once).
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from magicmix.store.database import open_database
from tests.http_fixtures import LoopbackServer, respond
from tests.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION
from tests.service_fixtures import API, serve, service_settings

FAST = {"steps": 2, "width": 256, "height": 256}


def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- the user's S3 server dies ------------------------------------------------------------


def test_user_s3_server_stopped_while_a_job_is_queued_falls_back_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"fault-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=DUMMY_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET,
    ).create_bucket(Bucket=bucket)
    settings = service_settings(tmp_path, tiny_model_dir, sync_wait_s=0, batch_wait_ms=800)
    try:
        with serve(settings) as app:
            saved = app.post(
                f"{API}/update_s3",
                {
                    "key": app.key,
                    "deploy_type": "image_editing",
                    "endpoint_url": endpoint,
                    "bucket": bucket,
                    "region_name": REGION,
                    "aws_access_key_id": DUMMY_KEY_ID,
                    "aws_secret_access_key": DUMMY_SECRET,
                },
            )
            assert saved.status_code == 200, saved.text
            queued = app.mix(image=image_host.url("/layout.png"), seed=1, **FAST).json()
            assert queued["status"] == "processing", queued
            moto.stop()  # the bucket's server is gone before the worker claims the job
            final = app.wait_success(queued["id"])
            assert final["status"] == "success", final
            assert "refused the upload" in final["message"]
            assert "endpoint_url" in final["message"] and "24 hours" in final["message"]
            assert final["output"][0].startswith(app.base_url + "/outputs/")
            assert app.download(final["output"][0]).startswith(b"\x89PNG")
            assert DUMMY_SECRET not in str(final)
    finally:
        moto.stop()


# --- a slow webhook receiver ------------------------------------------------------------


def test_slow_webhook_receiver_gets_bounded_attempts_and_the_job_is_intact(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    def sleepy(request: Any) -> None:
        time.sleep(1.5)  # past webhook_timeout_s, every time
        respond(200, b"ok")(request)

    settings = service_settings(
        tmp_path,
        tiny_model_dir,
        webhook_timeout_s=0.4,
        webhook_schedule=(0.0, 0.05, 0.1),
    )
    with LoopbackServer() as receiver, serve(settings) as app:
        receiver.route("/hook", sleepy)
        reply = app.mix(
            image=image_host.url("/layout.png"), seed=2, webhook=receiver.url("/hook"), **FAST
        ).json()
        assert reply["status"] == "success", reply
        jobs = app.service.jobs
        wait_for(lambda: jobs.get(reply["id"]).webhook.phase == "failed")  # type: ignore[union-attr]
        record = jobs.get(reply["id"])
        assert record is not None and record.webhook is not None
        # each attempt was cut at 0.4 s, never waiting out the receiver's 1.5 s
        assert record.webhook.attempts == 3
        assert record.webhook.last_error == "the receiver did not answer within 0.4 s"
        wait_for(lambda: len(receiver.requests) == 3)
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
        assert app.fetch(reply["id"]).json() == {**reply}  # the job itself is untouched
        assert app.http.get(app.base_url + "/healthz").status_code == 200


# --- SQLite busy ------------------------------------------------------------------------


@contextmanager
def write_lock_held(database: Path, seconds: float) -> Iterator[threading.Event]:
    """Another connection holds SQLite's write lock for `seconds` (from a thread)."""
    taken = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(database, isolation_level=None, timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("UPDATE jobs SET status = status WHERE id < 0")
        taken.set()
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        yield taken
    finally:
        holder.join(seconds + 10)


def test_sqlite_lock_shorter_than_the_busy_timeout_only_delays_requests(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    with serve(service_settings(tmp_path, tiny_model_dir)) as app:
        done = app.mix(image=image_host.url("/layout.png"), seed=3, **FAST).json()
        with write_lock_held(app.settings.database_path, 1.5):
            started = time.monotonic()
            details = app.post(f"{API}/image_editing/system_details", {"key": app.key})
            assert details.status_code == 200  # reads are not blocked (WAL)
            assert app.fetch(done["id"]).json()["status"] == "success"
            reply = app.mix(image=image_host.url("/layout.png"), seed=4, **FAST)
            waited = time.monotonic() - started
        assert reply.status_code == 200 and reply.json()["status"] == "success", reply.text
        assert waited >= 1.0  # the insert queued behind the lock instead of failing


def short_busy_timeout(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(
        "magicmix.store.stores.open_database",
        functools.partial(open_database, busy_timeout_s=seconds),
    )


def test_sqlite_lock_longer_than_the_busy_timeout_is_a_clear_error_not_a_500(
    tmp_path: Path,
    tiny_model_dir: Path,
    image_host: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short_busy_timeout(monkeypatch, 0.3)
    with serve(service_settings(tmp_path, tiny_model_dir)) as app:
        with write_lock_held(app.settings.database_path, 1.5):
            reply = app.mix(image=image_host.url("/layout.png"), seed=5, **FAST)
        assert reply.status_code in (429, 503), reply.text
        assert reply.json()["status"] == "error" and "retry_after" in reply.json()
        after = app.mix(image=image_host.url("/layout.png"), seed=5, **FAST)
        assert after.json()["status"] == "success"


def test_worker_survives_a_locked_database(
    tmp_path: Path,
    tiny_model_dir: Path,
    image_host: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short_busy_timeout(monkeypatch, 0.3)
    settings = service_settings(tmp_path, tiny_model_dir, sync_wait_s=0, batch_wait_ms=300)
    with serve(settings) as app:
        queued = app.mix(image=image_host.url("/layout.png"), seed=6, **FAST).json()
        with write_lock_held(app.settings.database_path, 1.5):
            time.sleep(1.0)  # the worker tries to claim the job while the lock is held
        assert app.wait_success(queued["id"], timeout=60)["status"] == "success"


# --- the output store's disk is full -----------------------------------------------------


@contextmanager
def full_disk(directory: Path) -> Iterator[str]:
    """`directory` has no room: a 16 KiB tmpfs (root), else a read-only directory."""
    directory.mkdir(parents=True)
    mount = shutil.which("mount")
    if os.geteuid() == 0 and mount:
        done = subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)
    else:
        directory.chmod(0o555)
        try:
            yield "read-only"
        finally:
            directory.chmod(0o755)


def make_room(directory: Path, kind: str) -> None:
    if kind == "tmpfs":
        subprocess.run(["mount", "-o", "remount,size=4m", str(directory)], check=True)
    else:
        directory.chmod(0o755)


def test_full_output_disk_fails_the_job_clearly_and_the_service_keeps_serving(
    tmp_path: Path, tiny_model_dir: Path, image_host: LoopbackServer
) -> None:
    store = tmp_path / "store"
    with full_disk(store) as kind, LoopbackServer() as receiver:
        receiver.route("/hook", respond(200, b"ok"))
        settings = service_settings(tmp_path, tiny_model_dir, store_url=f"file://{store}")
        with serve(settings) as app:
            reply = app.mix(
                image=image_host.url("/layout.png"),
                seed=7,
                webhook=receiver.url("/hook"),
                track_id="disk-full",
                **FAST,
            )
            assert reply.status_code == 200, reply.text
            failed = reply.json()
            assert failed["status"] == "failed", failed
            assert "could not be stored" in failed["message"], failed
            assert str(store) not in failed["message"]  # no server paths in replies
            assert app.fetch(failed["id"]).json() == failed
            wait_for(lambda: receiver.requests)
            assert b'"status":"failed"' in receiver.requests[0].body
            assert b"disk-full" in receiver.requests[0].body
            health = app.http.get(app.base_url + "/healthz")
            details = app.post(f"{API}/image_editing/system_details", {"key": app.key})
            assert health.status_code == 200 and details.status_code == 200
            make_room(store, kind)
            after = app.mix(image=image_host.url("/layout.png"), seed=7, **FAST).json()
            assert after["status"] == "success", after
            assert app.download(after["output"][0]).startswith(b"\x89PNG")
