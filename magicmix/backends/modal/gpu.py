"""The service on Modal: job state and S3 details in Modal Dicts, jobs run by the GPU class.

`modal_app.py` declares the Modal objects and calls into this module; everything that
behaves lives here, behind the same seams the local service uses (`JobStore`, `KeyStore`,
`Worker`). The stores take any object with `modal.Dict`'s methods, so tests run them on
an in-memory stand-in. A request flows: web container creates the job in the Dict and
spawns the GPU class's batched method, then waits on that call up to the sync window;
the GPU container runs `run_batch` (the same `JobRunner` as locally) and writes the
outcome back to the Dict; webhooks go out from a CPU function, not the GPU.
The Dict-backed stores and their trade-offs are in `modal_state.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch
from huggingface_hub import snapshot_download

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.engine import MagicMixEngine
from magicmix.jobs import JobRecord, JobStatus, JobStore
from magicmix.loading import HUB_ALLOW_PATTERNS, Components, load_components, resolve_dtype
from magicmix.local import engine_options
from magicmix.modal_state import DictJobStore, DictKeyStore, ModalState
from magicmix.runner import JobRunner
from magicmix.service import MagicMixService
from magicmix.storage import open_store

log = logging.getLogger(__name__)

# A job still queued or processing this long after creation was lost (web container gone
# before the spawn, GPU container killed past Modal's retries): the cleanup fails it.
STALE_AFTER_S = 3600.0
MAX_TRACKED_LAUNCHES = 4096
# -- the worker seam, web side ------------------------------------------------------------


class GpuCall(Protocol):
    """One spawned run of the GPU class."""

    async def wait(self, timeout: float) -> None:
        """Return when the run ended or `timeout` passed; raise if the run crashed."""
        ...


class GpuLauncher(Protocol):
    """Starts GPU runs: Modal's spawn in production, an inline stand-in in tests."""

    async def spawn(self, job_id: int) -> GpuCall: ...


class ModalCall:
    """A `modal.FunctionCall` behind `GpuCall`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def wait(self, timeout: float) -> None:
        try:
            await self._call.get.aio(timeout=timeout)
        except TimeoutError:  # still running: Modal raises the built-in TimeoutError
            return


class ModalLauncher:
    """Spawns the GPU class's batched method (e.g. `MagicMix().run`) for one job."""

    def __init__(self, method: Any) -> None:
        self._method = method

    async def spawn(self, job_id: int) -> GpuCall:
        return ModalCall(await self._method.spawn.aio(job_id))


class ModalWorker:
    """`Worker` for the web container: jobs run in the GPU class, state lives in the Dict.

    It never calls `on_finished`: the GPU side sends webhooks, and `wait` returning is
    what wakes the service, which then re-reads the job store.
    """

    def __init__(
        self,
        *,
        jobs: JobStore,
        launcher: GpuLauncher,
        engine: dict[str, str],
        poll_s: float = 1.0,
    ) -> None:
        self._jobs = jobs
        self._launcher = launcher
        self._engine = engine
        self._poll_s = poll_s
        # recent spawns by job id; bounded, since a job nobody waits on is never popped
        self._launches: OrderedDict[int, asyncio.Task[GpuCall | None]] = OrderedDict()
        self.on_finished: Callable[[list[JobRecord]], None] = lambda records: None

    def start(self) -> None:
        """Nothing to start: Modal starts GPU containers on demand."""

    def stop(self, timeout: float = 30.0) -> None:
        """Nothing to stop: spawned runs belong to Modal and outlive this container."""

    def submit(self, job: JobRecord) -> None:
        """Spawn in the background, so the request does not wait on Modal's API."""
        self._launches[job.id] = asyncio.ensure_future(self._launch(job.id))
        while len(self._launches) > MAX_TRACKED_LAUNCHES:
            self._launches.popitem(last=False)

    async def wait(self, job_id: int, timeout: float) -> None:
        launch = self._launches.get(job_id)
        if launch is None:  # not spawned here: poll the store
            await asyncio.sleep(min(timeout, self._poll_s))
            return
        # shield: a caller's timeout must not cancel the spawn itself
        call = await asyncio.shield(launch)
        if call is None:
            return
        try:
            await call.wait(timeout)
        except Exception:  # a failed job is recorded by the runner; this is a dead container
            log.exception("GPU run of job %s crashed", job_id)
            job = self._jobs.get(job_id)
            if job is not None and not job.status.is_terminal:
                self._jobs.fail(job_id, "the GPU worker stopped while running this job")

    def describe(self) -> dict[str, str]:
        return dict(self._engine)

    def clear_cache(self) -> str:
        return (
            "nothing to clear from the web container: each GPU container keeps its own"
            " text-embedding cache, dropped when it scales down"
        )

    def reload(self) -> str:
        return (
            "GPU containers load the model when they start; to change it, redeploy"
            " (`modal deploy modal_app.py`)"
        )

    async def _launch(self, job_id: int) -> GpuCall | None:
        try:
            return await self._launcher.spawn(job_id)
        except Exception:
            log.exception("could not spawn the GPU run of job %s", job_id)
            self._jobs.fail(job_id, "the job could not be started on a GPU; please retry")
            return None


# -- composition ---------------------------------------------------------------------------


