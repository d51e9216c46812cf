"""The Modal backend, run here without Modal: Dicts and spawn are in-memory stand-ins.

Everything below the Modal API is real: the service, the FastAPI app, the runner with
the tiny model, the loopback S3 server (service store and layout images) and a webhook
receiver. What only Modal can do (its Dict server, spawning the GPU class, the GPU) is
replaced by `tests/modal_standins.py` and `InlineGpuCalls`, named so in every test.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import pickle  # nosec B403 - our own values
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modal
import pytest
import torch
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from magicmix.backends.modal import compose, weights
from magicmix.backends.modal.compose import ModalParts
from magicmix.backends.modal.dispatch import ModalDispatcher, parse_job_input
from magicmix.backends.modal.gpu import GpuWorker
from magicmix.config import Settings
from magicmix.engine import MagicMixEngine
from magicmix.engine.configure import load_for_snapshot
from magicmix.families import SD1, SDXL
from magicmix.http.app import create_app
from magicmix.http.links import EDITING
from magicmix.jobs import JobResult, JobStatus
from magicmix.keys import static_principals
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.store import LocalStore
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, respond
from tests.modal_standins import InMemoryDict, standin_dicts
from tests.test_jobs import params

SECRET = b"test-secret-key-0123456789"
KEY = "mm_static_test_key"
KEY_ID = next(iter(static_principals([KEY], SECRET).values())).key_id
MIX = f"{EDITING}/magic_mix"


def test_standin_has_modal_dict_signatures() -> None:
    for name in ("get", "put", "pop", "items"):
        theirs = list(inspect.signature(getattr(modal.Dict, name)).parameters.values())[1:]
        ours = list(inspect.signature(getattr(InMemoryDict, name)).parameters.values())[1:]
        assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], name


@dataclass
class InlineGpuCalls:
    """Stand-in for spawning the GPU class: each call runs `GpuWorker.run` in a thread."""

    worker: Callable[[list[str]], list[str]] | None = None
    spawned: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    calls: dict[str, asyncio.Future[list[str]]] = field(default_factory=dict)
    fail_spawn: bool = False

    async def spawn(self, job_input: str) -> str:
        if self.fail_spawn:
            raise ConnectionError("modal is unreachable")
        assert self.worker is not None
        self.spawned.append(job_input)
        call_id = f"fc-{len(self.spawned)}"
        self.calls[call_id] = asyncio.ensure_future(asyncio.to_thread(self.worker, [job_input]))
        return call_id

    async def wait(self, call_id: str, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.calls[call_id]), timeout)
        except TimeoutError:
            return

    async def cancel(self, call_id: str) -> None:
        self.cancelled.append(call_id)


@dataclass
class ModalLike:
    """Web-side and GPU-side parts sharing one (stand-in) state, as on Modal."""

    web: ModalParts
    gpu: ModalParts
    calls: InlineGpuCalls
    webhook_spawns: list[list[int]]
    dicts: dict[str, InMemoryDict]

    def dispatcher(self) -> ModalDispatcher:
        return compose.dispatcher(self.web, self.calls, gpu_name="L40S")


def modal_settings(tmp_path: Path, bucket: str, s3_server: str) -> Settings:
    return Settings(
        model="tiny",
        data_dir=tmp_path,
        api_keys=KEY,
        secret_key=SECRET.decode(),
        store_url=f"s3://{bucket}/outputs/",
        s3_endpoint_url=s3_server,
        public_url="https://ws--magicmix-web.modal.run",
        allow_private_urls=True,
        sync_wait_s=20,
        webhook_schedule=(0.0, 0.05),
    )


@pytest.fixture
def modal_like(
    tmp_path: Path,
    engine: MagicMixEngine,
    s3_server: str,
    bucket: str,
    dummy_aws_env: dict[str, str],
) -> ModalLike:
    settings = modal_settings(tmp_path, bucket, s3_server)
    dicts = standin_dicts()
    spawns: list[list[int]] = []
    web = compose.modal_parts(settings, dicts, spawns.append)
    gpu_parts = compose.modal_parts(settings, dicts, spawns.append)
    calls = InlineGpuCalls(worker=GpuWorker(gpu_parts, engine).run)
    return ModalLike(web, gpu_parts, calls, spawns, dicts)


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
    assert modal_like.web.jobs.image(reply["id"]) is None  # the layout is gone with the job
    assert modal_like.web.jobs.queue_length() == 0 and modal_like.webhook_spawns == []
    details = client.post(f"{EDITING}/system_details", json={"key": KEY}).json()
    assert details["device"] == "cuda (L40S on Modal)" and details["dtype"] == "float16"


def test_layout_images_never_enter_a_dict_inmemory_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    """Dict values have a size limit: images go to the bucket, the Dict holds references."""
    seen: list[Any] = []
    for standin in modal_like.dicts.values():
        put = standin.put

        def recording(key: Any, value: Any, *, skip_if_exists: bool = False, put=put) -> bool:
            seen.append(value)
            return put(key, value, skip_if_exists=skip_if_exists)

        standin.put = recording  # type: ignore[method-assign]
    assert client.post(MIX, json=mix_body()).json()["status"] == "success"
    assert seen and all(LAYOUT not in pickled(value) for value in seen)
    assert max(len(pickled(value)) for value in seen) < 8192


def pickled(value: Any) -> bytes:
    return pickle.dumps(value)


def test_a_failed_spawn_fails_the_job_and_owes_its_webhook_inline_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    modal_like.calls.fail_spawn = True
    reply = client.post(MIX, json=mix_body(webhook="http://127.0.0.1:9/hook")).json()
    assert reply["status"] == "failed" and "could not be started" in reply["message"]
    assert modal_like.webhook_spawns == [[reply["id"]]]
    job = modal_like.web.jobs.get(reply["id"])
    assert job is not None and job.webhook_due


def test_a_crashed_gpu_run_fails_the_job_inline_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    def crash(job_inputs: list[str]) -> list[str]:
        raise RuntimeError("container killed")

    modal_like.calls.worker = crash
    reply = client.post(MIX, json=mix_body()).json()
    assert reply["status"] == "failed" and "GPU worker stopped" in reply["message"]


def queued_job(parts: ModalParts, **overrides: Any) -> int:
    """A queued job small enough to mix in well under a second on the tiny model."""
    return parts.lifecycle.create(
        KEY_ID, params(width=256, height=256, steps=2, **overrides), LAYOUT
    ).id


def test_a_batch_skips_cancelled_jobs_and_webhooks_leave_once_inmemory_standin(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    parts = modal_like.gpu
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200))
        cancelled = queued_job(parts, webhook=receiver.url("/hook"))
        assert parts.lifecycle.cancel(cancelled) is not None
        hooked = queued_job(parts, webhook=receiver.url("/hook"), track_id=5)
        worker = GpuWorker(parts, engine)
        statuses = worker.run([f"{cancelled}:a", f"{hooked}:b"])
        assert statuses == ["cancelled", "success"]
        assert sorted(i for ids in modal_like.webhook_spawns for i in ids) == [cancelled, hooked]
        asyncio.run(compose.deliver_webhooks(parts, [cancelled, hooked]))
        asyncio.run(compose.deliver_webhooks(parts, [cancelled, hooked]))  # sends nothing
    assert len(receiver.requests) == 2
    by_id = {}
    for request in receiver.requests:
        payload = Webhook(parts.keys.webhook_secret(KEY_ID)).verify(request.body, request.headers)
        by_id[payload["id"]] = (payload, request.headers["webhook-id"])
    assert by_id[hooked][0]["status"] == "success" and by_id[hooked][0]["track_id"] == 5
    assert by_id[cancelled][0]["status"] == "failed"
    assert by_id[hooked][1] == f"magicmix-job-{hooked}"
    for job_id in (cancelled, hooked):
        job = parts.jobs.get(job_id)
        assert job is not None and job.webhook is not None and job.webhook.phase == "delivered"


def test_a_retried_input_reclaims_its_job_but_a_second_input_does_not(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    parts = modal_like.gpu
    job_id = queued_job(parts)
    assert parts.lifecycle.claim(job_id, "token-1") is not None  # first attempt, then it died
    worker = GpuWorker(parts, engine)
    assert worker.run([f"{job_id}:token-2"]) == ["processing"]  # a duplicate spawn skips
    assert worker.run([f"{job_id}:token-1"]) == ["success"]  # Modal's retry runs it


def test_a_cancelled_batch_requeues_what_it_claimed(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    class Cancelled(BaseException):
        """Like modal's InputCancellation, a BaseException raised into the batch."""

    class Engine:
        def mix(self, requests: Any, *, progress: bool = False) -> Any:
            raise Cancelled

    parts = modal_like.gpu
    job_id = queued_job(parts)
    with pytest.raises(Cancelled):
        GpuWorker(parts, Engine()).run([f"{job_id}:t"])  # type: ignore[arg-type]
    job = parts.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED


