"""Wire schemas of requests: ModelsLab's exact field names, and the error body.

Requests ignore unknown fields (as ModelsLab does) and accept numbers sent as strings
("20"), as real clients send them, when the string is written as a JSON number: no
booleans for numbers, no `"1_000"`, `" 20 "` or `"+5"` (`request.Int`, `request.Float`).
The reply bodies are `magicmix.replies` (webhooks send them too); internal code uses
`jobs.JobParams`, not these.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from magicmix.request import Submission, Text

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

    key: Text = Field(..., min_length=1, max_length=256, description="Your API key")


class MagicMixIn(KeyIn, Submission):
    """Body of `POST /api/v1/enterprise/image_editing/magic_mix`: a `Submission` plus the key.

    Fields, defaults and limits are `magicmix.request`'s, written once there.
    """

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": SEED_EXAMPLE})


class UpdateS3In(KeyIn):
    """Body of `POST /api/v1/enterprise/update_s3` (ModelsLab's fields, plus `bucket`)."""

    deploy_type: Text | None = Field(None, max_length=64)
    public_url: Text | None = Field(None, max_length=1024)
    region_name: Text | None = Field(None, max_length=64)
    endpoint_url: Text | None = Field(None, max_length=1024)
    aws_access_key_id: Text = Field(..., min_length=1, max_length=256)
    aws_secret_access_key: Text = Field(..., min_length=1, max_length=512)
    image_directory: Text | None = Field("", max_length=512)
    bucket: Text | None = Field(None, max_length=255)


class ResetS3In(KeyIn):
    deploy_type: Text | None = Field(None, max_length=64)


# --- errors (the other replies are the service's: `magicmix.replies`) -------------------


class ErrorOut(BaseModel):
    status: Literal["error"] = "error"
    message: str
    errors: dict[str, str] | None = None
    retry_after: float | None = None
