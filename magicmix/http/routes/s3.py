"""Bring-your-own S3: `update_s3` and `reset_s3`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from magicmix.http.deps import Keyed, ServiceDep, keyed
from magicmix.http.errors import ERROR_RESPONSES
from magicmix.http.links import API_BASE
from magicmix.http.schemas import ResetS3In, UpdateS3In
from magicmix.outputs.user_bucket import S3Details
from magicmix.replies import MessageOut

router = APIRouter(prefix=API_BASE, tags=["s3"], responses=ERROR_RESPONSES)


@router.post("/update_s3", response_model=MessageOut)
async def update_s3(
    call: Annotated[Keyed[UpdateS3In], keyed(UpdateS3In)], service: ServiceDep
) -> MessageOut:
    """Save S3 details (checked with a probe object first); later outputs of this key
    go to that bucket and are never deleted by the service."""
    details = S3Details.model_validate(call.body.model_dump(exclude={"key"}, exclude_none=True))
    return await service.update_s3(details, call.principal)


@router.post("/reset_s3", response_model=MessageOut)
def reset_s3(
    call: Annotated[Keyed[ResetS3In], keyed(ResetS3In)], service: ServiceDep
) -> MessageOut:
    """Forget this key's S3 details."""
    return service.reset_s3(call.principal)
