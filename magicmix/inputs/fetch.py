"""Download a layout image from a user-given URL, within size, time and address limits.

Everything the caller cannot trust is bounded here: where we connect (`netguard`, on every
redirect hop), how long it may take in total (a server dripping one byte a second is cut off
by the overall deadline, not kept alive by per-read timeouts), and how many bytes we hold.
The bytes themselves are checked later by `images.decode_image`, not by their content type.

Compressed bodies: we ask for `Accept-Encoding: identity`, but a server may send gzip
anyway (an S3 object stored with `Content-Encoding: gzip` is served so to everyone).
httpx would inflate each network read whole before we could count it: 64 KB of gzip of
zeros is 64 MB, so 32 such fetches held gigabytes. So the raw stream is read and inflated
here, a bounded step at a time, and no stage ever holds more than `max_image_bytes` (+1):
gzip and deflate, up to `MAX_CODINGS` layers (`gzip, gzip`); any other coding (br, zstd,
compress, unknown) is refused, since we asked for none.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

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
MAX_CODINGS = 2  # content codings in one Content-Encoding, each bounded on its own
INFLATE_STEP = 256 * 1024  # bytes inflated between two turns of the event loop
_GZIP = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": zlib.MAX_WBITS}  # RFC 9110 8.4.1


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
    """The decoded body, refused as soon as any stage grows past `max_bytes` (Content-Length
    and the compression ratio may both lie)."""
    body: AsyncIterator[bytes] = response.aiter_raw()
    for coding in reversed(_codings(response, field)):  # the last one applied comes off first
        body = _inflate(body, coding, max_bytes, field)
    chunks: list[bytes] = []  # joined once at the end: a growing buffer would copy itself
    size = 0
    async for chunk in body:
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes, field)
    return b"".join(chunks)


def _codings(response: httpx.Response, field: str) -> list[str]:
    """The body's content codings, in the order the server applied them."""
    codings = [
        coding.strip().lower()
        for coding in response.headers.get("content-encoding", "").split(",")
        if coding.strip().lower() not in ("", "identity")
    ]
    unknown = sorted({coding for coding in codings if coding not in _ZLIB_WBITS})
    if unknown:
        raise InvalidInput(
            f"the {field} URL sent its file compressed as {', '.join(unknown)}, which is not"
            " accepted; serve it uncompressed (or gzip)",
            field=field,
        )
    if len(codings) > MAX_CODINGS:
        raise InvalidInput(
            f"the {field} URL sent its file compressed {len(codings)} times over; at most"
            f" {MAX_CODINGS} layers are accepted",
            field=field,
        )
    return codings


async def _inflate(
    chunks: AsyncIterator[bytes], coding: str, max_bytes: int, field: str
) -> AsyncIterator[bytes]:
    """`chunks` decompressed, never producing more than `max_bytes` + 1 bytes in all.

    zlib's `max_length` stops each step at `INFLATE_STEP` bytes (or what is left of the
    budget), and the event loop gets a turn between steps: 64 KB of gzip is 64 MB.
    """
    inflater = zlib.decompressobj(_ZLIB_WBITS[coding])
    left = max_bytes
    try:
        async for chunk in chunks:
            pending = chunk
            while pending:
                out = inflater.decompress(pending, min(left + 1, INFLATE_STEP))
                pending = inflater.unconsumed_tail
                if len(out) > left:  # the budget is spent with input left over
                    raise _too_large(max_bytes, field)
                left -= len(out)
                yield out
                await asyncio.sleep(0)
        out = inflater.flush()  # all input is consumed: only zlib's last few bytes remain
    except zlib.error as err:
        raise InvalidInput(
            f"the {field} URL's {coding} body is corrupt: {err}", field=field
        ) from err
    if len(out) > left:
        raise _too_large(max_bytes, field)
    if not inflater.eof:
        raise InvalidInput(f"the {field} URL's {coding} body is truncated", field=field)
    yield out


def _too_large(max_bytes: int, field: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"the {field} URL's file is larger than {max_bytes} bytes", field=field)
