"""The FastAPI app over one `MagicMixService`: the same app under uvicorn and on Modal.

Routes live one router per concern in `http/routes/`, take the service and the caller's
key through `http/deps.py`, and call one service method each.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from magicmix import __version__
from magicmix.http.errors import install_error_handlers
from magicmix.http.middleware import AccessLog, BodyGuard, HeadAsGet, SecurityHeaders
from magicmix.http.routes import files, mix, s3, system
from magicmix.service import MagicMixService


def create_app(service: MagicMixService) -> FastAPI:
    """The whole API over `service`, which starts and stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="magicmix",
        version=__version__,
        description="MagicMix semantic image mixing, compatible with ModelsLab's enterprise"
        " `magic_mix` API. Every POST body carries the API key as `key`.",
        lifespan=lifespan,
        docs_url=None,  # ours, served offline (`routes.files.docs`); FastAPI's loads a CDN
        redoc_url=None,
    )
    app.state.service = service
    install_error_handlers(app)
    settings = service.settings
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        max_containers=settings.max_json_containers,
        authenticate=service.authenticate,
    )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HeadAsGet)
    app.add_middleware(AccessLog)
    for module in (mix, system, s3, files):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=files.STATIC_DIR, check_dir=False), name="static")
    app.mount("/docs/vendor", StaticFiles(directory=files.SWAGGER_UI_DIR), name="swagger-ui")
    return app
