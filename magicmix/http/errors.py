"""Errors to HTTP, in one place: status codes and ModelsLab's error body.

Lower layers raise `magicmix.errors`; FastAPI's own validation and HTTP errors get the
same body. No stack trace or secret reaches a reply.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from magicmix.errors import MagicMixError, PayloadTooLarge
from magicmix.http.schemas import ErrorOut

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why}
    for code, why in [
        (401, "invalid API key"),
        (403, "admin key needed"),
        (404, "unknown id"),
        (409, "the same Idempotency-Key is still being accepted"),
        (410, "outputs expired"),
        (413, "input too large"),
        (422, "invalid input"),
        (429, "over capacity; see retry_after"),
    ]
}


def error_response(status_code: int, body: ErrorOut) -> JSONResponse:
    headers = {"Retry-After": str(int(body.retry_after))} if body.retry_after else None
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status_code, headers=headers
    )


def magicmix_error_response(err: MagicMixError) -> JSONResponse:
    errors = {err.field: err.message} if err.field else None
    return error_response(
        err.status_code,
        ErrorOut(message=err.message, errors=errors, retry_after=getattr(err, "retry_after", None)),
    )


def _field_of(location: tuple[Any, ...]) -> str:
    """The request field an error is about: bodies are flat, so the first name counts
    (pydantic adds union members after it, e.g. `track_id.int`)."""
    parts = [str(p) for p in location if p not in ("body", "path", "query", "header")]
    return parts[0] if parts else "body"


async def on_magicmix_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, MagicMixError)  # nosec B101 - registered for this type
    return magicmix_error_response(err)


async def on_validation_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)  # nosec B101 - registered for this type
    errors: dict[str, str] = {}
    for item in err.errors():
        field = "body" if item.get("type") == "json_invalid" else _field_of(tuple(item["loc"]))
        errors.setdefault(field, str(item.get("msg", "invalid")).removeprefix("Value error, "))
    summary = "; ".join(f"{field}: {why}" for field, why in errors.items())
    return error_response(422, ErrorOut(message=f"invalid input: {summary}", errors=errors))


async def on_http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)  # nosec B101 - registered for this type
    cause = err.__cause__ or err.__context__
    if isinstance(cause, PayloadTooLarge):  # a chunked body over the limit
        return magicmix_error_response(cause)
    if err.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8)
        why = str(err.detail)
        return error_response(
            422, ErrorOut(message=f"invalid input: body: {why}", errors={"body": why})
        )
    return error_response(err.status_code, ErrorOut(message=str(err.detail)))


async def on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, ErrorOut(message="internal error; the request was not completed"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MagicMixError, on_magicmix_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
