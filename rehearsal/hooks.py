"""What each emulated container installs around the app, without touching its code.

- `--latency-ms`: added to every round trip to a database server and every bucket
  request. Round trips are counted as the database benchmark counts them
  (benchmarks/database.py): each statement (SQLAlchemy's `before_cursor_execute`, on the
  `Engine` class so every engine the app makes has it), the BEGIN and the COMMIT or
  ROLLBACK of each transaction that is not in autocommit, and the pool's liveness ping at
  each checkout (`pool_pre_ping`); SQLite, a file, pays only its statements. Bucket
  requests are hooked with a botocore `before-send` handler on every client botocore
  creates. Modal calls pay it in `rehearsal/wire.py`. The same hooks count
  `db.statements`, `db.round_trips` and `bucket.requests`.
- The memory-snapshot check: a connection open when Modal snapshots a container would be
  captured in the snapshot and restored dead in every container started from it
  (https://modal.com/docs/guide/memory-snapshots), so the product must open none before
  it. The rehearsal fails such a container loudly.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil


class Stats:
    """Counts kept in the container, sent to the control plane as deltas."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


def install(latency_s: float, stats: Stats) -> None:
    """Hook SQLAlchemy and botocore, where installed, before the app imports them."""

    def pause(*names: str) -> None:
        for name in names:
            stats.add(name)
        if latency_s:
            time.sleep(latency_s)

    _hook_sqlalchemy(pause)
    _hook_botocore(lambda: pause("bucket.requests"))


def _hook_sqlalchemy(pause: Callable[..., None]) -> None:
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Connection, Engine
        from sqlalchemy.pool import Pool
    except ImportError:
        return

    def networked(connection: Connection) -> bool:
        """A server (not SQLite) and a transaction of its own (not autocommit)."""
        isolation = connection.get_execution_options().get("isolation_level")
        return connection.dialect.name != "sqlite" and isolation != "AUTOCOMMIT"

    def statement(*_: Any) -> None:
        pause("db.statements", "db.round_trips")

    def transaction_edge(connection: Connection, *_: Any) -> None:
        if networked(connection):
            pause("db.round_trips")

    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        pool = getattr(proxy, "_pool", None)  # SQLAlchemy keeps pool_pre_ping private
        if getattr(pool, "_pre_ping", False):
            pause("db.round_trips")

    event.listen(Engine, "before_cursor_execute", statement)
    for name in ("begin", "commit", "rollback"):
        event.listen(Engine, name, transaction_edge)
    event.listen(Pool, "checkout", ping)


def _hook_botocore(pause: Callable[[], None]) -> None:
    try:
        from botocore.session import Session
    except ImportError:
        return
    create_client = Session.create_client

    def before_send(**_: Any) -> None:
        pause()  # returning None lets botocore send the request itself

    def create_client_with_hook(self: Session, *args: Any, **kwargs: Any) -> Any:
        client = create_client(self, *args, **kwargs)
        client.meta.events.register("before-send", before_send)
        return client

    Session.create_client = create_client_with_hook  # type: ignore[method-assign]


def open_connections(ignore_fds: set[int]) -> list[str]:
    """This process's connected TCP/UDP sockets, but those in `ignore_fds` (the wire)."""
    process = psutil.Process()
    listing = getattr(process, "net_connections", None) or process.connections
    return [
        f"{c.laddr.ip}:{c.laddr.port} -> {c.raddr.ip}:{c.raddr.port} ({c.status}, fd {c.fd})"
        for c in listing(kind="inet")
        if c.raddr and c.fd not in ignore_fds
    ]
