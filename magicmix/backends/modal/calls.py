"""`GpuCalls` on Modal: spawn the GPU class's method, follow and cancel its `FunctionCall`s."""

from __future__ import annotations

from typing import Any

import modal


class ModalGpuCalls:
    """The real thing behind `dispatch.GpuCalls`, over a method such as `MagicMix().run`."""

    def __init__(self, method: Any) -> None:
        self._method = method

    async def spawn(self, job_input: str) -> str:
        call = await self._method.spawn.aio(job_input)
        return str(call.object_id)

    async def wait(self, call_id: str, timeout: float) -> None:
        try:
            await modal.FunctionCall.from_id(call_id).get.aio(timeout=timeout)
        except TimeoutError:  # still running: `get` raises the built-in TimeoutError
            return

    async def cancel(self, call_id: str) -> None:
        await modal.FunctionCall.from_id(call_id).cancel.aio()
