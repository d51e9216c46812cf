"""The `modal` package as the rehearsal gives it to the app: declarations and client calls.

Installed into `sys.modules["modal"]` (`install()`) before the app module is imported, in
the control plane and in every emulated container. Declarations (`App.function`,
`App.cls`, the decorators, `Image`, `Secret`, `Volume`) only record what the app asks
for; client calls (`spawn`, `FunctionCall.get`, `cancel`, ...) go over the wire to the
control plane (`rehearsal/control.py`), which holds the calls and inputs.

Only documented behaviour is emulated; each class says where it is documented. Options
that matter only to Modal's scheduler or billing (cpu, memory, region, cloud, proxy, ...)
are accepted and ignored, and listed in `functions.IGNORED_OPTIONS`; an unknown option is
a TypeError, as in Modal.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from rehearsal.fake_modal import _common, exception
from rehearsal.fake_modal._common import ENV_CONTAINER, ENV_STATE_DIR, ENV_WEB_URL, dumps, loads
from rehearsal.fake_modal.functions import (
    App,
    Cls,
    Function,
    FunctionCall,
    FunctionSpec,
    PartialFunction,
    asgi_app,
    batched,
    concurrent,
    enter,
    exit,
    method,
)
from rehearsal.fake_modal.resources import Cron, Image, Period, Retries, Secret, Volume

__all__ = [
    "ENV_CONTAINER",
    "ENV_STATE_DIR",
    "ENV_WEB_URL",
    "App",
    "Cls",
    "Cron",
    "Function",
    "FunctionCall",
    "FunctionSpec",
    "Image",
    "PartialFunction",
    "Period",
    "Retries",
    "Secret",
    "Volume",
    "app_of",
    "asgi_app",
    "batched",
    "concurrent",
    "dumps",
    "enter",
    "exception",
    "exit",
    "install",
    "is_local",
    "loads",
    "method",
]


def install(*, plane: bool = False) -> None:
    """Make `import modal` (and `modal.exception`) give this package in this process;
    `plane`: this is the control plane, in no image's container."""
    _common._ROLE["plane"] = plane
    sys.modules["modal"] = sys.modules[__name__]
    sys.modules["modal.exception"] = exception


def app_of(module: ModuleType) -> App:
    """The `modal.App` an app module declares."""
    return next(v for v in vars(module).values() if isinstance(v, App))


def is_local() -> bool:
    """True outside an (emulated) container, as `modal.is_local()`."""
    return ENV_CONTAINER not in os.environ
