"""The Modal backend, run here without Modal: spawning the GPU class is a stand-in.

Everything below the Modal API is real: the service, the FastAPI app, the SQL store on a
real PostgreSQL (as on Modal), the runner with the tiny model, the loopback S3 server
(the service bucket) and a webhook receiver. What only Modal can do (spawning the GPU
class, `FunctionCall.get`) is `tests/modal_standins.InlineGpuCalls`, named so in every
test; batching, retries, crashes and cancellation are the rehearsal's
(`tests/test_rehearsal_*.py`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from magicmix.backends.modal import compose, weights
from magicmix.backends.modal.compose import POOLS, ModalParts
from magicmix.backends.modal.dispatch import ModalDispatcher, parse_job_input
from magicmix.backends.modal.gpu import GpuWorker
from magicmix.cli.keys import key_action
from magicmix.config import Settings
from magicmix.engine import MagicMixEngine
from magicmix.engine.configure import load_for_snapshot
from magicmix.families import SD1, SDXL
from magicmix.http.app import create_app
from magicmix.http.links import EDITING
from magicmix.jobs import JobResult, JobStatus
from magicmix.keys import static_principals
from magicmix.lifecycle import Lifecycle
from magicmix.store.testing import TempPostgres, add_latency
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, respond
from tests.modal_standins import InlineGpuCalls
from tests.test_jobs import params

SECRET = b"test-secret-key-0123456789"
KEY = "mm_static_test_key"
KEY_ID = next(iter(static_principals([KEY], SECRET).values())).key_id
MIX = f"{EDITING}/magic_mix"


@dataclass
class ModalLike:
    """Web-side and GPU-side parts over one database, as on Modal."""

    web: ModalParts
    gpu: ModalParts
    calls: InlineGpuCalls
    webhook_spawns: list[None]

    def dispatcher(self) -> ModalDispatcher:
        return compose.dispatcher(self.web, self.calls, gpu_name="L40S")


def modal_settings(tmp_path: Path, bucket: str, s3_server: str, database_url: str) -> Settings:
    return Settings(
        model="tiny",
        data_dir=tmp_path,
        api_keys=KEY,
        secret_key=SECRET.decode(),
        database_url=database_url,
        store_url=f"s3://{bucket}/outputs/",
        s3_endpoint_url=s3_server,
        public_url="https://ws--magicmix-web.modal.run",
        allow_private_urls=True,
        sync_wait_s=20,
        webhook_schedule=(0.0, 0.05),
    )


def parts_for(settings: Settings, spawns: list[None], function: str = "web") -> ModalParts:
    return compose.modal_parts(settings, lambda: spawns.append(None), pool=POOLS[function])


@pytest.fixture
def modal_like(
    tmp_path: Path,
    engine: MagicMixEngine,
    s3_server: str,
    bucket: str,
    dummy_aws_env: dict[str, str],
    pg_url: str,
) -> ModalLike:
    settings = modal_settings(tmp_path, bucket, s3_server, pg_url)
    spawns: list[None] = []
    web, gpu = parts_for(settings, spawns), parts_for(settings, spawns, "gpu")
    calls = InlineGpuCalls(worker=GpuWorker(gpu, engine).run)
    return ModalLike(web, gpu, calls, spawns)


@pytest.fixture
def client(modal_like: ModalLike) -> Iterator[TestClient]:
    service = compose.web_service(modal_like.web, modal_like.calls, gpu_name="L40S")
    with TestClient(create_app(service)) as http:
        yield http


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    make_layout_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


LAYOUT = png_bytes(64, 64)


def mix_body(**fields: Any) -> dict[str, Any]:
    return {
        "key": KEY,
        "prompt": "Bed",
        "image": base64.b64encode(LAYOUT).decode(),
        "width": 256,
        "height": 256,
        "steps": 2,
        "seed": 7,
        **fields,
    }


def queued_job(parts: ModalParts, **overrides: Any) -> int:
    """A queued job small enough to mix in well under a second on the tiny model."""
    values = {"width": 256, "height": 256, "steps": 2, **overrides}
    return parts.lifecycle.create(KEY_ID, params(**values), LAYOUT).id


def status_of(parts: ModalParts, job_id: int) -> JobStatus:
    job = parts.stores.jobs.get(job_id)
    assert job is not None
    return job.status


def test_magic_mix_runs_on_the_gpu_side_inline_standin_for_spawn(
    client: TestClient, modal_like: ModalLike
) -> None:
    reply = client.post(MIX, json=mix_body(track_id="t-1")).json()
    assert reply["status"] == "success", reply
    assert [parse_job_input(i)[0] for i in modal_like.calls.spawned] == [reply["id"]]
    url = reply["output"][0]
    assert url.startswith("https://ws--magicmix-web.modal.run/outputs/")
    png = client.get(url.removeprefix("https://ws--magicmix-web.modal.run"))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    fetched = client.post(f"{EDITING}/fetch/{reply['id']}", json={"key": KEY})
    assert fetched.json()["output"] == reply["output"]
    jobs = modal_like.web.stores.jobs
    assert jobs.image(reply["id"]) is None  # the layout is gone with the job
    assert jobs.get(reply["id"]).call_id == "fc-1"  # type: ignore[union-attr]
    assert jobs.queue_length() == 0 and modal_like.webhook_spawns == []
    details = client.post(f"{EDITING}/system_details", json={"key": KEY}).json()
    assert details["device"] == "cuda (L40S on Modal)" and details["dtype"] == "float16"


def test_a_failed_spawn_fails_the_job_and_starts_the_webhook_function_inline_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    modal_like.calls.fail_spawn = True
    reply = client.post(MIX, json=mix_body(webhook="http://127.0.0.1:9/hook")).json()
    assert reply["status"] == "failed" and "could not be started" in reply["message"]
    assert modal_like.webhook_spawns == [None]
    job = modal_like.web.stores.jobs.get(reply["id"])
    assert job is not None and job.webhook_due


def test_a_gpu_call_that_failed_for_good_leaves_the_job_to_the_sweep_inline_standin(
    client: TestClient, modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    """A waiter is never told "GPU worker stopped" for a call Modal gave up on: the claim
    lapses and the sweep requeues and re-spawns it (issue 24, finding 1's second half)."""

    def crash(job_inputs: list[str]) -> list[str]:
        job_id, token = parse_job_input(job_inputs[0])
        modal_like.gpu.lifecycle.claim({job_id: token})
        raise RuntimeError("container killed mid-batch")  # its claim is left to lapse

    modal_like.calls.worker = crash
    modal_like.web.settings.sync_wait_s = 2
    reply = client.post(MIX, json=mix_body()).json()
    assert reply["status"] == "processing", reply
    job = modal_like.web.stores.jobs.get(reply["id"])
    assert job is not None and job.status is JobStatus.PROCESSING
    later = Lifecycle(
        modal_like.web.stores.jobs,
        modal_like.web.lifecycle.limits,
        clock=lambda: time.time() + 3600,  # the lease has lapsed by then
    )
    assert [j.id for j in later.release_lapsed()[0]] == [reply["id"]]
    modal_like.calls.worker = GpuWorker(modal_like.gpu, engine).run
    respawned = asyncio.run(modal_like.dispatcher().respawn_lost(older_than_s=0))
    assert respawned == [reply["id"]]
    modal_like.calls.join()
    assert status_of(modal_like.web, reply["id"]) is JobStatus.SUCCESS


def test_a_batch_skips_cancelled_jobs_and_webhooks_leave_once(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    parts = modal_like.gpu
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200))
        cancelled = queued_job(parts, webhook=receiver.url("/hook"))
        assert parts.lifecycle.cancel(cancelled) is not None
        hooked = queued_job(parts, webhook=receiver.url("/hook"), track_id=5)
        spawns_before = len(modal_like.webhook_spawns)
        statuses = GpuWorker(parts, engine).run([f"{cancelled}:a", f"{hooked}:b"])
        assert statuses == ["cancelled", "success"]
        assert len(modal_like.webhook_spawns) == spawns_before + 1  # one spawn per batch
        assert asyncio.run(compose.deliver_webhooks(parts)) == 2
        assert asyncio.run(compose.deliver_webhooks(parts)) == 0  # sends nothing more
    assert len(receiver.requests) == 2
    by_id = {}
    for request in receiver.requests:
        secret = parts.stores.keys.webhook_secret(KEY_ID)
        payload = Webhook(secret).verify(request.body, request.headers)
        by_id[payload["id"]] = (payload, request.headers["webhook-id"])
    assert by_id[hooked][0]["status"] == "success" and by_id[hooked][0]["track_id"] == 5
    assert by_id[cancelled][0]["status"] == "failed"
    assert by_id[hooked][1] == f"magicmix-job-{hooked}"


