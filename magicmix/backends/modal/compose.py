"""The Modal composition roots: what each kind of container builds, and nothing more.

- `web_service`: the service behind the FastAPI app (web function; no torch).
- `gpu_parts`: the lifecycle and runner of the GPU class (the engine is `gpu.py`'s).
- `deliver_webhooks` and `sweep`: the bodies of the webhook and scheduled functions.

Every container builds the same `ModalParts` from the same Dicts and settings; only the
web container builds a service, and only the GPU container an engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from magicmix.backends.modal.dispatch import GpuCalls, ModalDispatcher
from magicmix.backends.modal.state import BlobStore, DictJobStore, DictKeyStore, ModalState
from magicmix.cli.keys import key_action
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.families import Family, resolve_family
from magicmix.http.links import HttpLinks
from magicmix.jobs import JobRecord, QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.logs import configure_logging
from magicmix.outputs.s3 import make_s3_client
from magicmix.outputs.store import OutputStore, S3Store, open_store
from magicmix.runner import JobRunner
from magicmix.service import EngineInfo, MagicMixService, SweepReport, sweep
from magicmix.webhooks import WebhookSender

log = logging.getLogger(__name__)

CREATE_GRACE_S = 600.0  # a job id claimed this long ago with no record: its create crashed
RESPAWN_AFTER_S = 120.0  # a queued job this old with no spawned call: the spawn was lost
SEND_AGAIN_WITHIN_S = 60.0  # the webhook function waits for retries due this soon itself


@dataclass
class WebhookNudges:
    """Jobs that ended here with a webhook, handed to the webhook function in one spawn."""

    spawn: Callable[[list[int]], object]
    pending: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, jobs: list[JobRecord]) -> None:
        with self.lock:
            self.pending += [job.id for job in jobs if job.webhook is not None]

    def flush(self) -> None:
        with self.lock:
            ids, self.pending = self.pending, []
        if ids:
            try:
                self.spawn(ids)
            except Exception:  # the sweep sends what is due anyway
                log.exception("could not spawn the webhook function for jobs %s", ids)


@dataclass(frozen=True)
class ModalParts:
    """What every container shares: settings, stores, the lifecycle."""

    settings: Settings
    box: SecretBox
    state: ModalState
    jobs: DictJobStore
    keys: DictKeyStore
    lifecycle: Lifecycle
    outputs: OutputStore
    links: HttpLinks
    nudges: WebhookNudges

    @property
    def family(self) -> Family:
        """The deploy-time family (MAGICMIX_MODEL_FAMILY); the GPU class checks it."""
        return resolve_family(self.settings.model, self.settings.model_family)


def modal_settings(web_url: str | None) -> Settings:
    """Settings from the environment; `public_url` defaults to the web function's URL."""
    settings = Settings()
    if "public_url" not in settings.model_fields_set and web_url:
        settings = settings.model_copy(update={"public_url": web_url.rstrip("/")})
    return settings


def layouts_store(settings: Settings) -> S3Store:
    """Layout images wait for their run in the service bucket, beside the outputs."""
    parts = urlsplit(settings.store_url or "")
    prefix = f"{parts.path.strip('/')}/layouts/".lstrip("/")
    client = make_s3_client(settings.s3_endpoint_url, allow_private=True)
    return S3Store(parts.netloc, prefix, client=client)


def modal_parts(
    settings: Settings,
    dicts: dict[str, Any],
    spawn_webhooks: Callable[[list[int]], object],
    *,
    layouts: BlobStore | None = None,
) -> ModalParts:
    """The shared parts; refuses settings that cannot work on Modal."""
    if settings.secret_key is None:
        raise RuntimeError(
            "MAGICMIX_SECRET_KEY is not set: add it to the `magicmix` Modal secret (every"
            " container must share it, or stored S3 details cannot be decrypted)"
        )
    if not (settings.store_url or "").startswith("s3://"):
        raise RuntimeError(
            "MAGICMIX_STORE_URL must be s3://bucket/prefix on Modal (containers share no"
            " disk): add it to the `magicmix-s3` Modal secret"
        )
    configure_logging(settings.log_level)
    state = ModalState(**dicts, layouts=layouts or layouts_store(settings))
    secret = settings.secret_key_bytes()
    box = SecretBox(secret)
    jobs = DictJobStore(state)
    nudges = WebhookNudges(spawn_webhooks)
    lifecycle = Lifecycle(
        jobs, QueueLimits(settings.max_queue, settings.max_queued_per_key), listeners=[nudges.add]
    )
    return ModalParts(
        settings=settings,
        box=box,
        state=state,
        jobs=jobs,
        keys=DictKeyStore(state.keys, box, secret, settings.static_api_keys),
        lifecycle=lifecycle,
        outputs=open_store(settings),
        links=HttpLinks(settings.public_url),
        nudges=nudges,
    )


