"""`magic_mix` and `fetch`: submit a job, read a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam

from magicmix.http.deps import AnyKey, Keyed, ServiceDep, keyed
from magicmix.http.errors import ERROR_RESPONSES
from magicmix.http.links import EDITING
from magicmix.http.schemas import MagicMixIn
from magicmix.replies import JobOut
from magicmix.request import MAX_SEED, Int

router = APIRouter(prefix=EDITING, tags=["magic mix"])
JOB_REPLY: dict[str, Any] = {
    "response_model": JobOut,
    "response_model_exclude_none": True,
    "responses": ERROR_RESPONSES,
}
MAX_JOB_ID = MAX_SEED  # SQLite's largest integer


@router.post("/magic_mix", **JOB_REPLY)
async def magic_mix(
    request: Request,
    call: Annotated[Keyed[MagicMixIn], keyed(MagicMixIn)],
    service: ServiceDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="Resend safely: the same key and body within 24 h answer with the"
            " first request's job (409 while it is still being accepted; 422 for another body)",
        ),
    ] = None,
) -> JobOut:
    """Mix the layout of `image` with the content of `prompt`. Answers `success`, or
    `processing` with a `fetch_result` URL when not done within the sync window."""
    arrived = getattr(request.state, "arrived", None)
    return await service.submit(
        call.body, call.principal, idempotency_key=idempotency_key, arrived=arrived
    )


@router.post("/fetch/{job_id}", **JOB_REPLY)
async def fetch(
    call: AnyKey, job_id: Annotated[Int, PathParam(ge=1, le=MAX_JOB_ID)], service: ServiceDep
) -> JobOut:
    """The current state of a job made with this key."""
    return await service.fetch(job_id, call.principal)
