"""Run a batch of jobs through the engine and put each result where it belongs.

Shared by the local worker thread and Modal's GPU class: given an engine and claimed
jobs, it decodes inputs, mixes them in one engine call, stores each PNG (the key's own
bucket when it has S3 details, else the service store) and records the outcome. A job
never stays `processing` because of an error here: it ends `success` or `failed`.
"""

from __future__ import annotations

import logging
import time

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.engine import MagicMixEngine, MixResult
from magicmix.errors import MagicMixError, StorageError
from magicmix.images import decode_image, png_bytes
from magicmix.jobs import JobRecord, JobResult, JobStore
from magicmix.keys import KeyStore
from magicmix.mix_request import MixRequest
from magicmix.storage import OutputStore
from magicmix.user_s3 import S3Details, UserBucket, check_s3_endpoint

log = logging.getLogger(__name__)


def to_mix_request(job: JobRecord, image_bytes: bytes, settings: Settings) -> MixRequest:
    return job.params.mix_request(decode_image(image_bytes, max_pixels=settings.max_image_pixels))


class JobRunner:
    """Turns claimed jobs into finished ones; holds no engine of its own."""

    def __init__(
        self,
        *,
        settings: Settings,
        jobs: JobStore,
        outputs: OutputStore,
        keys: KeyStore,
        box: SecretBox,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.outputs = outputs
        self.keys = keys
        self.box = box

    def run(self, engine: MagicMixEngine, batch: list[JobRecord]) -> list[JobRecord]:
        """Mix `batch` (compatible jobs) in one engine call; returns the finished records."""
        finished: list[JobRecord] = []
        runnable: list[tuple[JobRecord, MixRequest]] = []
        for job in batch:
            data = self.jobs.image(job.id)
            if data is None:
                finished.append(self.jobs.fail(job.id, "the layout image was lost"))
                continue
            try:
                runnable.append((job, to_mix_request(job, data, self.settings)))
            except MagicMixError as err:
                finished.append(self.jobs.fail(job.id, err.message))
        if not runnable:
            return finished
        started = time.perf_counter()
        try:
            results = engine.mix([request for _, request in runnable], progress=False)
        except MagicMixError as err:
            return finished + [self.jobs.fail(job.id, err.message) for job, _ in runnable]
        except Exception:
            log.exception("engine failed on jobs %s", [job.id for job, _ in runnable])
            return finished + [
                self.jobs.fail(job.id, "internal error while generating the image")
                for job, _ in runnable
            ]
        elapsed = time.perf_counter() - started
        log.info("mixed jobs %s in %.2fs", [job.id for job, _ in runnable], elapsed)
        for (job, _), result in zip(runnable, results, strict=True):
            finished.append(self._store(job, result, elapsed))
        return finished

    def _store(self, job: JobRecord, result: MixResult, elapsed: float) -> JobRecord:
        """User bucket first when the key has one; the service store otherwise or as fallback."""
        data = png_bytes(result.image)
        name = job.output_name
        note = None
        blob = self.keys.get_s3(job.key_id)
        if blob:
            try:
                details = S3Details.from_encrypted(self.box, blob)
                check_s3_endpoint(details, self.settings)
                uploaded = UserBucket(details).upload(name, data)
            except MagicMixError as err:
                hours = f"{self.settings.retention_hours:g}"
                note = (
                    f"your S3 bucket refused the upload ({err.message}); the image was kept"
                    f" in the service store instead and will be deleted after {hours} hours"
                )
                log.warning("job %s: user bucket upload failed, using the service store", job.id)
            else:
                return self.jobs.finish(
                    job.id,
                    JobResult(
                        output=[uploaded.url],
                        generation_time=elapsed,
                        stored_in="user",
                        object_names=[uploaded.key],
                        note=uploaded.note,
                    ),
                )
        try:
            self.outputs.put(name, data)
        except StorageError as err:
            log.error("job %s: service store failed: %s", job.id, err.message)
            return self.jobs.fail(
                job.id, f"the image was generated but could not be stored: {err.message}"
            )
        return self.jobs.finish(
            job.id,
            JobResult(
                output=[self.settings.output_url(name)],
                generation_time=elapsed,
                stored_in="service",
                object_names=[name],
                note=note,
            ),
        )
