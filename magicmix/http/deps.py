"""Dependencies the routes declare: the service, and the caller's key checked (or admin).

`keyed(Model)` makes the dependency that owns a route's body: it parses `Model` (so the
body is parsed once, and documented once in OpenAPI) and authenticates its `key`. Written
without postponed annotations on purpose: FastAPI reads the body model from the
signature at definition time.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, cast

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from magicmix.http.schemas import KeyIn
from magicmix.keys import Principal
from magicmix.service import MagicMixService

Body = TypeVar("Body", bound=KeyIn)


def get_service(request: Request) -> MagicMixService:
    service: MagicMixService = request.app.state.service
    return service


ServiceDep = Annotated[MagicMixService, Depends(get_service)]


@dataclass(frozen=True)
class Keyed(Generic[Body]):
    """A route's parsed body and who sent it."""

    body: Body
    principal: Principal


def keyed(model: type[Body], *, admin: bool = False) -> Any:
    """A dependency parsing `model` as the body and authenticating its key (admin if asked)."""

    async def dependency(body: model, service: ServiceDep, request: Request) -> Keyed[Body]:  # type: ignore[valid-type]
        # `BodyGuard` authenticated this very key (read from the same bytes) before parsing
        checked = getattr(request.state, "principal", None)
        if isinstance(checked, Principal):
            return Keyed(body, service.authorize(checked, admin=admin))
        key = cast(KeyIn, body).key
        principal = await run_in_threadpool(service.authenticate, key, admin=admin)
        return Keyed(body, principal)

    return Depends(dependency)


AnyKey = Annotated[Keyed[KeyIn], keyed(KeyIn)]
AdminKey = Annotated[Keyed[KeyIn], keyed(KeyIn, admin=True)]
