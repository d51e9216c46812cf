"""Jobs as data: their states, records and results, and the store interface they live behind.

Behaviour (which state may follow which, and what each change sets off) is in
`lifecycle.py`; a store only has to make one status change atomic (`JobStore.transition`)
and keep what the lifecycle writes. Implementations: `backends.local.jobs` (SQLite) and
`backends.modal.state` (Modal Dicts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from PIL import Image
from pydantic import BaseModel

from magicmix.errors import Busy
from magicmix.request import ENGINE_FIELDS, MixParams, MixRequest, Submission

_NO_IMAGE = Image.new("RGB", (1, 1))  # stands in where only the schedule matters


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

    def mix_request(self, image: Image.Image | None = None) -> MixRequest:
        """The engine's view of this job (`image` may be left out to compare schedules)."""
        return MixRequest(image=image or _NO_IMAGE, **self.model_dump(include=set(ENGINE_FIELDS)))

    def batch_key(self) -> tuple[int, int, int, int, int]:
        """Jobs with equal keys share every timestep, so they can share UNet batches."""
        return self.mix_request().batch_key()


class JobResult(BaseModel):
    output: list[str]
    generation_time: float
    stored_in: Literal["user", "service"]
    object_names: list[str]
    note: str | None = None


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
    """One status change for `JobStore.transition`: from one of `expected` to `to`."""

    expected: frozenset[JobStatus]
    to: JobStatus
    fields: dict[str, Any] = field(default_factory=dict)  # JobRecord fields to set with it


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
    """What `JobStore.begin_idempotent` found: ours to accept now, or an earlier request's."""

    owned: bool
    fingerprint: str
    job_id: int | None  # the job the key's first request made, once it made one


@dataclass(frozen=True)
class NewJob:
    """A job to insert; the store assigns the id and the output token."""

    key_id: str
    params: JobParams
    created_at: float
    idempotency: Idempotency | None = None  # bound to the new job in the same insert

    @property
    def webhook(self) -> WebhookState | None:
        return WebhookState() if self.params.webhook else None


class JobStore(Protocol):
    """Where job records live. Only `transition` needs to be atomic."""

    def insert(self, job: NewJob, image: bytes, limits: QueueLimits) -> JobRecord:
        """Store a queued job, or raise `Busy` (via `limits.check`) when over a limit."""
        ...

    def get(self, job_id: int) -> JobRecord | None: ...

    def image(self, job_id: int) -> bytes | None:
        """The layout image of an active job; None once the job ended."""
        ...

    def transition(self, job_id: int, change: Change) -> JobRecord | None:
        """Apply `change` if the job's status is one of `change.expected`, atomically.

        Returns the changed record, or None when the job is missing or in another state.
        A change to an ended state succeeds at most once per job: first writer wins.
        """
        ...

    def active(self, limit: int | None = None) -> list[JobRecord]:
        """Queued and processing jobs, oldest first (the first `limit` of them)."""
        ...

    def queue_length(self) -> int: ...

    def webhooks_due(self, now: float, limit: int) -> list[JobRecord]:
        """Ended jobs whose webhook is pending and whose next attempt is due."""
        ...

    def record_webhook(self, job_id: int, state: WebhookState) -> None: ...

    def expirable(self, finished_before: float) -> list[JobRecord]:
        """Successes stored in the service store that finished before the cutoff."""
        ...

    def begin_idempotent(
        self, key_id: str, idempotency: Idempotency, *, now: float, ttl_s: float, lease_s: float
    ) -> IdempotencyClaim:
        """Claim the key for a request about to be accepted, or say whose it is.

        An entry older than `ttl_s`, or one still unbound after `lease_s` (its request
        died while being accepted), is taken over.
        """
        ...

    def release_idempotent(self, key_id: str, idempotency: Idempotency) -> None:
        """Give back a claim whose request made no job (it was refused)."""
        ...

    def forget_idempotent(self, created_before: float) -> int:
        """Drop keys older than the cutoff (stores whose entries lapse by themselves: 0)."""
        ...


def params_from(submission: Submission, *, family: str, seed: int, image_ref: str) -> JobParams:
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
