"""One MagicMix request, written once: the seed's fields, defaults and limits.

`EngineParams` holds the paper's knobs and the prompts, the seed's defaults and the rules
every mix must meet; `MixParams` narrows it to ModelsLab's bounds. Everything else derives
from them: the wire schema (`http.schemas.MagicMixIn`) and the job record
(`jobs.JobParams`) extend `Submission`, the engine's `MixRequest` takes its defaults from
here and is checked by `validate_request` with `EngineParams`, and the CLI's `mix` and
`sweep` options read their defaults and help text from `PARAMS`. A request is validated
once on its way in, by the schema. Torch-free, so the web tier validates as the engine does.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo

from magicmix.errors import InvalidInput
from magicmix.families import DEFAULT, FAMILIES, ModelFamily

MAX_SEED = 2**63 - 1
MAX_TRACK_ID_CHARS = 256
# RFC 8259's number: what a number sent as a string must look like (ASCII digits only;
# no spaces, `+`, `_`, leading zeros or bare `.5`, which Python's int() and float() take)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
SIZE_STEP = 8  # SD's VAE downsamples by 8; sizes are rounded down to a multiple of it
Params = TypeVar("Params", bound=BaseModel)


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


NATIVE_SIZES = " or ".join(f"{f.native_size} ({f.title})" for f in FAMILIES.values())
SIZE_HELP = f"{NATIVE_SIZES} unless given; rounded down to a multiple of 8"


class EngineParams(BaseModel):
    """The prompts and the paper's knobs as any caller may ask the engine for them: the
    seed's defaults, the rules every mix must meet (kmin <= kmax, at least one step to
    run), and the engine's own bounds (a library caller may ask for 64 px or 1000 steps).

    The API's schema narrows it (`MixParams`), so the engine checks a request it is handed
    (`validate_request`) with the very code that validated it on its way in.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(..., description="Content to mix in")
    negative_prompt: Text = Field("", description="What to avoid")
    width: Int | None = Field(None, ge=SIZE_STEP, description=SIZE_HELP)
    height: Int | None = Field(None, ge=SIZE_STEP, description=SIZE_HELP)
    # steps before kmin and kmax: the schedule's rules below read it when checking kmax
    steps: Int = Field(20, ge=1, le=1000, description="Denoising steps of the full schedule")
    kmin: Float = Field(
        0.3, ge=0, allow_inf_nan=False, le=1, description="Where the content phase starts"
    )
    kmax: Float = Field(
        0.5, ge=0, allow_inf_nan=False, le=1, description="How far the layout is noised"
    )
    mix_factor: Float = Field(
        0.5, ge=0, allow_inf_nan=False, le=1, description="Weight of the denoised latents"
    )
    guidance_scale: Float = Field(
        7.5, ge=0, allow_inf_nan=False, description="Classifier-free guidance"
    )
    seed: Int | None = Field(None, ge=0, le=MAX_SEED, description="null = random")

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("kmax")
    @classmethod
    def _a_schedule_to_run(cls, value: float, info: ValidationInfo) -> float:
        """kmin <= kmax, and at least one denoising step: int(kmax * steps) >= 1."""
        kmin, steps = info.data.get("kmin"), info.data.get("steps")
        if kmin is not None and kmin > value:
            raise ValueError(f"kmax ({value}) must not be less than kmin ({kmin})")
        if steps is not None and int(value * steps) < 1:
            raise ValueError(
                f"kmax * steps must be at least 1 (kmax={value}, steps={steps}): there would"
                " be no denoising step to run"
            )
        return value


class MixParams(EngineParams):
    """What the API (and the CLI) accept: `EngineParams` within ModelsLab's limits.

    Width and height outside multiples of 8 are accepted, as the contract says, and
    rounded down by `size_for`; the reply's `meta` reports both (`W`/`H` used,
    `W_requested`/`H_requested` asked).
    """

    prompt: Text = Field(..., min_length=1, max_length=2000, description="Content to mix in")
    negative_prompt: Text = Field("", max_length=2000, description="What to avoid")
    width: Int | None = Field(None, ge=256, le=1024, description=SIZE_HELP)
    height: Int | None = Field(None, ge=256, le=1024, description=SIZE_HELP)
    steps: Int = Field(20, ge=1, le=50, description="Denoising steps of the full schedule")
    guidance_scale: Float = Field(
        7.5, ge=0, allow_inf_nan=False, le=30, description="Classifier-free guidance"
    )

    def size_for(self, family: ModelFamily) -> tuple[int, int]:
        """(width, height) to run: as asked, else the model family's native size, rounded
        down to a multiple of 8 (SD's VAE works on 8x8 pixel blocks); the one rounding."""
        native = family.native_size
        width, height = self.width or native, self.height or native
        return width // SIZE_STEP * SIZE_STEP, height // SIZE_STEP * SIZE_STEP


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
    width: int = DEFAULT.native_size
    height: int = DEFAULT.native_size
    kmin: float = default("kmin")
    kmax: float = default("kmax")
    mix_factor: float = default("mix_factor")
    steps: int = default("steps")
    guidance_scale: float = default("guidance_scale")
    seed: int | None = None

    @property
    def run_steps(self) -> int:
        """UNet evaluations: the last `int(kmax * steps)` timesteps of the schedule."""
        return schedule_steps(self.steps, self.kmin, self.kmax)[0]

    @property
    def layout_steps(self) -> int:
        """How many of the run steps mix in the noised layout latents."""
        return schedule_steps(self.steps, self.kmin, self.kmax)[1]

    def batch_key(self) -> tuple[int, int, int, int, int]:
        """Requests with equal keys share every timestep and can share one UNet batch."""
        return batch_key(self.width, self.height, self.steps, self.kmin, self.kmax)


def batch_key(
    width: int, height: int, steps: int, kmin: float, kmax: float
) -> tuple[int, int, int, int, int]:
    """(size, steps, run steps, layout steps): what jobs must share to share UNet batches."""
    return (width, height, steps, *schedule_steps(steps, kmin, kmax))


def schedule_steps(steps: int, kmin: float, kmax: float) -> tuple[int, int]:
    """(run steps, layout steps): the UNet runs the last `int(kmax * steps)` timesteps, and
    all but the last `int(kmin * steps)` of them mix in the noised layout latents."""
    run = int(kmax * steps)
    return run, run - int(kmin * steps)


ENGINE_FIELDS = frozenset(MixRequest.__dataclass_fields__) - {"image"}


def random_seed() -> int:
    """A seed for requests that sent none; reported back so the image can be reproduced."""
    return secrets.randbelow(2**32)


def validated(model: type[Params], values: dict[str, Any]) -> Params:
    """`values` as `model`, or `InvalidInput` naming the first field it refuses."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidInput(str(first["msg"]).removeprefix("Value error, "), field=field) from err


def validate_request(request: MixRequest, *, vae_scale_factor: int = SIZE_STEP) -> None:
    """Raise `InvalidInput` naming the first bad field; never clamp or crop silently.

    The rules are `EngineParams`' (the code the API's schema runs too, with the engine's
    wider bounds); the size must also fit the model's latent grid.
    """
    validated(EngineParams, {name: getattr(request, name) for name in ENGINE_FIELDS})
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % vae_scale_factor:
            raise InvalidInput(
                f"{name} must be a multiple of {vae_scale_factor}, got {value}", field=name
            )
