"""Download a layout image from a user-given URL, within size, time and address limits.

Everything the caller cannot trust is bounded here: where we connect (`netguard`, on every
redirect hop), how long it may take in total (a server dripping one byte a second is cut off
by the overall deadline, not kept alive by per-read timeouts), and how many bytes we hold.
The bytes themselves are checked later by `images.decode_image`, not by their content type.
"""

from __future__ import annotations

import asyncio

import httpx

from magicmix.config import Settings
from magicmix.errors import InvalidInput, PayloadTooLarge
from magicmix.inputs.netguard import (
    RefusedAddress,
    check_url,
    describe_transport_error,
    guarded_async_client,
)

MAX_REDIRECTS = 5


async def fetch_image_bytes(
    url: str, settings: Settings, *, field: str = "image", within_s: float | None = None
) -> bytes:
    """The body at `url`, after up to `MAX_REDIRECTS` checked redirects; errors are client-safe.

    All of it takes at most `fetch_timeout_s`, or `within_s` when that is shorter (what is
    left of the request's own deadline).
    """
    deadline_s = settings.fetch_timeout_s
    if within_s is not None:
        deadline_s = max(0.5, min(deadline_s, within_s))
    try:
        async with (
            asyncio.timeout(deadline_s),
            guarded_async_client(
                allow_private=settings.allow_private_urls, timeout_s=deadline_s
            ) as client,
        ):
            return await _follow_redirects(client, url, settings, field)
    except TimeoutError as err:
        raise InvalidInput(
            f"fetching the {field} URL took longer than {deadline_s:g} s; gave up", field=field
        ) from err


async def _follow_redirects(
    client: httpx.AsyncClient, url: str, settings: Settings, field: str
) -> bytes:
    """GET `url`, checking each hop before connecting to it."""
    for _ in range(MAX_REDIRECTS + 1):
        await asyncio.to_thread(
            check_url, url, allow_private=settings.allow_private_urls, field=field
        )
        try:
            async with client.stream("GET", url) as response:
                if response.is_redirect:
                    url = _redirect_target(response, field)
                    continue
                _check_response(response, settings, field)
                return await _read_capped(response, settings.max_image_bytes, field)
        except RefusedAddress as err:  # the name resolved differently at connect time
            raise InvalidInput(f"{field} {err.message}", field=field) from err
        except httpx.HTTPError as err:
            raise InvalidInput(
                f"could not fetch the {field} URL: {describe_transport_error(err)}", field=field
            ) from err
    raise InvalidInput(
        f"the {field} URL redirected more than {MAX_REDIRECTS} times; gave up", field=field
    )


def _redirect_target(response: httpx.Response, field: str) -> str:
    """The absolute URL a redirect points to (relative `Location`s resolve against the hop)."""
    location = response.headers["location"]
    try:
        return str(response.url.join(location))
    except httpx.InvalidURL as err:
        raise InvalidInput(
            f"the {field} URL redirected to an invalid URL: {location!r}", field=field
        ) from err


def _check_response(response: httpx.Response, settings: Settings, field: str) -> None:
    """Refuse error statuses, announced oversize bodies and web pages before reading a byte."""
    if not response.is_success:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        raise InvalidInput(
            f"the {field} URL answered HTTP {response.status_code}{reason}", field=field
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_image_bytes:
        raise PayloadTooLarge(
            f"the {field} URL's file is {int(length)} bytes; "
            f"the limit is {settings.max_image_bytes} bytes",
            field=field,
        )
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "text/html":
        raise InvalidInput(
            f"the {field} URL returned a web page (text/html), not an image; "
            "link the image file itself",
            field=field,
        )


async def _read_capped(response: httpx.Response, max_bytes: int, field: str) -> bytes:
    """The body, refused as soon as it grows past `max_bytes` (Content-Length may lie)."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise PayloadTooLarge(
                f"the {field} URL's file is larger than {max_bytes} bytes", field=field
            )
    return bytes(data)
