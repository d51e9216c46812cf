"""The loopback wire from a container (or a client) to the rehearsal's control plane.

One `multiprocessing.connection` socket on 127.0.0.1 with an authkey, per process. Calls
carry an id, so many threads (a web container's 64 concurrent requests) share it; a reader
thread hands each reply to its caller and each push (a cancel, a stop) to the handler.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import Any

log = logging.getLogger(__name__)

ENV_ADDRESS = "REHEARSAL_CONTROL_ADDRESS"  # host:port of the control plane
ENV_AUTHKEY = "REHEARSAL_AUTHKEY"  # hex; only the rehearsal's own children get it
ENV_LATENCY_MS = "REHEARSAL_LATENCY_MS"  # added to every Modal call (`--latency-ms`)

Push = Callable[[str, Any], None]


@dataclass
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    value: Any = None


class WireClosed(ConnectionError):
    """The control plane went away: the rehearsal stopped."""


class Wire:
    """Request/reply over one connection, safe to share between threads."""

    def __init__(self, address: tuple[str, int], authkey: bytes, hello: tuple[Any, ...]) -> None:
        self._conn: Connection = Client(address, authkey=authkey)
        self._send = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self.on_push: Push | None = None
        self.latency_s = latency_from_env()
        self._conn.send(hello)
        threading.Thread(target=self._read, name="rehearsal-wire", daemon=True).start()

    def fileno(self) -> int:
        return self._conn.fileno()

    def call(self, op: str, *args: Any) -> Any:
        """One request to the control plane; its reply, or the exception it raised."""
        slot = _Slot()
        request_id = next(self._ids)
        self._slots[request_id] = slot
        try:
            with self._send:
                if self._closed:
                    raise WireClosed("the rehearsal's control plane is gone")
                self._conn.send((request_id, op, args))
            slot.done.wait()
        finally:
            self._slots.pop(request_id, None)
        if not slot.ok:
            raise slot.value
        return slot.value

    def modal(self, op: str, *args: Any) -> Any:
        """A Modal call of the code under rehearsal: it pays `--latency-ms` first."""
        if self.latency_s:
            time.sleep(self.latency_s)
        return self.call(op, *args)

    def close(self) -> None:
        with self._send:
            self._closed = True
            self._conn.close()

    def _read(self) -> None:
        try:
            while True:
                request_id, ok, value = self._conn.recv()
                if request_id is None:  # a push: (None, kind, payload)
                    if self.on_push is not None:
                        self.on_push(ok, value)
                    continue
                slot = self._slots.get(request_id)
                if slot is not None:
                    slot.ok, slot.value = ok, value
                    slot.done.set()
        except (EOFError, OSError):
            pass
        self._closed = True
        for slot in list(self._slots.values()):
            slot.ok, slot.value = False, WireClosed("the rehearsal's control plane is gone")
            slot.done.set()
        if self.on_push is not None:
            self.on_push("closed", None)


_current: Wire | None = None


def latency_from_env() -> float:
    """`--latency-ms` as seconds, from this container's environment."""
    return float(os.environ.get(ENV_LATENCY_MS, "0") or 0) / 1000


def fds() -> set[int]:
    """The file descriptor of this process's wire, if connected (not app connections)."""
    return {_current.fileno()} if _current is not None else set()


def connect(hello: tuple[Any, ...]) -> Wire:
    """Connect this process to the control plane named in its environment."""
    global _current
    host, _, port = os.environ[ENV_ADDRESS].rpartition(":")
    _current = Wire((host, int(port)), bytes.fromhex(os.environ[ENV_AUTHKEY]), hello)
    return _current


def use(wire: Wire | None) -> None:
    """Make `wire` the one Modal calls of this process go through (clients, tests)."""
    global _current
    _current = wire


def current() -> Wire:
    if _current is None:
        raise RuntimeError(
            "this Modal call needs the rehearsal's control plane: run the app under"
            " scripts/modal-rehearsal, or rehearsal.client.connect() first"
        )
    return _current
