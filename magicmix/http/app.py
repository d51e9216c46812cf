"""The HTTP layer: a FastAPI app over `MagicMixService`. Thin by design.

Routes parse the body, authenticate, call one service method. Errors from the layers
below are mapped to status codes and ModelsLab's error body here, in one place; nothing
else in the package imports FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from magicmix import __version__
from magicmix.errors import MagicMixError, PayloadTooLarge
from magicmix.schemas import (
    ErrorOut,
    JobOut,
    KeyIn,
    MagicMixIn,
    MessageOut,
    ResetS3In,
    SystemDetailsOut,
    UpdateS3In,
)
from magicmix.service import API_BASE, MagicMixService

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why}
    for code, why in [
        (401, "invalid API key"),
        (403, "admin key needed"),
        (404, "unknown id"),
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


def _field_of(location: tuple[Any, ...]) -> str:
    parts = [str(p) for p in location if p not in ("body", "path", "query")]
    return ".".join(parts) or "body"


async def on_magicmix_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, MagicMixError)  # nosec B101 - registered for this type
    errors = {err.field: err.message} if err.field else None
    return error_response(
        err.status_code,
        ErrorOut(message=err.message, errors=errors, retry_after=getattr(err, "retry_after", None)),
    )


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
    if isinstance(err.__cause__ or err.__context__, PayloadTooLarge):  # a chunked body
        return await on_magicmix_error(request, err.__cause__ or err.__context__)  # type: ignore[arg-type]
    if err.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8)
        why = str(err.detail)
        return error_response(
            422, ErrorOut(message=f"invalid input: body: {why}", errors={"body": why})
        )
    return error_response(err.status_code, ErrorOut(message=str(err.detail)))


async def on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, ErrorOut(message="internal error; the request was not completed"))


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413) before they are buffered in full."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"request body is over {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except PayloadTooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        response = error_response(
            413, ErrorOut(message=f"request body is over {self.max_bytes} bytes")
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def create_app(service: MagicMixService, *, background_cleanup: bool = True) -> FastAPI:
    """The whole API over one service; the same app runs under uvicorn and on Modal.

    `background_cleanup` sweeps expired outputs from the web process; on Modal a scheduled
    function does that instead.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        cleaner = asyncio.create_task(service.cleanup_forever()) if background_cleanup else None
        yield
        if cleaner is not None:
            cleaner.cancel()
        await service.stop()

    app = FastAPI(
        title="magicmix",
        version=__version__,
        description="MagicMix semantic image mixing, compatible with ModelsLab's enterprise"
        " `magic_mix` API. Every POST body carries the API key as `key`.",
        lifespan=lifespan,
    )
    app.add_exception_handler(MagicMixError, on_magicmix_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_body_bytes)

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        log.info(
            "%s %s -> %d in %.1fms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    editing = f"{API_BASE}/image_editing"
    job_reply = {
        "response_model": JobOut,
        "response_model_exclude_none": True,
        "responses": ERROR_RESPONSES,
    }
    message_reply = {"response_model": MessageOut, "responses": ERROR_RESPONSES}

    @app.post(f"{editing}/magic_mix", tags=["magic mix"], **job_reply)  # type: ignore[arg-type]
    async def magic_mix(body: MagicMixIn) -> JobOut:
        """Mix the layout of `image` with the content of `prompt`. Answers `success`, or
        `processing` with a `fetch_result` URL when not done within the sync window."""
        return await service.submit(body, service.authenticate(body.key))

    @app.post(f"{editing}/fetch/{{job_id}}", tags=["magic mix"], **job_reply)  # type: ignore[arg-type]
    async def fetch(body: KeyIn, job_id: Annotated[int, PathParam(ge=1, le=MAX_JOB_ID)]) -> JobOut:
        """The current state of a job made with this key."""
        return await service.fetch(job_id, service.authenticate(body.key))

    @app.post(
        f"{editing}/system_details",
        tags=["system"],
        response_model=SystemDetailsOut,
        responses=ERROR_RESPONSES,
    )
    def system_details(body: KeyIn) -> SystemDetailsOut:
        """Model, device, dtype, queue length, version, and this key's webhook secret."""
        return service.system_details(service.authenticate(body.key))

    @app.post(f"{editing}/clear_queue", tags=["system"], **message_reply)  # type: ignore[arg-type]
    def clear_queue(body: KeyIn) -> MessageOut:
        """Cancel every queued job (admin key)."""
        service.authenticate(body.key, admin=True)
        return service.clear_queue()

    @app.post(f"{editing}/clear_cache", tags=["system"], **message_reply)  # type: ignore[arg-type]
    def clear_cache(body: KeyIn) -> MessageOut:
        """Drop cached text embeddings and free GPU memory (admin key)."""
        service.authenticate(body.key, admin=True)
        return service.clear_cache()

    @app.post(f"{editing}/restart_server", tags=["system"], **message_reply)  # type: ignore[arg-type]
    def restart_server(body: KeyIn) -> MessageOut:
        """Reload the model before the next batch (admin key)."""
        service.authenticate(body.key, admin=True)
        return service.restart_server()

    @app.post(f"{editing}/update_server", tags=["system"], **message_reply)  # type: ignore[arg-type]
    @app.post(f"{editing}/update", tags=["system"], **message_reply)  # type: ignore[arg-type]
    def update_server(body: KeyIn) -> JSONResponse:
        """Explains that updating is done by redeploying (admin key)."""
        service.authenticate(body.key, admin=True)
        return JSONResponse(service.update_server().model_dump(), status_code=501)

    @app.post(f"{API_BASE}/update_s3", tags=["s3"], **message_reply)  # type: ignore[arg-type]
    async def update_s3(body: UpdateS3In) -> MessageOut:
        """Save S3 details (checked with a probe object first); later outputs of this key
        go to that bucket and are never deleted by the service."""
        return await service.update_s3(body, service.authenticate(body.key))

    @app.post(f"{API_BASE}/reset_s3", tags=["s3"], **message_reply)  # type: ignore[arg-type]
    def reset_s3(body: ResetS3In) -> MessageOut:
        """Forget this key's S3 details."""
        return service.reset_s3(service.authenticate(body.key))

    @app.get(
        "/outputs/{name}",
        tags=["outputs"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}},
    )
    async def output(name: Annotated[str, PathParam(max_length=255)]) -> Response:
        """A PNG from the service store (deleted after the retention period)."""
        data = await asyncio.to_thread(service.output, name)
        return Response(
            data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
        )

    @app.get("/healthz", tags=["system"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/", include_in_schema=False, response_model=None)
    async def playground() -> Response:
        index = STATIC_DIR / "index.html"
        if index.exists():
            return FileResponse(index)
        return JSONResponse({"status": "ok", "docs": "/docs"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    return app
