"""`GpuCalls` on Modal: spawn the GPU class's method and follow its `FunctionCall`s.

`FunctionCall.get(timeout=...)` raises the built-in `TimeoutError` while the call runs
(modal 1.6 `_functions.py`), returns its result once it returned, and raises the remote
error once Modal gave up retrying it; an id Modal no longer knows raises too.
"""

from __future__ import annotations

import logging
from typing import Any

import modal

log = logging.getLogger(__name__)


class ModalGpuCalls:
    """The real thing behind `dispatch.GpuCalls`, over a method such as `MagicMix().run`."""

    def __init__(self, method: Any) -> None:
        self._method = method

    async def spawn(self, job_input: str) -> str:
        call = await self._method.spawn.aio(job_input)
        return str(call.object_id)

    async def wait(self, call_id: str, timeout: float) -> bool:
        try:
            await modal.FunctionCall.from_id(call_id).get.aio(timeout=timeout)
        except TimeoutError:  # still running (or still waiting for a container)
            return False
        except Exception as err:  # failed for good, or unknown: either way it is over
            log.info("GPU call %s is over: %s", call_id, type(err).__name__)
        return True
