"""Jobs as data: their states, records, results and the changes a store applies.

Behaviour (which state may follow which, and what each change sets off) is in
`lifecycle.py`; where records live is `store/` (the `JobStore` contract and its SQL
implementation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from magicmix.errors import Busy
from magicmix.families import ModelFamily
from magicmix.request import ENGINE_FIELDS, MixParams, MixRequest, Submission, batch_key

if TYPE_CHECKING:
    from PIL.Image import Image


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self not in ACTIVE


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING})
ENDED = frozenset({JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCELLED})


class JobParams(MixParams):
    """What to run, as validated at submission; `seed` is always resolved by then."""

    seed: int  # resolved at submission: never None in a job
    width: int  # resolved at submission (the model family's size unless asked), rounded
    height: int
    width_requested: int | None = None  # as the client sent them (None: not sent)
    height_requested: int | None = None
    image_ref: str  # the input URL, or a short description of inline data (never the bytes)
    webhook: str | None = None
    track_id: str | int | None = None

    def mix_request(self, image: Image) -> MixRequest:
        """The engine's view of this job, with its decoded layout."""
        return MixRequest(image=image, **self.model_dump(include=set(ENGINE_FIELDS)))

    def batch_key(self) -> tuple[int, int, int, int, int]:
        """Jobs with equal keys share every timestep, so they can share UNet batches."""
        return batch_key(self.width, self.height, self.steps, self.kmin, self.kmax)

    def batch_key_text(self) -> str:
        """`batch_key` as stores keep it, so a batch claim can match it in SQL."""
        return "x".join(map(str, self.batch_key()))


class TextRead(BaseModel):
    """How much of one prompt the text encoders read: its tokens, and whether some were cut
    (CLIP reads 75 besides its start and end markers)."""

    tokens: int
    truncated: bool


class PromptsRead(BaseModel):
    """What the engine read of a job's prompt and negative prompt; the reply's meta says it."""

    prompt: TextRead
    negative_prompt: TextRead


class JobResult(BaseModel):
    output: list[str]
    generation_time: float
    stored_in: Literal["user", "service"]
    object_names: list[str]
    note: str | None = None
    prompts: PromptsRead | None = None  # None on results stored before prompts were counted


WebhookPhase = Literal["pending", "delivered", "failed", "stopped"]


class WebhookState(BaseModel):
    """Delivery of a job's webhook: owed from creation, due once the job has ended.

    `next_at` None means "as soon as the job ends"; the attempt count and the last
    outcome are what `system_details`-style debugging and the retry schedule need.
    """

    phase: WebhookPhase = "pending"
    attempts: int = 0
    next_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None


class JobRecord(BaseModel):
    id: int
    key_id: str
    status: JobStatus
    params: JobParams
    output_token: str
    result: JobResult | None = None
    error: str | None = None
    webhook: WebhookState | None = None  # None: the job has no webhook URL
    claimant: str | None = None  # who runs it (a worker or a Modal input), while processing
    lease_until: float | None = None  # the claim lapses then unless its claimant renews it
    run_attempts: int = 0  # claims so far: a job that keeps killing its workers is failed
    call_id: str | None = None  # the dispatcher's handle of its run (Modal's FunctionCall id)
    webhook_body: str | None = None  # a success's webhook body, fixed when it was recorded
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def output_name(self) -> str:
        """The PNG's file name in a store: stable per job (a re-run overwrites)."""
        return f"{self.file_prefix}.png"

    @property
    def file_prefix(self) -> str:
        """Unguessable stem of this job's output names; fixed at creation, so a re-run
        after a crash overwrites its own output instead of making a second one."""
        return f"{self.id}-{self.output_token}"

    @property
    def webhook_due(self) -> bool:
        """Ended with a webhook still owed; `next_at` says when the next attempt is."""
        return (
            self.status in ENDED | {JobStatus.EXPIRED}
            and self.webhook is not None
            and self.webhook.phase == "pending"
        )


@dataclass(frozen=True)
class QueueLimits:
    """How many jobs may be queued or running at once, overall and per API key.

    The one place the limits are compared; stores call `check` with their counts inside
    whatever makes their insert atomic.
    """

    max_queue: int
    max_per_key: int
    retry_after_s: float = 10.0

    def check(self, total: int, mine: int) -> None:
        if total >= self.max_queue:
            raise Busy(
                f"the queue is full ({total} jobs); retry shortly", retry_after=self.retry_after_s
            )
        if mine >= self.max_per_key:
            raise Busy(
                f"this key already has {mine} jobs in flight (limit {self.max_per_key});"
                " retry when some finish",
                retry_after=self.retry_after_s,
            )


@dataclass(frozen=True)
class Change:
    """One status change for `JobStore.transition`: from one of `expected` to `to`.

    With `claimant`, only while that claimant holds the job: a worker whose lease lapsed
    (and whose job another worker took since) cannot end it.
    """

    expected: frozenset[JobStatus]
    to: JobStatus
    fields: dict[str, Any] = field(default_factory=dict)  # JobRecord fields to set with it
    claimant: str | None = None


@dataclass(frozen=True)
class Idempotency:
    """A client's `Idempotency-Key` and the fingerprint of the body it came with."""

    key: str
    fingerprint: str

    @property
    def key_hash(self) -> str:
        """How stores name it: a digest, so a client's key is never a storage key itself."""
        return hashlib.sha256(self.key.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotencyClaim:
    """What `JobStore.begin_idempotent` found: ours to accept now, or an earlier request's.

    An owned claim carries its `token`: the job's insert binds the key only while the
    token still holds it, so a request whose claim was taken over makes no job.
    """

    owned: bool
    fingerprint: str
    job_id: int | None  # the job the key's first request made, once it made one
    key: Idempotency | None = None  # the client's key, on an owned claim
    token: str | None = None


@dataclass(frozen=True)
class NewJob:
    """A job to insert; the store assigns the id and the output token."""

    key_id: str
    params: JobParams
    created_at: float
    idempotency: IdempotencyClaim | None = None  # an owned claim, bound in the same insert

    @property
    def webhook(self) -> WebhookState | None:
        return WebhookState() if self.params.webhook else None


def params_from(
    submission: Submission, *, family: ModelFamily, seed: int, image_ref: str
) -> JobParams:
    """A job's params from what the client sent (the image itself is stored apart).

    Not validated again: the submission was, by the schema, on its way in.
    """
    width, height = submission.size_for(family)
    resolved = {"seed", "image_ref", "width", "height", "width_requested", "height_requested"}
    fields = submission.model_dump(include=set(JobParams.model_fields) - resolved)
    return JobParams.model_construct(
        **fields,
        seed=seed,
        image_ref=image_ref,
        width=width,
        height=height,
        width_requested=submission.width,
        height_requested=submission.height,
    )
