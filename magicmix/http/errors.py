"""Errors to HTTP, in one place: the status of each error class, and ModelsLab's error body.

Lower layers raise `magicmix.errors` and know no status code; `STATUS` gives each class
its code (a subclass without its own entry takes its parent's), and every error reply
of the app, the middleware's included, is made by `error_response`. FastAPI's own
validation and HTTP errors get the same body. No stack trace or secret reaches a reply.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from magicmix.errors import (
    Busy,
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    MagicMixError,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    StorageError,
    Unauthorized,
)
from magicmix.http.schemas import ErrorOut

log = logging.getLogger(__name__)


class BodyTimeout(MagicMixError):
    """The request's body did not arrive in time (the HTTP edge's own error)."""


class FrameworkError(MagicMixError):
    """An error Starlette answers with a status of its own (405 and the like)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


STATUS: dict[type[MagicMixError], int] = {
    InvalidInput: 422,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    BodyTimeout: 408,
    Conflict: 409,
    Gone: 410,
    Busy: 429,
    NotSupported: 501,
    StorageError: 502,
}
INTERNAL = 500  # any other error: said without detail

# What OpenAPI lists for the API's routes: the errors a client can cause or meet
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    STATUS[kind]: {"model": ErrorOut, "description": (kind.__doc__ or "").split(";")[0]}
    for kind in (
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        Gone,
        PayloadTooLarge,
        InvalidInput,
        Busy,
    )
}


def status_of(err: MagicMixError) -> int:
    """The status of `err`: its class's entry in `STATUS`, else its nearest parent's."""
    if isinstance(err, FrameworkError):
        return err.status
    for kind in type(err).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return INTERNAL


def error_response(
    err: MagicMixError,
    *,
    errors: dict[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The reply to `err`: its status, ModelsLab's error body, `Retry-After` when busy.

    `errors` (field -> why) defaults to the error's own field; `headers` are the
    framework's for its own errors (405's `Allow`).
    """
    retry_after = err.retry_after if isinstance(err, Busy) else None
    body = ErrorOut(
        message=err.message,
        errors=errors or ({err.field: err.message} if err.field else None),
        retry_after=retry_after,
    )
    if retry_after:
        headers = {**(headers or {}), "Retry-After": str(max(1, round(retry_after)))}
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status_of(err), headers=headers
    )


def _field_of(location: tuple[Any, ...]) -> str:
    """The request field an error is about: bodies are flat, so the first name counts
    (pydantic adds union members after it, e.g. `track_id.int`)."""
    parts = [str(p) for p in location if p not in ("body", "path", "query", "header")]
    return parts[0] if parts else "body"


async def on_magicmix_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, MagicMixError)  # nosec B101 - registered for this type
    return error_response(err)


async def on_validation_error(request: Request, err: Exception) -> JSONResponse:
    """Every field pydantic refused, as one `InvalidInput` whose `errors` name them all."""
    assert isinstance(err, RequestValidationError)  # nosec B101 - registered for this type
    errors: dict[str, str] = {}
    for item in err.errors():
        field = "body" if item.get("type") == "json_invalid" else _field_of(tuple(item["loc"]))
        errors.setdefault(field, str(item.get("msg", "invalid")).removeprefix("Value error, "))
    summary = "; ".join(f"{field}: {why}" for field, why in errors.items())
    return error_response(InvalidInput(f"invalid input: {summary}"), errors=errors)


async def on_http_error(request: Request, err: Exception) -> JSONResponse:
    """Starlette's errors (unknown path, wrong method, unreadable body) in our body."""
    assert isinstance(err, StarletteHTTPException)  # nosec B101 - registered for this type
    cause = err.__cause__ or err.__context__
    if isinstance(cause, PayloadTooLarge):  # a chunked body over the limit
        return error_response(cause)
    if err.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8)
        return error_response(InvalidInput(f"invalid input: body: {err.detail}", field="body"))
    return error_response(
        FrameworkError(str(err.detail), status=err.status_code), headers=err.headers
    )


async def on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(MagicMixError("internal error; the request was not completed"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MagicMixError, on_magicmix_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
