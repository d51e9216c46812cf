"""The service on Modal: job state and S3 details in Modal Dicts, jobs run by the GPU class.

`modal_app.py` declares the Modal objects and calls into this module; everything that
behaves lives here, behind the same seams the local service uses (`JobStore`, `KeyStore`,
`Worker`). The stores take any object with `modal.Dict`'s methods, so tests run them on
an in-memory stand-in. A request flows: web container creates the job in the Dict and
spawns the GPU class's batched method, then waits on that call up to the sync window;
the GPU container runs `run_batch` (the same `JobRunner` as locally) and writes the
outcome back to the Dict; webhooks go out from a CPU function, not the GPU.

Trade-offs of a Dict without transactions or compare-and-swap:
- ids are claimed with `put(..., skip_if_exists=True)` (atomic), from a hint that may
  lag, so they are unique and increase in claim order;
- queued and processing jobs are listed in their own small Dict (`active`, at most
  `max_queue` entries), so limits are one read; two submissions racing may both pass a
  limit, so the limits are soft by at most the number of concurrent submissions;
- service-store successes are listed in `expiring` until the cleanup expires them.
Dict entries vanish after 7 days untouched: the hourly cleanup reads the id hint and the
S3 details so they stay, while old job records are allowed to lapse.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from huggingface_hub import snapshot_download

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.engine import MagicMixEngine
from magicmix.errors import Busy, NotFound, Unauthorized
from magicmix.jobs import JobParams, JobRecord, JobResult, JobStatus, JobStore
from magicmix.keys import Principal, static_principals
from magicmix.loading import HUB_ALLOW_PATTERNS, Components, load_components, resolve_dtype
from magicmix.local import engine_options
from magicmix.runner import JobRunner
from magicmix.service import MagicMixService
from magicmix.storage import open_store

log = logging.getLogger(__name__)

# A job still queued or processing this long after creation was lost (web container gone
# before the spawn, GPU container killed past Modal's retries): the cleanup fails it.
STALE_AFTER_S = 3600.0
_NEXT_ID = "next_id"
_MISSING = object()


class DictLike(Protocol):
    """The part of `modal.Dict` the stores use; the stand-in in tests has the same signatures."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool: ...
    def pop(self, key: Any, default: Any = ...) -> Any: ...
    def items(self) -> Iterable[tuple[Any, Any]]: ...
    def len(self) -> int: ...


@dataclass(frozen=True)
class ModalState:
    """The Dicts holding the service's state on Modal (see the module docstring)."""

    jobs: DictLike  # "job:{id}" -> record JSON, "image:{id}" -> layout bytes, the id hint
    active: DictLike  # job id -> key id, for queued and processing jobs
    expiring: DictLike  # job id -> finished_at, for successes in the service store
    keys: DictLike  # key id -> encrypted S3 details


# -- job state ---------------------------------------------------------------------------


