"""A small world for lifecycle races and crashes: a store, the lifecycle, the real runner.

The engine is the one stand-in: `FlatEngine` returns a plain image per request (the
engine is not what these tests are about, and torch would make hundreds of runs slow);
everything after it is real: PNG encoding, the output store on disk, the lifecycle on
SQLite or on the Dict store. `ended` records every won end (the lifecycle's listener):
one entry per job is the "exactly one ended state, one webhook" the tests assert.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from magicmix.backends.local.db import Database
from magicmix.backends.local.jobs import SqliteJobStore
from magicmix.backends.local.keys import SqliteKeyStore
from magicmix.backends.modal.state import DictJobStore, DictKeyStore, ModalState
from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.http.links import HttpLinks
from magicmix.jobs import JobRecord, JobStore, QueueLimits, TextRead
from magicmix.keys import KeyStore
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.store import LocalStore
from magicmix.request import MixRequest
from magicmix.runner import JobRunner
from tests.modal_standins import standin_dicts
from tests.test_jobs import params

SECRET = b"lifecycle-harness-secret"
OPERATOR = "operator-key"
KINDS = ("sqlite", "modal-dict-inmemory-standin")


@dataclass(frozen=True)
class Flat:
    image: Image.Image
    seed: int = 0
    prompt: TextRead = field(default_factory=lambda: TextRead(tokens=1, truncated=False))
    negative_prompt: TextRead = field(default_factory=lambda: TextRead(tokens=0, truncated=False))


class FlatEngine:
    """Stands in for the engine: one flat image per request, at the request's size.

    `ran` lists the seeds it mixed (the harness gives each job its id as seed).
    """

    def __init__(self) -> None:
        self.ran: list[int] = []

    def mix(self, requests: Sequence[MixRequest], *, progress: bool = False) -> list[Flat]:
        self.ran += [r.seed or 0 for r in requests]
        return [Flat(Image.new("RGB", (r.width, r.height), (90, 30, 200))) for r in requests]

    def clear_cache(self) -> int:
        return 0

    def describe(self) -> dict[str, str]:
        return {"model": "flat", "device": "cpu", "dtype": "float32"}


@dataclass
class World:
    kind: str
    store: JobStore
    keys: KeyStore
    lifecycle: Lifecycle
    outputs: LocalStore
    runner: JobRunner
    key_id: str
    ended: list[JobRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: FlatEngine = field(default_factory=FlatEngine)
    made: int = 0

    def create(self, **overrides: Any) -> JobRecord:
        self.made += 1
        values = {"steps": 2, "webhook": "http://127.0.0.1:9/hook", "seed": self.made}
        return self.lifecycle.create(self.key_id, params(**{**values, **overrides}), PNG_1PX)

    def run(self, jobs: list[JobRecord]) -> list[JobRecord]:
        return self.runner.run(self.engine, jobs)

    def outputs_of(self, job_id: int) -> list[str]:
        return sorted(p.name for p in self.outputs.directory.glob(f"{job_id}-*.png"))


def _png_1px() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 200, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG_1PX = _png_1px()


class Crash(BaseException):
    """The process dies here (a BaseException, so no `except Exception` absorbs it)."""


class Budget:
    """Counts writes to storage; the process 'dies' right after write number `crash_after`."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.crash_after = crash_after
        self.writes = 0

    def tick(self) -> None:
        self.writes += 1
        if self.crash_after is not None and self.writes >= self.crash_after:
            self.crash_after = None  # die once
            raise Crash(f"after write {self.writes}")


class CrashingDict:
    """A Dict whose every write counts against a `Budget` (the write happens, then death)."""

    def __init__(self, inner: Any, budget: Budget) -> None:
        self._inner, self._budget = inner, budget

    def get(self, key: Any, default: Any = None) -> Any:
        return self._inner.get(key, default)

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        done = self._inner.put(key, value, skip_if_exists=skip_if_exists)
        self._budget.tick()
        return bool(done)

    def pop(self, key: Any, default: Any = None) -> Any:
        value = self._inner.pop(key, default)
        self._budget.tick()
        return value

    def items(self) -> Any:
        return self._inner.items()


