"""What the control plane keeps: inputs, batches, containers, services, its options."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol

from rehearsal.fake_modal import FunctionSpec

if TYPE_CHECKING:
    from rehearsal.snapshots import Snapshot


class Process(Protocol):
    """A container's process: a `subprocess.Popen`, or a fork of a snapshot (`Forked`)."""

    @property
    def pid(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


@dataclass
class Options:
    """The CLI's flags, as the control plane uses them."""

    app_module: str
    gpus: int | None
    crash_gpu_every: int | None
    sweep_every: float | None
    latency_ms: float
    default_max_containers: int  # for functions that set none (one machine, not Modal)


@dataclass(eq=False)
class Input:
    """One spawned call's input (the rehearsal spawns one input per call)."""

    id: str
    tag: str
    method: str | None
    args: bytes
    # queued, waiting_retry, collecting, running; at the end success, failure, timeout or terminated
    state: str = "queued"
    retries: int = 0  # `max_retries` spent
    attempts: int = 0
    outcome: tuple[str, Any] | None = None
    batch: Batch | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class Batch:
    id: str
    container: Container
    inputs: list[Input]
    started_at: float | None = None
    finished: bool = False
    crash: bool = False  # --crash-gpu-every chose it
    timer: threading.Timer | None = None


@dataclass(eq=False)
class Container:
    id: str
    tag: str
    gpu: bool
    proc: Process | None = None
    peer: Peer | None = None
    state: str = "starting"  # starting, idle, collecting, busy, stopping
    ready: bool = False
    batch: Batch | None = None
    collecting: list[Input] = field(default_factory=list)
    kill_reason: str | None = None  # timeout, terminate, crash: why the plane killed it
    idle_since: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.monotonic)
    port: int | None = None  # a web container's uvicorn
    inflight: int = 0
    failure: str | None = None  # what it reported before dying at start
    gone: bool = False  # its process exited


@dataclass(eq=False)
class Peer:
    conn: Connection
    container: Container | None
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except (OSError, ValueError):
            pass  # it died; its exit is handled by the process watcher


@dataclass(eq=False)
class Service:
    """A function or class with its queue and containers."""

    spec: FunctionSpec
    cv: threading.Condition
    queue: deque[Input] = field(default_factory=deque)
    containers: dict[str, Container] = field(default_factory=dict)
    backoff_s: float = 0.0
    start_after: float = 0.0
    # completed batches (size, seconds) and container starts (seconds to ready), for
    # `op_timings`; the last batches also time `--crash-gpu-every`'s kills
    batch_times: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=10_000))
    start_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    web_waiters: int = 0
    snapshot: Snapshot | None = None  # with enable_memory_snapshot: what containers fork from

    @property
    def alive(self) -> list[Container]:
        return [c for c in self.containers.values() if c.state != "stopping"]
