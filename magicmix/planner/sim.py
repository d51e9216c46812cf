"""A discrete-event simulation of the deployed system: web tier, autoscaler, batched GPU class.

Pure Python on a `heapq` of timed events; no threads, no wall clock, and the only
randomness (Poisson arrivals) comes from a seeded `random.Random`, so a run is a function
of its inputs. What it models, and the sources each rule rests on:

**Web tier** (`MagicMixService.submit`, `SqliteJobStore.create`/`DictJobStore.create`): a
request is admitted while the active jobs (queued or processing, every key) number fewer
than `max_queue` and its key's fewer than `max_queued_per_key`; otherwise it gets a 429
with `retry_after` (10 s in the service). A job stays active until its batch finishes.
ModelsLab's SDKs raise on a non-200 reply, so by default a refused request is simply
refused; `Arrivals.retries` models a client that waits `retry_after_s` and tries again.
The web tier itself (`@modal.concurrent(max_inputs=64)` CPU containers) is not a
bottleneck here, and its few milliseconds per request are not modelled. On Modal the
limits are soft under races (docs/deploy.md); the model treats them as exact.

**Autoscaler** (Modal guide "Scaling out", modal.com/docs/guide/scale: "The autoscaler
will spin up new containers when there is no capacity available for new inputs, and it
will spin down containers when resources are idling"; decisions are "made quickly and
frequently"). Modelled as: after every event, with P inputs pending (admitted, in no
batch yet) and S free slots on containers that are starting, idle or still collecting a
batch, start `ceil((P - S) / batch_size)` containers, never exceeding `max_containers`
live at once. Busy containers count as no capacity, as the guide says. A new container
takes `cold_start_s` (the profile's, or `--cold-start-s`) before it takes work; Modal
containers "are not considered warm until all `enter` methods have completed" (guide "Cold
start performance", modal.com/docs/guide/cold-start), which for `modal_app.MagicMix` is
the snapshot restore plus `to_gpu` (and, with `MAGICMIX_COMPILE`, the compile warm-up).
Modal's real autoscaler may be slower to react, or smarter; any reaction delay belongs in
the cold start figure.

**`@modal.batched`** (guide "Dynamic batching", modal.com/docs/guide/dynamic-batching:
"`wait_ms` limits the amount of time the Function waits for more inputs after the first
input is received ... If `max_batch_size` is reached, the batch immediately executes";
modal-client `_ContainerIOManager._generate_inputs` asks for the next batch, with
`batch_max_size` and `batch_linger_ms`, only once the previous one has released its input
slot). Modelled as: a free container takes up to `batch_size` pending inputs; if that fills
the batch it runs at once, else the container keeps collecting arrivals for up to
`batch_wait_s` after its first input and then runs what it has. A container runs one batch
at a time, for `GpuProfile.batch_seconds(n)` (the engine, then each image's host work:
a job is done when its own image is stored). Pending inputs go first to a container
already collecting, then to the idle container that went idle last (so spare containers'
idle windows run out; the choice Modal makes is not documented). `linger="local"` models
`magicmix.worker.LocalWorker` instead: on waking from idle it sleeps `batch_wait_s` and
then claims up to `batch_size` (no early start), and after a batch it claims whatever is
queued at once, without waiting.

**Scale-down and billing** (`scaledown_window`: "The maximum duration (in seconds) that
individual containers can remain idle when scaling down", guide "Scaling out"; you are
"billed for any resources used while the container is idle", guide "Cold start
performance"). A container stops after `scaledown_window_s` without work, unless that
would leave fewer than `min_containers`. Modal notes containers "may not wait for the
entire scaledown window" when substantially over-provisioned: the full window is assumed,
so idle cost is an upper bound. GPU-seconds run from a container's start (its cold start
included) to its stop (its idle window included); containers kept by `min_containers` are
billed to the end of the simulation (the later of the last arrival and last completion).

**Not modelled**: `buffer_containers`; waiting for Modal to find a free GPU; the web tier's
own seconds per request; Modal's input limits (guide "Scaling out": 2,000 pending inputs
per function, but up to 1 million for `.spawn()`, which the web tier uses); GPU failures
and input retries. Greedy batching has the usual scheduling anomalies: for a steady
stream, one more container can finish the last request slightly later (a late input
starts alone on a spare container instead of joining a fuller batch), by less than one
batch plus its wait in the tests; a burst never drains later with more containers.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from magicmix.families import SD1
from magicmix.planner.profile import GpuProfile

# Event kinds, in the order they are handled at the same instant: a finishing batch frees
# queue room (and a container) before an arrival at that instant is judged, and an idle
# container's timer fires last, so work arriving exactly then still finds it.
_DONE, _READY, _LINGER, _ARRIVAL, _IDLE = range(5)


@dataclass(frozen=True)
class Capacity:
    """The knobs that decide a burst (defaults: `modal_app.py` and `magicmix.config`)."""

    max_containers: int = 4  # modal_app's MAGICMIX_MAX_GPUS default
    batch_size: int = SD1.batch_size  # modal_app's default for the profiles' family
    batch_wait_s: float = 0.100  # modal_app's MAGICMIX_BATCH_WAIT_MS default / 1000
    scaledown_window_s: float = 30.0  # modal_app's MAGICMIX_GPU_IDLE_S default
    max_queue: int = 64  # the service derives its own (capacity.py); `plan` does the same
    max_queued_per_key: int = 64
    min_containers: int = 0
    linger: Literal["modal", "local"] = "modal"

    def __post_init__(self) -> None:
        if self.max_containers < 1 or self.batch_size < 1:
            raise ValueError("max_containers and batch_size must be >= 1")
        if not 0 <= self.min_containers <= self.max_containers:
            raise ValueError("need 0 <= min_containers <= max_containers")
        if self.batch_wait_s < 0 or self.scaledown_window_s < 0:
            raise ValueError("batch_wait_s and scaledown_window_s must be >= 0")
        if self.max_queue < 1 or self.max_queued_per_key < 1:
            raise ValueError("max_queue and max_queued_per_key must be >= 1")


@dataclass(frozen=True)
class Arrivals:
    """When requests first arrive, from how many API keys, and how clients treat a 429.

    Request i belongs to key `i % keys`.
    """

    times: tuple[float, ...]
    keys: int = 1
    retries: int = 0
    retry_after_s: float = 10.0
    label: str = ""

    def __post_init__(self) -> None:
        if self.keys < 1 or self.retries < 0 or self.retry_after_s < 0:
            raise ValueError("need keys >= 1, retries >= 0, retry_after_s >= 0")
        if any(t < 0 for t in self.times):
            raise ValueError("arrival times must be >= 0")

    @classmethod
    def burst(
        cls, n: int, *, keys: int = 1, retries: int = 0, retry_after_s: float = 10.0
    ) -> Arrivals:
        """`n` requests at t = 0."""
        return cls((0.0,) * n, keys, retries, retry_after_s, f"burst of {n} at t=0")

    @classmethod
    def steady(
        cls,
        rate: float,
        duration: float,
        *,
        poisson: bool = True,
        seed: int = 0,
        keys: int = 1,
        retries: int = 0,
        retry_after_s: float = 10.0,
    ) -> Arrivals:
        """`rate` requests/s for `duration` s: a Poisson process (seeded) or evenly spaced."""
        if rate <= 0 or duration <= 0:
            raise ValueError("rate and duration must be > 0")
        if poisson:
            rng = random.Random(seed)  # nosec B311 - simulated arrivals, not security
            times: list[float] = []
            t = rng.expovariate(rate)
            while t < duration:
                times.append(t)
                t += rng.expovariate(rate)
        else:
            times = [i / rate for i in range(math.ceil(rate * duration - 1e-9))]
        kind = f"Poisson, seed {seed}" if poisson else "evenly spaced"
        label = f"{rate:g}/s for {duration:g}s ({kind}): {len(times)} requests"
        return cls(tuple(times), keys, retries, retry_after_s, label)

    @classmethod
    def from_times(cls, times: list[float], *, keys: int = 1, label: str = "") -> Arrivals:
        """Measured arrival times (e.g. when a real burst's submissions reached the server)."""
        return cls(tuple(sorted(times)), keys, label=label or f"{len(times)} given arrivals")


@dataclass
class RequestOutcome:
    """One request's life: first arrival, each attempt, then served or refused."""

    id: int
    key: int
    arrived_at: float
    attempts: int = 0
    admitted_at: float | None = None
    started_at: float | None = None  # its batch started
    done_at: float | None = None
    refused: bool = False
    container: int | None = None

    @property
    def served(self) -> bool:
        return self.done_at is not None

    @property
    def latency(self) -> float:
        """First arrival to result, 429 waits included (served requests only)."""
        assert self.done_at is not None  # nosec B101 - callers filter served requests
        return self.done_at - self.arrived_at


@dataclass
class ContainerLife:
    id: int
    started_at: float
    ready_at: float
    stopped_at: float | None = None
    batches: int = 0
    images: int = 0
    busy_s: float = 0.0


@dataclass
class Batch:
    container: int
    started_at: float
    size: int
    seconds: float
    requests: tuple[int, ...] = ()


@dataclass
class SimResult:
    profile: GpuProfile
    capacity: Capacity
    arrivals: Arrivals
    requests: list[RequestOutcome]
    containers: list[ContainerLife]
    batches: list[Batch]
    timeline: list[tuple[float, int]]  # (time, live containers) after each change
    horizon: float  # the last arrival or completion; min containers are billed to here
    rejections: int  # 429 replies, retries included

    @property
    def served(self) -> list[RequestOutcome]:
        return [r for r in self.requests if r.served]

    @property
    def refused(self) -> list[RequestOutcome]:
        return [r for r in self.requests if r.refused]

    def gpu_seconds(self) -> float:
        return sum((c.stopped_at or self.horizon) - c.started_at for c in self.containers)


@dataclass
class _Container:
    life: ContainerLife
    state: str = "starting"  # starting | idle | collecting | busy | stopped
    batch: list[int] = field(default_factory=list)
    token: int = 0  # bumped on every state change; stale timer events carry an old one
    idle_since: float = 0.0


class _Simulation:
    def __init__(self, profile: GpuProfile, capacity: Capacity, arrivals: Arrivals) -> None:
        self.profile = profile
        self.cap = capacity
        self.arrivals = arrivals
        self.now = 0.0
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.requests = [
            RequestOutcome(id=i, key=i % arrivals.keys, arrived_at=t)
            for i, t in enumerate(arrivals.times)
        ]
        self.pending: deque[int] = deque()
        self.active = 0
        self.active_by_key: dict[int, int] = {}
        self.containers: list[_Container] = []
        self.batches: list[Batch] = []
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]
        self.live = 0
        self.rejections = 0

    # -- the event loop -------------------------------------------------------------------

    def push(self, at: float, kind: int, subject: int, token: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, kind, self.seq, subject, token))

    def run(self) -> SimResult:
        for _ in range(self.cap.min_containers):
            self.start_container(ready_now=True)
        for request in self.requests:
            self.push(request.arrived_at, _ARRIVAL, request.id)
        handlers = {
            _DONE: self.on_done,
            _READY: self.on_ready,
            _LINGER: self.on_linger,
            _ARRIVAL: self.on_arrival,
            _IDLE: self.on_idle,
        }
        while self.heap:
            at, kind, _, subject, token = heapq.heappop(self.heap)
            self.now = at
            handlers[kind](subject, token)
            self.dispatch()
            self.autoscale()
        horizon = max(
            [r.done_at for r in self.requests if r.done_at is not None]
            + [max(self.arrivals.times, default=0.0)]
        )
        return SimResult(
            profile=self.profile,
            capacity=self.cap,
            arrivals=self.arrivals,
            requests=self.requests,
            containers=[c.life for c in self.containers],
            batches=self.batches,
            timeline=self.timeline,
            horizon=horizon,
            rejections=self.rejections,
        )

    # -- handlers -------------------------------------------------------------------------

    def on_arrival(self, request_id: int, _token: int) -> None:
        request = self.requests[request_id]
        request.attempts += 1
        mine = self.active_by_key.get(request.key, 0)
        if self.active >= self.cap.max_queue or mine >= self.cap.max_queued_per_key:
            self.rejections += 1  # 429, retry_after
            if request.attempts <= self.arrivals.retries:
                self.push(self.now + self.arrivals.retry_after_s, _ARRIVAL, request_id)
            else:
                request.refused = True
            return
        request.admitted_at = self.now
        self.active += 1
        self.active_by_key[request.key] = mine + 1
        self.pending.append(request_id)

    def on_ready(self, container_id: int, _token: int) -> None:
        self.become_idle(self.containers[container_id])

    def on_linger(self, container_id: int, token: int) -> None:
        container = self.containers[container_id]
        if container.state != "collecting" or container.token != token:
            return
        if self.cap.linger == "local":  # LocalWorker: sleep, then claim what is queued
            container.batch = self.take(self.cap.batch_size)
            if not container.batch:
                self.become_idle(container)
                return
        self.start_batch(container)

    def on_done(self, container_id: int, _token: int) -> None:
        container = self.containers[container_id]
        for request_id in container.batch:
            request = self.requests[request_id]
            self.active -= 1
            self.active_by_key[request.key] -= 1
        container.batch = []
        if self.cap.linger == "local" and self.pending:  # claims the next batch at once
            container.batch = self.take(self.cap.batch_size)
            self.start_batch(container)
            return
        self.become_idle(container)

    def on_idle(self, container_id: int, token: int) -> None:
        container = self.containers[container_id]
        if container.state != "idle" or container.token != token:
            return
        if self.live <= self.cap.min_containers:
            return  # kept warm; billed to the horizon
        container.state = "stopped"
        container.token += 1
        container.life.stopped_at = self.now
        self.set_live(self.live - 1)

    # -- decisions ------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand pending inputs to containers that can take them (`@modal.batched`)."""
        size = self.cap.batch_size
        while self.pending:
            if self.cap.linger == "modal":
                collecting = next((c for c in self.containers if c.state == "collecting"), None)
                if collecting is not None:
                    collecting.batch += self.take(size - len(collecting.batch))
                    if len(collecting.batch) >= size:
                        self.start_batch(collecting)
                    continue
            idle = [c for c in self.containers if c.state == "idle"]
            if not idle:
                return
            container = max(idle, key=lambda c: (c.idle_since, c.life.id))  # went idle last
            if self.cap.linger == "local":
                if self.cap.batch_wait_s == 0:
                    container.batch = self.take(size)
                    self.start_batch(container)
                else:
                    self.collect(container)
                    return  # it claims at the end of its sleep; queued inputs wait for it
                continue
            container.batch = self.take(size)
            if len(container.batch) >= size or self.cap.batch_wait_s == 0:
                self.start_batch(container)
            else:
                self.collect(container)

    def autoscale(self) -> None:
        """Start containers while pending inputs have no free slot to go to."""
        size = self.cap.batch_size
        free = 0
        for c in self.containers:
            if c.state in ("starting", "idle"):
                free += size
            elif c.state == "collecting":
                free += size - (0 if self.cap.linger == "local" else len(c.batch))
        need = math.ceil(max(0, len(self.pending) - free) / size)
        for _ in range(min(need, self.cap.max_containers - self.live)):
            self.start_container(ready_now=False)

    # -- helpers --------------------------------------------------------------------------

    def take(self, n: int) -> list[int]:
        taken: list[int] = []
        while self.pending and len(taken) < n:
            taken.append(self.pending.popleft())
        return taken

    def start_container(self, *, ready_now: bool) -> None:
        cold = 0.0 if ready_now else self.profile.cold_start_s
        life = ContainerLife(id=len(self.containers), started_at=self.now, ready_at=self.now + cold)
        container = _Container(life=life)
        self.containers.append(container)
        self.set_live(self.live + 1)
        if ready_now:
            self.become_idle(container)
        else:
            self.push(life.ready_at, _READY, life.id)

    def become_idle(self, container: _Container) -> None:
        container.state = "idle"
        container.token += 1
        container.idle_since = self.now
        self.push(self.now + self.cap.scaledown_window_s, _IDLE, container.life.id, container.token)

    def collect(self, container: _Container) -> None:
        container.state = "collecting"
        container.token += 1
        self.push(self.now + self.cap.batch_wait_s, _LINGER, container.life.id, container.token)

    def start_batch(self, container: _Container) -> None:
        n = len(container.batch)
        seconds = self.profile.batch_seconds(n)
        container.state = "busy"
        container.token += 1
        life = container.life
        life.batches += 1
        life.images += n
        life.busy_s += seconds
        self.batches.append(Batch(life.id, self.now, n, seconds, tuple(container.batch)))
        engine_done = self.now + self.profile.engine_seconds(n)
        for i, request_id in enumerate(container.batch):
            request = self.requests[request_id]
            request.started_at = self.now
            request.container = life.id
            # results are stored one after another (JobRunner); each job is done when its
            # own is; its queue slot is freed with the batch (a slightly late release)
            request.done_at = engine_done + (i + 1) * self.profile.per_image_overhead_s
        self.push(self.now + seconds, _DONE, life.id)

    def set_live(self, live: int) -> None:
        self.live = live
        if self.timeline and self.timeline[-1][0] == self.now:
            self.timeline[-1] = (self.now, live)
        else:
            self.timeline.append((self.now, live))


def simulate(profile: GpuProfile, capacity: Capacity, arrivals: Arrivals) -> SimResult:
    """Run the model to the end: every request served or refused, every container stopped
    (except those `min_containers` keeps)."""
    return _Simulation(profile, capacity, arrivals).run()