def test_a_retried_input_reclaims_its_job_but_a_second_input_does_not(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    parts = modal_like.gpu
    job_id = queued_job(parts)
    assert parts.lifecycle.claim({job_id: "token-1"})  # first attempt, then it died
    worker = GpuWorker(parts, engine)
    assert worker.run([f"{job_id}:token-2"]) == ["processing"]  # a duplicate spawn skips
    assert worker.run([f"{job_id}:token-1"]) == ["success"]  # Modal's retry runs it


class Cut(BaseException):
    """Like modal's InputCancellation: a BaseException raised into the batch."""


class CutEngine:
    def mix(self, requests: Any, *, progress: bool = False) -> Any:
        raise Cut


def test_a_batch_cut_short_requeues_its_jobs_until_their_last_attempt(
    modal_like: ModalLike,
) -> None:
    """Issue 24, finding 2: on its last attempt the job fails at once, with its webhook."""
    parts = modal_like.gpu
    job_id = queued_job(parts, webhook="http://127.0.0.1:9/hook")
    attempts = parts.lifecycle.leases.max_attempts
    for attempt in range(1, attempts + 1):
        with pytest.raises(Cut):
            GpuWorker(parts, CutEngine()).run([f"{job_id}:t"])  # type: ignore[arg-type]
        expected = JobStatus.QUEUED if attempt < attempts else JobStatus.FAILED
        assert status_of(parts, job_id) is expected, attempt
    job = parts.stores.jobs.get(job_id)
    assert job is not None and f"failed {attempts} times" in (job.error or "")
    assert job.webhook_due and modal_like.webhook_spawns


def test_one_failing_group_fails_only_its_own_jobs(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    """Issue 24, finding 3: Modal's batcher mixes sizes and keys; a group that fails (out
    of memory at 512 px, say) fails its jobs only, and each group reports its own time."""

    class FailsAt512:
        def mix(self, requests: Any, *, progress: bool = False) -> Any:
            if requests[0].width == 512:
                raise RuntimeError("CUDA out of memory")
            return engine.mix(requests, progress=progress)

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

    parts = modal_like.gpu
    small = [queued_job(parts, seed=i) for i in range(2)]
    large = queued_job(parts, width=512, height=512)
    inputs = [f"{job_id}:t{job_id}" for job_id in (small[0], large, small[1])]
    assert GpuWorker(parts, FailsAt512()).run(inputs) == ["success", "failed", "success"]  # type: ignore[arg-type]
    times = {parts.stores.jobs.get(i).result.generation_time for i in small}  # type: ignore[union-attr]
    assert len(times) == 1  # one UNet batch for both, timed once


def test_clear_queue_never_cancels_a_gpu_call_inline_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    """Issue 24, finding 1: cancelling one input of a `@modal.batched` call terminates the
    whole batch (other keys' jobs in it too); clear_queue only cancels the jobs, and the
    inputs find them cancelled when they try to claim them."""
    gate = threading.Event()
    real = modal_like.calls.worker
    assert real is not None

    def held(job_inputs: list[str]) -> list[str]:
        gate.wait(60)
        return real(job_inputs)

    modal_like.calls.worker = held
    modal_like.web.settings.sync_wait_s = 0  # answer `processing` at once
    replies = [client.post(MIX, json=mix_body(seed=i)).json() for i in range(2)]
    ids = [r["id"] for r in replies if r["status"] == "processing"]
    assert len(ids) == 2, replies
    cleared = client.post(f"{EDITING}/clear_queue", json={"key": KEY}).json()
    assert cleared["message"] == "cancelled 2 queued jobs"
    assert not hasattr(modal_like.calls, "cancel")  # the dispatcher has nothing to cancel with
    gate.set()
    modal_like.calls.join()
    assert [status_of(modal_like.web, i) for i in ids] == [JobStatus.CANCELLED] * 2


def test_the_sweep_expires_releases_and_respawns(modal_like: ModalLike) -> None:
    """Issue 24, findings 4 and 5: a lapsed claim is requeued (or failed on its last
    attempt), and a queued job whose call is gone or over is spawned again."""
    parts = modal_like.gpu
    earlier = Lifecycle(parts.stores.jobs, parts.lifecycle.limits, clock=lambda: time.time() - 1000)
    done, never_spawned, call_over, call_alive, dead = (
        earlier.create(KEY_ID, params(steps=2), LAYOUT).id for _ in range(5)
    )
    [claimed] = earlier.claim({done: "t"})
    result = JobResult(output=["u"], generation_time=1, stored_in="service", object_names=["x"])
    earlier.finish(claimed, result)
    earlier.claim({dead: "t"})  # its worker died 1000 s ago: the lease lapsed long since
    calls = modal_like.calls
    calls.worker = lambda inputs: ["queued"]  # call_over's call returned (having run nothing)
    parts.stores.jobs.set_call(call_over, asyncio.run(calls.spawn(f"{call_over}:old")))
    calls.join()
    gate = threading.Event()
    calls.worker = lambda inputs: ["queued"] if gate.wait(60) else []  # still running
    parts.stores.jobs.set_call(call_alive, asyncio.run(calls.spawn(f"{call_alive}:old")))
    parts.settings.retention_hours = 0.1  # 360 s: the success 1000 s ago expires
    report = asyncio.run(compose.run_sweep(parts, modal_like.dispatcher()))
    gate.set()
    assert report.ran and report.errors == {}
    assert status_of(parts, done) is JobStatus.EXPIRED
    assert report.requeued == [dead]
    respawned = sorted(report.extra["respawn"])  # type: ignore[arg-type]
    assert respawned == [never_spawned, call_over, dead]  # not call_alive: its call runs


def test_waiting_on_a_finished_call_never_spins(modal_like: ModalLike) -> None:
    """Issue 24, finding 6: a call over while its job is still active (retried, or another
    input runs it) is waited on by polling the store, not by asking Modal again and again."""
    parts = modal_like.web
    job_id = queued_job(parts)
    modal_like.calls.worker = lambda inputs: ["queued"]  # returns at once, runs nothing
    call = asyncio.run(modal_like.calls.spawn(f"{job_id}:x"))
    parts.stores.jobs.set_call(job_id, call)
    modal_like.calls.join()
    dispatcher = modal_like.dispatcher()

    async def wait_two_seconds() -> int:
        deadline = time.monotonic() + 2.0
        rounds = 0
        while (left := deadline - time.monotonic()) > 0:
            await dispatcher.wait(job_id, left)
            rounds += 1
        return rounds

    rounds = asyncio.run(wait_two_seconds())
    assert rounds <= 4 and modal_like.calls.waits <= 4, (rounds, modal_like.calls.waits)


# -- composition, weights ---------------------------------------------------------------


def test_modal_settings_default_public_url_to_the_web_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://ws--magicmix-web.modal.run"
    assert compose.modal_settings(url + "/").public_url == url
    monkeypatch.setenv("MAGICMIX_PUBLIC_URL", "https://mix.example.com")
    assert compose.modal_settings(url).public_url == "https://mix.example.com"


@pytest.mark.parametrize(
    ("overrides", "needs"),
    [
        ({"store_url": "s3://b/o/", "database_url": "postgresql://h/d"}, "MAGICMIX_SECRET_KEY"),
        ({"store_url": "s3://b/o/", "secret_key": "s"}, "MAGICMIX_DATABASE_URL"),
        (
            {"secret_key": "s", "database_url": "postgresql://h/d", "store_url": "file:///x"},
            "MAGICMIX_STORE_URL",
        ),
        (
            {"secret_key": "s", "database_url": "sqlite:///x.db", "store_url": "s3://b/o/"},
            "PostgreSQL URL",
        ),
    ],
)
def test_modal_parts_refuse_what_cannot_work_on_modal(
    tmp_path: Path, overrides: dict[str, Any], needs: str
) -> None:
    with pytest.raises(RuntimeError, match=needs):
        compose.modal_parts(
            Settings(data_dir=tmp_path, **overrides), lambda: None, pool=POOLS["web"]
        )


def test_download_asks_the_hub_for_the_family_fp16_files_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        weights, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or "/cache/hf/x"
    )
    weights.download_weights(Settings(model="org/model", model_revision="abc123"))
    weights.download_weights(Settings(model="org/model", model_family="sdxl"))
    (sd1_repo, sd1), (_, sdxl) = calls
    assert sd1_repo == "org/model" and sd1["revision"] == "abc123"
    assert sd1["allow_patterns"] == list(SD1.hub_files) and sdxl["allow_patterns"] == list(
        SDXL.hub_files
    )
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in sd1["allow_patterns"]
    assert not any("_2/" in p or "safety" in p for p in sd1["allow_patterns"])
    assert {"text_encoder_2/model.fp16.safetensors", "tokenizer_2/*"} <= set(sdxl["allow_patterns"])


def test_weights_load_without_touching_cuda(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory snapshots are taken without a GPU: a CUDA query there would poison torch."""

    def no_cuda() -> bool:
        raise AssertionError("CUDA queried while loading for the snapshot")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    components = load_for_snapshot(Settings(model=str(tiny_model_dir)))
    for module in components.modules():
        assert module.device.type == "cpu" and module.dtype == torch.float16


def test_the_gpu_class_loads_the_shipped_toy_model_by_name() -> None:
    """`MAGICMIX_MODEL=toy` (make rehearse's default): the name is resolved as the local
    worker resolves it, not looked up on the hub (offline, it crash-looped every container)."""
    components = load_for_snapshot(Settings(model="toy", dtype="float32"))
    assert components.family.name == "sd1" and components.denoiser.device.type == "cpu"


# -- keys on Modal, and the request deadline ---------------------------------------------


def test_keys_are_issued_listed_and_revoked_on_the_deployed_store(
    client: TestClient, modal_like: ModalLike
) -> None:
    created = compose.manage_keys(modal_like.web, key_action, "create")
    user_key, id_line, secret_line = created.splitlines()
    key_id = id_line.split()[2]
    assert user_key.startswith("mm_") and "(user)" in id_line and "whsec_" in secret_line
    assert key_id in compose.manage_keys(modal_like.web, key_action, "list")
    reply = client.post(MIX, json=mix_body(key=user_key)).json()
    assert reply["status"] == "success", reply
    admin_only = client.post(f"{EDITING}/clear_queue", json={"key": user_key})
    assert admin_only.status_code == 403  # a user key never reaches the admin routes
    assert (
        compose.manage_keys(modal_like.web, key_action, "revoke", key_id=key_id)
        == f"revoked {key_id}"
    )
    assert client.post(MIX, json=mix_body(key=user_key)).status_code == 401
    listed = compose.manage_keys(modal_like.web, key_action, "list")
    assert f"{key_id}  user " in listed and "revoked" in listed and user_key not in listed
    with pytest.raises(RuntimeError, match="no active key") as refused:
        compose.manage_keys(modal_like.web, key_action, "revoke", key_id="key-unknown")
    assert type(refused.value) is RuntimeError  # a laptop with only modal can unpickle it


def test_the_answer_leaves_before_the_deadline_with_a_slow_fetch_and_slow_store_inline_standin(
    tmp_path: Path,
    s3_server: str,
    bucket: str,
    dummy_aws_env: dict[str, str],
    postgres: TempPostgres,
) -> None:
    """Fetch + store calls + sync wait never cross the request's deadline (Modal's 150 s)."""
    settings = modal_settings(tmp_path, bucket, s3_server, postgres.fresh_url())
    settings.request_deadline_s, settings.sync_wait_s = 12.0, 120.0
    parts = parts_for(settings, [])
    add_latency(parts.stores.database.engine, 0.05)  # a database across a slow network
    never = threading.Event()
    calls = InlineGpuCalls(worker=lambda inputs: never.wait(300) and [])  # the GPU never answers

    def slow_image(request: Any) -> None:
        time.sleep(2.0)
        respond(200, LAYOUT, {"Content-Type": "image/png"})(request)

    with (
        LoopbackServer() as host,
        TestClient(create_app(compose.web_service(parts, calls, gpu_name="L40S"))) as http,
    ):
        host.route("/slow.png", slow_image)
        started = time.monotonic()
        reply = http.post(MIX, json=mix_body(image=host.url("/slow.png")))
        elapsed = time.monotonic() - started
        never.set()
    assert reply.status_code == 200 and reply.json()["status"] == "processing", reply.text
    assert elapsed < 30, elapsed  # the deadline (12 s) cut the 120 s sync wait short
