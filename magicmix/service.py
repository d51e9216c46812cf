"""The service: composes the job lifecycle, keys, inputs, outputs and webhooks.

It speaks in the wire's reply bodies (`magicmix.replies`) at its edge, so the HTTP layer
stays thin, and raises only `magicmix.errors`; it knows nothing of HTTP or of where jobs
run. The same class serves every deployment, through two seams: the store under the
lifecycle (`store.base`), and the `backends.base.Dispatcher` (a local worker thread, or
Modal's GPU class). Background work (the webhook delivery loop, the sweep) is scheduled
by each deployment's composition root.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable

from magicmix import __version__
from magicmix.backends.base import Dispatcher
from magicmix.config import Settings
from magicmix.errors import (
    Busy,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    NotSupported,
)
from magicmix.families import ModelFamily
from magicmix.inputs.images import decode_image, png_bytes
from magicmix.inputs.netguard import check_url
from magicmix.inputs.sources import image_bytes_from_field
from magicmix.jobs import Idempotency, IdempotencyClaim, JobRecord, params_from
from magicmix.keys import Principal
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.routing import OutputRouter
from magicmix.outputs.user_bucket import S3Details
from magicmix.replies import (
    JobOut,
    Links,
    MessageOut,
    ProcessingOut,
    SystemDetailsOut,
    ended_reply,
    meta,
)
from magicmix.request import Submission, random_seed
from magicmix.store.base import KeyStore

log = logging.getLogger(__name__)
REPLY_RESERVE_S = 5.0  # of a request's deadline, kept for the store calls of its reply


class MagicMixService:
    """Everything the API does, minus HTTP."""

    def __init__(
        self,
        *,
        settings: Settings,
        lifecycle: Lifecycle,
        keys: KeyStore,
        outputs: OutputRouter,
        dispatcher: Dispatcher,
        links: Links,
        family: ModelFamily,
    ) -> None:
        self.settings = settings
        self.family = family  # sizes requests that give none
        self.lifecycle = lifecycle
        self.jobs = lifecycle.store
        self.keys = keys
        self.outputs = outputs
        self.dispatcher = dispatcher
        self.links = links
        self._background_work: list[Callable[[], Awaitable[None]]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._seconds_per_job = 5.0  # moving average, feeds `eta`

    # -- life cycle -------------------------------------------------------------------

    def add_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """A loop to run while the service runs (the webhook pump, the local sweep)."""
        self._background_work.append(work)

    async def start(self) -> None:
        self.dispatcher.start()
        for work in self._background_work:
            task = asyncio.ensure_future(work())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.to_thread(self.dispatcher.stop)

    def authenticate(self, key: str, *, admin: bool = False) -> Principal:
        return self.authorize(self.keys.authenticate(key), admin=admin)

    @staticmethod
    def authorize(principal: Principal, *, admin: bool = False) -> Principal:
        """`principal`, if it may use a route (an admin route needs an admin key)."""
        if admin and not principal.admin:
            raise Forbidden("this route needs an admin key (magicmix keys create --admin)")
        return principal

    # -- magic_mix and fetch ----------------------------------------------------------

    async def submit(
        self,
        body: Submission,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        arrived: float | None = None,
    ) -> JobOut:
        """Validate everything up front, queue the job, wait up to the sync window.

        With an `idempotency_key` (IETF httpapi draft semantics, per API key, 24 hours):
        a resend of the same body answers with the first request's job; another body is
        refused (422); while the first is still being accepted, 409.
        The answer leaves within `request_deadline_s` of `arrived` (a `time.monotonic()`).
        """
        deadline = (arrived or time.monotonic()) + self.settings.request_deadline_s
        if idempotency_key is None:
            return await self._submit(body, principal, None, deadline)
        idempotency = Idempotency(idempotency_key, fingerprint(body))
        claim = await asyncio.to_thread(
            self.lifecycle.begin_idempotent, principal.key_id, idempotency
        )
        if not claim.owned:
            return await self._replay(claim, idempotency, deadline)
        try:
            return await self._submit(body, principal, claim, deadline)
        except BaseException:  # refused before a job was made: the key is free again
            await asyncio.to_thread(  # (a key bound to a job is never released)
                self.lifecycle.release_idempotent, principal.key_id, claim
            )
            raise

    async def _replay(
        self, claim: IdempotencyClaim, idempotency: Idempotency, deadline: float
    ) -> JobOut:
        if claim.fingerprint != idempotency.fingerprint:
            raise InvalidInput(
                "this Idempotency-Key was already used with a different request body; use a"
                " new key for a new request",
                field="Idempotency-Key",
            )
        if claim.job_id is None:
            raise Conflict(
                "a request with this Idempotency-Key is still being accepted; retry shortly"
            )
        log.info("job %s: replayed for its Idempotency-Key", claim.job_id)
        job = await self.wait(claim.job_id, self._wait_s(deadline))
        return await asyncio.to_thread(self.reply, job)

    def _wait_s(self, deadline: float) -> float:
        """The sync wait, cut to leave time for the reply before the request's deadline."""
        left = deadline - time.monotonic() - REPLY_RESERVE_S
        return max(0.0, min(self.settings.sync_wait_s, left))

    async def _submit(
        self,
        body: Submission,
        principal: Principal,
        idempotency: IdempotencyClaim | None,
        deadline: float,
    ) -> JobOut:
        # shed load before any fetch; store calls run off the event loop (on Modal they are
        # network round trips, locally a write may wait on SQLite's busy timeout)
        if await asyncio.to_thread(self.jobs.queue_length) >= self.settings.max_queue:
            raise Busy("the queue is full; retry shortly", retry_after=10)
        data = await image_bytes_from_field(
            body.image, self.settings, within_s=deadline - time.monotonic() - REPLY_RESERVE_S
        )
        # decoded once, here, and shrunk to the size the engine needs before anything else
        # (off the event loop); the job keeps that small image, not the upload
        image = await asyncio.to_thread(
            decode_image,
            data,
            max_pixels=self.settings.max_image_pixels,
            max_decoded_bytes=self.settings.max_image_decoded_bytes,
            reduce_to=body.size_for(self.family),
        )
        layout = await asyncio.to_thread(png_bytes, image)
        if body.webhook:
            await asyncio.to_thread(
                check_url,
                body.webhook,
                allow_private=self.settings.allow_private_urls,
                field="webhook",
            )
        params = params_from(
            body,
            family=self.family,
            seed=body.seed if body.seed is not None else random_seed(),
            image_ref=describe_image_field(body.image, len(data)),
        )
        job = await asyncio.to_thread(
            functools.partial(self.lifecycle.create, idempotency=idempotency),
            principal.key_id,
            params,
            layout,
        )
        await self.dispatcher.submit(job)
        job = await self.wait(job.id, self._wait_s(deadline))
        return await asyncio.to_thread(self.reply, job)

    async def fetch(self, job_id: int, principal: Principal) -> JobOut:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or job.key_id != principal.key_id:
            raise NotFound(f"no job with id {job_id} for this key")
        return await asyncio.to_thread(self.reply, job)

    async def wait(self, job_id: int, timeout: float) -> JobRecord:
        """The job once ended, or as it stands after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        job = await asyncio.to_thread(self._get, job_id)
        while not job.status.is_terminal and (left := deadline - time.monotonic()) > 0:
            await self.dispatcher.wait(job_id, left)
            job = await asyncio.to_thread(self._get, job_id)
        if job.result is not None:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * job.result.generation_time
        return job

    def _get(self, job_id: int) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return job

    # -- replies ----------------------------------------------------------------------

    def reply(self, job: JobRecord) -> JobOut:
        """The ModelsLab reply for a job in any state (expired jobs raise `Gone`)."""
        if job.status.is_terminal:
            return ended_reply(job, retention_hours=self.settings.retention_hours)
        ahead = max(self.jobs.queue_length() - 1, 0)
        eta = math.ceil((ahead // self.settings.batch_size + 1) * self._seconds_per_job)
        future = self.outputs.pending_links(job.key_id, job.output_name)
        return ProcessingOut(
            id=job.id,
            eta=eta,
            meta=meta(job),
            future_links=future,
            proxy_links=list(future),
            message="Your image is being processed; fetch the result with the fetch_result"
            " URL (POST with your key).",
            tip="Set `webhook` to be called when the image is ready instead of polling.",
            fetch_result=self.links.fetch(job.id),
            track_id=job.params.track_id,
        )

    # -- admin and details ------------------------------------------------------------

    def system_details(self, principal: Principal) -> SystemDetailsOut:
        engine = self.dispatcher.describe()
        return SystemDetailsOut(
            message="magicmix is running",
            model=engine.model,
            family=engine.family,
            device=engine.device,
            dtype=engine.dtype,
            queue_length=self.jobs.queue_length(),
            version=__version__,
            webhook_secret=principal.webhook_secret,
            s3=self.outputs.describe(principal.key_id),
        )

    async def clear_queue(self) -> MessageOut:
        """Cancel queued jobs in one statement: their waiters wake, their webhooks go. A
        worker that picks one up later finds it cancelled and skips it."""
        cancelled = await asyncio.to_thread(self.lifecycle.cancel_queued)
        return MessageOut(message=f"cancelled {len(cancelled)} queued jobs")

    def clear_cache(self) -> MessageOut:
        return MessageOut(message=self.dispatcher.clear_cache())

    def restart_server(self) -> MessageOut:
        return MessageOut(message=self.dispatcher.reload())

    @staticmethod
    def update_server() -> MessageOut:
        """Never: a new version is deployed, not pulled by a running service."""
        raise NotSupported(
            "magicmix is not updated through the API: redeploy the new version"
            " (`modal deploy modal_app.py`, or restart `magicmix serve`). Nothing"
            " was changed."
        )

    async def update_s3(self, details: S3Details, principal: Principal) -> MessageOut:
        """Prove the details work (write and delete a probe object), then keep them."""
        where = await asyncio.to_thread(self.outputs.save, principal.key_id, details)
        return MessageOut(message=f"S3 details saved; new images of this key go to {where}")

    def reset_s3(self, principal: Principal) -> MessageOut:
        removed = self.outputs.forget(principal.key_id)
        return MessageOut(
            message="S3 details removed; new images go to the service store"
            f" and are deleted after {self.settings.retention_hours:g} hours"
            if removed
            else "no S3 details were saved for this key"
        )

    # -- outputs and the sweep --------------------------------------------------------

    def output(self, name: str) -> bytes:
        return self.outputs.service.get(name)


def fingerprint(body: Submission) -> str:
    """The body as parsed (so spacing and key order do not matter), as a digest."""
    fields = body.model_dump(mode="json", exclude={"key"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def describe_image_field(value: str, size: int) -> str:
    """What `meta.image` echoes: the URL as sent, never megabytes of inline data."""
    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        return text
    return f"inline image ({size} bytes)"
