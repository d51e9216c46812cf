"""One MagicMix request, written once: the seed's fields, defaults and limits.

`MixParams` holds the paper's knobs and the prompts with ModelsLab's defaults and bounds.
Everything else derives from it: the wire schema (`http.schemas.MagicMixIn`) and the job
record (`jobs.JobParams`) extend `Submission`, the engine's `MixRequest` takes its
defaults from here, and the CLI's `mix` and `sweep` options read their defaults and help
text from `PARAMS`. Torch-free, so the web tier validates exactly as the engine does.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo

from magicmix.errors import InvalidInput
from magicmix.families import DEFAULT_SIZE

MAX_SEED = 2**63 - 1
MAX_TRACK_ID_CHARS = 256
# RFC 8259's number: what a number sent as a string must look like (ASCII digits only;
# no spaces, `+`, `_`, leading zeros or bare `.5`, which Python's int() and float() take)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
SIZE_STEP = 8  # SD's VAE downsamples by 8; sizes are rounded down to a multiple of it


def _valid_text(value: str) -> str:
    """Refuse strings that are not Unicode text: JSON's `"\\ud800"` decodes to a lone
    surrogate, which no encoder (SQLite's, a JSON reply's) can write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"must be valid Unicode text (a lone surrogate is at position {err.start})"
        ) from err
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A string field of a request: any Unicode text, and only that."""


def _strict_number(value: Any) -> Any:
    """Refuse what pydantic's lax mode would turn into a number: `true`/`false` (1/0), and
    strings such as `"1_000"`, `" 20 "` or `"+5"`. A number sent as a string is accepted
    (real clients send `"20"`) when it is written as JSON writes numbers."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    if isinstance(value, str) and not _JSON_NUMBER.fullmatch(value):
        raise ValueError(
            f"must be a number written as JSON writes it (e.g. 20 or 0.5), got {value!r}"
        )
    return value


Int = Annotated[int, BeforeValidator(_strict_number)]
"""An integer field of a request: a JSON integer, or a string holding one."""
Float = Annotated[float, BeforeValidator(_strict_number)]
"""A number field of a request: a JSON number, or a string holding one."""


class MixParams(BaseModel):
    """The prompts and the paper's knobs, with the seed's defaults and ModelsLab's limits."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(..., min_length=1, max_length=2000, description="Content to mix in")
    negative_prompt: Text = Field("", max_length=2000, description="What to avoid")
    width: Int | None = Field(
        None,
        ge=256,
        le=1024,
        description="768 (SD 1.x) or 1024 (SDXL) unless given; rounded down to a multiple of 8",
    )
    height: Int | None = Field(
        None,
        ge=256,
        le=1024,
        description="768 (SD 1.x) or 1024 (SDXL) unless given; rounded down to a multiple of 8",
    )
    kmin: Float = Field(
        0.3, ge=0, allow_inf_nan=False, le=1, description="Where the content phase starts"
    )
    kmax: Float = Field(
        0.5, ge=0, allow_inf_nan=False, le=1, description="How far the layout is noised"
    )
    mix_factor: Float = Field(
        0.5, ge=0, allow_inf_nan=False, le=1, description="Weight of the denoised latents"
    )
    steps: Int = Field(20, ge=1, le=50, description="Denoising steps of the full schedule")
    guidance_scale: Float = Field(
        7.5, ge=0, allow_inf_nan=False, le=30, description="Classifier-free guidance"
    )
    seed: Int | None = Field(None, ge=0, le=MAX_SEED, description="null = random")

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("width", "height")
    @classmethod
    def _round_down(cls, value: int | None) -> int | None:
        return None if value is None else value // SIZE_STEP * SIZE_STEP

    def size_for(self, family: str) -> tuple[int, int]:
        """(width, height): as asked, else the model family's native size."""
        native = DEFAULT_SIZE[family]
        return self.width or native, self.height or native

    @field_validator("kmax")
    @classmethod
    def _kmin_not_above_kmax(cls, value: float, info: ValidationInfo) -> float:
        kmin = info.data.get("kmin")
        if kmin is not None and kmin > value:
            raise ValueError(f"kmax ({value}) must not be less than kmin ({kmin})")
        return value


PARAMS: dict[str, FieldInfo] = MixParams.model_fields


def default(name: str) -> Any:
    """The seed's default for one `MixParams` field (the CLI's option defaults)."""
    return PARAMS[name].default


def describe(name: str) -> str:
    """The help text of one `MixParams` field."""
    return PARAMS[name].description or name


class Submission(MixParams):
    """What a client submits besides its key: the params, the layout image, where to report."""

    image: Text = Field(
        ..., min_length=1, description="Layout image: http(s) URL, data: URI or base64"
    )
    samples: Int = Field(1, ge=1, le=1, description="Images per request (max 1)")
    webhook: Text | None = Field(None, max_length=2048, description="POSTed the final reply")
    track_id: Text | int | None = Field(
        None,
        union_mode="left_to_right",
        description="Echoed in the webhook body: a string (at most 256 characters) or a"
        " 64-bit integer",
    )

    @field_validator("track_id", mode="before")
    @classmethod
    def _bounded_track_id(cls, value: Any) -> Any:
        """Bounded whatever its JSON type: it is stored and echoed in every reply."""
        if isinstance(value, bool) or not isinstance(value, str | int | None):
            raise ValueError("must be a string or an integer")
        if isinstance(value, int) and not -MAX_SEED - 1 <= value <= MAX_SEED:
            raise ValueError("as an integer, must fit in 64 bits (-2**63 .. 2**63-1)")
        if isinstance(value, str) and len(value) > MAX_TRACK_ID_CHARS:
            raise ValueError(f"must be at most {MAX_TRACK_ID_CHARS} characters")
        return value

    @field_validator("webhook")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


@dataclass(frozen=True)
class MixRequest:
    """One MagicMix sample as the engine runs it: the layout image plus `MixParams`."""

    image: Image.Image
    prompt: str
    negative_prompt: str = default("negative_prompt")
    width: int = DEFAULT_SIZE["sd1"]
    height: int = DEFAULT_SIZE["sd1"]
    kmin: float = default("kmin")
    kmax: float = default("kmax")
    mix_factor: float = default("mix_factor")
    steps: int = default("steps")
    guidance_scale: float = default("guidance_scale")
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


ENGINE_FIELDS = frozenset(MixRequest.__dataclass_fields__) - {"image"}


def random_seed() -> int:
    """A seed for requests that sent none; reported back so the image can be reproduced."""
    return secrets.randbelow(2**32)


def validate_request(request: MixRequest, *, vae_scale_factor: int = SIZE_STEP) -> None:
    """Raise `InvalidInput` naming the first bad field; never clamp or crop silently.

    The engine's own bounds, looser than the API's (`MixParams`): a library caller may ask
    for 1000 steps or 2048 px; what no model can run is refused here.
    """
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
