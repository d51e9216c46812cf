"""What one MagicMix sample asks for, and the checks on it.

Kept free of torch so the web tier (which has no model on Modal) validates requests
exactly as the engine does without importing the deep-learning stack.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from PIL import Image

from magicmix.errors import InvalidInput

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class MixRequest:
    """One MagicMix sample: the layout image, the content prompt and the paper's knobs."""

    image: Image.Image
    prompt: str
    negative_prompt: str = ""
    width: int = 768
    height: int = 768
    kmin: float = 0.3
    kmax: float = 0.5
    mix_factor: float = 0.5
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None

    @property
    def run_steps(self) -> int:
        """UNet evaluations: the last `int(kmax * steps)` timesteps of the schedule."""
        return int(self.kmax * self.steps)

    @property
    def layout_steps(self) -> int:
        """How many of the run steps mix in the noised layout latents."""
        return self.run_steps - int(self.kmin * self.steps)

    def batch_key(self) -> tuple[int, int, int, int, int]:
        """Requests with equal keys share every timestep and can share one UNet batch."""
        return (self.width, self.height, self.steps, self.run_steps, self.layout_steps)


def random_seed() -> int:
    """A seed for requests that sent none; reported back so the image can be reproduced."""
    return secrets.randbelow(2**32)


def validate_request(request: MixRequest, *, vae_scale_factor: int = 8) -> None:
    """Raise `InvalidInput` naming the first bad field; never clamp or crop silently."""
    if not 1 <= request.steps <= 1000:
        raise InvalidInput(f"steps must be 1..1000, got {request.steps}", field="steps")
    if not 0.0 <= request.kmin <= request.kmax <= 1.0:
        raise InvalidInput(
            f"need 0 <= kmin <= kmax <= 1, got kmin={request.kmin}, kmax={request.kmax}",
            field="kmin" if not 0.0 <= request.kmin <= 1.0 else "kmax",
        )
    if request.run_steps < 1:
        raise InvalidInput(
            f"kmax * steps must be at least 1 (kmax={request.kmax}, steps={request.steps}):"
            " there would be no denoising step to run",
            field="kmax",
        )
    if not 0.0 <= request.mix_factor <= 1.0:
        raise InvalidInput(
            f"mix_factor must be in [0, 1], got {request.mix_factor}", field="mix_factor"
        )
    for name in ("width", "height"):
        value = getattr(request, name)
        if value < vae_scale_factor or value % vae_scale_factor:
            raise InvalidInput(
                f"{name} must be a positive multiple of {vae_scale_factor}, got {value}",
                field=name,
            )
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidInput(f"seed must be in 0..{MAX_SEED}, got {request.seed}", field="seed")
