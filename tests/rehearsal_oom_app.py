"""modal_app.py on a GPU with little memory: a UNet batch over more than `GPU_PIXELS`
pixels raises CUDA's out-of-memory error, as a real GPU does for a batch too large.

The app is modal_app.py's, unchanged (`app` is its object); only the engine's device is
emulated, in the GPU image's containers (the control plane and the web containers do
not import torch). For `tests/test_rehearsal_findings.py`: one size group of a Modal
batch fails, the others must not.
"""

from __future__ import annotations

from typing import Any

from modal_app import app, gpu_image

GPU_PIXELS = 512 * 512 - 1  # a 512 x 512 job does not fit; two 256 x 256 jobs do

with gpu_image.imports():
    import torch

    from magicmix.engine import MagicMixEngine

    _mix = MagicMixEngine.mix

    def _mix_within_memory(self: MagicMixEngine, requests: Any, **options: Any) -> Any:
        pixels = sum(request.width * request.height for request in requests)
        if pixels > GPU_PIXELS:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (emulated: a batch of {pixels} pixels, at most {GPU_PIXELS})"
            )
        return _mix(self, requests, **options)

    MagicMixEngine.mix = _mix_within_memory  # type: ignore[method-assign]

__all__ = ["app"]
