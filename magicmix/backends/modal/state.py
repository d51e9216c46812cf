"""The service's state on Modal: jobs and keys in Modal Dicts, layout images in a bucket.

The stores take any object with `modal.Dict`'s methods (`DictLike`), so tests run them on
an in-memory stand-in. A Dict has no transactions and no compare-and-swap; the one
atomic write is `put(key, value, skip_if_exists=True)` ("insert if absent"). The design
uses it for every decision two containers could race on, and makes everything else
either idempotent or repaired by the sweep:

- A job is a set of keys in the `jobs` Dict, each written once: `id:N` claims the id,
  `job:N` is the record as created (queued), `run:N` the claim of whoever runs it, and
  `end:N` its ended record. The status is read from them: `end` wins, else `run`, else
  queued. A claim and an end are both insert-if-absent, so exactly one runner and
  exactly one ended state per job, first writer wins; a finish after a cancel finds
  `end:N` taken and is refused. Only the sweep rewrites `end:N`, to mark it expired.
- A claim carries the claimant (one token per spawned input): Modal's retry of the
  same input may re-claim its own job, a second input for the job may not.
- `create` writes the layout image, then the `active` and `outbox` index entries, then
  the record: a crash in between leaves index entries without a record, which the sweep
  drops (`repair`); the client was never given that id.
- Queue limits use counters (`count:all`, `count:KEY`) kept by read-modify-write, so
  concurrent writers may lose an update. A count is therefore only trusted to say "there
  is room": before refusing a job, the store recounts exactly from the `active` index and
  rewrites the counters (so a drifted count never refuses wrongly), and the sweep
  recounts each pass. Limits stay soft by at most the submissions racing at once.
- Dict entries vanish after 7 days without a read or a write; the sweep reads the
  id hint and the keys, so they stay, while old job records lapse.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from magicmix.crypto import SecretBox
from magicmix.errors import Busy, Unauthorized
from magicmix.jobs import (
    ACTIVE,
    Change,
    Idempotency,
    IdempotencyClaim,
    JobRecord,
    JobStatus,
    NewJob,
    QueueLimits,
    WebhookState,
)
from magicmix.keys import (
    KeyInfo,
    NewKey,
    Principal,
    StaticKeys,
    key_hash,
    mint_key,
)

_NEXT_ID = "next_id"
_TOTAL = "count:all"
_MISSING = object()


class DictLike(Protocol):
    """The part of `modal.Dict` the stores use; the stand-in in tests has the same signatures."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool: ...
    def pop(self, key: Any, default: Any = ...) -> Any: ...
    def items(self) -> Iterable[tuple[Any, Any]]: ...


class BlobStore(Protocol):
    """Where layout images wait for their run (the service bucket, under its own prefix)."""

    def put(self, name: str, data: bytes, content_type: str = ...) -> None: ...
    def get(self, name: str) -> bytes: ...
    def delete(self, name: str) -> None: ...
    def delete_older_than(self, cutoff: datetime) -> list[str]: ...


@dataclass(frozen=True)
class ModalState:
    """Where the service's state lives on Modal (see the module docstring)."""

    jobs: DictLike  # the keys of each job, the id hint, the queue counters
    active: DictLike  # job id -> key id, for queued and processing jobs
    outbox: DictLike  # job id -> WebhookState JSON, while a webhook is pending
    expiring: DictLike  # job id -> finished_at, for successes in the service store
    keys: DictLike  # key hashes, key records, per-key S3 details
    layouts: BlobStore  # layout images by job


def layout_name(job_id: int) -> str:
    return f"layout-{job_id}.bin"