def modal_settings(web_url: str | None) -> Settings:
    """Settings from the environment; `public_url` defaults to the web function's URL."""
    settings = Settings()
    if "public_url" not in settings.model_fields_set and web_url:
        settings = settings.model_copy(update={"public_url": web_url.rstrip("/")})
    return settings


def build_modal_service(
    settings: Settings, state: ModalState, launcher: GpuLauncher, *, gpu: str
) -> MagicMixService:
    """The service every Modal container runs: web, GPU class, webhooks and cleanup alike."""
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
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    secret = settings.secret_key_bytes()
    box = SecretBox(secret)
    jobs = DictJobStore(state.jobs, state.active, state.expiring)
    keys = DictKeyStore(state.keys, secret, settings.static_api_keys)
    dtype = "float16" if settings.dtype == "auto" else settings.dtype
    worker = ModalWorker(
        jobs=jobs,
        launcher=launcher,
        engine={"model": settings.model, "device": f"cuda ({gpu} on Modal)", "dtype": dtype},
    )
    return MagicMixService(
        settings=settings,
        jobs=jobs,
        keys=keys,
        outputs=open_store(settings),
        worker=worker,
        box=box,
    )


# -- the GPU class -------------------------------------------------------------------------


def load_weights(settings: Settings) -> Components:
    """The CPU half of a cold start, kept in Modal's memory snapshot: weights into RAM.

    No CUDA call may happen here (the snapshot is taken without a GPU), hence the
    explicit devices instead of `auto`.
    """
    return load_components(
        settings.model,
        device=torch.device("cpu"),
        dtype=resolve_dtype(settings.dtype, torch.device("cuda")),
        revision=settings.model_revision,
    )


def engine_on_gpu(components: Components, settings: Settings) -> MagicMixEngine:
    """After each restore: move the weights to the GPU and wrap them in an engine."""
    device = torch.device("cuda")
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device)
    engine = MagicMixEngine(
        components,
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        text_cache_size=settings.text_cache_size,
        options=engine_options(settings),
    )
    engine.model_name = settings.model
    if settings.compile:  # compile now, before the container takes work (no request pays)
        sizes = [b for b in engine.options.batch_buckets if b <= settings.batch_size]
        engine.warmup(768, 768, batch_sizes=sizes)
    return engine


def run_batch(
    service: MagicMixService,
    engine: MagicMixEngine,
    job_ids: list[int],
    send_webhooks: Callable[[list[int]], object],
) -> list[str]:
    """The GPU class's body: run the jobs among `job_ids` still to do, as one batch.

    Returns each job's status in input order (a batched Modal method answers every input).
    Cancelled or already finished jobs (a retried input) are skipped.
    """
    service.jobs.mark_processing(job_ids)
    # re-read: a job cancelled before the mark stays cancelled; a retried one is processing
    todo = [
        job for i in job_ids if (job := service.jobs.get(i)) and job.status is JobStatus.PROCESSING
    ]
    runner = JobRunner(
        settings=service.settings,
        jobs=service.jobs,
        outputs=service.outputs,
        keys=service.keys,
        box=service.box,
    )
    finished = runner.run(engine, todo) if todo else []
    if hooks := [job.id for job in finished if job.params.webhook]:
        send_webhooks(hooks)
    statuses = {job.id: job.status.value for job in finished}
    return [statuses.get(i) or _status(service.jobs.get(i)) for i in job_ids]


def _status(job: JobRecord | None) -> str:
    return job.status.value if job is not None else "unknown"


async def deliver_webhooks(service: MagicMixService, job_ids: list[int]) -> None:
    """Send each finished job's final reply (plus track_id) to its webhook, once.

    Runs in a CPU function so the GPU never idles on a slow receiver's retries. The
    payload is the local service's: `MagicMixService.reply` plus track_id.
    """

    jobs = [service.jobs.get(i) for i in job_ids]
    await asyncio.gather(
        *(
            service.deliver_webhook(job)
            for job in jobs
            if job is not None and job.params.webhook and job.webhook_state == "pending"
        )
    )


# -- weights and cleanup -------------------------------------------------------------------


def download_weights(settings: Settings) -> str:
    """Fill the Hugging Face cache with the fp16 files MagicMix reads, nothing else."""
    path = snapshot_download(
        settings.model, revision=settings.model_revision, allow_patterns=HUB_ALLOW_PATTERNS
    )
    log.info("cached %s@%s in %s", settings.model, settings.model_revision or "main", path)
    return str(path)


def cleanup(service: MagicMixService, *, now: float | None = None) -> None:
    """The scheduled sweep: expire outputs past retention, fail lost jobs, keep hints alive."""
    jobs, keys = service.jobs, service.keys
    if not isinstance(jobs, DictJobStore) or not isinstance(keys, DictKeyStore):
        raise TypeError("cleanup runs on the service from build_modal_service")
    removed, expired = service.cleanup()
    lost = jobs.fail_stale((time.time() if now is None else now) - STALE_AFTER_S)
    jobs.keep_alive()
    keys.keep_alive()
    log.info(
        "cleanup: removed %d outputs, expired %d jobs, failed %d lost jobs",
        len(removed),
        len(expired),
        len(lost),
    )
