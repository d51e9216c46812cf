"""Webhooks: signed per Standard Webhooks, delivered at least once on a persisted schedule.

Receivers verify with any Standard Webhooks library: `Webhook(secret).verify(body, headers)`.

A job's webhook is owed from its creation (`jobs.WebhookState`), and due once the job
ended. `WebhookSender` makes one attempt per due webhook and records the outcome on the
job, with the time of the next attempt from the schedule, so a restart, another process
or another container resumes where the last one stopped. Every attempt of a job carries
the same `webhook-id`, so receivers can drop duplicates. The schedule follows the spec's
recommendation (https://www.standardwebhooks.com, "Retry schedule"): attempts at these
offsets after the job ended: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h,
24 h. A 2xx is delivered; 410 Gone stops deliveries to that receiver; every other answer
(3xx, 4xx, 5xx: redirects are not followed) and every network error is a failed attempt,
retried on the schedule, no sooner than a `Retry-After` asks. `Retry-After` is read
strictly (RFC 9110 section 10.2.3): ASCII digits, or an HTTP date in ASCII; anything else
(`²`, `①`, Arabic-Indic or fullwidth digits, `1e3`, `-5`) is ignored, as if absent.
Whatever goes wrong in one attempt is recorded on that attempt: delivery never raises for
the receiver's sake. The secret and the body are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from standardwebhooks import Webhook

from magicmix.config import Settings
from magicmix.errors import InvalidInput, MagicMixError
from magicmix.inputs.netguard import (
    RefusedAddress,
    check_url,
    describe_transport_error,
    guarded_async_client,
    redact_url,
)
from magicmix.jobs import JobRecord, WebhookState
from magicmix.replies import webhook_json
from magicmix.store.base import JobStore, KeyStore

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 24 * 3600.0  # a receiver cannot push an attempt further than this
# RFC 9110's delay-seconds is 1*DIGIT, and DIGIT is ASCII 0-9 only (`str.isdigit` and `\d`
# also take `²`, `①`, `٣`); surrounding spaces and tabs are the field's optional whitespace
_DELAY_SECONDS = re.compile(r"[ \t]*([0-9]+)[ \t]*")


def sign_headers(secret: str, msg_id: str, body: bytes, timestamp: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for `body`; a naive `timestamp` is taken as UTC."""
    when = timestamp.replace(tzinfo=UTC) if timestamp.tzinfo is None else timestamp
    when = when.astimezone(UTC)  # the library assumes UTC and would misread other zones
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(math.floor(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode("utf-8")),
        "content-type": "application/json",
    }


def message_id(job_id: int) -> str:
    """The `webhook-id` of a job's webhook: the same on every attempt."""
    return f"magicmix-job-{job_id}"


@dataclass(frozen=True)
class Attempt:
    """How one POST went: `error` None means delivered."""

    status_code: int | None
    error: str | None
    retry: bool = False  # a later attempt may succeed
    retry_after_s: float | None = None  # what the receiver asked for (429/503)
    gone: bool = False  # 410: the receiver wants no more deliveries


def next_state(
    state: WebhookState, attempt: Attempt, *, ended_at: float, now: float, schedule: Sequence[float]
) -> WebhookState:
    """The webhook's state after `attempt`: delivered, stopped, failed, or when to retry."""
    attempts = state.attempts + 1
    common = {"attempts": attempts, "last_status": attempt.status_code, "last_error": attempt.error}
    if attempt.error is None:
        return WebhookState(phase="delivered", next_at=None, **common)
    if attempt.gone:
        return WebhookState(phase="stopped", next_at=None, **common)
    if not attempt.retry or attempts >= len(schedule):
        return WebhookState(phase="failed", next_at=None, **common)
    next_at = max(ended_at + schedule[attempts], now)
    if attempt.retry_after_s is not None:
        next_at = max(next_at, now + min(attempt.retry_after_s, MAX_RETRY_AFTER_S))
    return WebhookState(phase="pending", next_at=next_at, **common)


