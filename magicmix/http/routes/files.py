"""GET routes: outputs of the service store, liveness, the playground, the API docs."""

from __future__ import annotations

import asyncio
import importlib.resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response

from magicmix import __version__
from magicmix.http.deps import ServiceDep
from magicmix.http.links import OUTPUTS
from magicmix.http.schemas import ErrorOut

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Swagger UI's files, from a pinned package that keeps them current (no CDN, no hand copy)
SWAGGER_UI_DIR = Path(str(importlib.resources.files("fastapi_offline") / "static"))
router = APIRouter()


@router.get(
    f"{OUTPUTS}/{{name}}",
    tags=["outputs"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}},
)
async def output(name: Annotated[str, PathParam(max_length=255)], service: ServiceDep) -> Response:
    """A PNG from the service store (deleted after the retention period)."""
    data = await asyncio.to_thread(service.output, name)
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.get("/healthz", tags=["system"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok", "version": __version__}


@router.get("/", include_in_schema=False, response_model=None)
async def playground() -> Response:
    index = STATIC_DIR / "index.html"
    if index.exists():
        return FileResponse(index)
    return JSONResponse({"status": "ok", "docs": "/docs"})


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    """Swagger UI over `/openapi.json`, every file served from here."""
    return FileResponse(STATIC_DIR / "docs.html")
