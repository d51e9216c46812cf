"""The service layer: composes keys, jobs, the worker, storage and webhooks.

It speaks in wire schemas at its edge (so the HTTP server stays thin) and raises only
`magicmix.errors`; it knows nothing of HTTP. The same service runs locally (SQLite jobs,
a worker thread) and on Modal (Modal-backed job store and worker), through the seams
`JobStore`, `OutputStore`, `KeyStore` and `Worker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from magicmix import __version__, webhooks
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.errors import Busy, Forbidden, Gone, MagicMixError, NotFound, StorageError
from magicmix.images import decode_image
from magicmix.jobs import JobParams, JobRecord, JobStatus, JobStore
from magicmix.keys import KeyStore, Principal
from magicmix.mix_request import random_seed, validate_request
from magicmix.netguard import check_url
from magicmix.schemas import (
    FailedOut,
    JobOut,
    MagicMixIn,
    MessageOut,
    Meta,
    ProcessingOut,
    SuccessOut,
    SystemDetailsOut,
    UpdateS3In,
)
from magicmix.sources import image_bytes_from_field
from magicmix.storage import OutputStore
from magicmix.user_s3 import S3Details, UserBucket, check_s3_endpoint

log = logging.getLogger(__name__)
API_BASE = "/api/v1/enterprise"


class Worker(Protocol):
    """Where jobs run: a local thread, or Modal's GPU class."""

    on_finished: Callable[[list[JobRecord]], None]

    def start(self) -> None: ...
    def stop(self, timeout: float = 30.0) -> None: ...
    def submit(self, job: JobRecord) -> None: ...
    async def wait(self, job_id: int, timeout: float) -> None: ...
    def describe(self) -> dict[str, str]: ...
    def clear_cache(self) -> str: ...
    def reload(self) -> str: ...


