"""The local dispatcher: one thread that owns the engine and drains the shared queue.

It claims the oldest queued job plus compatible ones (up to `batch_size`) through the
lifecycle, holds the claims while the batch runs (`Lifecycle.holding` renews them), and
runs them as one UNet batch. When it wakes from idle it waits `batch_wait_ms` first, so
requests arriving together share a batch; when busy, the queue fills while it works.
Any number of these workers (one per `magicmix serve` replica) may share one database:
claims are atomic, and a worker that dies leaves claims that lapse and are requeued by
the sweep, so no worker ever takes back another's running job.

Waiters on a job that ends in this process are woken at once (`JobWaiters`, a
lifecycle `Notifier`); a job another replica runs is seen by polling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence

from magicmix.backends.base import EngineInfo
from magicmix.jobs import JobRecord
from magicmix.lifecycle import Lifecycle
from magicmix.runner import Engine, JobRunner

log = logging.getLogger(__name__)


class JobWaiters:
    """Futures of requests waiting on jobs, woken from any thread as jobs end."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, set[asyncio.Future[None]]] = {}

    async def wait(self, job_id: int, timeout: float, *, ended: Callable[[], bool]) -> None:
        """Until the job ends here or `timeout` passes; `ended` is checked after
        registering, so an end between the caller's read and this call is never missed."""
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting.setdefault(job_id, set()).add(future)
        try:
            if not await asyncio.to_thread(ended):
                await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiting.get(job_id, set())
            waiting.discard(future)
            if not waiting:
                self._waiting.pop(job_id, None)

    def ended(self, jobs: Sequence[JobRecord]) -> None:
        """The lifecycle's `Notifier`: called once per job that ended, from its thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake, [job.id for job in jobs])

    def _wake(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            for future in self._waiting.get(job_id, ()):
                if not future.done():
                    future.set_result(None)


class LocalWorker:
    """The service's `Dispatcher` in this process, with a background thread."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        runner: JobRunner,
        load_engine: Callable[[], Engine],
        family: str,
        batch_size: int,
        batch_wait_s: float,
        poll_s: float = 1.0,
    ) -> None:
        self._lifecycle = lifecycle
        self._runner = runner
        self._load_engine = load_engine
        self._family = family
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._poll_s = poll_s  # how soon a job ended by another replica is noticed
        self.claimant = f"local:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.waiters = JobWaiters()
        lifecycle.notifiers.add(self.waiters)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._clear = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine: Engine | None = None

    # -- the Dispatcher seam ----------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread. Nothing is requeued here: claims a dead process left
        lapse and the sweep requeues them, whichever replica sweeps."""
        self._thread = threading.Thread(target=self._loop, name="magicmix-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, job: JobRecord) -> None:
        self._wake.set()

    async def wait(self, job_id: int, timeout: float) -> None:
        def ended() -> bool:
            job = self._lifecycle.store.get(job_id)
            return job is None or job.status.is_terminal

        await self.waiters.wait(job_id, min(timeout, self._poll_s), ended=ended)

    def describe(self) -> EngineInfo:
        if self.engine is None:
            return EngineInfo(
                model="loading", family=self._family, device="loading", dtype="loading"
            )
        return EngineInfo(**self.engine.describe())

    def clear_cache(self) -> str:
        self._clear.set()  # done by the worker thread between batches: no race with a mix
        self._wake.set()
        return "cached text embeddings will be dropped before the next batch"

    def reload(self) -> str:
        self._reload.set()
        self._wake.set()
        return "the model will be reloaded before the next batch"

    def wait_ready(self, timeout: float) -> bool:
        """Block until the engine is loaded (tests and benchmarks wait on it)."""
        return self._ready.wait(timeout)

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set() and not self._try_load():
            self._stop.wait(5.0)  # queued jobs wait (they are not lost) until a load works
        self._ready.set()
        while not self._stop.is_set():
            submitted = self._wake.wait(timeout=1.0)  # the timeout only re-checks the queue
            self._wake.clear()
            if self._reload.is_set():
                self._reload.clear()
                self._try_load()  # on failure the previous engine keeps serving
            if self._clear.is_set() and self.engine is not None:
                self._clear.clear()
                log.info("dropped %d cached text embeddings", self.engine.clear_cache())
            if submitted and self._batch_wait_s and not self._stop.is_set():
                time.sleep(self._batch_wait_s)  # let requests arriving together batch up
            try:
                while not self._stop.is_set() and self._drain_one_batch():
                    pass
            except Exception:  # e.g. the database stayed locked: keep the thread alive
                log.exception("worker could not take jobs; retrying shortly")
                self._stop.wait(1.0)
                self._wake.set()

    def _try_load(self) -> bool:
        try:
            self.engine = self._load_engine()
        except Exception:
            log.exception("loading the model failed")
            return False
        log.info("model loaded: %s", self.engine.describe())
        return True

    def _drain_one_batch(self) -> bool:
        batch = self._lifecycle.claim_next(self._batch_size, self.claimant)
        if not batch:
            return False
        assert self.engine is not None  # nosec B101 - loaded before the loop
        try:
            with self._lifecycle.holding(batch):
                self._runner.run(self.engine, batch)
        except Exception:  # the runner ends jobs itself; this is a bug guard
            log.exception("worker failed on jobs %s", [job.id for job in batch])
            for job in batch:
                self._lifecycle.fail(job.id, "internal error", claimant=job.claimant)
        return True
