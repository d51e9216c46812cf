"""The `modal` package as the rehearsal gives it to the app: declarations and client calls.

Installed into `sys.modules["modal"]` (`install()`) before the app module is imported, in
the control plane and in every emulated container. Declarations (`App.function`,
`App.cls`, the decorators, `Image`, `Secret`, `Volume`) only record what the app asks
for; client calls (`spawn`, `FunctionCall.get`, `Dict.put`, ...) go over the wire to the
control plane (`rehearsal/control.py`), which holds the calls, inputs and Dicts.

Only documented behaviour is emulated; each class says where it is documented. Options
that matter only to Modal's scheduler or billing (cpu, memory, region, cloud, proxy, ...)
are accepted and ignored, and listed in `IGNORED_OPTIONS`; an unknown option is a
TypeError, as in Modal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import os
import pickle  # nosec B403 - values of the rehearsed app itself, as Modal pickles them
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from rehearsal import wire
from rehearsal.fake_modal import exception

__all__ = [
    "App",
    "Cls",
    "Cron",
    "Dict",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "Retries",
    "Secret",
    "Volume",
    "asgi_app",
    "batched",
    "concurrent",
    "enter",
    "exception",
    "exit",
    "install",
    "is_local",
    "method",
]

ENV_CONTAINER = "REHEARSAL_CONTAINER_ID"
ENV_STATE_DIR = "REHEARSAL_STATE_DIR"
ENV_WEB_URL = "REHEARSAL_WEB_URL"
PICKLE_PROTOCOL = 4  # fixed, so a Dict key pickles to the same bytes in every process
_NO_DEFAULT = object()

# `modal/_partial_function.py`
MAX_MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000
# `modal/retries.py`
MIN_INPUT_RETRY_DELAY_MS = 1000
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


def install() -> None:
    """Make `import modal` (and `modal.exception`) give this package in this process."""
    sys.modules["modal"] = sys.modules[__name__]
    sys.modules["modal.exception"] = exception


def is_local() -> bool:
    """True outside an (emulated) container, as `modal.is_local()`."""
    return ENV_CONTAINER not in os.environ


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


class _api:
    """Method decorator: `obj.m(...)` blocks, `obj.m.aio(...)` awaits."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return _Blocking(self._fn.__get__(obj, owner))


# -- schedules, retries --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cron:
    """`modal.Cron(cron_string, timezone="UTC")` (https://modal.com/docs/reference/modal.Cron)."""

    cron_string: str
    timezone: str = "UTC"

    def period_s(self) -> float:
        """Seconds between runs, for the simple specs `*/N * * * *`, `* * * * *`, `M * * * *`.

        Anything else needs `--sweep-every`: the rehearsal runs schedules by period only.
        """
        fields = self.cron_string.split()
        if len(fields) == 5 and fields[1:] == ["*"] * 4:
            minute = fields[0]
            if minute == "*":
                return 60.0
            if minute.startswith("*/") and minute[2:].isdigit():
                return 60.0 * int(minute[2:])
            if minute.isdigit():
                return 3600.0
        raise exception.InvalidError(
            f"no period can be derived from Cron({self.cron_string!r}): pass --sweep-every"
        )


class Period:
    """`modal.Period(days=..., hours=..., minutes=..., seconds=...)` (modal/schedule.py)."""

    def __init__(
        self,
        *,
        years: int = 0,
        months: int = 0,
        weeks: int = 0,
        days: int = 0,
        hours: int = 0,
        minutes: int = 0,
        seconds: float = 0,
    ) -> None:
        if years or months:
            raise exception.InvalidError("the rehearsal runs Periods of weeks or less")
        self._period = timedelta(
            weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds
        )

    def period_s(self) -> float:
        return self._period.total_seconds()