def test_clear_queue_cancels_the_jobs_and_their_spawned_calls_inline_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    gate = threading.Event()
    real = modal_like.calls.worker
    assert real is not None

    def held(job_inputs: list[str]) -> list[str]:
        gate.wait(60)
        return real(job_inputs)

    modal_like.calls.worker = held
    modal_like.web.settings.sync_wait_s = 0  # answer `processing` at once
    replies = [client.post(MIX, json=mix_body(seed=i)) for i in range(2)]
    ids = [r.json()["id"] for r in replies if r.json()["status"] == "processing"]
    assert len(ids) == 2, [r.json() for r in replies]
    cleared = client.post(f"{EDITING}/clear_queue", json={"key": KEY}).json()
    assert cleared["message"] == "cancelled 2 queued jobs"
    assert modal_like.calls.cancelled == ["fc-1", "fc-2"]
    gate.set()  # the stand-in's "calls" run anyway: their claims are refused
    for call in list(modal_like.calls.calls.values()):
        client.portal.call(lambda call=call: asyncio.wait_for(asyncio.shield(call), 30))  # type: ignore[union-attr]
    for job_id in ids:
        job = modal_like.web.jobs.get(job_id)
        assert job is not None and job.status is JobStatus.CANCELLED


def test_the_sweep_expires_fails_and_respawns_inmemory_standin(modal_like: ModalLike) -> None:
    parts = modal_like.gpu
    earlier = Lifecycle(parts.jobs, parts.lifecycle.limits, clock=lambda: time.time() - 1000)
    done, lost_spawn, stuck = (earlier.create(KEY_ID, params(steps=2), LAYOUT).id for _ in range(3))
    claimed = earlier.claim(done, "t")
    assert claimed is not None and earlier.claim(stuck, "t") is not None
    result = JobResult(output=["u"], generation_time=1, stored_in="service", object_names=["x"])
    earlier.finish(claimed, result)
    parts.settings.retention_hours = 0.1  # 360 s: the success 1000 s ago expires
    parts.settings.stale_processing_s = 500  # the claim 1000 s ago is stuck
    modal_like.calls.worker = lambda inputs: ["queued"]  # the respawned call runs nothing
    asyncio.run(compose.run_sweep(parts, modal_like.dispatcher()))
    status = {i: job.status for i in (done, lost_spawn, stuck) if (job := parts.jobs.get(i))}
    assert status == {
        done: JobStatus.EXPIRED,
        lost_spawn: JobStatus.QUEUED,
        stuck: JobStatus.FAILED,
    }
    assert [parse_job_input(i)[0] for i in modal_like.calls.spawned] == [lost_spawn]


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
        ({"store_url": "s3://b/outputs/"}, "MAGICMIX_SECRET_KEY"),
        ({"secret_key": "s", "store_url": "file:///tmp/x"}, "MAGICMIX_STORE_URL"),
    ],
)
def test_modal_parts_refuse_what_cannot_work_on_modal(
    tmp_path: Path, overrides: dict[str, Any], needs: str
) -> None:
    with pytest.raises(RuntimeError, match=needs):
        compose.modal_parts(
            Settings(data_dir=tmp_path, **overrides),
            standin_dicts(),
            lambda ids: None,
            layouts=LocalStore(tmp_path / "layouts"),
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


# -- keys on Modal, and the request deadline ---------------------------------------------


def test_keys_are_issued_listed_and_revoked_on_the_deployed_store_inmemory_standin(
    client: TestClient, modal_like: ModalLike
) -> None:
    created = compose.manage_keys(modal_like.web, "create")
    user_key, id_line, secret_line = created.splitlines()
    key_id = id_line.split()[2]
    assert user_key.startswith("mm_") and "(user)" in id_line and "whsec_" in secret_line
    assert key_id in compose.manage_keys(modal_like.web, "list")
    reply = client.post(MIX, json=mix_body(key=user_key)).json()
    assert reply["status"] == "success", reply
    admin_only = client.post(f"{EDITING}/clear_queue", json={"key": user_key})
    assert admin_only.status_code == 403  # a user key never reaches the admin routes
    assert compose.manage_keys(modal_like.web, "revoke", key_id=key_id) == f"revoked {key_id}"
    assert client.post(MIX, json=mix_body(key=user_key)).status_code == 401
    listed = compose.manage_keys(modal_like.web, "list")
    assert f"{key_id}  user " in listed and "revoked" in listed and user_key not in listed


class SlowDict:
    """A Dict stand-in whose every call takes 50 ms: a slow Modal API."""

    def __init__(self, inner: InMemoryDict) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.05)
            return method(*args, **kwargs)

        return slow


def test_the_answer_leaves_before_the_deadline_with_a_slow_fetch_and_slow_store_inline_standin(
    tmp_path: Path, s3_server: str, bucket: str, dummy_aws_env: dict[str, str]
) -> None:
    """Fetch + store calls + sync wait never cross the request's deadline (Modal's 150 s)."""
    settings = modal_settings(tmp_path, bucket, s3_server)
    settings.request_deadline_s, settings.sync_wait_s = 12.0, 120.0
    dicts = {name: SlowDict(d) for name, d in standin_dicts().items()}
    parts = compose.modal_parts(settings, dicts, lambda ids: None)
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
