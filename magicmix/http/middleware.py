"""ASGI middleware: limits on every request body checked before it is parsed; HEAD as GET;
the browser-hardening headers; the access log.

Starlette has neither a body-size limit nor a body-read timeout, and FastAPI parses a
body (on the event loop) before any dependency runs, so the key check of `http.deps`
comes too late to stop an unauthenticated client from costing seconds of parsing.
`BodyGuard` reads the body itself first, within limits of bytes, time and structure,
refuses a body whose key is wrong, or cannot be read without parsing it, and hands the
bytes on. Its refusals are the app's own error replies (`http.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import logging
import re
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from magicmix.errors import InvalidInput, MagicMixError, PayloadTooLarge, Unauthorized
from magicmix.http.errors import BodyTimeout, error_response

log = logging.getLogger("magicmix.http.access")

# A member named "key", spelled plainly or with \u escapes (`"k\u0065y"` is the same name to
# a JSON parser), whose opening quote is not itself escaped: preceded by an even run of
# backslashes. In valid JSON such a match is a member name, never text inside a string.
_KEY_NAME = re.compile(
    rb'(?<!\\)(?:\\\\)*"(?P<name>(?:k|\\u006[bB])(?:e|\\u0065)(?:y|\\u0079))"\s*:\s*'
)
# The key's value as we accept it: a JSON string of 1..256 bytes, no escape in it
_PLAIN_VALUE = re.compile(rb'"([^"\\\x00-\x1f]{1,256})"')
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-32's begin so too


def plain_key(body: bytes) -> str:
    """The API key of a JSON body, read from its bytes without parsing them.

    RFC 8259 section 8.1: JSON between systems is UTF-8 without a byte order mark; a body
    in another encoding is refused (422) before anything reads it. The key must be one
    plain member: `"key": "..."`, a string without escapes, present once. Anything else
    (a name spelled with escapes, a duplicate, a number, an escaped value) could only be
    read by parsing the whole body, which is what an unauthenticated client must not
    cost: refused with 401.
    """
    if body.startswith(_BOMS) or b"\x00" in body:
        raise InvalidInput(
            "the body must be JSON in UTF-8 without a byte order mark (RFC 8259)", field="body"
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(
            f"the body is not valid UTF-8 (at byte {err.start}); JSON must be UTF-8",
            field="body",
        ) from err
    names = list(itertools.islice(_KEY_NAME.finditer(body), 2))
    if not names:
        raise Unauthorized('no API key: send it in the body as "key"')
    value = _PLAIN_VALUE.match(body, names[0].end())
    if len(names) > 1 or names[0]["name"] != b"key" or value is None:
        raise Unauthorized(
            "the API key must be sent once, as a plain JSON string of 1 to 256 bytes without"
            ' escapes: "key": "..."'
        )
    return value.group(1).decode("utf-8")


class BodyGuard:
    """Read each POST body within limits, then check its key before anything parses it.

    - more than `max_bytes` (declared or sent): 413;
    - not all there within `timeout_s` of the first byte asked for: 408;
    - more than `max_containers` JSON arrays and objects (`[` and `{`; our bodies are
      flat objects): 422, since millions of `[]` cost seconds and hundreds of MB to parse;
    - not UTF-8, or no key readable without parsing (`plain_key`): 422 or 401;
    - a `"key"` that `authenticate` refuses: 401.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        max_containers: int,
        authenticate: Callable[[str], object],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_containers = max_containers
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            principal = await self._check(body)
        except MagicMixError as err:  # answered as the app's handlers would, before it runs
            await error_response(err)(scope, receive, send)
            return
        except TimeoutError:
            late = BodyTimeout(f"the body did not arrive within {self.timeout_s:g} s")
            await error_response(late)(scope, receive, send)
            return
        if principal is not None:  # the route's key check reuses it (`http.deps.keyed`)
            scope.setdefault("state", {})["principal"] = principal
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"request body is over {self.max_bytes} bytes")
        body = bytearray()
        deadline = time.monotonic() + self.timeout_s
        while True:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                message = await receive()
            if message["type"] == "http.disconnect":
                raise MagicMixError("the client went away")
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise PayloadTooLarge(f"request body is over {self.max_bytes} bytes")
            if not message.get("more_body", False):
                return bytes(body)

    async def _check(self, body: bytes) -> object | None:
        """The body's key authenticated (None: the key store could not say, so the route
        will ask again); refusals raised."""
        key = plain_key(body)
        principal = None
        try:
            principal = await run_in_threadpool(self.authenticate, key)
        except Unauthorized:
            raise
        except MagicMixError:  # e.g. the key store is busy: let the route decide
            pass
        containers = body.count(b"[") + body.count(b"{")
        if containers > self.max_containers:
            raise InvalidInput(
                f"the body has {containers} JSON arrays and objects; at most"
                f" {self.max_containers} are accepted",
                field="body",
            )
        return principal


class SecurityHeaders:
    """Headers that make every page and file safe to open in a browser.

    The playground keeps the API key in the browser; the CSP is what keeps any script but
    this server's own from reading it: no inline script, no outside script or style, no
    framing. Images may come from anywhere (outputs in a user's bucket, the image URL a
    user previews); requests go to this origin only.
    """

    HEADERS = (
        (
            b"content-security-policy",
            b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:"
            b" blob: http: https:; connect-src 'self'; base-uri 'none'; form-action 'self';"
            b" frame-ancestors 'none'",
        ),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


class HeadAsGet:
    """HEAD wherever GET works (RFC 9110 section 9.3.2): the GET route answers, its headers
    go out, its body does not.

    FastAPI's routes answer only the methods they name (Starlette's own add HEAD to GET),
    so a HEAD is routed as a GET here, once for every route (the API's, `/docs`,
    `/openapi.json`, static files), without documenting a HEAD twin of each in OpenAPI.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):  # the GET's Content-Length stays
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class AccessLog:
    """One line per request: method, path (never the query string), status, time.

    The outermost middleware, so it also stamps the request's arrival
    (`request.state.arrived`, monotonic), from which the request's deadline counts.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            log.info(
                "%s %s -> %d in %.1fms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )
