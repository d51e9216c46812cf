"""The dispatcher contract: where jobs run. Implementations: `local.worker.LocalWorker`
(a thread of this process) and `modal.dispatch.ModalDispatcher` (Modal's GPU class).

The service hands each accepted job to a dispatcher and waits through it; state never
lives in a dispatcher (it is the store's), so any process can wait on any job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from magicmix.jobs import JobRecord


@dataclass(frozen=True)
class EngineInfo:
    """What `system_details` says of the model, from wherever it runs."""

    model: str
    family: str
    device: str
    dtype: str


class Dispatcher(Protocol):
    """Where jobs run: the local worker thread, or Modal's GPU class."""

    def start(self) -> None: ...
    def stop(self) -> None: ...

    async def submit(self, job: JobRecord) -> None:
        """See that `job` (queued) will run; failing that, fail it through the lifecycle."""
        ...

    async def wait(self, job_id: int, timeout: float) -> None:
        """Return once the job may have ended, or after `timeout` seconds (never at once
        while it runs: callers re-read the job after each return)."""
        ...

    def describe(self) -> EngineInfo: ...
    def clear_cache(self) -> str: ...
    def reload(self) -> str: ...
