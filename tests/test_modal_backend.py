"""The Modal backend, run here without Modal: Dicts and spawn are in-memory stand-ins.

Everything below the Modal API is real: the service, the FastAPI app, the runner with
the tiny model, the loopback S3 server and webhook receiver. What only Modal can do
(its Dict server, spawning the GPU class, the GPU itself) is replaced by the stand-ins in
`tests/modal_standins.py` and `InlineLauncher`, named so in every test that uses them.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modal
import pytest
import torch
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from magicmix import modal_backend
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.db import Database
from magicmix.engine import MagicMixEngine
from magicmix.errors import Unauthorized
from magicmix.jobs import JobResult, JobStatus
from magicmix.keys import KeyStore, SqliteKeyStore, static_principals
from magicmix.loading import HUB_ALLOW_PATTERNS
from magicmix.modal_backend import GpuCall, build_modal_service, deliver_webhooks, run_batch
from magicmix.modal_state import DictKeyStore, ModalState
from magicmix.server import create_app
from magicmix.service import API_BASE, MagicMixService
from tests.conftest import make_layout_image
from tests.http_fixtures import LoopbackServer, respond
from tests.modal_standins import InMemoryDict, standin_job_store, standin_state
from tests.test_jobs import params

SECRET = b"test-secret-key-0123456789"
KEY = "mm_static_test_key"
KEY_ID = next(iter(static_principals([KEY], SECRET).values())).key_id
MIX = f"{API_BASE}/image_editing/magic_mix"


def test_standin_has_modal_dict_signatures() -> None:
    for name in ("get", "put", "pop", "items", "len"):
        theirs = list(inspect.signature(getattr(modal.Dict, name)).parameters.values())[1:]
        ours = list(inspect.signature(getattr(InMemoryDict, name)).parameters.values())[1:]
        assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], name


# -- KeyStore: the same interface tests for the local and the Modal store ----------------

KEY_STORES: dict[str, Callable[[Path], KeyStore]] = {
    "sqlite": lambda tmp: SqliteKeyStore(
        Database(tmp / "keys.sqlite3"), SecretBox(SECRET), SECRET, [KEY]
    ),
    "modal-dict-inmemory-standin": lambda tmp: DictKeyStore(InMemoryDict(), SECRET, [KEY]),
}


@pytest.fixture(params=sorted(KEY_STORES))
def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStore:
    return KEY_STORES[request.param](tmp_path)


def test_static_key_authenticates_as_admin(key_store: KeyStore) -> None:
    principal = key_store.authenticate(KEY)
    assert principal.admin and principal in static_principals([KEY], SECRET).values()
    assert key_store.webhook_secret(principal.key_id) == principal.webhook_secret
    with pytest.raises(Unauthorized):
        key_store.authenticate(KEY + "x")
    with pytest.raises(Unauthorized):
        key_store.webhook_secret("key-unknown")


def test_s3_details_are_kept_per_key(key_store: KeyStore) -> None:
    key_id = key_store.authenticate(KEY).key_id
    assert key_store.get_s3(key_id) is None and key_store.delete_s3(key_id) is False
    key_store.set_s3(key_id, "encrypted-blob")
    assert key_store.get_s3(key_id) == "encrypted-blob"
    assert key_store.delete_s3(key_id) is True and key_store.get_s3(key_id) is None


# -- DictJobStore beyond the shared JobStore tests ----------------------------------------


def test_ids_stay_unique_with_a_lagging_hint_and_racing_creators_inmemory_standin() -> None:
    store = standin_job_store()
    first = [store.create("k", params(), b"x", max_queue=999, max_per_key=999).id for _ in "abc"]
    store._jobs.put("next_id", 1)  # as if a slower container wrote an old hint last
    assert store.create("k", params(), b"x", max_queue=999, max_per_key=999).id == first[-1] + 1
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda _: store.create("k", params(), b"x", max_queue=999, max_per_key=999).id,
                range(40),
            )
        )
    assert len(set(ids)) == 40 and min(ids) > first[-1] + 1


def test_fail_stale_fails_only_old_active_jobs_inmemory_standin() -> None:
    store = standin_job_store()
    old, done = store.create("k", params(), b"x", max_queue=9, max_per_key=9), None
    done = store.create("k", params(), b"x", max_queue=9, max_per_key=9)
    store.fail(done.id, "boom")
    assert store.fail_stale(old.created_at) == []
    assert store.fail_stale(time.time() + 1) == [old.id]
    lost = store.get(old.id)
    assert lost is not None and lost.status is JobStatus.FAILED and store.queue_length() == 0


# -- the service on Modal's seams, with stand-ins for Modal -------------------------------


@dataclass
class InlineCall:
    """Stand-in for a `modal.FunctionCall`: the GPU run as a local task."""

    task: asyncio.Future[list[str]]

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            return


@dataclass
class InlineLauncher:
    """Stand-in for spawning the GPU class: runs `run_batch` in a thread, on the CPU."""

    gpu: Callable[[list[int]], list[str]] | None = None
    spawned: list[int] = field(default_factory=list)

    async def spawn(self, job_id: int) -> GpuCall:
        assert self.gpu is not None
        self.spawned.append(job_id)
        return InlineCall(asyncio.ensure_future(asyncio.to_thread(self.gpu, [job_id])))


@dataclass
class ModalLike:
    """A web-side and a GPU-side service sharing one (stand-in) state, as on Modal."""

    web: MagicMixService
    gpu: MagicMixService
    launcher: InlineLauncher
    webhooks: list[list[int]]


@pytest.fixture
def modal_like(
    tmp_path: Path,
    engine: MagicMixEngine,
    s3_server: str,
    bucket: str,
    dummy_aws_env: dict[str, str],
) -> ModalLike:
    settings = Settings(
        model="tiny",
        data_dir=tmp_path,
        api_keys=KEY,
        secret_key=SECRET.decode(),
        store_url=f"s3://{bucket}/outputs/",
        s3_endpoint_url=s3_server,
        public_url="https://ws--magicmix-web.modal.run",
        allow_private_urls=True,
        sync_wait_s=20,
        webhook_backoff_s=0.01,
    )
    state = standin_state()
    launcher = InlineLauncher()
    web = build_modal_service(settings, state, launcher, gpu="L40S")
    gpu = build_modal_service(settings, state, InlineLauncher(), gpu="L40S")
    webhooks: list[list[int]] = []
    launcher.gpu = lambda ids: run_batch(gpu, engine, ids, webhooks.append)
    return ModalLike(web, gpu, launcher, webhooks)


@pytest.fixture
def client(modal_like: ModalLike) -> Iterator[TestClient]:
    with TestClient(create_app(modal_like.web)) as http:
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
    assert modal_like.launcher.spawned == [reply["id"]]
    url = reply["output"][0]
    assert url.startswith("https://ws--magicmix-web.modal.run/outputs/")
    png = client.get(url.removeprefix("https://ws--magicmix-web.modal.run"))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    fetched = client.post(f"{API_BASE}/image_editing/fetch/{reply['id']}", json={"key": KEY})
    assert fetched.json()["output"] == reply["output"]
    assert modal_like.web.jobs.image(reply["id"]) is None  # the layout left the Dict
    assert modal_like.web.jobs.queue_length() == 0 and modal_like.webhooks == []
    details = client.post(f"{API_BASE}/image_editing/system_details", json={"key": KEY}).json()
    assert details["device"] == "cuda (L40S on Modal)" and details["dtype"] == "float16"


def test_a_failed_spawn_fails_the_job_inline_standin_for_spawn(
    client: TestClient, modal_like: ModalLike
) -> None:
    async def refuse(job_id: int) -> GpuCall:
        raise ConnectionError("modal is unreachable")

    modal_like.launcher.spawn = refuse  # type: ignore[method-assign]
    reply = client.post(MIX, json=mix_body()).json()
    assert reply["status"] == "failed" and "could not be started" in reply["message"]


def test_a_crashed_gpu_run_fails_the_job_inline_standin_for_spawn(
    client: TestClient, modal_like: ModalLike
) -> None:
    def crash(job_ids: list[int]) -> list[str]:
        raise RuntimeError("container killed")

    modal_like.launcher.gpu = crash
    reply = client.post(MIX, json=mix_body()).json()
    assert reply["status"] == "failed" and "GPU worker stopped" in reply["message"]


def small_job(service: MagicMixService, **overrides: Any) -> int:
    """A queued job small enough to mix in well under a second on the tiny model."""
    job = service.jobs.create(
        KEY_ID,
        params(width=64, height=64, steps=2, **overrides),
        LAYOUT,
        max_queue=9,
        max_per_key=9,
    )
    return job.id


def test_run_batch_skips_cancelled_jobs_and_webhooks_leave_once_inmemory_standin(
    modal_like: ModalLike, engine: MagicMixEngine
) -> None:
    gpu = modal_like.gpu
    with LoopbackServer() as receiver:
        receiver.route("/hook", respond(200))
        cancelled = small_job(gpu)
        gpu.jobs.cancel_queued()
        hooked = small_job(gpu, webhook=receiver.url("/hook"), track_id=5)
        statuses = run_batch(gpu, engine, [cancelled, hooked], modal_like.webhooks.append)
        assert statuses == ["cancelled", "success"] and modal_like.webhooks == [[hooked]]
        asyncio.run(deliver_webhooks(gpu, [hooked]))
        asyncio.run(deliver_webhooks(gpu, [hooked]))  # a retried call sends nothing
    (request,) = receiver.requests
    payload = Webhook(gpu.keys.webhook_secret(KEY_ID)).verify(request.body, request.headers)
    assert payload["status"] == "success" and payload["track_id"] == 5
    stored = gpu.jobs.get(hooked)
    assert stored is not None and stored.webhook_state == "delivered"


def test_cleanup_expires_outputs_and_fails_lost_jobs_inmemory_standin(
    modal_like: ModalLike,
) -> None:
    service = modal_like.gpu
    done, lost = small_job(service), small_job(service)
    service.outputs.put("done.png", b"png")
    service.jobs.finish(
        done,
        JobResult(output=["u"], generation_time=1, stored_in="service", object_names=["done.png"]),
    )
    service.settings.retention_hours = 1e-9
    modal_backend.cleanup(service, now=time.time() + modal_backend.STALE_AFTER_S + 1)
    expired, failed = service.jobs.get(done), service.jobs.get(lost)
    assert expired is not None and expired.status is JobStatus.EXPIRED
    assert failed is not None and failed.status is JobStatus.FAILED


# -- composition, weights ---------------------------------------------------------------


def test_modal_settings_default_public_url_to_the_web_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://ws--magicmix-web.modal.run"
    assert modal_backend.modal_settings(url + "/").public_url == url
    monkeypatch.setenv("MAGICMIX_PUBLIC_URL", "https://mix.example.com")
    assert modal_backend.modal_settings(url).public_url == "https://mix.example.com"


@pytest.mark.parametrize(
    ("overrides", "needs"),
    [
        ({"store_url": "s3://b/outputs/"}, "MAGICMIX_SECRET_KEY"),
        ({"secret_key": "s", "store_url": "file:///tmp/x"}, "MAGICMIX_STORE_URL"),
    ],
)
def test_build_modal_service_refuses_what_cannot_work_on_modal(
    tmp_path: Path, overrides: dict[str, Any], needs: str
) -> None:
    state = ModalState(InMemoryDict(), InMemoryDict(), InMemoryDict(), InMemoryDict())
    with pytest.raises(RuntimeError, match=needs):
        build_modal_service(
            Settings(data_dir=tmp_path, **overrides), state, InlineLauncher(), gpu="L40S"
        )


def test_download_asks_the_hub_for_the_fp16_files_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        modal_backend,
        "snapshot_download",
        lambda repo, **kw: calls.append((repo, kw)) or "/cache/hf/x",
    )
    modal_backend.download_weights(Settings(model="org/model", model_revision="abc123"))
    assert calls == [("org/model", {"revision": "abc123", "allow_patterns": HUB_ALLOW_PATTERNS})]


def test_weights_load_without_touching_cuda(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory snapshots are taken without a GPU: a CUDA query there would poison torch."""

    def no_cuda() -> bool:
        raise AssertionError("CUDA queried while loading for the snapshot")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    components = modal_backend.load_weights(Settings(model=str(tiny_model_dir)))
    for module in (components.unet, components.vae, components.text_encoder):
        assert module.device.type == "cpu" and module.dtype == torch.float16
