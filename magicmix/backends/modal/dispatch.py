"""The web side's `Dispatcher` on Modal: jobs run in the GPU class, one spawned input each.

Each spawn gets a token (`"JOB:TOKEN"` is the GPU method's input), and the token is the
claimant of the job's run: Modal's retry of that input re-claims its own job, while a
second input for the same job (a re-spawn) finds it taken and skips it. The spawned
call's id is kept on the job (`call_id`), so any web container can wait on it and the
sweep can tell a lost call from a live one.

Nothing here ever cancels a GPU call: every input of one `@modal.batched` call shares
one context, and cancelling any of them terminates the whole batch, other keys' jobs
included (modal `_runtime/container_io_manager.py`, `FunctionCall.cancel`). A job that
clear_queue cancels is simply a state its input finds when it tries to claim it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Protocol

from magicmix.backends.base import EngineInfo
from magicmix.jobs import JobRecord
from magicmix.lifecycle import Lifecycle

log = logging.getLogger(__name__)

RESPAWN_AFTER_S = 120.0  # a queued job this old whose call is gone or over is spawned again
RESPAWN_CHECKS = 64  # calls looked at per sweep, oldest jobs first


class GpuCalls(Protocol):
    """Spawning and following GPU runs: Modal's `FunctionCall`s (`calls.ModalGpuCalls`)."""

    async def spawn(self, job_input: str) -> str:
        """Start `MagicMix.run(job_input)`; the spawned call's id."""
        ...

    async def wait(self, call_id: str, timeout: float) -> bool:
        """Wait up to `timeout` for the call to end; whether it has ended (returned,
        failed for good, or is unknown to Modal)."""
        ...


def job_input(job_id: int, token: str) -> str:
    return f"{job_id}:{token}"


def parse_job_input(value: str) -> tuple[int, str]:
    job_id, _, token = value.partition(":")
    return int(job_id), token


class ModalDispatcher:
    """Hands jobs to the GPU class and follows their calls; state stays in the store."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        gpu: GpuCalls,
        engine: EngineInfo,
        poll_s: float = 1.0,
    ) -> None:
        self._lifecycle = lifecycle
        self._store = lifecycle.store
        self._gpu = gpu
        self._engine = engine
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
                self._lifecycle.fail,
                job.id,
                "the job could not be started on a GPU; please retry",
                expected={job.status},
            )
            return
        await asyncio.to_thread(self._store.set_call, job.id, call_id)

    async def wait(self, job_id: int, timeout: float) -> None:
        """Wait on the job's call while it runs; once the call is over (or there is none
        yet), poll the store every `poll_s`. Never returns at once while the job is
        active, so a waiter does at most a few store reads and one Modal call a second."""
        started = time.monotonic()
        job = await asyncio.to_thread(self._store.get, job_id)
        if job is None or job.status.is_terminal:
            return
        if job.call_id is not None:
            ended = await self._gpu.wait(job.call_id, timeout)
            if not ended:
                return  # the whole timeout went by with the call still running
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is None or job.status.is_terminal:
                return
        # the call is over (retried by Modal, re-spawned by the sweep) or not made yet
        left = timeout - (time.monotonic() - started)
        await asyncio.sleep(max(0.0, min(self._poll_s, left)))

    async def respawn_lost(self, older_than_s: float = RESPAWN_AFTER_S) -> list[int]:
        """Spawn again queued jobs whose call is gone: never made (the spawn failed after
        the insert), over (Modal gave up on it, then its claim lapsed and the sweep
        requeued the job), or unknown (`modal app stop`, a call past its 7 days)."""
        old = await asyncio.to_thread(
            self._store.queued, created_before=time.time() - older_than_s, limit=RESPAWN_CHECKS
        )
        lost = [job for job in old if job.call_id is None or await self._gpu.wait(job.call_id, 0)]
        for job in lost:
            await self.submit(job)
        if lost:
            log.warning("re-spawned the GPU runs of jobs %s", [job.id for job in lost])
        return [job.id for job in lost]

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