class DictJobStore:
    """`JobStore` on Modal Dicts; records are JSON so they outlive code changes."""

    def __init__(self, jobs: DictLike, active: DictLike, expiring: DictLike) -> None:
        self._jobs = jobs
        self._active = active
        self._expiring = expiring

    def create(
        self, key_id: str, params: JobParams, image: bytes, *, max_queue: int, max_per_key: int
    ) -> JobRecord:
        """Claim the next free id for a queued job, or raise `Busy` when over a limit."""
        owners = [owner for _, owner in self._active.items()]
        if len(owners) >= max_queue:
            raise Busy(f"the queue is full ({len(owners)} jobs); retry shortly", retry_after=10)
        mine = owners.count(key_id)
        if mine >= max_per_key:
            raise Busy(
                f"this key already has {mine} jobs in flight (limit {max_per_key});"
                " retry when some finish",
                retry_after=10,
            )
        job_id = max(int(self._jobs.get(_NEXT_ID, 1)), 1)
        while True:
            job = JobRecord(
                id=job_id,
                key_id=key_id,
                status=JobStatus.QUEUED,
                params=params,
                output_token=secrets.token_urlsafe(16),
                webhook_state="pending" if params.webhook else None,
                created_at=time.time(),
            )
            if self._jobs.put(f"job:{job_id}", job.model_dump_json(), skip_if_exists=True):
                break
            job_id += 1  # another container took this id first
        self._jobs.put(_NEXT_ID, job_id + 1)
        self._jobs.put(f"image:{job_id}", image)
        self._active.put(job_id, key_id)
        return job

    def get(self, job_id: int) -> JobRecord | None:
        data = self._jobs.get(f"job:{job_id}")
        return JobRecord.model_validate_json(data) if data is not None else None

    def image(self, job_id: int) -> bytes | None:
        data = self._jobs.get(f"image:{job_id}")
        return bytes(data) if data is not None else None

    def mark_processing(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._save(
                    job.model_copy(
                        update={"status": JobStatus.PROCESSING, "started_at": time.time()}
                    )
                )

    def finish(self, job_id: int, result: JobResult) -> JobRecord:
        job = self._end(job_id, JobStatus.SUCCESS, result=result)
        if result.stored_in == "service":
            self._expiring.put(job_id, job.finished_at)
        return job

    def fail(self, job_id: int, message: str) -> JobRecord:
        return self._end(job_id, JobStatus.FAILED, error=message)

    def set_webhook_state(self, job_id: int, state: str, attempts: int) -> None:
        job = self._load(job_id)
        self._save(job.model_copy(update={"webhook_state": state, "webhook_attempts": attempts}))

    def cancel_queued(self) -> int:
        cancelled = 0
        for job_id, _ in list(self._active.items()):
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._end(job_id, JobStatus.CANCELLED, error="cancelled by clear_queue")
                cancelled += 1
        return cancelled

    def queue_length(self) -> int:
        return self._active.len()

    def expire_service_outputs(self, finished_before: float) -> list[int]:
        expired = []
        for job_id, finished_at in list(self._expiring.items()):
            if finished_at >= finished_before:
                continue
            job = self.get(job_id)
            if job is not None and job.status is JobStatus.SUCCESS:
                self._save(job.model_copy(update={"status": JobStatus.EXPIRED}))
                expired.append(int(job_id))
            self._expiring.pop(job_id, None)
        return sorted(expired)

    def fail_stale(self, created_before: float) -> list[int]:
        """Fail active jobs created before `created_before`: nothing will finish them now."""
        failed = []
        for job_id, _ in list(self._active.items()):
            job = self.get(job_id)
            if job is None:  # the record lapsed; only the index entry is left
                self._active.pop(job_id, None)
            elif job.created_at < created_before:
                self.fail(job.id, "the job was lost by the GPU worker; please submit it again")
                failed.append(job.id)
        return sorted(failed)

    def keep_alive(self) -> None:
        """Read the id hint, so a week without jobs does not reset ids to 1."""
        self._jobs.get(_NEXT_ID)

    def _load(self, job_id: int) -> JobRecord:
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return job

    def _save(self, job: JobRecord) -> None:
        self._jobs.put(f"job:{job.id}", job.model_dump_json())

    def _end(
        self,
        job_id: int,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: str | None = None,
    ) -> JobRecord:
        """Terminal state: record it, drop the layout image and the index entry."""
        job = self._load(job_id).model_copy(
            update={"status": status, "result": result, "error": error, "finished_at": time.time()}
        )
        self._save(job)
        self._jobs.pop(f"image:{job_id}", None)
        self._active.pop(job_id, None)
        return job


# -- keys --------------------------------------------------------------------------------


class DictKeyStore:
    """`KeyStore` on Modal: the operator's keys from the Secret, S3 details in a Dict.

    `magicmix keys create` writes the local SQLite database, which Modal never sees, so
    every key here is a static (admin) key from `MAGICMIX_API_KEYS`.
    """

    def __init__(self, s3_details: DictLike, secret: bytes, static_keys: list[str]) -> None:
        self._s3 = s3_details
        self._secret = secret
        self._static = static_principals(static_keys, secret)

    def authenticate(self, key: str) -> Principal:
        (digest,) = static_principals([key], self._secret)  # the same keyed hash
        for known, principal in self._static.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthorized("invalid API key")

    def webhook_secret(self, key_id: str) -> str:
        for principal in self._static.values():
            if principal.key_id == key_id:
                return principal.webhook_secret
        raise Unauthorized("the key of this job no longer exists")

    def get_s3(self, key_id: str) -> str | None:
        blob = self._s3.get(key_id)
        return str(blob) if blob is not None else None

    def set_s3(self, key_id: str, blob: str) -> None:
        self._s3.put(key_id, blob)

    def delete_s3(self, key_id: str) -> bool:
        return self._s3.pop(key_id, _MISSING) is not _MISSING

    def keep_alive(self) -> None:
        """Read every entry, so S3 details of a key unused for a week do not lapse."""
        for key_id, _ in list(self._s3.items()):
            self._s3.get(key_id)


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
        self._launches: dict[int, asyncio.Task[GpuCall | None]] = {}
        self.on_finished: Callable[[list[JobRecord]], None] = lambda records: None

    def start(self) -> None:
        """Nothing to start: Modal starts GPU containers on demand."""

    def stop(self, timeout: float = 30.0) -> None:
        """Nothing to stop: spawned runs belong to Modal and outlive this container."""

    def submit(self, job: JobRecord) -> None:
        """Spawn in the background, so the request does not wait on Modal's API."""
        self._launches[job.id] = asyncio.ensure_future(self._launch(job.id))

    async def wait(self, job_id: int, timeout: float) -> None:
        launch = self._launches.pop(job_id, None)
        if launch is None:  # not spawned here (or already awaited): poll the store
            await asyncio.sleep(min(timeout, self._poll_s))
            return
        call = await launch
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
    todo = [job for i in job_ids if (job := service.jobs.get(i)) and not job.status.is_terminal]
    service.jobs.mark_processing([job.id for job in todo])
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
