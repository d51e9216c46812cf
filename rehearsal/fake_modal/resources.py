"""Schedules, retry policies, images, secrets and Volumes of the stand-in `modal`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from rehearsal.fake_modal import exception
from rehearsal.fake_modal._common import ENV_STATE_DIR, api, in_control_plane
from rehearsal.images import nothing_new, read_requirements

MIN_INPUT_RETRY_DELAY_MS = 1000  # modal/retries.py


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
    """`modal.Image`: what it installs is recorded, nothing is built.

    The rehearsal runs on this machine's environment, so nothing is built or installed;
    the packages an image declares (`pip_install`, `pip_install_from_requirements`,
    `uv_pip_install`) and its local source (`add_local_python_source`) only limit what a
    container of it may import (`rehearsal/images.py`). Builders the rehearsal cannot
    read (commands, a pyproject, a registry base) make the image "this machine's
    environment". `.env(...)` is not applied: containers inherit the rehearsal's
    environment, which is the deploying machine's, so deploy-time knobs read from it
    agree. As in Modal, each builder returns a new image.

    `imports()` runs its block; an exception inside is recorded, not raised, and raised
    later only in a container of this very image (modal/_image.py, `imports`). In the
    control plane, which is in no image's container, every import inside the block that
    is not loaded yet fails, as it would in a container without the package.
    """

    _NO_OPS = ("add_local_dir", "add_local_file", "apt_install", "entrypoint", "env", "workdir")
    _UNREADABLE = (
        "dockerfile_commands",
        "pip_install_from_pyproject",
        "run_commands",
        "run_function",
        "uv_sync",
    )

    def __init__(
        self,
        origin: str,
        *,
        readable: bool = False,
        requirements: tuple[str, ...] = (),
        local_sources: tuple[str, ...] = (),
    ) -> None:
        self.origin = origin
        self.readable = readable  # every step so far says what it installs
        self.requirements = requirements
        self.local_sources = local_sources
        self.inside_exceptions: list[BaseException] = []

    @property
    def declares_packages(self) -> bool:
        """Whether a container of it may import only what it installs."""
        return self.readable and bool(self.requirements)

    @classmethod
    def debian_slim(cls, python_version: str | None = None, force_build: bool = False) -> Image:
        return cls("debian_slim", readable=True)

    @classmethod
    def from_registry(cls, tag: str, **_: Any) -> Image:
        return cls(f"registry:{tag}")

    @classmethod
    def micromamba(cls, python_version: str | None = None, force_build: bool = False) -> Image:
        return cls("micromamba")

    def _then(
        self,
        *,
        readable: bool = True,
        requirements: list[str] | tuple[str, ...] = (),
        local: tuple[str, ...] = (),
    ) -> Image:
        return Image(
            self.origin,
            readable=self.readable and readable,
            requirements=(*self.requirements, *requirements),
            local_sources=(*self.local_sources, *local),
        )

    def pip_install(self, *packages: str | list[str], **_: Any) -> Image:
        return self._then(requirements=_flatten(packages))

    def uv_pip_install(
        self, *packages: str | list[str], requirements: list[str] | None = None, **_: Any
    ) -> Image:
        image = self._then(requirements=_flatten(packages))
        for path in requirements or []:
            image = image.pip_install_from_requirements(path)
        return image

    def pip_install_from_requirements(self, requirements_txt: str, **_: Any) -> Image:
        found = read_requirements(Path(requirements_txt))
        return self._then(requirements=[str(req) for req in found])

    def add_local_python_source(self, *modules: str, **_: Any) -> Image:
        return self._then(local=modules)

    def __getattr__(self, name: str) -> Callable[..., Image]:
        if name in self._NO_OPS:
            return lambda *args, **kwargs: self._then()
        if name in self._UNREADABLE:
            return lambda *args, **kwargs: self._then(readable=False)
        raise AttributeError(f"'Image' object has no attribute {name!r}")

    @contextlib.contextmanager
    def imports(self) -> Iterator[None]:
        hidden = nothing_new() if in_control_plane() else contextlib.nullcontext()
        try:
            with hidden:
                yield
        except Exception as exc:
            self.inside_exceptions.append(exc)
            if not isinstance(exc, ImportError):
                warnings.warn(
                    f"Warning: caught a non-ImportError exception in an `imports()` block: {exc!r}",
                    stacklevel=3,
                )


def _flatten(packages: tuple[str | list[str], ...]) -> list[str]:
    return [p for item in packages for p in ([item] if isinstance(item, str) else item)]


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

    @api
    def commit(self) -> None:
        """No-op: one folder on one disk."""

    @api
    def reload(self) -> None:
        """No-op: one folder on one disk."""
