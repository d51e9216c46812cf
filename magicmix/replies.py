"""ModelsLab's reply bodies, built from job records: what the API answers and webhooks send.

Links (where an output is served, where to fetch a job) belong to the HTTP layer; the
service is handed them as a `Links` object (`http.links.HttpLinks`), so this module knows
no route or path.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from magicmix.errors import Gone
from magicmix.jobs import JobRecord, JobStatus


class Links(Protocol):
    """Absolute URLs the replies carry; made by the HTTP layer, which owns the routes."""

    def output(self, name: str) -> str:
        """Where the service store's file `name` is served."""
        ...

    def fetch(self, job_id: int) -> str:
        """The `fetch_result` URL of a job."""
        ...


class Meta(BaseModel):
    """The seed's `meta` block, echoing what was run (with the seed actually used).

    `H`/`W` are the size run: the size asked for (`H_requested`/`W_requested`, null when
    none was) rounded down to a multiple of 8, or the model's native size.
    """

    H: int
    W: int
    H_requested: int | None = None
    W_requested: int | None = None
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
    # what the text encoders read, once the job has run (our extension; README "Prompts")
    prompt_tokens: int | None = None
    prompt_truncated: bool | None = None
    negative_prompt_tokens: int | None = None
    negative_prompt_truncated: bool | None = None


class SuccessOut(BaseModel):
    status: Literal["success"] = "success"
    generationTime: float
    id: int
    output: list[str]
    proxy_links: list[str]  # ModelsLab's published schema: the same URLs here
    meta: Meta
    message: str | None = None
    track_id: str | int | None = None


class ProcessingOut(BaseModel):
    status: Literal["processing"] = "processing"
    id: int
    eta: int  # seconds, a whole number as ModelsLab sends it
    message: str
    tip: str
    fetch_result: str
    output: list[str] = []
    future_links: list[str]
    proxy_links: list[str]
    meta: Meta
    track_id: str | int | None = None


class FailedOut(BaseModel):
    status: Literal["failed"] = "failed"
    id: int
    message: str
    track_id: str | int | None = None


class MessageOut(BaseModel):
    status: Literal["success", "error"] = "success"
    message: str


class SystemDetailsOut(MessageOut):
    model: str
    family: str
    device: str
    dtype: str
    queue_length: int
    version: str
    webhook_secret: str
    s3: dict[str, Any] | None = None


JobOut = SuccessOut | ProcessingOut | FailedOut


def meta(job: JobRecord) -> Meta:
    p = job.params
    outdir = "outputs" if not job.result or job.result.stored_in == "service" else "s3"
    read = job.result.prompts if job.result is not None else None
    return Meta(
        H=p.height,
        W=p.width,
        H_requested=p.height_requested,
        W_requested=p.width_requested,
        file_prefix=job.file_prefix,
        image=p.image_ref,
        kmax=p.kmax,
        kmin=p.kmin,
        mix_factor=p.mix_factor,
        n_samples=1,
        negative_prompt=p.negative_prompt,
        outdir=outdir,
        prompt=p.prompt,
        seed=p.seed,
        steps=p.steps,
        guidance_scale=p.guidance_scale,
        prompt_tokens=read.prompt.tokens if read else None,
        prompt_truncated=read.prompt.truncated if read else None,
        negative_prompt_tokens=read.negative_prompt.tokens if read else None,
        negative_prompt_truncated=read.negative_prompt.truncated if read else None,
    )


def ended_reply(job: JobRecord, *, retention_hours: float) -> SuccessOut | FailedOut:
    """The reply of a job that ended; `Gone` for one whose outputs expired."""
    if job.status is JobStatus.EXPIRED:
        raise Gone(
            f"the outputs of job {job.id} were deleted after {retention_hours:g} hours;"
            " add S3 details with update_s3 to keep images in your own bucket"
        )
    return final_reply(job)


def final_reply(job: JobRecord) -> SuccessOut | FailedOut:
    """How a job ended, whatever happened to its outputs since (what its webhook says)."""
    if job.status in (JobStatus.SUCCESS, JobStatus.EXPIRED) and job.result is not None:
        return SuccessOut(
            generationTime=round(job.result.generation_time, 4),
            id=job.id,
            output=job.result.output,
            proxy_links=list(job.result.output),
            meta=meta(job),
            message=job.result.note,
            track_id=job.params.track_id,
        )
    return FailedOut(
        id=job.id, message=job.error or f"job {job.status.value}", track_id=job.params.track_id
    )


def webhook_json(job: JobRecord) -> str:
    """What a job's webhook POSTs: how it ended plus `track_id` (ModelsLab's shape).

    The same bytes on every attempt: a success's body is fixed when it is recorded
    (`Lifecycle.finish`), and any other end is a record that no longer changes.
    """
    body = {**final_reply(job).model_dump(mode="json"), "track_id": job.params.track_id}
    return json.dumps(body, separators=(",", ":"))