class CrashingFiles(LocalStore):
    """A directory store whose writes count against a `Budget`."""

    def __init__(self, directory: Path, budget: Budget) -> None:
        super().__init__(directory)
        self._budget = budget

    def put(self, name: str, data: bytes, content_type: str = "image/png") -> None:
        super().put(name, data, content_type)
        self._budget.tick()

    def delete(self, name: str) -> None:
        super().delete(name)
        self._budget.tick()


class JitteryDict:
    """A Dict whose every call first sleeps a random moment: a race amplifier.

    Without it two threads rarely meet inside the microseconds between a read and the
    write that follows it; with it they do, many times per test.
    """

    def __init__(self, inner: Any, rng: random.Random) -> None:
        self._inner, self._rng = inner, rng

    def _pause(self) -> None:
        time.sleep(self._rng.uniform(0, 0.0004))

    def get(self, key: Any, default: Any = None) -> Any:
        self._pause()
        return self._inner.get(key, default)

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        self._pause()
        return bool(self._inner.put(key, value, skip_if_exists=skip_if_exists))

    def pop(self, key: Any, default: Any = None) -> Any:
        self._pause()
        return self._inner.pop(key, default)

    def items(self) -> Any:
        self._pause()
        return self._inner.items()


def _counting_transactions(db: Database, budget: Budget) -> None:
    """Every committed SQLite transaction counts against `budget`."""
    inner = db.transaction

    @contextmanager
    def transaction() -> Iterator[Any]:
        with inner() as connection:
            yield connection
        budget.tick()

    db.transaction = transaction  # type: ignore[method-assign]


def make_world(
    kind: str,
    tmp: Path,
    *,
    dicts: dict[str, Any] | None = None,
    budget: Budget | None = None,
    jitter: random.Random | None = None,
    clock: Callable[[], float] | None = None,
) -> World:
    """A fresh world, or (same `tmp` / `dicts`) a restarted one over the same state.

    With a `budget`, every storage write counts and the world dies after the chosen one;
    with `jitter`, every Dict call first waits a random moment (races meet more often).
    """
    box = SecretBox(SECRET)
    files: Callable[[Path], LocalStore] = (
        (lambda path: CrashingFiles(path, budget)) if budget else LocalStore
    )
    if kind == "sqlite":
        db = Database(tmp / "world.sqlite3")
        keys: KeyStore = SqliteKeyStore(db, box, SECRET, [OPERATOR])
        if budget:
            _counting_transactions(db, budget)
        store: JobStore = SqliteJobStore(db)
    else:
        dicts = dicts if dicts is not None else standin_dicts()
        keys = DictKeyStore(dicts["keys"], box, SECRET, [OPERATOR])
        if budget:
            dicts = {name: CrashingDict(d, budget) for name, d in dicts.items()}
        if jitter:
            dicts = {name: JitteryDict(d, jitter) for name, d in dicts.items()}
        store = DictJobStore(ModalState(**dicts, layouts=files(tmp / "layouts")))
    lifecycle = Lifecycle(store, QueueLimits(10_000, 10_000), **({"clock": clock} if clock else {}))
    outputs = files(tmp / "outputs")
    settings = Settings(data_dir=tmp, secret_key=SECRET.decode(), allow_private_urls=True)
    runner = JobRunner(
        settings=settings,
        lifecycle=lifecycle,
        outputs=outputs,
        keys=keys,
        box=box,
        links=HttpLinks("http://127.0.0.1:8000"),
    )
    world = World(kind, store, keys, lifecycle, outputs, runner, keys.authenticate(OPERATOR).key_id)
    lifecycle.listen(lambda jobs: _record(world, jobs))
    return world


def _record(world: World, jobs: list[JobRecord]) -> None:
    with world.lock:
        world.ended.extend(jobs)
