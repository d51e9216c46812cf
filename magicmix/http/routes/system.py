"""System routes: details for any key; queue, cache and model controls for admin keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from magicmix.errors import NotSupported
from magicmix.http.deps import AdminKey, AnyKey, ServiceDep
from magicmix.http.errors import ERROR_RESPONSES, STATUS
from magicmix.http.links import EDITING
from magicmix.http.schemas import ErrorOut
from magicmix.replies import MessageOut, SystemDetailsOut

router = APIRouter(prefix=EDITING, tags=["system"], responses=ERROR_RESPONSES)


@router.post("/system_details", response_model=SystemDetailsOut)
def system_details(call: AnyKey, service: ServiceDep) -> SystemDetailsOut:
    """Model, device, dtype, queue length, version, and this key's webhook secret."""
    return service.system_details(call.principal)


@router.post("/clear_queue", response_model=MessageOut)
async def clear_queue(call: AdminKey, service: ServiceDep) -> MessageOut:
    """Cancel every queued job (admin key)."""
    return await service.clear_queue()


@router.post("/clear_cache", response_model=MessageOut)
def clear_cache(call: AdminKey, service: ServiceDep) -> MessageOut:
    """Drop cached text embeddings and free GPU memory (admin key)."""
    return service.clear_cache()


@router.post("/restart_server", response_model=MessageOut)
def restart_server(call: AdminKey, service: ServiceDep) -> MessageOut:
    """Reload the model before the next batch (admin key)."""
    return service.restart_server()


NOT_SUPPORTED: dict[int | str, dict[str, Any]] = {
    STATUS[NotSupported]: {"model": ErrorOut, "description": "not done through the API"}
}


@router.post("/update_server", response_model=MessageOut, responses=NOT_SUPPORTED)
@router.post("/update", response_model=MessageOut, responses=NOT_SUPPORTED)
def update_server(call: AdminKey, service: ServiceDep) -> MessageOut:
    """Explains that updating is done by redeploying (admin key): always an error."""
    return service.update_server()
