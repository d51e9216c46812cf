"""The SQL store per operation, and a burst over two replicas (issue "One SQL store").

    python -m benchmarks.database [--quick]

1. Milliseconds and round trips per operation on SQLite (a file) and PostgreSQL (a server
   on loopback, started here): submit, fetch, claim a batch of 8, finish, clear_queue
   with 2,000 queued, a sweep pass with 2,000 active. Round trips count what crosses the
   wire to PostgreSQL: statements, BEGIN and COMMIT, and the pool's liveness ping at each
   checkout; SQLite has no wire, its figure is the same count for comparison.
2. A burst on one PostgreSQL: 1,000 submissions from 32 threads in 2 processes (2
   replicas' front doors) against a queue limit of 600, with no worker running: exactly
   600 accepted, every refusal a 429 while the queue was full. Then the queue drains
   through 1 replica's worker, and again (the same burst) through 2, a worker being a
   process that claims batches of 8 and runs them through the real runner with a flat
   stand-in engine (the store's cost, not the model's): drain seconds side by side, and
   every job ended exactly once.

Figures go to benchmarks/results/database-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import event

from magicmix.config import Settings
from magicmix.errors import Busy
from magicmix.jobs import JobRecord, JobResult, QueueLimits
from magicmix.lifecycle import Lifecycle
from magicmix.outputs.store import LocalStore
from magicmix.store.database import Database, open_database
from magicmix.store.jobs import SqlJobStore
from magicmix.store.testing import TempPostgres
from magicmix.sweep import Sweeper

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Wire:
    """What one block of work sent to the database."""

    statements: int = 0
    transactions: int = 0
    checkouts: int = 0

    def round_trips(self, dialect: str) -> int:
        extra = 2 * self.transactions + self.checkouts if dialect == "postgresql" else 0
        return self.statements + extra


@contextmanager
def counting(database: Database) -> Iterator[Wire]:
    wire = Wire()

    def statement(*_: Any) -> None:
        wire.statements += 1

    def transaction(connection: Any) -> None:
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            wire.transactions += 1  # in autocommit no BEGIN or COMMIT goes to the server

    def checkout(*_: Any) -> None:
        wire.checkouts += 1

    engine = database.engine
    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", statement),
        (engine, "begin", transaction),
        (engine.pool, "checkout", checkout),
    ]
    for target, name, fn in hooks:
        event.listen(target, name, fn)
    try:
        yield wire
    finally:
        for target, name, fn in hooks:
            event.remove(target, name, fn)


def params(seed: int) -> Any:
    from magicmix.jobs import JobParams

    return JobParams(
        prompt="a red circle",
        width=256,
        height=256,
        steps=8,
        seed=seed,
        image_ref="inline image (4 bytes)",
        webhook="http://127.0.0.1:9/hook",
    )


RESULT = JobResult(output=["u"], generation_time=0.1, stored_in="service", object_names=["n"])


@dataclass
class OpFigure:
    dialect: str
    operation: str
    ms: float  # median per operation
    round_trips: float  # per operation
    statements: float


def per_op(dialect: str, url: str, quick: bool) -> list[OpFigure]:
    database = open_database(url)
    store = SqlJobStore(database)
    lifecycle = Lifecycle(store, QueueLimits(100_000, 100_000))
    n = 50 if quick else 200
    figures: list[OpFigure] = []

    def measure(name: str, fn: Callable[[], object], times: int) -> None:
        samples = []
        with counting(database) as wire:
            for _ in range(times):
                started = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - started)
        figures.append(
            OpFigure(
                dialect,
                name,
                round(statistics.median(samples) * 1000, 3),
                round(wire.round_trips(dialect) / times, 2),
                round(wire.statements / times, 2),
            )
        )
        log(f"  {dialect} {name}: {figures[-1].ms} ms, {figures[-1].round_trips} round trips")

    made: list[JobRecord] = []
    measure("submit", lambda: made.append(lifecycle.create("k", params(len(made)), b"png")), n)
    ids = iter([job.id for job in made] * 2)
    measure("fetch", lambda: store.get(next(ids)), n)
    claimed: list[JobRecord] = []
    measure("claim a batch of 8", lambda: claimed.extend(lifecycle.claim_next(8, "w")), n // 8)
    todo = iter(list(claimed))
    measure("finish", lambda: lifecycle.finish(next(todo), RESULT), min(n, len(claimed)))
    for i in range(2000):
        lifecycle.create("k", params(i), b"png")
    measure("clear_queue, 2,000 queued", lifecycle.cancel_queued, 1)
    for i in range(2000):
        lifecycle.create("k", params(i), b"png")
    for _ in range(1000):  # 1,000 running (with live leases) and 1,000 queued
        lifecycle.claim_next(1, "w")
    sweeper = Sweeper(lifecycle, LocalStore(Path(tempfile.mkdtemp())), Settings())
    import asyncio

    measure("sweep pass, 2,000 active", lambda: asyncio.run(sweeper.run_once()), 3)
    database.close()
    return figures


# -- the burst ------------------------------------------------------------------------------


def _front_door(url: str, threads: int, per_thread: int, offset: int, results: Any) -> None:
    """One replica's front door: `threads` clients submitting at once."""
    store = SqlJobStore(open_database(url))
    lifecycle = Lifecycle(store, QueueLimits(MAX_QUEUE, MAX_QUEUE))
    outcomes: list[tuple[str, int]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(per_thread):
            seed = offset + index * per_thread + i
            try:
                lifecycle.create(f"key-{seed % 7}", params(seed), b"png")
                outcome = ("accepted", 0)
            except Busy:
                outcome = ("refused", store.queue_length())  # how full it was at the refusal
            with lock:
                outcomes.append(outcome)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(outcomes)


def _worker(url: str, name: str, results: Any, ready: Any) -> None:
    """One replica's worker: claims batches of 8 and runs them through the real runner."""
    from tests.lifecycle_harness import make_world

    world = make_world(url, Path(tempfile.mkdtemp()))
    ready.wait()  # all workers imported and connected: the drain times the store alone
    started = time.time()
    ended = world.drain(8, name)
    results.put((name, ended, [job.id for job in world.ended], started, time.time()))


MAX_QUEUE = 600


def burst(server: TempPostgres, replicas: int, submissions: int) -> dict[str, Any]:
    url = server.fresh_url()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    per_thread = submissions // 32
    doors = [
        context.Process(
            target=_front_door, args=(url, 16, per_thread, d * 16 * per_thread, results)
        )
        for d in range(2)
    ]
    started = time.perf_counter()
    for door in doors:
        door.start()
    outcomes = [o for _ in doors for o in results.get(timeout=600)]
    submit_s = time.perf_counter() - started
    for door in doors:
        door.join()
    accepted = sum(1 for kind, _ in outcomes if kind == "accepted")
    refused_not_full = sum(1 for kind, seen in outcomes if kind == "refused" and seen < MAX_QUEUE)
    ready = context.Barrier(replicas)
    workers = [
        context.Process(target=_worker, args=(url, f"w{r}", results, ready))
        for r in range(replicas)
    ]
    for worker in workers:
        worker.start()
    ran = [results.get(timeout=600) for _ in workers]
    drain_s = max(end for *_, end in ran) - min(start for *_, start, _ in ran)
    for worker in workers:
        worker.join()
    ended_ids = [job_id for _, _, ids, _, _ in ran for job_id in ids]
    store = SqlJobStore(open_database(url))
    left_active = len(store.active())
    return {
        "replicas": replicas,
        "submitted": len(outcomes),
        "accepted": accepted,
        "refused": len(outcomes) - accepted,
        "refused_while_not_full": refused_not_full,
        "submit_s": round(submit_s, 2),
        "drain_s": round(drain_s, 2),
        "jobs_per_s": round(accepted / drain_s, 1),
        "ended_once": len(ended_ids) == len(set(ended_ids)) == accepted,
        "left_active": left_active,
        "per_worker": {name: count for name, count, *_ in ran},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    figures: list[OpFigure] = []
    with TempPostgres() as server, tempfile.TemporaryDirectory() as tmp:
        figures += per_op("sqlite", f"sqlite:///{tmp}/bench.sqlite3", args.quick)
        figures += per_op("postgresql", server.fresh_url(), args.quick)
        bursts = [burst(server, replicas, 1000) for replicas in (1, 2)]
    stamp = date.today().isoformat()
    out = {"operations": [asdict(f) for f in figures], "bursts": bursts}
    (RESULTS / f"database-{stamp}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "| operation | SQLite ms | SQLite statements | PostgreSQL ms | PostgreSQL round trips |",
        "|---|---|---|---|---|",
    ]
    by = {(f.dialect, f.operation): f for f in figures}
    for operation in dict.fromkeys(f.operation for f in figures):
        lite, pg = by[("sqlite", operation)], by[("postgresql", operation)]
        lines.append(
            f"| {operation} | {lite.ms} | {lite.statements} | {pg.ms} | {pg.round_trips} |"
        )
    lines += [
        "",
        f"| replicas draining | accepted / submitted (queue {MAX_QUEUE}) "
        "| refused while not full | drain s |",
        "|---|---|---|---|",
    ]
    for b in bursts:
        accepted = f"{b['accepted']} / {b['submitted']}"
        row = (b["replicas"], accepted, b["refused_while_not_full"], b["drain_s"])
        lines.append("| " + " | ".join(map(str, row)) + " |")
    table = "\n".join(lines)
    (RESULTS / f"database-{stamp}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