class MagicMixService:
    """Everything the API does, minus HTTP."""

    def __init__(
        self,
        *,
        settings: Settings,
        jobs: JobStore,
        keys: KeyStore,
        outputs: OutputStore,
        worker: Worker,
        box: SecretBox,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.keys = keys
        self.outputs = outputs
        self.worker = worker
        self.box = box
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._seconds_per_job = 5.0  # moving average, feeds `eta`
        worker.on_finished = self.jobs_finished

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker.start()
        pending = getattr(self.jobs, "pending_webhooks", None)
        for job in pending() if pending else []:
            self._spawn(self.deliver_webhook(job))

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop)
        for task in list(self._background):
            task.cancel()

    def authenticate(self, key: str, *, admin: bool = False) -> Principal:
        principal = self.keys.authenticate(key)
        if admin and not principal.admin:
            raise Forbidden("this route needs an admin key (magicmix keys create --admin)")
        return principal

    # -- magic_mix and fetch ----------------------------------------------------------

    async def submit(self, body: MagicMixIn, principal: Principal) -> JobOut:
        """Validate everything up front, queue the job, wait up to the sync window."""
        # shed load before any fetch; store calls run off the event loop (on Modal they are
        # network round trips, locally a write may wait on SQLite's busy timeout)
        if await asyncio.to_thread(self.jobs.queue_length) >= self.settings.max_queue:
            raise Busy("the queue is full; retry shortly", retry_after=10)
        data = await image_bytes_from_field(body.image, self.settings)
        image = await asyncio.to_thread(  # decoding up to 40 MP must not stall the loop
            decode_image, data, max_pixels=self.settings.max_image_pixels
        )
        if body.webhook:
            await asyncio.to_thread(
                check_url,
                body.webhook,
                allow_private=self.settings.allow_private_urls,
                field="webhook",
            )
        params = JobParams(
            **body.model_dump(include=set(JobParams.model_fields), exclude={"seed", "image_ref"}),
            seed=body.seed if body.seed is not None else random_seed(),
            image_ref=describe_image_field(body.image, len(data)),
        )
        validate_request(params.mix_request(image))
        job = await asyncio.to_thread(
            self.jobs.create,
            principal.key_id,
            params,
            data,
            max_queue=self.settings.max_queue,
            max_per_key=self.settings.max_queued_per_key,
        )
        log.info(
            "job %s queued key=%s size=%dx%d steps=%d",
            job.id,
            principal.key_id,
            params.width,
            params.height,
            params.steps,
        )
        self.worker.submit(job)
        job = await self.wait(job.id, self.settings.sync_wait_s)
        return await asyncio.to_thread(self.reply, job)

    async def fetch(self, job_id: int, principal: Principal) -> JobOut:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or job.key_id != principal.key_id:
            raise NotFound(f"no job with id {job_id} for this key")
        return await asyncio.to_thread(self.reply, job)

    async def wait(self, job_id: int, timeout: float) -> JobRecord:
        """The job once terminal, or as it stands after `timeout` seconds."""
        assert self._loop is not None  # nosec B101 - start() ran
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            job = await asyncio.to_thread(self._get, job_id)
            deadline = time.monotonic() + timeout
            while not job.status.is_terminal and (left := deadline - time.monotonic()) > 0:
                poll = asyncio.ensure_future(self.worker.wait(job_id, left))
                await asyncio.wait(
                    {future, poll}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                poll.cancel()
                job = await asyncio.to_thread(self._get, job_id)
            return job
        finally:
            self._waiters[job_id].remove(future)
            if not self._waiters[job_id]:
                del self._waiters[job_id]

    def jobs_finished(self, records: list[JobRecord]) -> None:
        """Called by the worker (any thread) as jobs end: wake waiters, send webhooks."""
        if self._loop is None:
            return
        for job in records:
            if job.result is not None:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (
                    job.result.generation_time
                )
            log.info(
                "job %s %s in %.2fs",
                job.id,
                job.status.value,
                (job.finished_at or 0) - (job.started_at or job.created_at),
            )
            self._loop.call_soon_threadsafe(self._job_done, job)

    def _job_done(self, job: JobRecord) -> None:
        for future in self._waiters.get(job.id, []):
            if not future.done():
                future.set_result(None)
        if job.params.webhook:
            self._spawn(self.deliver_webhook(job))

    def _get(self, job_id: int) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return job

    # -- replies ----------------------------------------------------------------------

    def reply(self, job: JobRecord) -> JobOut:
        """The ModelsLab reply for a job in any state (expired jobs raise `Gone`)."""
        if job.status is JobStatus.EXPIRED:
            raise Gone(
                f"the outputs of job {job.id} were deleted after"
                f" {self.settings.retention_hours:g} hours; add S3 details with"
                " update_s3 to keep images in your own bucket"
            )
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            message = job.error or f"job {job.status.value}"
            return FailedOut(id=job.id, message=message, track_id=job.params.track_id)
        if job.status is JobStatus.SUCCESS and job.result is not None:
            return SuccessOut(
                generationTime=round(job.result.generation_time, 4),
                id=job.id,
                output=job.result.output,
                meta=self._meta(job),
                message=job.result.note,
                track_id=job.params.track_id,
            )
        ahead = max(self.jobs.queue_length() - 1, 0)
        eta = round((ahead // self.settings.batch_size + 1) * self._seconds_per_job, 1)
        future = [] if self.keys.get_s3(job.key_id) else [self.settings.output_url(job.output_name)]
        return ProcessingOut(
            id=job.id,
            eta=eta,
            meta=self._meta(job),
            future_links=future,
            message="Your image is being processed; fetch the result with the fetch_result"
            " URL (POST with your key).",
            tip="Set `webhook` to be called when the image is ready instead of polling.",
            fetch_result=f"{self.settings.public_url}{API_BASE}/image_editing/fetch/{job.id}",
            track_id=job.params.track_id,
        )

    def _meta(self, job: JobRecord) -> Meta:
        p = job.params
        outdir = "outputs" if not job.result or job.result.stored_in == "service" else "s3"
        return Meta(
            H=p.height,
            W=p.width,
            file_prefix=job.file_prefix,
            image=p.image_ref,
            kmax=p.kmax,
            kmin=p.kmin,
            mix_factor=p.mix_factor,
            n_samples=1,
            negative_prompt=p.negative_prompt,
            outdir=outdir,
            prompt=p.prompt,
            seed=p.seed,
            steps=p.steps,
            guidance_scale=p.guidance_scale,
        )

    # -- webhooks ---------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def deliver_webhook(self, job: JobRecord) -> None:
        """POST the final reply (plus track_id) to the job's webhook; record the outcome."""
        assert job.params.webhook is not None  # nosec B101 - only called with a webhook
        try:
            payload = self.reply(job).model_dump(mode="json")
        except Gone as err:
            payload = FailedOut(id=job.id, message=err.message).model_dump(mode="json")
        payload["track_id"] = job.params.track_id
        try:
            secret = self.keys.webhook_secret(job.key_id)
        except MagicMixError as err:  # e.g. the key was removed since the job was made
            log.warning("job %s webhook not sent: %s", job.id, err.message)
            self.jobs.set_webhook_state(job.id, "failed", 0)
            return
        outcome = await webhooks.deliver_webhook(
            job.params.webhook,
            payload,
            secret=secret,
            msg_id=f"magicmix-job-{job.id}",
            settings=self.settings,
        )
        state = "delivered" if outcome.delivered else "failed"
        self.jobs.set_webhook_state(job.id, state, outcome.attempts)
        log.info("job %s webhook %s after %d attempts", job.id, state, outcome.attempts)

    # -- admin and details ------------------------------------------------------------

    def system_details(self, principal: Principal) -> SystemDetailsOut:
        engine = self.worker.describe()
        return SystemDetailsOut(
            message="magicmix is running",
            model=engine["model"],
            device=engine["device"],
            dtype=engine["dtype"],
            queue_length=self.jobs.queue_length(),
            version=__version__,
            webhook_secret=principal.webhook_secret,
            s3=self._masked_s3(principal.key_id),
        )

    def _masked_s3(self, key_id: str) -> dict[str, Any] | None:
        """The key's saved S3 details with secrets masked; None when there are none."""
        blob = self.keys.get_s3(key_id)
        if not blob:
            return None
        try:
            return S3Details.from_encrypted(self.box, blob).masked()
        except StorageError as err:  # saved under another MAGICMIX_SECRET_KEY
            return {"error": err.message}

    def clear_queue(self) -> MessageOut:
        """Cancel queued jobs; their waiters wake and their webhooks get the final reply."""
        cancelled = [job for i in self.jobs.cancel_queued() if (job := self.jobs.get(i))]
        self.jobs_finished(cancelled)
        return MessageOut(message=f"cancelled {len(cancelled)} queued jobs")

    def clear_cache(self) -> MessageOut:
        return MessageOut(message=self.worker.clear_cache())

    def restart_server(self) -> MessageOut:
        return MessageOut(message=self.worker.reload())

    @staticmethod
    def update_server() -> MessageOut:
        return MessageOut(
            status="error",
            message="magicmix is not updated through the API: redeploy the new version"
            " (`modal deploy modal_app.py`, or restart `magicmix serve`). Nothing"
            " was changed.",
        )

    async def update_s3(self, body: UpdateS3In, principal: Principal) -> MessageOut:
        """Prove the details work (write and delete a probe object), then store them."""
        details = S3Details.model_validate(body.model_dump(exclude={"key"}, exclude_none=True))
        # the probe must not become a way to scan internal hosts: check where boto3 connects
        await asyncio.to_thread(check_s3_endpoint, details, self.settings)
        await asyncio.to_thread(UserBucket(details).probe)
        self.keys.set_s3(principal.key_id, details.to_encrypted(self.box))
        log.info("key %s saved S3 details for bucket %s", principal.key_id, details.bucket)
        where = f"s3://{details.bucket}/{details.image_directory}".rstrip("/")
        return MessageOut(message=f"S3 details saved; new images of this key go to {where}")

    def reset_s3(self, principal: Principal) -> MessageOut:
        removed = self.keys.delete_s3(principal.key_id)
        return MessageOut(
            message="S3 details removed; new images go to the service store"
            f" and are deleted after {self.settings.retention_hours:g} hours"
            if removed
            else "no S3 details were saved for this key"
        )

    # -- outputs and cleanup ----------------------------------------------------------

    def output(self, name: str) -> bytes:
        return self.outputs.get(name)

    def cleanup(self) -> tuple[list[str], list[int]]:
        """Delete service-store outputs older than the retention; expire their jobs."""
        return expire_outputs(self.jobs, self.outputs, self.settings.retention_hours)

    async def cleanup_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.cleanup)
            except Exception:  # a failed sweep must not stop later ones
                log.exception("periodic cleanup failed")
            await asyncio.sleep(self.settings.cleanup_interval_s)


def expire_outputs(
    jobs: JobStore, outputs: OutputStore, retention_hours: float
) -> tuple[list[str], list[int]]:
    """The 24-hour rule: outputs past retention are deleted and their jobs marked expired.

    A function of the stores alone, so `magicmix cleanup` runs it without loading a model.
    """
    cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
    removed = outputs.delete_older_than(cutoff)
    expired = jobs.expire_service_outputs(cutoff.timestamp())
    if removed or expired:
        log.info("cleanup removed %d outputs, expired %d jobs", len(removed), len(expired))
    return removed, expired


def describe_image_field(value: str, size: int) -> str:
    """What `meta.image` echoes: the URL as sent, never megabytes of inline data."""
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        return text
    return f"inline image ({size} bytes)"