class Retries:
    """`modal.Retries`, with modal/retries.py's validation and delay rule.

    The delay before retry n is `initial_delay * backoff_coefficient ** (n - 1)`, at least
    `MIN_INPUT_RETRY_DELAY_MS` (retries.py, `RetryManager._retry_delay_ms`) and at most
    `max_delay` ("Upper cap on the delay between retries").
    """

    def __init__(
        self,
        *,
        max_retries: int,
        backoff_coefficient: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        if max_retries < 0:
            raise exception.InvalidError(f"Invalid retries number: {max_retries}.")
        if not 1.0 <= max_delay <= 60:
            raise exception.InvalidError(f"Invalid max_delay: {max_delay}.")
        if not 0.0 <= initial_delay <= 60:
            raise exception.InvalidError(f"Invalid initial_delay argument: {initial_delay}.")
        if not 1.0 <= backoff_coefficient <= 10.0:
            raise exception.InvalidError(f"Invalid backoff_coefficient: {backoff_coefficient}.")
        self.max_retries = max_retries
        self.backoff_coefficient = backoff_coefficient
        self.initial_delay = initial_delay
        self.max_delay = max_delay

    def delay_s(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        delay = self.initial_delay * self.backoff_coefficient ** (retry - 1)
        return min(max(delay, MIN_INPUT_RETRY_DELAY_MS / 1000), self.max_delay)


def _retries(value: int | Retries | None) -> Retries | None:
    """An int n means n retries, 1 s apart (modal/_utils/function_utils.py, `_parse_retries`)."""
    if isinstance(value, Retries) or value is None:
        return value
    if isinstance(value, int):
        return Retries(max_retries=value, initial_delay=1.0, backoff_coefficient=1.0)
    raise exception.InvalidError(
        f"Retries parameter must be an integer or modal.Retries: {value!r}"
    )


# -- images, secrets, volumes ----------------------------------------------------------------


class Image:
    """`modal.Image`: every builder method is a no-op returning the image.

    The rehearsal runs in this machine's environment, so nothing is built or installed,
    and `.env(...)` is not applied either: containers inherit the rehearsal's environment,
    which is the deploying machine's, so deploy-time knobs read from it agree.
    `imports()` runs its block; an exception inside is recorded, not raised, and raised
    later only in a container of this very image (modal/_image.py, `imports`).
    """

    _BUILDERS = (
        "add_local_dir",
        "add_local_file",
        "add_local_python_source",
        "apt_install",
        "dockerfile_commands",
        "entrypoint",
        "env",
        "pip_install",
        "pip_install_from_pyproject",
        "pip_install_from_requirements",
        "run_commands",
        "run_function",
        "uv_pip_install",
        "uv_sync",
        "workdir",
    )

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.inside_exceptions: list[BaseException] = []

    @classmethod
    def debian_slim(cls, python_version: str | None = None, force_build: bool = False) -> Image:
        return cls("debian_slim")

    @classmethod
    def from_registry(cls, tag: str, **_: Any) -> Image:
        return cls(f"registry:{tag}")

    @classmethod
    def micromamba(cls, python_version: str | None = None, force_build: bool = False) -> Image:
        return cls("micromamba")

    def __getattr__(self, name: str) -> Callable[..., Image]:
        if name not in self._BUILDERS:
            raise AttributeError(f"'Image' object has no attribute {name!r}")
        return lambda *args, **kwargs: self

    @contextlib.contextmanager
    def imports(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.inside_exceptions.append(exc)
            if not isinstance(exc, ImportError):
                warnings.warn(
                    f"Warning: caught a non-ImportError exception in an `imports()` block: {exc!r}",
                    stacklevel=3,
                )


@dataclasses.dataclass(frozen=True)
class Secret:
    """`modal.Secret`: read from the rehearsal's environment.

    `from_name(name, required_keys=[...])`: "the server asserts these keys exist on the
    Secret" (modal/secret.py); the rehearsal checks them against its environment when it
    starts and refuses to start without them, as `modal deploy` would.
    """

    name: str
    required_keys: tuple[str, ...] = ()
    values: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        environment_name: str | None = None,
        required_keys: list[str] | tuple[str, ...] = (),
        client: Any = None,
    ) -> Secret:
        return cls(name, tuple(required_keys))

    @classmethod
    def from_dict(cls, env_dict: dict[str, str | None] | None = None) -> Secret:
        values = tuple((env_dict or {}).items())
        return cls(f"from_dict({', '.join(sorted(k for k, _ in values))})", (), values)

    def missing_keys(self, environ: dict[str, str] | os._Environ[str]) -> list[str]:
        return [key for key in self.required_keys if key not in environ]


class Volume:
    """`modal.Volume`: a folder under the rehearsal's state dir (`volumes/NAME`).

    Writes are visible to every container at once (one disk), so `commit()` and
    `reload()` are no-ops. Mount paths are NOT remapped: a function that reads its mount
    path (say `/cache`) does not find the folder there; the folder is `Volume.path`.
    """

    def __init__(self, name: str, create_if_missing: bool, read_only: bool = False) -> None:
        self.name = name
        self.create_if_missing = create_if_missing
        self.read_only = read_only

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
        client: Any = None,
    ) -> Volume:
        return cls(name, create_if_missing)

    @property
    def path(self) -> Path:
        return Path(os.environ.get(ENV_STATE_DIR, ".")) / "volumes" / self.name

    def with_mount_options(self, *, read_only: bool | None = None, sub_path: Any = None) -> Volume:
        return Volume(self.name, self.create_if_missing, bool(read_only))

    @_api
    def commit(self) -> None:
        """No-op: one folder on one disk."""

    @_api
    def reload(self) -> None:
        """No-op: one folder on one disk."""


class Dict:
    """`modal.Dict`, held by the control plane (modal/dict.py; https://modal.com/docs/guide/dicts).

    Values are pickled, so a container sees a copy; keys compare by their pickled bytes,
    as on Modal's server. An entry expires 7 days after its last read or write
    (dict.py: "An individual Dict entry will expire after 7 days of inactivity"): `get`,
    `[]`, `put` and `[]=` touch an entry; `items`, `keys`, `values`, `contains` and `len`
    do not (the docs do not say they do). Entries live as long as the rehearsal.
    """

    def __init__(self, name: str, create_if_missing: bool) -> None:
        self.name = name
        self._create = create_if_missing

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        client: Any = None,
    ) -> Dict:
        return cls(name, create_if_missing)

    def _call(self, op: str, *args: Any) -> Any:
        return wire.current().modal("dict", self.name, self._create, op, *args)

    @_api
    def get(self, key: Any, default: Any | None = None) -> Any:
        found, value = self._call("get", dumps(key))
        return loads(value) if found else default

    @_api
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        return bool(self._call("put", dumps(key), dumps(value), skip_if_exists))

    @_api
    def pop(self, key: Any, default: Any = _NO_DEFAULT) -> Any:
        found, value = self._call("pop", dumps(key))
        if found:
            return loads(value)
        if default is _NO_DEFAULT:
            raise KeyError(key)
        return default

    @_api
    def contains(self, key: Any) -> bool:
        return bool(self._call("contains", dumps(key)))

    @_api
    def len(self) -> int:
        return int(self._call("len"))

    @_api
    def clear(self) -> None:
        self._call("clear")

    @_api
    def update(self, other: Any = None, /, **kwargs: Any) -> None:
        pairs = {**dict(other or {}), **kwargs}
        self._call("update", [(dumps(k), dumps(v)) for k, v in pairs.items()])

    @_api
    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter([(loads(k), loads(v)) for k, v in self._call("items")])

    @_api
    def keys(self) -> Iterator[Any]:
        return iter([key for key, _ in self.items()])

    @_api
    def values(self) -> Iterator[Any]:
        return iter([value for _, value in self.items()])

    def __getitem__(self, key: Any) -> Any:
        found, value = self._call("get", dumps(key))
        if not found:
            raise KeyError(key)
        return loads(value)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        self.pop(key)

    def __contains__(self, key: Any) -> bool:
        return bool(self.contains(key))


# -- decorators ---------------------------------------------------------------------------


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


# -- functions, classes, calls --------------------------------------------------------------


@dataclasses.dataclass
class FunctionSpec:
    """One deployed function or class, as the app declared it."""

    tag: str
    app_name: str
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

    def is_async(self, method: str | None) -> bool:
        fn = self.methods[method].raw_f if method else self.raw_f
        return inspect.iscoroutinefunction(fn)


class FunctionCall:
    """`modal.FunctionCall` (modal/_functions.py): a spawned input, by id."""

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id

    @classmethod
    def from_id(cls, function_call_id: str, client: Any = None) -> FunctionCall:
        return cls(function_call_id)

    @_api
    def get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        """The result; the built-in TimeoutError while it runs (`poll_function`)."""
        return _outcome(wire.current().modal("get", self.object_id, timeout))

    @_api
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

    @_api
    def spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        call_id = wire.current().modal("spawn", self._tag, self._method, dumps((args, kwargs)))
        return FunctionCall(call_id)

    @_api
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
        self.entrypoints: dict[str, Callable[..., Any]] = {}

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
            app_name=self.name,
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
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.entrypoints[name or fn.__name__] = fn
            return fn

        return wrap


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