async def post_once(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> Attempt:
    """One POST; the answer's body is never read, so a receiver cannot make us hold it."""
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            status = response.status_code
            retry_after = _retry_after_s(response.headers.get("retry-after"))
    except RefusedAddress as err:  # the name resolved differently at connect time
        return Attempt(None, f"webhook {err.message}")
    except TimeoutError:
        return Attempt(None, f"the receiver did not answer within {timeout_s:g} s", retry=True)
    except httpx.HTTPError as err:
        return Attempt(None, describe_transport_error(err), retry=True)
    if 200 <= status < 300:
        return Attempt(status, None)
    error = f"the receiver answered HTTP {status}"
    if status == 410:
        return Attempt(status, error + " (Gone): no more deliveries to it", gone=True)
    # Standard Webhooks: any other status is a failed attempt (a redirect is not followed:
    # the receiver must be configured with its final URL)
    return Attempt(status, error, retry=True, retry_after_s=retry_after)


def _retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` header as seconds from now; None when absent or not well-formed."""
    if not value or not value.isascii():  # an HTTP date is ASCII too
        return None
    delay = _DELAY_SECONDS.fullmatch(value)
    if delay is not None:
        digits = delay.group(1).lstrip("0") or "0"
        # past nine digits it is over the cap anyway (and int() refuses 4,300+ digits)
        return float(digits) if len(digits) <= 9 else MAX_RETRY_AFTER_S
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None
    except (TypeError, ValueError, IndexError, OverflowError):  # not a date we can read
        return None


class WebhookSender:
    """One attempt of one job's webhook, its outcome recorded on the job."""

    def __init__(
        self,
        jobs: JobStore,
        keys: KeyStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._keys = keys
        self._settings = settings
        self._clock = clock

    async def send(self, job: JobRecord) -> WebhookState | None:
        """One attempt for `job`'s webhook (owed, and leased to this sender), recorded
        before returning; None when another sender recorded an attempt meanwhile."""
        assert job.webhook is not None and job.params.webhook  # nosec B101 - callers check
        url = job.params.webhook
        attempt = await self._attempt(job, url)
        now = self._clock()
        state = next_state(
            job.webhook,
            attempt,
            ended_at=job.finished_at or now,
            now=now,
            schedule=self._settings.webhook_schedule,
        )
        recorded = await asyncio.to_thread(
            self._jobs.record_webhook, job.id, state, attempts_before=job.webhook.attempts
        )
        log.info(
            "webhook of job %s to %s: attempt %d %s%s%s",
            job.id,
            redact_url(url),
            state.attempts,
            state.phase,
            f" ({attempt.error})" if attempt.error else "",
            f"; next in {state.next_at - now:.0f} s" if state.next_at is not None else "",
        )
        return state if recorded else None

    async def _attempt(self, job: JobRecord, url: str) -> Attempt:
        """One attempt, whatever happens in it: an error we did not foresee (a receiver's
        header, a library's corner) is recorded on this attempt and retried on the
        schedule, never raised into the pass that sends the other jobs' webhooks."""
        try:
            return await self._post(job, url)
        except Exception as err:
            # the type only: an exception's text may carry the URL's query string
            why = f"the attempt failed unexpectedly ({type(err).__name__})"
            log.error("webhook of job %s: %s", job.id, why)
            return Attempt(None, why, retry=True)

    async def _post(self, job: JobRecord, url: str) -> Attempt:
        settings = self._settings
        try:
            await asyncio.to_thread(
                check_url, url, allow_private=settings.allow_private_urls, field="webhook"
            )
            secret = await asyncio.to_thread(self._keys.webhook_secret, job.key_id)
        except InvalidInput as err:  # the URL is refused (now): nothing will change that
            return Attempt(None, err.message)
        except MagicMixError as err:  # e.g. the key was removed since the job was made
            return Attempt(None, f"not sent: {err.message}")
        body = (job.webhook_body or webhook_json(job)).encode()
        # a fresh timestamp each attempt: receivers refuse signatures older than minutes
        headers = sign_headers(secret, message_id(job.id), body, datetime.now(UTC))
        async with guarded_async_client(
            allow_private=settings.allow_private_urls, timeout_s=settings.webhook_timeout_s
        ) as client:
            return await post_once(client, url, body, headers, settings.webhook_timeout_s)


class WebhookDelivery:
    """The one delivery loop, whatever the deployment: due webhooks leased, each attempt
    on its own.

    Attempts run as independent tasks: a slow or failing receiver holds only its own
    attempt (at most the webhook timeout), never a pass, and no more than `per_key`
    attempts of one API key run at once here, so one tenant's receivers cannot take every
    slot. Leases make any number of loops (replicas, Modal's webhook function and sweep)
    safe together: one attempt at a time per job. `nudge()` may be called from any
    thread: the lifecycle's notifier calls it as jobs end.
    """

    def __init__(
        self,
        sender: WebhookSender,
        jobs: JobStore,
        settings: Settings,
        *,
        concurrency: int = 256,
        per_key: int = 16,
        idle_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sender = sender
        self._jobs = jobs
        self._concurrency = concurrency
        self._per_key = per_key
        self._idle_s = idle_s
        self._lease_s = settings.webhook_timeout_s * 3 + 30  # outlives any one attempt
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._flying: dict[asyncio.Task[WebhookState | None], str] = {}  # task -> key id
        self._fatal: BaseException | None = None  # not an error: the process is going down
        self.attempts = 0

    @classmethod
    def over(cls, jobs: JobStore, keys: KeyStore, settings: Settings) -> WebhookDelivery:
        """The delivery loop over a deployment's stores, sending with its own sender."""
        return cls(WebhookSender(jobs, keys, settings), jobs, settings)

    def ended(self, jobs: Sequence[JobRecord]) -> None:
        """The lifecycle's `Notifier`: jobs with a webhook just ended."""
        if any(job.webhook is not None for job in jobs):
            self.nudge()

    def nudge(self) -> None:
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run_forever(self) -> None:
        """Deliver for as long as the process runs (a local server's background task)."""
        await self.run(until=None)

    async def run(self, *, until: float | None) -> int:
        """Deliver what is due, and what falls due, until `until` (a `clock()` time; None:
        forever), or sooner once nothing owed falls due before it; then wait for the
        attempts in flight. Returns the attempts made."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        made = self.attempts
        try:
            while True:
                self._reap()
                if self._fatal is not None:
                    raise self._fatal
                started = await self._start_due()
                if started:
                    continue  # more may be due
                if until is not None and not self._flying and not await self._due_before(until):
                    break
                timeout = self._idle_s
                if until is not None:
                    timeout = min(timeout, max(0.0, until - self._clock()))
                await self._pause(timeout)
            if self._flying:
                await asyncio.wait(set(self._flying))
            self._reap()
            if self._fatal is not None:
                raise self._fatal
        except asyncio.CancelledError:  # the server stops: leases of attempts cut short lapse
            for task in self._flying:
                task.cancel()
            raise
        finally:
            self._loop = self._wake = None
        return self.attempts - made

    async def _due_before(self, until: float) -> bool:
        """Whether an attempt owed falls due before `until` (the run should stay for it)."""
        if self._clock() >= until:
            return False
        next_at = await asyncio.to_thread(self._jobs.next_webhook_at)
        return next_at is not None and next_at < until

    async def _pause(self, timeout: float) -> None:
        """Until a nudge, an attempt landing (a slot freed), or `timeout`."""
        assert self._wake is not None  # nosec B101 - set by `run`
        self._wake.clear()
        nudged = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {nudged, *self._flying}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            nudged.cancel()

    async def _start_due(self) -> int:
        """Lease what is due (up to the free slots) and start an attempt for each."""
        self._reap()
        free = self._concurrency - len(self._flying)
        if free <= 0:
            return 0
        now = self._clock()
        try:
            due = await asyncio.to_thread(
                self._jobs.lease_webhooks,
                now=now,
                lease_until=now + self._lease_s,
                limit=free,
                per_key=self._per_key,
                in_flight=Counter(self._flying.values()),
            )
        except Exception:  # e.g. the database is briefly away: try again on the next round
            log.exception("could not take due webhooks")
            return 0
        for job in due:
            self._flying[asyncio.ensure_future(self._sender.send(job))] = job.key_id
        return len(due)

    def _reap(self) -> None:
        """Count the attempts that landed and free their slots, before any decision is
        taken on what is in flight (a done task's callbacks may not have run yet)."""
        for task in [task for task in self._flying if task.done()]:
            del self._flying[task]
            self.attempts += 1
            error = None if task.cancelled() else task.exception()
            if isinstance(error, Exception):  # `send` records its own failures: a bug if here
                log.error("webhook attempt failed: %r", error)
            elif error is not None:
                self._fatal = error