class DictJobStore:
    """`JobStore` on Modal Dicts; records are JSON so they outlive code changes."""

    def __init__(self, state: ModalState) -> None:
        self._state = state
        self._jobs = state.jobs

    # -- create -------------------------------------------------------------------------

    def insert(self, job: NewJob, image: bytes, limits: QueueLimits) -> JobRecord:
        total, mine = self._count(_TOTAL), self._count(_key_count(job.key_id))
        try:
            limits.check(total, mine)
        except Busy:  # a count may have drifted high: only an exact count refuses
            total, mine = self.recount(job.key_id)
            limits.check(total, mine)
        job_id = self._claim_id(job.created_at)
        record = JobRecord(
            id=job_id,
            key_id=job.key_id,
            status=JobStatus.QUEUED,
            params=job.params,
            output_token=secrets.token_urlsafe(16),
            webhook=job.webhook,
            created_at=job.created_at,
        )
        self._state.layouts.put(layout_name(job_id), image, "application/octet-stream")
        self._state.active.put(job_id, job.key_id)
        self._add(job.key_id, +1)
        if record.webhook is not None:
            self._state.outbox.put(job_id, record.webhook.model_dump_json())
        self._jobs.put(f"job:{job_id}", record.model_dump_json())
        if job.idempotency is not None:  # after the record: a crash in between is the one
            # window where a resend, once the lease ends, makes a second job
            key = _idem_key(job.key_id, job.idempotency)
            self._jobs.put(key, (job.idempotency.fingerprint, job_id, job.created_at))
        return record

    def begin_idempotent(
        self, key_id: str, idempotency: Idempotency, *, now: float, ttl_s: float, lease_s: float
    ) -> IdempotencyClaim:
        key = _idem_key(key_id, idempotency)
        ours = (idempotency.fingerprint, None, now)
        for _ in range(2):  # a fresh claim, or one take-over of a stale entry
            if self._jobs.put(key, ours, skip_if_exists=True):
                return IdempotencyClaim(True, idempotency.fingerprint, None)
            entry = self._jobs.get(key)
            if entry is None:
                continue  # released meanwhile
            fingerprint, job_id, created_at = entry
            stale = created_at < now - ttl_s or (job_id is None and created_at < now - lease_s)
            if not stale:
                return IdempotencyClaim(False, fingerprint, job_id)
            self._jobs.pop(key, None)
        entry = self._jobs.get(key)
        fingerprint, job_id, _ = entry if entry else (idempotency.fingerprint, None, now)
        return IdempotencyClaim(False, fingerprint, job_id)

    def forget_idempotent(self, created_before: float) -> int:
        """Nothing to do: an entry past its 24 h is taken over on its next use, and
        Dict entries lapse after 7 days untouched."""
        return 0

    def release_idempotent(self, key_id: str, idempotency: Idempotency) -> None:
        key = _idem_key(key_id, idempotency)
        entry = self._jobs.get(key)
        if entry is not None and entry[1] is None:
            self._jobs.pop(key, None)

    def _claim_id(self, created_at: float) -> int:
        """The next free id: insert-if-absent from a hint that may lag, never reused."""
        job_id = max(int(self._jobs.get(_NEXT_ID, 1)), 1)
        while not self._jobs.put(f"id:{job_id}", created_at, skip_if_exists=True):
            job_id += 1  # another container took this id first
        self._jobs.put(_NEXT_ID, job_id + 1)
        return job_id

    # -- read ---------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        ended = self._jobs.get(f"end:{job_id}")
        job = JobRecord.model_validate_json(ended) if ended is not None else self._created(job_id)
        if job is None:
            return None
        if job.webhook is not None:
            job = job.model_copy(update={"webhook": self._webhook(job_id, job.webhook)})
        return job

    def _created(self, job_id: int) -> JobRecord | None:
        data = self._jobs.get(f"job:{job_id}")
        if data is None:
            return None
        job = JobRecord.model_validate_json(data)
        run = self._jobs.get(f"run:{job_id}")
        if run is None:
            return job
        claimant, started_at = run
        return job.model_copy(
            update={"status": JobStatus.PROCESSING, "claimant": claimant, "started_at": started_at}
        )

    def _webhook(self, job_id: int, created: WebhookState) -> WebhookState:
        pending = self._state.outbox.get(job_id)
        if pending is not None:
            return WebhookState.model_validate_json(pending)
        final = self._jobs.get(f"hook:{job_id}")
        return WebhookState.model_validate_json(final) if final is not None else created

    def image(self, job_id: int) -> bytes | None:
        try:
            return self._state.layouts.get(layout_name(job_id))
        except Exception:  # NotFound, or the bucket failed: the runner fails the job
            return None

    def active(self, limit: int | None = None) -> list[JobRecord]:
        ids = sorted(int(job_id) for job_id, _ in self._state.active.items())
        jobs = [job for job in map(self.get, ids) if job is not None and job.status in ACTIVE]
        return jobs if limit is None else jobs[:limit]

    def queue_length(self) -> int:
        return max(self._count(_TOTAL), 0)

    def webhooks_due(self, now: float, limit: int) -> list[JobRecord]:
        due = []
        for job_id, state in list(self._state.outbox.items()):
            webhook = WebhookState.model_validate_json(state)
            if webhook.next_at is not None and webhook.next_at > now:
                continue
            job = self.get(int(job_id))
            if job is not None and job.webhook_due:
                due.append(job)
            if len(due) >= limit:
                break
        return due

    def expirable(self, finished_before: float) -> list[JobRecord]:
        old = [int(i) for i, done_at in self._state.expiring.items() if done_at < finished_before]
        jobs = [job for job in map(self.get, sorted(old)) if job is not None]
        for job in jobs:
            if job.status is not JobStatus.SUCCESS:  # already expired: drop the index entry
                self._state.expiring.pop(job.id, None)
        return [job for job in jobs if job.status is JobStatus.SUCCESS]

    # -- write --------------------------------------------------------------------------

    def transition(self, job_id: int, change: Change) -> JobRecord | None:
        job = self.get(job_id)
        if job is None or job.status not in change.expected:
            return None
        if change.to is JobStatus.PROCESSING:
            return self._claim(job, change)
        if change.to is JobStatus.QUEUED:  # requeue: the claimant is gone
            self._jobs.pop(f"run:{job_id}", None)
            return self.get(job_id)
        changed = job.model_copy(update={"status": change.to, **change.fields})
        if job.status is JobStatus.SUCCESS:  # success -> expired: only the sweep gets here
            self._jobs.put(f"end:{job_id}", changed.model_dump_json())
            self._state.expiring.pop(job_id, None)
            return changed
        if not self._jobs.put(f"end:{job_id}", changed.model_dump_json(), skip_if_exists=True):
            return None  # another writer ended it first
        self._ended(changed)
        return changed

    def _claim(self, job: JobRecord, change: Change) -> JobRecord | None:
        claimant = change.fields["claimant"]
        run = (claimant, change.fields["started_at"])
        if not self._jobs.put(f"run:{job.id}", run, skip_if_exists=True):
            return None
        if self._jobs.get(f"end:{job.id}") is not None:
            return None  # cancelled between our read and our claim: the cancel won
        return job.model_copy(update={"status": JobStatus.PROCESSING, **change.fields})

    def _ended(self, job: JobRecord) -> None:
        """After an end is won: the image, the index entry and the count go (repairable)."""
        if job.result is not None and job.result.stored_in == "service":
            self._state.expiring.put(job.id, job.finished_at)
        with suppress(Exception):  # else left for the bucket's retention sweep
            self._state.layouts.delete(layout_name(job.id))
        if self._state.active.pop(job.id, None) is not None:
            self._add(job.key_id, -1)

    def record_webhook(self, job_id: int, state: WebhookState) -> None:
        if state.phase == "pending":
            self._state.outbox.put(job_id, state.model_dump_json())
            return
        self._jobs.put(f"hook:{job_id}", state.model_dump_json())
        self._state.outbox.pop(job_id, None)

    # -- counts and repair --------------------------------------------------------------

    def _count(self, name: str) -> int:
        return int(self._jobs.get(name, 0))

    def _add(self, key_id: str, delta: int) -> None:
        for name in (_TOTAL, _key_count(key_id)):
            self._jobs.put(name, max(self._count(name) + delta, 0))

    def recount(self, key_id: str | None = None) -> tuple[int, int]:
        """Exact counts from the active index, written back; (total, of `key_id`)."""
        owners = [owner for _, owner in self._state.active.items()]
        self._jobs.put(_TOTAL, len(owners))
        for owner in set(owners) | ({key_id} if key_id else set()):
            self._jobs.put(_key_count(owner), owners.count(owner))
        return len(owners), owners.count(key_id) if key_id else 0

    def repair(self, now: float, *, grace_s: float) -> list[int]:
        """Finish what crashes interrupted; returns the ids whose entries were repaired.

        Index entries of ended jobs lose their image and entry (a crash after the end
        claim); entries older than `grace_s` with no record (a crash inside `create`) are
        dropped with their image and outbox entry. Then the counters are recounted.
        """
        repaired = []
        for raw_id, _ in list(self._state.active.items()):
            job_id = int(raw_id)
            ended = self._jobs.get(f"end:{job_id}")
            if ended is not None:
                self._ended(JobRecord.model_validate_json(ended))
                repaired.append(job_id)
            elif self._jobs.get(f"job:{job_id}") is None:
                claimed_at = self._jobs.get(f"id:{job_id}")
                if claimed_at is None or claimed_at < now - grace_s:
                    self._state.active.pop(job_id, None)
                    self._state.outbox.pop(job_id, None)
                    with suppress(Exception):  # else the bucket's retention sweep gets it
                        self._state.layouts.delete(layout_name(job_id))
                    repaired.append(job_id)
        for raw_id, _ in list(self._state.outbox.items()):
            if (
                self._jobs.get(f"job:{int(raw_id)}") is None
                and self._jobs.get(f"id:{int(raw_id)}", now) < now - grace_s
            ):
                self._state.outbox.pop(raw_id, None)
                repaired.append(int(raw_id))
        self.recount()
        self._jobs.get(_NEXT_ID)  # a read keeps the id hint from lapsing
        return sorted(set(repaired))


