"""Run a batch of claimed jobs through the engine and put each result where it belongs.

Shared by the local worker thread and Modal's GPU class: given an engine and claimed
jobs, it decodes inputs, mixes each group of jobs that share a schedule in one engine
call, places each PNG where the output router says (`outputs.routing`) and ends each job
through the lifecycle, as its claimant. A group that fails
fails only its own jobs, and each group's jobs report their own generation time. A job
never stays `processing` because of an error here. When the lifecycle refuses a finish
(the job was cancelled, failed by the sweep, or its claim lapsed and passed to another
worker), the PNG just stored is deleted again, so a job has at most one output and only
if it succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from PIL import Image

from magicmix.config import Settings
from magicmix.errors import MagicMixError, StorageError
from magicmix.inputs.images import decode_image, png_bytes
from magicmix.jobs import JobRecord, JobResult, PromptsRead
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.routing import OutputRouter
from magicmix.request import MixRequest

log = logging.getLogger(__name__)


class Mixed(Protocol):
    """One result of `engine.MagicMixEngine.mix` (`engine.MixResult`)."""

    @property
    def image(self) -> Image.Image: ...
    # how much of each text the encoders read: `tokens` and `truncated` (a `jobs.TextRead`)
    @property
    def prompt(self) -> object: ...
    @property
    def negative_prompt(self) -> object: ...


class Engine(Protocol):
    """What the backends need of `engine.MagicMixEngine` (a seam: no torch above it)."""

    def mix(self, requests: Sequence[MixRequest], *, progress: bool = ...) -> Sequence[Mixed]: ...
    def clear_cache(self) -> int: ...
    def describe(self) -> dict[str, str]: ...


class JobRunner:
    """Turns claimed jobs into ended ones; holds no engine of its own."""

    def __init__(self, *, settings: Settings, lifecycle: Lifecycle, outputs: OutputRouter) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.outputs = outputs

    def run(self, engine: Engine, batch: list[JobRecord]) -> list[JobRecord]:
        """Mix `batch` (claimed jobs): one engine call per schedule group, so a group that
        fails ends only its own jobs, each with its own time; returns the ended ones."""
        ended: list[JobRecord | None] = []
        runnable: list[tuple[JobRecord, MixRequest]] = []
        for job in batch:
            data = self.lifecycle.store.image(job.id)
            if data is None:
                ended.append(self._fail(job, "the layout image was lost"))
                continue
            try:
                image = decode_image(
                    data,
                    max_pixels=self.settings.max_image_pixels,
                    max_decoded_bytes=self.settings.max_image_decoded_bytes,
                )
            except MagicMixError as err:
                ended.append(self._fail(job, err.message))
                continue
            runnable.append((job, job.params.mix_request(image)))
        groups: dict[tuple[int, ...], list[tuple[JobRecord, MixRequest]]] = {}
        for job, request in runnable:
            groups.setdefault(request.batch_key(), []).append((job, request))
        for group in groups.values():  # one UNet batch each; a failure stays in its group
            ended += self._mix(engine, group)
        return [job for job in ended if job is not None]

    def _fail(self, job: JobRecord, message: str) -> JobRecord | None:
        return self.lifecycle.fail(job.id, message, claimant=job.claimant)

    def _mix(
        self, engine: Engine, runnable: list[tuple[JobRecord, MixRequest]]
    ) -> list[JobRecord | None]:
        started = time.perf_counter()
        try:
            results = engine.mix([request for _, request in runnable], progress=False)
        except MagicMixError as err:
            return [self._fail(job, err.message) for job, _ in runnable]
        except Exception:
            log.exception("engine failed on jobs %s", [job.id for job, _ in runnable])
            return [
                self._fail(job, "internal error while generating the image") for job, _ in runnable
            ]
        elapsed = time.perf_counter() - started
        log.info("mixed jobs %s in %.2fs", [job.id for job, _ in runnable], elapsed)

        def store(pair: tuple[tuple[JobRecord, MixRequest], Mixed]) -> JobRecord | None:
            (job, _), result = pair
            prompts = PromptsRead.model_validate(result, from_attributes=True)
            return self._store(job, png_bytes(result.image), elapsed, prompts)

        pairs = list(zip(runnable, results, strict=True))
        threads = min(self.settings.store_threads, len(pairs))
        if threads <= 1:
            return [store(pair) for pair in pairs]
        # PNG encoding (zlib frees the GIL) and uploads overlap: the batch's images are
        # stored in about the time of one, and the GPU container takes its next batch sooner
        with ThreadPoolExecutor(threads, thread_name_prefix="magicmix-store") as pool:
            return list(pool.map(store, pairs))

    def _store(
        self, job: JobRecord, data: bytes, elapsed: float, prompts: PromptsRead
    ) -> JobRecord | None:
        """Place the PNG where the router says, then record the success."""
        try:
            placed = self.outputs.place(job.key_id, job.output_name, data)
        except StorageError as err:
            log.error("job %s: service store failed: %s", job.id, err.message)
            return self._fail(
                job, f"the image was generated but could not be stored: {err.message}"
            )
        result = JobResult(
            output=[placed.url],
            generation_time=elapsed,
            stored_in=placed.stored_in,
            object_names=[placed.key],
            note=placed.note,
            prompts=prompts,
        )
        return self._finish(job, result, undo=placed.undo)

    def _finish(
        self, job: JobRecord, result: JobResult, *, undo: Callable[[], None]
    ) -> JobRecord | None:
        ended = self.lifecycle.finish(job, result)
        if ended is None:  # cancelled or failed meanwhile: the output must not outlive that
            log.info("job %s ended before its finish; removing its output", job.id)
            try:
                undo()
            except MagicMixError as err:
                log.warning("job %s: output not removed: %s", job.id, err.message)
        return ended
