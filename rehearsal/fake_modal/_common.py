"""What the stand-in `modal` modules share: how values travel, and blocking calls' `.aio`."""

from __future__ import annotations

import asyncio
import functools
import pickle  # nosec B403 - values of the rehearsed app itself, as Modal pickles them
from collections.abc import Callable
from typing import Any

ENV_CONTAINER = "REHEARSAL_CONTAINER_ID"
ENV_STATE_DIR = "REHEARSAL_STATE_DIR"
ENV_WEB_URL = "REHEARSAL_WEB_URL"
_ROLE = {"plane": False}  # set by `install(plane=True)` in the control plane
PICKLE_PROTOCOL = 4  # fixed: every process of the rehearsal reads what any other wrote


def in_control_plane() -> bool:
    """Whether this process is the rehearsal's control plane (in no image's container)."""
    return _ROLE["plane"]


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)  # nosec B301 - written by the rehearsal's own processes


class _Blocking:
    """A blocking call with its `.aio` twin, as Modal's synchronicity wrappers give."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._fn, *args, **kwargs)


class api:
    """Method decorator: `obj.m(...)` blocks, `obj.m.aio(...)` awaits."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return _Blocking(self._fn.__get__(obj, owner))