def dispatcher(parts: ModalParts, gpu: GpuCalls, *, gpu_name: str) -> ModalDispatcher:
    dtype = "float16" if parts.settings.dtype == "auto" else parts.settings.dtype
    return ModalDispatcher(
        lifecycle=parts.lifecycle,
        calls=parts.state.jobs,
        gpu=gpu,
        engine=EngineInfo(
            model=parts.settings.model,
            family=parts.family,
            device=f"cuda ({gpu_name} on Modal)",
            dtype=dtype,
        ),
        flush_webhooks=parts.nudges.flush,
    )


def web_service(parts: ModalParts, gpu: GpuCalls, *, gpu_name: str) -> MagicMixService:
    """The service of the web function: no engine, no background loops (the cron sweeps)."""
    return MagicMixService(
        settings=parts.settings,
        lifecycle=parts.lifecycle,
        keys=parts.keys,
        outputs=parts.outputs,
        dispatcher=dispatcher(parts, gpu, gpu_name=gpu_name),
        box=parts.box,
        links=parts.links,
        family=parts.family,
    )


def job_runner(parts: ModalParts) -> JobRunner:
    """The GPU class's runner: the same as the local worker's."""
    return JobRunner(
        settings=parts.settings,
        lifecycle=parts.lifecycle,
        outputs=parts.outputs,
        keys=parts.keys,
        box=parts.box,
        links=parts.links,
    )


async def deliver_webhooks(parts: ModalParts, job_ids: list[int]) -> None:
    """The webhook function: attempt each due webhook now, and the retries due within a minute.

    Later retries are the sweep's (every few minutes), so no container waits for hours.
    """
    sender = WebhookSender(parts.jobs, parts.keys, parts.settings)
    deadline = time.time() + SEND_AGAIN_WITHIN_S
    todo = job_ids
    while todo:
        jobs = await asyncio.gather(*(asyncio.to_thread(parts.jobs.get, i) for i in todo))
        now = time.time()
        ready = [job for job in jobs if job is not None and _due(job, now)]
        states = await asyncio.gather(*(sender.send(job) for job in ready))
        later = [
            (state.next_at, job.id)
            for job, state in zip(ready, states, strict=True)
            if state.phase == "pending" and state.next_at is not None and state.next_at <= deadline
        ]
        if not later:
            return
        await asyncio.sleep(max(0.0, min(at for at, _ in later) - time.time()))
        todo = [job_id for _, job_id in later]


async def run_sweep(parts: ModalParts, dispatch: ModalDispatcher) -> SweepReport:
    """The scheduled function: repair crashes, expire outputs, fail or respawn stuck jobs,
    send due webhooks, and keep the key entries from lapsing."""
    now = time.time()
    repaired = await asyncio.to_thread(parts.jobs.repair, now, grace_s=CREATE_GRACE_S)
    report = await asyncio.to_thread(sweep, parts.lifecycle, parts.outputs, parts.settings)
    active = await asyncio.to_thread(parts.jobs.active)
    respawned = await dispatch.respawn_stuck(active, older_than_s=RESPAWN_AFTER_S)
    sent = await WebhookSender(parts.jobs, parts.keys, parts.settings).send_due(limit=512)
    await asyncio.to_thread(parts.keys.keep_alive)
    # an image outlives its job only after a crash; none is needed past the queued limit
    cutoff = datetime.now(UTC) - timedelta(seconds=parts.settings.stale_queued_s * 2)
    layouts = await asyncio.to_thread(parts.state.layouts.delete_older_than, cutoff)
    log.info(
        "sweep: repaired %d, respawned %d, webhooks sent %d, old layouts removed %d",
        len(repaired),
        len(respawned),
        len(sent),
        len(layouts),
    )
    return report


def _due(job: JobRecord, now: float) -> bool:
    return job.webhook_due and (job.webhook is None or (job.webhook.next_at or 0) <= now)


def manage_keys(parts: ModalParts, action: str, *, key_id: str = "", admin: bool = False) -> str:
    """`magicmix keys` against the deployed app: what `keys.key_action` prints.

    Runs in a Modal function (it needs the service secret to hash keys and encrypt their
    webhook secrets); the new key travels back as the function's result, never in a log.
    """
    return key_action(parts.keys, action, key_id=key_id, admin=admin)
