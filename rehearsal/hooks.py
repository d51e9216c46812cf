"""What each emulated container installs around the app, without touching its code.

- `--latency-ms`: added to every database statement (a SQLAlchemy `before_cursor_execute`
  listener on the `Engine` class, so every engine the app makes has it) and every bucket
  request (a botocore `before-send` handler on every client botocore creates). Modal
  calls pay it in `rehearsal/wire.py`. The same hooks count statements and requests.
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

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


def install(latency_s: float, stats: Stats) -> None:
    """Hook SQLAlchemy and botocore, where installed, before the app imports them."""

    def pause(name: str) -> None:
        stats.add(name)
        if latency_s:
            time.sleep(latency_s)

    _hook_sqlalchemy(lambda: pause("db.statements"))
    _hook_botocore(lambda: pause("bucket.requests"))


def _hook_sqlalchemy(pause: Callable[[], None]) -> None:
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
    except ImportError:
        return

    def before_cursor_execute(*_: Any) -> None:
        pause()

    event.listen(Engine, "before_cursor_execute", before_cursor_execute)


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
