"""The web side's `Dispatcher` on Modal: jobs run in the GPU class, spawned per job.

Each spawn gets a token (`"JOB:TOKEN"` is the GPU method's input), and the token is the
claimant of the job's run: Modal's retry of that input re-claims its own job, while a
second input for the same job (a re-spawn by the sweep) finds it taken and skips. The
spawned call's id is kept in the `jobs` Dict (`call:N`), so any web container can wait
on it, and a cancel (clear_queue) can cancel it. Waiting is on the call itself: it
returns when the GPU answered, then the service re-reads the job from the Dict.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from magicmix.backends.modal.state import DictLike
from magicmix.jobs import JobRecord, JobStatus
from magicmix.lifecycle import Lifecycle
from magicmix.service import EngineInfo

log = logging.getLogger(__name__)


class GpuCalls(Protocol):
    """Spawning and following GPU runs: Modal's `FunctionCall`s, or a stand-in in tests."""

    async def spawn(self, job_input: str) -> str:
        """Start `MagicMix.run(job_input)`; the spawned call's id."""
        ...

    async def wait(self, call_id: str, timeout: float) -> None:
        """Return when the call ended or `timeout` passed; raise if the run crashed."""
        ...

    async def cancel(self, call_id: str) -> None: ...


def job_input(job_id: int, token: str) -> str:
    return f"{job_id}:{token}"


def parse_job_input(value: str) -> tuple[int, str]:
    job_id, _, token = value.partition(":")
    return int(job_id), token


class ModalDispatcher:
    """Hands jobs to the GPU class and follows their calls; state stays in the Dicts."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        calls: DictLike,
        gpu: GpuCalls,
        engine: EngineInfo,
        flush_webhooks: Callable[[], None],
        poll_s: float = 1.0,
    ) -> None:
        self._lifecycle = lifecycle
        self._calls = calls
        self._gpu = gpu
        self._engine = engine
        self._flush_webhooks = flush_webhooks
        self._poll_s = poll_s

    def start(self) -> None:
        """Nothing to start: Modal starts GPU containers on demand."""

    def stop(self) -> None:
        """Nothing to stop: spawned runs belong to Modal and outlive this container."""

    async def submit(self, job: JobRecord) -> None:
        try:
            call_id = await self._gpu.spawn(job_input(job.id, secrets.token_hex(8)))
        except Exception:
            log.exception("could not spawn the GPU run of job %s", job.id)
            await asyncio.to_thread(
                self._lifecycle.fail, job.id, "the job could not be started on a GPU; please retry"
            )
            await asyncio.to_thread(self._flush_webhooks)  # a spawn: a blocking Modal call
            return
        await asyncio.to_thread(self._calls.put, f"call:{job.id}", call_id)

    async def wait(self, job_id: int, timeout: float) -> None:
        call_id = await asyncio.to_thread(self._calls.get, f"call:{job_id}")
        if call_id is None:  # not spawned (yet): poll the store
            await asyncio.sleep(min(timeout, self._poll_s))
            return
        started = time.monotonic()
        try:
            await self._gpu.wait(call_id, timeout)
        except Exception:  # our code ends every job it claims: this is a dead container
            log.exception("GPU run of job %s crashed", job_id)
            failed = await asyncio.to_thread(
                self._lifecycle.fail, job_id, "the GPU worker stopped while running this job"
            )
            if failed is not None:
                await asyncio.to_thread(self._flush_webhooks)
            await asyncio.sleep(max(0.0, min(self._poll_s, timeout - (time.monotonic() - started))))

    async def cancel(self, job_ids: list[int]) -> None:
        """Cancel the spawned calls of cancelled jobs, so no GPU starts to skip them.

        Best effort: a call already inside a running batch cancels that batch (Modal
        cancels a batch as one); the GPU side then requeues the jobs it had claimed.
        """
        await asyncio.to_thread(self._flush_webhooks)
        for job_id in job_ids:
            call_id = await asyncio.to_thread(self._calls.get, f"call:{job_id}")
            if call_id is None:
                continue
            try:
                await self._gpu.cancel(call_id)
            except Exception:  # the call may be finished or expired already
                log.warning("could not cancel the GPU call of job %s", job_id)

    async def respawn_stuck(self, jobs: list[JobRecord], *, older_than_s: float) -> list[int]:
        """Spawn again queued jobs whose spawn was lost (the sweep calls this)."""
        now = time.time()
        stuck = [
            job
            for job in jobs
            if job.status is JobStatus.QUEUED
            and job.created_at < now - older_than_s
            and await asyncio.to_thread(self._calls.get, f"call:{job.id}") is None
        ]
        for job in stuck:
            await self.submit(job)
        return [job.id for job in stuck]

    def describe(self) -> EngineInfo:
        return self._engine

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