def _key_count(key_id: str) -> str:
    return f"count:{key_id}"


def _idem_key(key_id: str, idempotency: Idempotency) -> str:
    return f"idem:{key_id}:{idempotency.key_hash}"


# -- keys --------------------------------------------------------------------------------


class DictKeyStore:
    """`KeyStore` on Modal: keys made with `magicmix keys` (via `modal run`), in a Dict.

    Entries: `hash:H` -> key id (the lookup), `key:ID` -> the key's record with its
    encrypted webhook secret, and `ID` -> the key's encrypted S3 details. The static
    keys of `MAGICMIX_API_KEYS` (admins, for bootstrapping) are never stored.
    """

    def __init__(
        self, keys: DictLike, box: SecretBox, secret: bytes, static_keys: list[str]
    ) -> None:
        self._keys = keys
        self._box = box
        self._secret = secret
        self._static = StaticKeys(static_keys, secret)

    def create(self, *, admin: bool = False) -> NewKey:
        new = mint_key(admin=admin)
        record = {
            "admin": admin,
            "created_at": new.created_at,
            "revoked_at": None,
            "webhook_secret": self._box.encrypt(new.webhook_secret),
        }
        self._keys.put(f"key:{new.key_id}", record)
        self._keys.put(f"hash:{key_hash(self._secret, new.key)}", new.key_id)  # last: usable
        return new

    def list(self) -> list[KeyInfo]:
        made = [
            KeyInfo(name.removeprefix("key:"), r["admin"], r["created_at"], r["revoked_at"])
            for name, r in self._keys.items()
            if isinstance(name, str) and name.startswith("key:")
        ]
        return self._static.infos() + sorted(made, key=lambda info: (info.created_at, info.key_id))

    def revoke(self, key_id: str) -> bool:
        record = self._keys.get(f"key:{key_id}")
        if record is None or record["revoked_at"] is not None:
            return False
        self._keys.put(f"key:{key_id}", {**record, "revoked_at": time.time()})
        return True

    def authenticate(self, key: str) -> Principal:
        principal = self._static.find(key)
        if principal is not None:
            return principal
        key_id = self._keys.get(f"hash:{key_hash(self._secret, key)}")
        record = self._keys.get(f"key:{key_id}") if key_id is not None else None
        if record is None or record["revoked_at"] is not None:
            raise Unauthorized("invalid API key")
        return Principal(key_id, record["admin"], self._box.decrypt(record["webhook_secret"]))

    def webhook_secret(self, key_id: str) -> str:
        principal = self._static.by_id(key_id)
        if principal is not None:
            return principal.webhook_secret
        record = self._keys.get(f"key:{key_id}")
        if record is None:
            raise Unauthorized("the key of this job no longer exists")
        return str(self._box.decrypt(record["webhook_secret"]))

    def get_s3(self, key_id: str) -> str | None:
        blob = self._keys.get(key_id)
        return str(blob) if blob is not None else None

    def set_s3(self, key_id: str, blob: str) -> None:
        self._keys.put(key_id, blob)

    def delete_s3(self, key_id: str) -> bool:
        return self._keys.pop(key_id, _MISSING) is not _MISSING

    def keep_alive(self) -> None:
        """Read every entry, so keys unused for a week do not lapse (7 days untouched)."""
        for name, _ in list(self._keys.items()):
            self._keys.get(name)
