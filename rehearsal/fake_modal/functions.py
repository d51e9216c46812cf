"""Decorators, functions, classes and calls of the stand-in `modal`: what `App` records and
what `spawn`, `remote` and `FunctionCall` send to the control plane."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from rehearsal import wire
from rehearsal.fake_modal import exception
from rehearsal.fake_modal._common import ENV_WEB_URL, api, dumps, loads
from rehearsal.fake_modal.resources import Cron, Image, Period, Retries, Secret, Volume, _retries

# `modal/_partial_function.py`
MAX_MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000
DEFAULT_SCALEDOWN_WINDOW_S = 60.0  # https://modal.com/docs/guide/cold-start (scaledown_window)

IGNORED_OPTIONS = frozenset(
    {
        "serialized",
        "network_file_systems",
        "cpu",
        "memory",
        "ephemeral_disk",
        "buffer_containers",
        "proxy",
        "startup_timeout",
        "is_generator",
        "cloud",
        "region",
        "routing_region",
        "nonpreemptible",
        "block_network",
        "restrict_modal_access",
        "single_use_containers",
        "i6pn",
        "include_source",
        "experimental_options",
        "_experimental_restrict_output",
        "max_inputs",
    }
)


@dataclasses.dataclass(frozen=True)
class PartialFunction:
    """What `modal.enter`, `batched`, `concurrent`, `asgi_app`, ... make of a function.

    Stacked decorators merge into one, as in modal/_partial_function.py. On an instance
    of the user class it is the plain bound method, so methods can call each other.
    """

    raw_f: Callable[..., Any]
    enter_snap: bool | None = None  # None: not an enter method
    exit: bool = False
    method: bool = False
    batch: tuple[int, int] | None = None  # (max_batch_size, wait_ms)
    max_inputs: int | None = None  # @modal.concurrent
    asgi: bool = False

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else self.raw_f.__get__(obj, owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)


def _stack(**changes: Any) -> Callable[[Any], PartialFunction]:
    def wrap(obj: Any) -> PartialFunction:
        if isinstance(obj, PartialFunction):
            return dataclasses.replace(obj, **changes)
        return PartialFunction(obj, **changes)

    return wrap


def enter(*, snap: bool = False) -> Callable[[Any], PartialFunction]:
    """Runs when a container starts: `snap=True` ones before the memory snapshot, the rest
    after it (modal/_runtime/user_code_imports.py, `lifecycle_context`)."""
    return _stack(enter_snap=snap)


def exit() -> Callable[[Any], PartialFunction]:
    """Runs when a container is about to exit (https://modal.com/docs/guide/lifecycle-functions)."""
    return _stack(exit=True)


def method(*, is_generator: bool | None = None) -> Callable[[Any], PartialFunction]:
    return _stack(method=True)


def batched(*, max_batch_size: int, wait_ms: int) -> Callable[[Any], PartialFunction]:
    """Inputs are grouped: a container takes up to `max_batch_size`, waiting at most
    `wait_ms` after the first (https://modal.com/docs/guide/dynamic-batching)."""
    if not 1 <= max_batch_size <= MAX_MAX_BATCH_SIZE:
        raise exception.InvalidError(f"max_batch_size must be 1 to {MAX_MAX_BATCH_SIZE}.")
    if not 0 <= wait_ms <= MAX_BATCH_WAIT_MS:
        raise exception.InvalidError(f"wait_ms must be 0 to {MAX_BATCH_WAIT_MS}.")
    return _stack(batch=(max_batch_size, wait_ms), method=True)


def concurrent(
    *, max_inputs: int | None = None, target_inputs: int | None = None
) -> Callable[[Any], PartialFunction]:
    """At most `max_inputs` inputs at once per container (modal/_partial_function.py)."""
    if max_inputs is None:
        raise TypeError("`@modal.concurrent()` missing required argument: `max_inputs`.")
    return _stack(max_inputs=max_inputs)


def asgi_app(
    *, label: str | None = None, custom_domains: Any = None, requires_proxy_auth: bool = False
) -> Callable[[Any], PartialFunction]:
    """The function returns an ASGI app, served at the web URL (`--port`)."""
    return _stack(asgi=True)


@dataclasses.dataclass
class FunctionSpec:
    """One deployed function or class, as the app declared it."""

    tag: str
    image: Image
    secrets: list[Secret]
    env: dict[str, str | None]
    gpu: Any
    volumes: dict[str, Volume]
    retries: Retries | None
    timeout: float
    max_containers: int | None
    min_containers: int
    scaledown_window: float
    schedule: Cron | Period | None
    enable_memory_snapshot: bool
    raw_f: Callable[..., Any] | None = None  # a function
    user_cls: type | None = None  # a class
    methods: dict[str, PartialFunction] = dataclasses.field(default_factory=dict)
    batch: tuple[int, int] | None = None
    max_inputs: int | None = None
    web: bool = False

    def lifecycle(self, *, snap: bool | None = None, exit: bool = False) -> list[str]:
        """Names of the class's enter (`snap` True/False) or exit methods, in order."""
        if exit:
            return [name for name, pf in self.methods.items() if pf.exit]
        return [name for name, pf in self.methods.items() if pf.enter_snap is snap]


class FunctionCall:
    """`modal.FunctionCall` (modal/_functions.py): a spawned input, by id."""

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id

    @classmethod
    def from_id(cls, function_call_id: str, client: Any = None) -> FunctionCall:
        return cls(function_call_id)

    @api
    def get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        """The result; the built-in TimeoutError while it runs (`poll_function`)."""
        return _outcome(wire.current().modal("get", self.object_id, timeout))

    @api
    def cancel(self, terminate_containers: bool = False) -> None:
        """ "Cancel the FunctionCall and terminate its inputs without retrying."""
        wire.current().modal("cancel", self.object_id, terminate_containers)


def _outcome(reply: tuple[str, Any]) -> Any:
    """A call's outcome as modal's `_process_result` turns a result into a value or a raise."""
    kind, value = reply
    if kind == "success":
        return loads(value)
    if kind == "pending":
        raise TimeoutError()  # the built-in one, as `poll_function` raises
    if kind == "failure":
        try:
            error = loads(value)
        except Exception as err:
            raise exception.ExecutionError(
                f"Could not deserialize remote exception due to local error: {err!r}"
            ) from err
        raise error
    if kind == "timeout":
        raise exception.FunctionTimeoutError(value)
    raise exception.RemoteError(value)  # terminated: no data, so RemoteError


class Function:
    """A deployed function, or one method of a class: `spawn`, `remote`, `local`."""

    def __init__(
        self, tag: str, method: str | None = None, spec: FunctionSpec | None = None
    ) -> None:
        self._tag = tag
        self._method = method
        self._spec = spec

    @classmethod
    def from_name(
        cls, app_name: str, name: str, *, environment_name: str | None = None, client: Any = None
    ) -> Function:
        wire.current().call("lookup", app_name, name)
        return cls(name)

    @api
    def spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        call_id = wire.current().modal("spawn", self._tag, self._method, dumps((args, kwargs)))
        return FunctionCall(call_id)

    @api
    def remote(self, *args: Any, **kwargs: Any) -> Any:
        reply = wire.current().modal("remote", self._tag, self._method, dumps((args, kwargs)))
        return _outcome(reply)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self._spec is None or self._spec.raw_f is None:
            raise exception.InvalidError(f"{self._tag}.local() needs the function's own code")
        return self._spec.raw_f(*args, **kwargs)

    def get_web_url(self) -> str | None:
        """The rehearsal's front door (`--port`), for a web function."""
        if self._spec is not None and not self._spec.web:
            return None
        return os.environ.get(ENV_WEB_URL)


class Cls:
    """What `@app.cls` gives: `Cls()` is an object whose methods are `Function`s."""

    def __init__(self, tag: str, spec: FunctionSpec | None = None) -> None:
        self._tag = tag
        self._spec = spec

    @classmethod
    def from_name(
        cls, app_name: str, name: str, *, environment_name: str | None = None, client: Any = None
    ) -> Cls:
        wire.current().call("lookup", app_name, name)
        return cls(name)

    def __call__(self, *args: Any, **kwargs: Any) -> _Obj:
        if args or kwargs:
            raise exception.InvalidError("the rehearsal does not emulate parametrized classes")
        return _Obj(self)


class _Obj:
    def __init__(self, cls: Cls) -> None:
        self._cls = cls

    def __getattr__(self, name: str) -> Function:
        spec = self._cls._spec
        if spec is not None and name not in spec.methods:
            raise AttributeError(f"{self._cls._tag} has no method {name!r}")
        return Function(self._cls._tag, name, spec)


class App:
    """`modal.App`: records the functions and classes the module declares."""

    def __init__(
        self,
        name: str | None = None,
        *,
        image: Image | None = None,
        secrets: list[Secret] | None = None,
        volumes: dict[str, Volume] | None = None,
        include_source: bool | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.name = name or "app"
        self.image = image or Image("default")
        self.secrets = list(secrets or [])
        self.volumes = dict(volumes or {})
        self.specs: dict[str, FunctionSpec] = {}

    def _spec(self, tag: str, options: dict[str, Any]) -> FunctionSpec:
        unknown = set(options) - IGNORED_OPTIONS - _EMULATED_OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        secrets = self.secrets + list(options.get("secrets") or [])
        env = {k: v for s in secrets for k, v in s.values} | dict(options.get("env") or {})
        window = options.get("scaledown_window")
        if window is not None and not 2 <= window <= 3600:
            raise exception.InvalidError(
                "`scaledown_window` must be between 2 and 3600 (inclusive)"
            )
        spec = FunctionSpec(
            tag=options.get("name") or tag,
            image=options.get("image") or self.image,
            secrets=secrets,
            env=env,
            gpu=options.get("gpu"),
            volumes=self.volumes | dict(options.get("volumes") or {}),
            retries=_retries(options.get("retries")),
            timeout=float(options.get("timeout", 300)),
            max_containers=options.get("max_containers"),
            min_containers=int(options.get("min_containers") or 0),
            scaledown_window=float(window or DEFAULT_SCALEDOWN_WINDOW_S),
            schedule=options.get("schedule"),
            enable_memory_snapshot=bool(options.get("enable_memory_snapshot")),
        )
        if spec.tag in self.specs:
            raise exception.InvalidError(f"two functions named {spec.tag!r} in app {self.name!r}")
        self.specs[spec.tag] = spec
        return spec

    def function(self, **options: Any) -> Callable[[Any], Function]:
        def wrap(obj: Any) -> Function:
            partial = obj if isinstance(obj, PartialFunction) else PartialFunction(obj)
            spec = self._spec(partial.raw_f.__name__, options)
            spec.raw_f = partial.raw_f
            spec.batch, spec.max_inputs, spec.web = partial.batch, partial.max_inputs, partial.asgi
            return Function(spec.tag, spec=spec)

        return wrap

    def cls(self, **options: Any) -> Callable[[type], Cls]:
        def wrap(user_cls: type) -> Cls:
            spec = self._spec(user_cls.__name__, options)
            spec.user_cls = user_cls
            spec.methods = {
                name: value
                for name, value in vars(user_cls).items()
                if isinstance(value, PartialFunction)
            }
            for partial in spec.methods.values():
                spec.batch = spec.batch or partial.batch
                spec.max_inputs = spec.max_inputs or partial.max_inputs
            if spec.batch and len([p for p in spec.methods.values() if p.method]) > 1:
                raise exception.InvalidError(
                    f"{spec.tag}: a class with a @modal.batched method may have only that method"
                )
            return Cls(spec.tag, spec)

        return wrap

    def local_entrypoint(self, *, name: str | None = None) -> Callable[[Any], Any]:
        return lambda fn: fn  # the rehearsal runs deployed functions, not entrypoints


_EMULATED_OPTIONS = frozenset(
    {
        "image",
        "schedule",
        "env",
        "secrets",
        "gpu",
        "volumes",
        "min_containers",
        "max_containers",
        "scaledown_window",
        "retries",
        "timeout",
        "name",
        "enable_memory_snapshot",
    }
)
