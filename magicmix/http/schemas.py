"""Wire schemas: ModelsLab's exact field names in, ModelsLab's reply shapes out.

Requests ignore unknown fields (as ModelsLab does) and accept numbers sent as strings
("20"), as real clients send them. Internal code uses `jobs.JobParams`, not these.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from magicmix.mix_request import MAX_SEED

SEED_EXAMPLE: dict[str, Any] = {
    "key": "your-api-key",
    "prompt": "Bed",
    "height": 768,
    "width": 768,
    "image": "https://user-images.githubusercontent.com/59410571/209578593-141467c7-d831-4792-8b9a-b17dc5e47816.jpg",
    "kmax": 0.5,
    "kmin": 0.3,
    "mix_factor": 0.5,
    "samples": 1,
    "negative_prompt": "low quality",
    "seed": 1829183163,
    "steps": 20,
    "webhook": None,
    "track_id": None,
}


class KeyIn(BaseModel):
    """Every request carries the API key in the body, as ModelsLab's clients send it."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"example": {"key": "your-api-key"}}
    )

    key: str = Field(..., min_length=1, max_length=256, description="Your API key")


class MagicMixIn(KeyIn):
    """Body of `POST /api/v1/enterprise/image_editing/magic_mix` (defaults from the seed)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": SEED_EXAMPLE})

    prompt: str = Field(..., min_length=1, max_length=2000, description="Content to mix in")
    negative_prompt: str | None = Field("", max_length=2000, description="What to avoid")
    image: str = Field(
        ..., min_length=1, description="Layout image: http(s) URL, data: URI or base64"
    )
    width: int = Field(768, ge=256, le=1024, description="Rounded down to a multiple of 8")
    height: int = Field(768, ge=256, le=1024, description="Rounded down to a multiple of 8")
    kmin: float = Field(0.3, ge=0, le=1, description="Where the content phase starts")
    kmax: float = Field(0.5, ge=0, le=1, description="How far the layout is noised")
    mix_factor: float = Field(0.5, ge=0, le=1, description="Weight of the denoised latents")
    steps: int = Field(20, ge=1, le=50, description="Denoising steps of the full schedule")
    samples: int = Field(1, ge=1, le=1, description="Images per request (max 1)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null = random")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance")
    webhook: str | None = Field(None, max_length=2048, description="POSTed the final reply")
    track_id: str | int | None = Field(
        None, union_mode="left_to_right", description="Echoed in the webhook body"
    )

    @field_validator("track_id")
    @classmethod
    def _short_track_id(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str) and len(value) > 256:
            raise ValueError("track_id must be at most 256 characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _round_down_to_8(cls, value: int) -> int:
        return value // 8 * 8

    @field_validator("negative_prompt")
    @classmethod
    def _none_is_empty(cls, value: str | None) -> str:
        return value or ""

    @field_validator("webhook")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("kmax")
    @classmethod
    def _kmin_not_above_kmax(cls, value: float, info: ValidationInfo) -> float:
        kmin = info.data.get("kmin")
        if kmin is not None and kmin > value:
            raise ValueError(f"kmax ({value}) must not be less than kmin ({kmin})")
        return value


class UpdateS3In(KeyIn):
    """Body of `POST /api/v1/enterprise/update_s3` (ModelsLab's fields, plus `bucket`)."""

    deploy_type: str | None = Field(None, max_length=64)
    public_url: str | None = Field(None, max_length=1024)
    region_name: str | None = Field(None, max_length=64)
    endpoint_url: str | None = Field(None, max_length=1024)
    aws_access_key_id: str = Field(..., min_length=1, max_length=256)
    aws_secret_access_key: str = Field(..., min_length=1, max_length=512)
    image_directory: str | None = Field("", max_length=512)
    bucket: str | None = Field(None, max_length=255)


class ResetS3In(KeyIn):
    deploy_type: str | None = Field(None, max_length=64)


# --- replies ---------------------------------------------------------------------------


class Meta(BaseModel):
    """The seed's `meta` block, echoing what was run (with the seed actually used)."""

    H: int
    W: int
    file_prefix: str
    image: str
    kmax: float
    kmin: float
    mix_factor: float
    n_samples: int
    negative_prompt: str
    outdir: str
    prompt: str
    seed: int
    steps: int
    guidance_scale: float


class SuccessOut(BaseModel):
    status: Literal["success"] = "success"
    generationTime: float
    id: int
    output: list[str]
    meta: Meta
    message: str | None = None
    track_id: str | int | None = None


class ProcessingOut(BaseModel):
    status: Literal["processing"] = "processing"
    id: int
    eta: float
    message: str
    tip: str
    fetch_result: str
    output: list[str] = []
    future_links: list[str]
    meta: Meta
    track_id: str | int | None = None


class FailedOut(BaseModel):
    status: Literal["failed"] = "failed"
    id: int
    message: str
    track_id: str | int | None = None


class ErrorOut(BaseModel):
    status: Literal["error"] = "error"
    message: str
    errors: dict[str, str] | None = None
    retry_after: float | None = None


class MessageOut(BaseModel):
    status: Literal["success", "error"] = "success"
    message: str


class SystemDetailsOut(MessageOut):
    model: str
    device: str
    dtype: str
    queue_length: int
    version: str
    webhook_secret: str
    s3: dict[str, Any] | None = None


JobOut = SuccessOut | ProcessingOut | FailedOut
