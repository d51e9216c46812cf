"""Webhook delivery, signed per the Standard Webhooks spec (https://www.standardwebhooks.com).

Receivers verify with any Standard Webhooks library: `Webhook(secret).verify(body, headers)`.
Delivery never raises for the receiver's sake: a refused URL, a dead receiver or a 4xx all
end as a `DeliveryOutcome` the caller records. The secret and the body are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from magicmix.config import Settings
from magicmix.errors import InvalidInput
from magicmix.netguard import (
    RefusedAddress,
    check_url,
    describe_transport_error,
    guarded_async_client,
)

logger = logging.getLogger(__name__)

_SECRET_BYTES = 32  # the spec asks for 24 to 64 random bytes
_MAX_DELAY_S = 600.0  # with up to 20 attempts, uncapped doubling would wait for days
_jitter = secrets.SystemRandom()


@dataclass(frozen=True)
class DeliveryOutcome:
    """How a delivery ended: `status_code` of the last answer, `error` when not delivered."""

    delivered: bool
    attempts: int
    status_code: int | None
    error: str | None


def new_signing_secret() -> str:
    """A fresh per-key signing secret in the spec's `whsec_<base64>` form."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


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


async def deliver_webhook(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str,
    msg_id: str,
    settings: Settings,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> DeliveryOutcome:
    """POST `payload` to `url`, retrying failures that may pass (network, 5xx, 429) with backoff.

    2xx is delivered; any other answer (a 4xx, or a redirect, which is not followed) is final.
    """
    try:
        await asyncio.to_thread(
            check_url, url, allow_private=settings.allow_private_urls, field="webhook"
        )
    except InvalidInput as err:
        logger.warning("webhook %s not sent: %s", msg_id, err.message)
        return DeliveryOutcome(delivered=False, attempts=0, status_code=None, error=err.message)

    body = json.dumps(payload, separators=(",", ":")).encode()
    max_attempts = settings.webhook_max_attempts
    status_code: int | None = None
    error: str | None = None
    async with guarded_async_client(
        allow_private=settings.allow_private_urls, timeout_s=settings.webhook_timeout_s
    ) as client:
        for attempt in range(1, max_attempts + 1):
            # a fresh timestamp each attempt: receivers refuse signatures older than minutes
            headers = sign_headers(secret, msg_id, body, datetime.now(UTC))
            status_code, error, retry = await _post_once(client, url, body, headers, settings)
            logger.info(
                "webhook %s attempt %d/%d: status=%s error=%s",
                msg_id,
                attempt,
                max_attempts,
                status_code,
                error,
            )
            if error is None:
                return DeliveryOutcome(
                    delivered=True, attempts=attempt, status_code=status_code, error=None
                )
            if not retry or attempt == max_attempts:
                break
            delay = min(settings.webhook_backoff_s * 2 ** (attempt - 1), _MAX_DELAY_S)
            await sleep(delay + _jitter.uniform(0, settings.webhook_backoff_s))
    return DeliveryOutcome(delivered=False, attempts=attempt, status_code=status_code, error=error)


async def _post_once(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    settings: Settings,
) -> tuple[int | None, str | None, bool]:
    """One attempt: (status code, error or None when delivered, whether a retry may help).

    The answer's body is never read: a receiver cannot make us hold or wait for it.
    """
    timeout_s = settings.webhook_timeout_s
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            status = response.status_code
    except RefusedAddress as err:  # the name resolved differently at connect time
        return None, f"webhook {err.message}", False
    except TimeoutError:
        return None, f"the receiver did not answer within {timeout_s:g} s", True
    except httpx.HTTPError as err:
        return None, describe_transport_error(err), True
    if 200 <= status < 300:
        return status, None, False
    retry = status == 429 or status >= 500
    return status, f"the receiver answered HTTP {status}", retry
