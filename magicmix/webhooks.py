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
import contextlib
import json
import logging
import math
import re
import time
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
from magicmix.jobs import JobRecord, JobStore, WebhookState
from magicmix.keys import KeyStore
from magicmix.replies import webhook_body

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
    """Makes the due attempts of jobs' webhooks and records each outcome on the job."""

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

    async def send_due(self, limit: int = 64) -> list[WebhookState]:
        """One attempt for every webhook due now (up to `limit`, concurrently)."""
        due = await asyncio.to_thread(self._jobs.webhooks_due, self._clock(), limit)
        return list(await asyncio.gather(*(self.send(job) for job in due)))

    async def send(self, job: JobRecord) -> WebhookState:
        """One attempt for `job`'s webhook (which must be owed), recorded before returning."""
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
        await asyncio.to_thread(self._jobs.record_webhook, job.id, state)
        log.info(
            "webhook of job %s to %s: attempt %d %s%s",
            job.id,
            redact_url(url),
            state.attempts,
            state.phase,
            f" ({attempt.error}); next in {state.next_at - now:.0f} s"
            if state.next_at is not None
            else f" ({attempt.error})"
            if attempt.error
            else "",
        )
        return state

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
        body = json.dumps(
            webhook_body(job, retention_hours=settings.retention_hours), separators=(",", ":")
        ).encode()
        # a fresh timestamp each attempt: receivers refuse signatures older than minutes
        headers = sign_headers(secret, message_id(job.id), body, datetime.now(UTC))
        async with guarded_async_client(
            allow_private=settings.allow_private_urls, timeout_s=settings.webhook_timeout_s
        ) as client:
            return await post_once(client, url, body, headers, settings.webhook_timeout_s)


class WebhookPump:
    """Runs a `WebhookSender` in one event loop: at once when nudged, and on schedule.

    `nudge()` may be called from any thread (the lifecycle calls it as jobs end).
    """

    def __init__(self, sender: WebhookSender, *, idle_s: float) -> None:
        self._sender = sender
        self._idle_s = idle_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def nudge(self, jobs: list[JobRecord] | None = None) -> None:
        if self._loop is None or self._wake is None:
            return
        if jobs is None or any(job.webhook is not None for job in jobs):
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            try:
                sent = await self._sender.send_due()
            except Exception:  # a failed pass must not stop later ones
                log.exception("webhook pass failed")
                sent = []
            if sent:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_s)
            self._wake.clear()
