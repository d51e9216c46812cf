"""An in-process stand-in for spawning Modal's GPU class, for the backend's unit tests.

`InlineGpuCalls` implements `backends.modal.dispatch.GpuCalls` with the documented
semantics of `Function.spawn` and `FunctionCall.get` that the dispatcher relies on, and
nothing more (modal 1.6.4, `modal/_functions.py`; https://modal.com/docs/guide/job-queue):
- `spawn(...)` "calls the function with the given arguments, without waiting for the
  results" and returns a `FunctionCall` whose `object_id` identifies it;
- `FunctionCall.get(timeout=...)` returns the result, raises the built-in `TimeoutError`
  while the call runs, and raises the function's error once Modal stopped retrying it;
  a call id Modal does not know raises too.
Each spawned call runs its input alone, in a thread, with no retries: the rehearsal
(`scripts/modal-rehearsal`) emulates batching, retries, crashes and cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class InlineGpuCalls:
    """Each spawn runs `worker([job_input])` in a thread of its own."""

    worker: Callable[[list[str]], list[str]] | None = None
    spawned: list[str] = field(default_factory=list)
    waits: int = 0  # `wait` calls made, finished calls included
    fail_spawn: bool = False
    calls: dict[str, concurrent.futures.Future[list[str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def spawn(self, job_input: str) -> str:
        if self.fail_spawn:
            raise ConnectionError("modal is unreachable")
        worker = self.worker
        assert worker is not None
        with self._lock:
            self.spawned.append(job_input)
            call_id = f"fc-{len(self.spawned)}"
        future: concurrent.futures.Future[list[str]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(worker([job_input]))
            except BaseException as err:  # failed for good: `get` raises a modal error
                future.set_exception(RuntimeError(f"the remote call failed: {err!r}"))

        self.calls[call_id] = future
        threading.Thread(target=run, daemon=True).start()
        return call_id

    async def wait(self, call_id: str, timeout: float) -> bool:
        self.waits += 1
        future = self.calls.get(call_id)
        if future is None:
            return True  # unknown to Modal: over
        if future.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            return False
        except Exception:  # failed for good: over
            return True
        return True

    def join(self, timeout: float = 60.0) -> None:
        """Wait for every call spawned so far (tests: before asserting on the outcome)."""
        concurrent.futures.wait(list(self.calls.values()), timeout)
