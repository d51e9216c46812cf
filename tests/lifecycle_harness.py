"""A small world for lifecycle races and crashes: a store, the lifecycle, the real runner.

The engine is the one stand-in: `FlatEngine` returns a plain image per request (the
engine is not what these tests are about, and torch would make hundreds of runs slow);
everything after it is real: PNG encoding, the output store on disk, the lifecycle on
SQLite or PostgreSQL. `ended` records every won end (the lifecycle's notifier): one
entry per job is the "exactly one ended state, one webhook" the tests assert.
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
from sqlalchemy import event

from magicmix.config import Settings
from magicmix.crypto import SecretBox
from magicmix.http.links import HttpLinks
from magicmix.jobs import JobRecord, QueueLimits, TextRead
from magicmix.lifecycle import Leases, Lifecycle
from magicmix.outputs.routing import OutputRouter
from magicmix.outputs.store import LocalStore
from magicmix.request import MixRequest
from magicmix.runner import JobRunner
from magicmix.store.base import JobStore, KeyStore
from magicmix.store.database import Database, open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.store.keys import SqlKeyStore
from tests.test_jobs import params

SECRET = b"lifecycle-harness-secret"
OPERATOR = "operator-key"


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
        """The runner alone (a worker also renews its claims; races here are faster)."""
        return self.runner.run(self.engine, jobs)

    def drain(self, size: int, claimant: str) -> int:
        """A worker's loop: claim batches of `size` and run them until none is queued;
        how many jobs ended."""
        ended = 0
        while batch := self.lifecycle.claim_next(size, claimant):
            ended += len(self.run(batch))
        return ended

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


def _jitter(database: Database, rng: random.Random) -> None:
    """Every statement first waits a random moment: a race amplifier.

    Without it two threads rarely meet inside the microseconds between one statement and
    the next; with it they do, many times per test.
    """

    def pause(*_: Any) -> None:
        time.sleep(rng.uniform(0, 0.0004))

    event.listen(database.engine, "before_cursor_execute", pause)


def _counting_transactions(db: Database, budget: Budget) -> None:
    """Every committed transaction counts against `budget`."""
    inner = db.transaction

    @contextmanager
    def transaction() -> Iterator[Any]:
        with inner() as connection:
            yield connection
        budget.tick()

    db.transaction = transaction  # type: ignore[method-assign]


def make_world(
    url: str,
    tmp: Path,
    *,
    budget: Budget | None = None,
    jitter: random.Random | None = None,
    clock: Callable[[], float] | None = None,
    leases: Leases | None = None,
) -> World:
    """A world over the database at `url`, or (same `url` and `tmp`) a restarted one.

    With a `budget`, every storage write counts and the world dies after the chosen one;
    with `jitter`, every statement first waits a random moment (races meet more often).
    """
    box = SecretBox(SECRET)
    files: Callable[[Path], LocalStore] = (
        (lambda path: CrashingFiles(path, budget)) if budget else LocalStore
    )
    database = open_database(url)
    keys: KeyStore = SqlKeyStore(database, box, SECRET, [OPERATOR])
    if budget:
        _counting_transactions(database, budget)
    if jitter:
        _jitter(database, jitter)
    store = SqlJobStore(database)
    lifecycle = Lifecycle(
        store,
        QueueLimits(10_000, 10_000),
        leases=leases,
        **({"clock": clock} if clock else {}),
    )
    outputs = files(tmp / "outputs")
    settings = Settings(data_dir=tmp, secret_key=SECRET.decode(), allow_private_urls=True)
    router = OutputRouter(
        settings=settings,
        service=outputs,
        details=keys,
        box=box,
        service_url=HttpLinks("http://127.0.0.1:8000").output,
    )
    runner = JobRunner(settings=settings, lifecycle=lifecycle, outputs=router)
    world = World(store, keys, lifecycle, outputs, runner, keys.authenticate(OPERATOR).key_id)
    lifecycle.notifiers.add(_Recorder(world))
    return world


class _Recorder:
    """The world's notifier: every won end, in `world.ended`."""

    def __init__(self, world: World) -> None:
        self._world = world

    def ended(self, jobs: Sequence[JobRecord]) -> None:
        _record(self._world, list(jobs))


def _record(world: World, jobs: list[JobRecord]) -> None:
    with world.lock:
        world.ended.extend(jobs)
