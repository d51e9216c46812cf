"""The local worker: one thread that owns the engine and drains the SQLite queue.

It claims the oldest queued job plus compatible ones (up to `batch_size`) and runs them
as one UNet batch. When it wakes from idle it waits `batch_wait_ms` first, so requests
arriving together share a batch; when busy, the queue fills while it works.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from magicmix.engine import MagicMixEngine
from magicmix.jobs import JobRecord, SqliteJobStore
from magicmix.runner import JobRunner

log = logging.getLogger(__name__)


class LocalWorker:
    """Implements the service's `Worker` seam in-process, with a background thread."""

    def __init__(
        self,
        *,
        jobs: SqliteJobStore,
        runner: JobRunner,
        load_engine: Callable[[], MagicMixEngine],
        batch_size: int,
        batch_wait_s: float,
    ) -> None:
        self._jobs = jobs
        self._runner = runner
        self._load_engine = load_engine
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._clear = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine: MagicMixEngine | None = None
        self.on_finished: Callable[[list[JobRecord]], None] = lambda records: None

    # -- the Worker seam --------------------------------------------------------------

    def start(self) -> None:
        requeued = self._jobs.requeue_interrupted()
        if requeued:
            log.info("requeued %d jobs interrupted by the last shutdown", requeued)
        self._thread = threading.Thread(target=self._loop, name="magicmix-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: JobRecord) -> None:
        self._wake.set()

    async def wait(self, job_id: int, timeout: float) -> None:
        """Completion is pushed through `on_finished`; nothing to poll here."""
        await asyncio.sleep(timeout)

    def describe(self) -> dict[str, str]:
        if self.engine is None:
            return {"model": "loading", "device": "loading", "dtype": "loading"}
        return self.engine.describe()

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
        batch = self._jobs.claim(self._batch_size)
        if not batch:
            return False
        assert self.engine is not None  # nosec B101 - loaded before the loop
        try:
            finished = self._runner.run(self.engine, batch)
        except Exception:  # the runner records job failures itself; this is a bug guard
            log.exception("worker failed on jobs %s", [job.id for job in batch])
            finished = [self._jobs.fail(job.id, "internal error") for job in batch]
        self.on_finished(finished)
        return True
