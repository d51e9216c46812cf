"""The control plane: Modal's side of the rehearsal, in the rehearsal's main process.

It holds what Modal's servers hold (calls and their inputs, results) and starts
and stops the emulated containers, one process each (`rehearsal/container.py`). Each
rule below is Modal's as documented; where the docs leave a number open (how fast the
autoscaler starts containers, the crash-loop backoff), the rehearsal's choice is named.

- Inputs and results (https://modal.com/docs/guide/job-queue, modal/_functions.py):
  `spawn` queues one input and returns its call id; `get(timeout)` waits for the result
  and answers "pending" (the built-in TimeoutError) while it runs; results stay for as
  long as the rehearsal runs.
- Batches (https://modal.com/docs/guide/dynamic-batching): an idle container takes up
  to `max_batch_size` inputs, waiting at most `wait_ms` after the first.
- Failures (modal/_runtime/container_io_manager.py, `output_items_exception`: "all
  inputs in the batch get the same failure"): an exception fails every input of the
  batch, and each is retried on its own under `modal.Retries` (the retries guide: "each
  input is retried independently"), after `Retries.delay_s`.
- Timeouts (https://modal.com/docs/guide/timeouts): an attempt longer than `timeout` is
  a failed attempt ending in `FunctionTimeoutError` once retries are spent, and "each
  retry starts a new execution timeout". The container is killed: the client has no
  in-container timeout (container_io_manager.py), so it is ended from outside. A batch
  is one execution (one `IOContext`), so one timeout covers the batch and every input of
  it fails; the docs say nothing of batches here.
- Crashes (https://modal.com/docs/guide/retries, "Container crashes"): "Modal will
  reschedule the container and any work it was currently assigned"; for deployed apps
  "container crashes will be retried indefinitely", with "a crash-loop backoff". So an
  input whose container died runs again at once and spends none of its `max_retries`
  (the client agrees: an internal failure "doesn't count towards the retry policy",
  modal/_functions.py). Backoff here: containers that die before they are ready delay
  the next start by 1 s, doubling up to 30 s.
- Cancellation (modal/_functions.py, `FunctionCall.cancel`: "terminate its inputs
  without retrying"; container_io_manager.py: one `IOContext` per batch, whose
  `cancel()` interrupts the whole batch, and `output_items_cancellation` marks every
  input of it TERMINATED): cancelling any input of a running batch terminates them all.
  A queued input is just terminated. `terminate_containers=True` kills the container
  and reschedules its other inputs (the docstring).
- Scaling (https://modal.com/docs/guide/scale): at most `max_containers` (with
  `--gpus N`: at most N containers of GPU functions, together), at least
  `min_containers`; a container idle for `scaledown_window` exits. A function without
  `max_containers` gets at most `--max-containers-default` (8) here: Modal has no such
  limit, but this machine has two cores.
- Schedules (https://modal.com/docs/guide/cron): every period a new input; nothing
  waits for the previous run, so runs may overlap.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from rehearsal import fake_modal, images, wire
from rehearsal.fake_modal import ENV_CONTAINER, FunctionSpec, exception
from rehearsal.snapshots import Snapshot
from rehearsal.state import Batch, Container, Input, Options, Peer, Service

log = logging.getLogger(__name__)

BLOCKING_OPS = frozenset({"get", "remote", "next", "wait_input"})


class ControlPlane:
    """Calls, inputs, results and containers; serves the wire (`rehearsal/wire.py`)."""

    def __init__(self, app: fake_modal.App, options: Options) -> None:
        self.app = app
        self.options = options
        self._lock = threading.RLock()
        self._services = {
            tag: Service(spec, threading.Condition(self._lock)) for tag, spec in app.specs.items()
        }
        self._inputs: dict[str, Input] = {}
        self._batches: dict[str, Batch] = {}
        self._containers: dict[str, Container] = {}
        self._ids = itertools.count(1)
        self._refused: dict[int, str] = {}  # imports refused in containers, by image
        self._gpu_batches = 0
        self._stopping = threading.Event()
        self.counters: Counter[str] = Counter()
        self.per_function: dict[str, Counter[str]] = {tag: Counter() for tag in self._services}
        self.failures: dict[str, list[str]] = {}  # why containers failed at start, by function
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        host, port = self._listener.address
        return f"{host}:{port}"

    @property
    def authkey_hex(self) -> str:
        return self._authkey.hex()

    def check_deployable(self) -> list[str]:
        """What `modal deploy` would refuse: missing secret keys, missing volumes."""
        problems = []
        for spec in self.app.specs.values():
            for secret in spec.secrets:
                missing = secret.missing_keys(os.environ)
                if missing:
                    problems.append(
                        f"{spec.tag}: Secret {secret.name!r} is missing required key(s)"
                        f" {', '.join(missing)} (the rehearsal reads secrets from its environment)"
                    )
            for mount, volume in spec.volumes.items():
                if volume.create_if_missing:
                    volume.path.mkdir(parents=True, exist_ok=True)
                elif not volume.path.is_dir():
                    problems.append(f"{spec.tag}: Volume {volume.name!r} ({mount}) not found")
        return problems

    def start(self) -> None:
        self._spawn_thread(self._accept, "accept")
        self._spawn_thread(self._housekeeping, "housekeeping")
        for tag, service in self._services.items():
            if service.spec.schedule is not None:
                period = self.options.sweep_every or service.spec.schedule.period_s()
                self._spawn_thread(lambda t=tag, p=period: self._schedule(t, p), f"cron-{tag}")
        with self._lock:
            for service in self._services.values():
                self._scale(service)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every container (SIGTERM, then SIGKILL after `grace_s`) and the wire."""
        self._stopping.set()
        with self._lock:
            containers = list(self._containers.values())
            for service in self._services.values():
                service.cv.notify_all()
        for container in containers:
            if container.proc is not None and container.proc.poll() is None:
                container.proc.terminate()
        deadline = time.monotonic() + grace_s
        for container in containers:
            if container.proc is None:
                continue
            try:
                container.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                container.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):  # a fork never made
                    container.proc.wait(grace_s)
        for service in self._services.values():
            if service.snapshot is not None:
                service.snapshot.stop(grace_s)
        self._listener.close()

    def _spawn_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=f"rehearsal-{name}", daemon=True)
        thread.start()

    # -- the wire ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                if self._stopping.is_set():
                    return
                log.exception("a connection to the control plane failed")
                continue
            except Exception:  # a peer without the authkey: refused, keep serving
                log.warning("refused a connection to the control plane")
                continue
            self._spawn_thread(lambda c=conn: self._serve_peer(c), "peer")

    def _serve_peer(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
        except (EOFError, OSError):
            return
        container = self._containers.get(hello[1]) if hello[0] == "container" else None
        peer = Peer(conn, container)
        if container is not None:
            container.peer = peer
        while True:
            try:
                request_id, op, args = conn.recv()
            except (EOFError, OSError):
                return
            if op in BLOCKING_OPS:
                self._spawn_thread(
                    lambda r=request_id, o=op, a=args: self._answer(peer, r, o, a), op
                )
            else:
                self._answer(peer, request_id, op, args)

    def _answer(self, peer: Peer, request_id: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            value = getattr(self, f"op_{op}")(peer, *args)
        except (exception.Error, KeyError, TypeError, ValueError) as err:
            peer.send((request_id, False, err))
            return
        except Exception as err:
            log.exception("control plane op %s failed", op)
            peer.send((request_id, False, RuntimeError(f"rehearsal control plane: {err!r}")))
            return
        peer.send((request_id, True, value))

    # -- Modal calls of the rehearsed code -----------------------------------------------

    def op_lookup(self, peer: Peer, app_name: str, name: str) -> None:
        if app_name != self.app.name or name not in self._services:
            raise exception.NotFoundError(
                f"Lookup failed for Function '{name}' in app '{app_name}'"
            )

    def op_spawn(self, peer: Peer, tag: str, method: str | None, args: bytes) -> str:
        self.count("modal.spawn")
        return self._enqueue(tag, method, args).id

    def op_remote(self, peer: Peer, tag: str, method: str | None, args: bytes) -> Any:
        self.count("modal.remote")
        item = self._enqueue(tag, method, args)
        item.done.wait()
        return item.outcome

    def op_get(self, peer: Peer, call_id: str, timeout: float | None) -> tuple[str, Any]:
        self.count("modal.get")
        item = self._input(call_id)
        if not item.done.wait(timeout):
            return ("pending", None)
        assert item.outcome is not None
        return item.outcome

    def op_cancel(self, peer: Peer, call_id: str, terminate_containers: bool) -> None:
        self.count("modal.cancel")
        item = self._input(call_id)
        kill: Container | None = None
        with self._lock:
            if item.state in ("queued", "waiting_retry", "collecting"):
                service = self._services[item.tag]
                if item in service.queue:
                    service.queue.remove(item)
                for container in service.containers.values():
                    if item in container.collecting:
                        container.collecting.remove(item)
                self._finish(item, ("terminated", "the input was cancelled before it ran"))
            elif item.state == "running" and item.batch is not None:
                batch = item.batch
                if terminate_containers:
                    self._finish(item, ("terminated", "the input was cancelled"))
                    batch.container.kill_reason = "terminate"
                    kill = batch.container
                elif batch.container.peer is not None:
                    batch.container.peer.send((None, "cancel", batch.id))
        if kill is not None:
            self._kill(kill)

    def _input(self, call_id: str) -> Input:
        item = self._inputs.get(call_id)
        if item is None:
            raise exception.NotFoundError(f"FunctionCall {call_id!r} not found")
        return item

    def _enqueue(self, tag: str, method: str | None, args: bytes) -> Input:
        service = self._services.get(tag)
        if service is None:
            raise exception.NotFoundError(f"Function '{tag}' not found in app '{self.app.name}'")
        if service.spec.web:
            raise exception.InvalidError(f"{tag} is a web function: call it over HTTP")
        item = Input(f"fc-{secrets.token_hex(12)}", tag, method, args)
        with self._lock:
            self._inputs[item.id] = item
            self.per_function[tag]["inputs"] += 1
            service.queue.append(item)
            service.cv.notify_all()
            self._scale(service)
        return item

    # -- containers' side ------------------------------------------------------------------

    def op_ready(self, peer: Peer, port: int | None) -> None:
        container = self._container(peer)
        with self._lock:
            container.ready, container.port = True, port
            self._services[container.tag].start_times.append(
                time.monotonic() - container.started_at
            )
            if container.state == "starting":
                container.state = "idle"
            container.idle_since = time.monotonic()
            service = self._services[container.tag]
            service.backoff_s = 0.0
            service.cv.notify_all()

    def op_failed(self, peer: Peer, reason: str) -> None:
        """A container is about to exit at start (a failed import, enter, snapshot check)."""
        container = self._container(peer)
        container.failure = reason
        with self._lock:
            self.failures.setdefault(container.tag, []).append(reason)
        log.error("container %s of %s failed to start: %s", container.id, container.tag, reason)

    def op_next(self, peer: Peer) -> tuple[str, list[tuple[str, str | None, bytes]]] | None:
        """The container's next batch, or None: exit (idle past `scaledown_window`)."""
        container = self._container(peer)
        service = self._services[container.tag]
        max_size, wait_ms = service.spec.batch or (1, 0)
        with self._lock:
            container.state, container.idle_since = "idle", time.monotonic()
            idle_until = time.monotonic() + service.spec.scaledown_window
            while not service.queue:
                remaining = idle_until - time.monotonic()
                if self._stopping.is_set() or container.kill_reason or container.gone:
                    return None
                if remaining <= 0 and len(service.alive) > service.spec.min_containers:
                    container.state = "stopping"
                    self._scale(service)
                    return None
                service.cv.wait(max(remaining, 0.5))
            container.state = "collecting"
            collect_until = time.monotonic() + wait_ms / 1000
            while len(container.collecting) < max_size:
                if self._stopping.is_set() or container.gone:
                    return None  # what it collected is back in the queue (`_watch`)
                if service.queue:
                    item = service.queue.popleft()
                    item.state = "collecting"
                    container.collecting.append(item)
                    continue
                remaining = collect_until - time.monotonic()
                if remaining <= 0:
                    break
                service.cv.wait(remaining)
            items, container.collecting = container.collecting, []
            if not items:  # all cancelled while collecting
                return self.op_next(peer)
            batch = Batch(f"b-{next(self._ids)}", container, items)
            self._batches[batch.id] = batch
            container.batch, container.state = batch, "busy"
            for item in items:
                item.state, item.batch = "running", batch
                item.attempts += 1
            running = sum(len(c.batch.inputs) for c in service.alive if c.batch)
            stats = self.per_function[container.tag]
            stats["peak_running"] = max(stats["peak_running"], running)
            self._scale(service)
        return batch.id, [(item.id, item.method, item.args) for item in items]

    def op_running(self, peer: Peer, batch_id: str) -> None:
        """The batch's user code starts now: its timeout starts, and a crash may be due."""
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None or batch.finished:
                return
            service = self._services[batch.container.tag]
            batch.started_at = time.monotonic()
            batch.timer = threading.Timer(service.spec.timeout, self._timed_out, (batch,))
            batch.timer.daemon = True
            batch.timer.start()
            self._count(batch.container.tag, "batches")
            self.per_function[batch.container.tag]["batch_inputs"] += len(batch.inputs)
            every = self.options.crash_gpu_every
            if batch.container.gpu and every:
                self._gpu_batches += 1
                if self._gpu_batches % every == 0:
                    batch.crash = True
                    recent = [s for _, s in list(service.batch_times)[-50:]]
                    delay = statistics.fmean(recent) / 2 if recent else 0.0
                    timer = threading.Timer(delay, self._crash, (batch,))
                    timer.daemon = True
                    timer.start()

    def op_outputs(self, peer: Peer, batch_id: str, kind: str, payload: Any) -> None:
        """The batch ended: "success" (one result per input), "failure" or "terminated"."""
        container = self._container(peer)
        crash = False
        with self._lock:
            batch = self._batches.pop(batch_id, None)
            if batch is None or batch.finished:
                return  # timed out meanwhile: its inputs were already failed
            if batch.crash:
                crash = True  # its outputs never reach Modal: the container dies first
            else:
                self._end_batch(batch, completed=True)
                for i, item in enumerate(batch.inputs):
                    if item.state != "running":
                        continue  # ended meanwhile (cancelled with terminate_containers)
                    if kind == "success":
                        self._finish(item, ("success", payload[i]))
                    elif kind == "failure":
                        self._attempt_failed(item, ("failure", payload))
                    else:
                        self._finish(item, ("terminated", "the input was cancelled"))
                container.batch, container.state = None, "idle"
        if crash:
            self._crash(batch)

    def op_stats(self, peer: Peer, deltas: dict[str, int]) -> None:
        with self._lock:
            self.counters.update(deltas)

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _container(self, peer: Peer) -> Container:
        if peer.container is None:
            raise exception.InvalidError("only a container may call this")
        return peer.container

    def _count(self, tag: str, name: str) -> None:
        """One more `name`, in the totals and in `tag`'s own counters (under the lock)."""
        self.counters[name] += 1
        self.per_function[tag][name] += 1

    def _end_batch(self, batch: Batch, *, completed: bool = False) -> None:
        """No more outcome from it; a completed one's duration times the next crash."""
        batch.finished = True
        if batch.timer is not None:
            batch.timer.cancel()
        if completed and batch.started_at is not None:
            self._services[batch.container.tag].batch_times.append(
                (len(batch.inputs), time.monotonic() - batch.started_at)
            )

    def _finish(self, item: Input, outcome: tuple[str, Any]) -> None:
        item.state, item.outcome, item.batch = outcome[0], outcome, None
        item.done.set()
        self.per_function[item.tag][f"ended.{outcome[0]}"] += 1

    def _attempt_failed(self, item: Input, outcome: tuple[str, Any]) -> None:
        """One failed attempt (an exception, a timeout): retry it under `Retries`, or end."""
        service = self._services[item.tag]
        policy = service.spec.retries
        if policy is None or item.retries >= policy.max_retries:
            self._finish(item, outcome)
            return
        item.retries += 1
        item.state, item.batch = "waiting_retry", None
        self._count(item.tag, "retries")
        timer = threading.Timer(policy.delay_s(item.retries), self._retry, (item,))
        timer.daemon = True
        timer.start()

    def _retry(self, item: Input) -> None:
        with self._lock:
            if item.state != "waiting_retry":
                return  # cancelled while waiting
            service = self._services[item.tag]
            item.state = "queued"
            service.queue.append(item)
            service.cv.notify_all()
            self._scale(service)

    def _timed_out(self, batch: Batch) -> None:
        with self._lock:
            if batch.finished:
                return
            self._end_batch(batch)
            self._batches.pop(batch.id, None)
            timeout = self._services[batch.container.tag].spec.timeout
            self._count(batch.container.tag, "timeouts")
            batch.container.kill_reason = "timeout"
            message = f"Function execution timed out after {timeout:g} s"
            for item in batch.inputs:
                self._attempt_failed(item, ("timeout", message))
        self._kill(batch.container)

    def _crash(self, batch: Batch) -> None:
        """--crash-gpu-every: SIGKILL the container mid-batch; `_watch` reschedules."""
        with self._lock:
            proc = batch.container.proc
            if batch.finished or proc is None or proc.poll() is not None:
                return
            self.counters["crashes_injected"] += 1
        log.warning("killing container %s mid-batch (--crash-gpu-every)", batch.container.id)
        self._kill(batch.container)

    @staticmethod
    def _kill(container: Container) -> None:
        if container.proc is not None and container.proc.poll() is None:
            container.proc.kill()

    # -- scaling -----------------------------------------------------------------------

    def _cap(self, service: Service) -> int:
        """How many more containers `service` may start now."""
        spec = service.spec
        limit = spec.max_containers
        if limit is None:
            limit = self.options.default_max_containers
        room = limit - len(service.alive)
        if spec.gpu is not None and self.options.gpus is not None:
            gpus = sum(len(s.alive) for s in self._services.values() if s.spec.gpu is not None)
            room = min(room, self.options.gpus - gpus)
        return room

    def _scale(self, service: Service) -> None:
        """Start the containers the queue needs (called with the lock held).

        "The autoscaler will spin up new containers when there is no capacity available for
        new inputs" (https://modal.com/docs/guide/scale): with P inputs queued and S free
        places on containers starting, idle or still collecting a batch, it starts
        `ceil((P - S) / batch size)`, as `magicmix plan` models it (planner/sim.py).
        """
        if self._stopping.is_set() or time.monotonic() < service.start_after:
            return
        alive = service.alive
        want = service.spec.min_containers - len(alive)
        if not service.spec.web:  # enough containers for the queue, counting free places
            per_batch = service.spec.batch[0] if service.spec.batch else 1
            places = sum(
                per_batch - len(c.collecting)
                for c in alive
                if c.state in ("starting", "idle", "collecting")
            )
            want = max(want, math.ceil((len(service.queue) - places) / per_batch))
        for _ in range(min(want, self._cap(service))):
            self._start(service)

    def _start(self, service: Service) -> Container:
        spec = service.spec
        container = Container(f"ct-{spec.tag}-{next(self._ids)}", spec.tag, spec.gpu is not None)
        env = self._container_env(spec)
        self._containers[container.id] = container
        service.containers[container.id] = container
        command = [sys.executable, "-m", "rehearsal.container", self.options.app_module, spec.tag]
        if spec.enable_memory_snapshot:
            if service.snapshot is None or not service.snapshot.alive:
                service.snapshot = Snapshot(
                    [*command, "--snapshot"], env, lambda why: self._snapshot_failed(service, why)
                )
            container.proc = service.snapshot.fork(container.id)
        else:
            container.proc = subprocess.Popen(  # a terminal's Ctrl-C is for the plane alone
                command, env={**env, ENV_CONTAINER: container.id}, process_group=0
            )
        self._count(spec.tag, "containers_started")
        stats = self.per_function[spec.tag]
        stats["peak_containers"] = max(stats["peak_containers"], len(service.alive))
        self._spawn_thread(lambda: self._watch(container), f"watch-{container.id}")
        return container

    def _container_env(self, spec: FunctionSpec) -> dict[str, str]:
        """A container's environment: the rehearsal's, the function's own, the wire's, and
        the imports its image does not install."""
        env = dict(os.environ)
        env.update({k: v for k, v in spec.env.items() if v is not None})
        for key in [k for k, v in spec.env.items() if v is None]:
            env.pop(key, None)
        env.update(  # the state dir and web URL come with os.environ: the CLI set them there
            {
                wire.ENV_ADDRESS: self.address,
                wire.ENV_AUTHKEY: self.authkey_hex,
                wire.ENV_LATENCY_MS: str(self.options.latency_ms),
                images.ENV_REFUSED: self._refused_imports(spec.image),
            }
        )
        return env

    def _refused_imports(self, image: fake_modal.Image) -> str:
        key = id(image)
        if key not in self._refused:
            names: list[str] = []
            if image.declares_packages:
                installs = images.with_dependencies(Requirement(r) for r in image.requirements)
                exempt = {self.options.app_module.partition(".")[0], "rehearsal", "modal"}
                names = images.refused_names(installs, image.local_sources, exempt)
            self._refused[key] = ",".join(names)
        return self._refused[key]

    def _snapshot_failed(self, service: Service, reason: str) -> None:
        """The snapshot could not be taken: every container waiting on it failed to start."""
        with self._lock:
            for container in service.containers.values():
                if not container.ready:
                    container.failure = reason
            self.failures.setdefault(service.spec.tag, []).append(reason)
        log.error("the memory snapshot of %s failed: %s", service.spec.tag, reason)

    def _watch(self, container: Container) -> None:
        assert container.proc is not None
        code = container.proc.wait()
        with self._lock:
            service = self._services[container.tag]
            service.containers.pop(container.id, None)
            self._containers.pop(container.id, None)
            batch, container.batch = container.batch, None
            stats = self.per_function[container.tag]
            if batch is not None and not batch.finished:
                self._end_batch(batch)
                self._batches.pop(batch.id, None)
                if container.kill_reason is None:
                    self._count(container.tag, "crashes")
                for item in reversed(batch.inputs):  # to the front, in their order
                    if item.state == "running":  # rescheduled, no retry spent
                        item.state, item.batch = "queued", None
                        service.queue.appendleft(item)
                        stats["rescheduled"] += 1
            container.gone = True
            for item in reversed(container.collecting):
                item.state = "queued"
                service.queue.appendleft(item)
            container.collecting = []
            stopping = self._stopping.is_set()
            if not container.ready and not stopping:
                stats["containers_failed"] += 1
                service.backoff_s = min(max(1.0, service.backoff_s * 2), 30.0)
                service.start_after = time.monotonic() + service.backoff_s
                log.error(
                    "container %s of %s exited with %s before it was ready%s; next start in %g s",
                    container.id,
                    container.tag,
                    code,
                    f": {container.failure}" if container.failure else "",
                    service.backoff_s,
                )
            elif batch is None and code != 0 and not (container.kill_reason or stopping):
                self._count(container.tag, "crashes")  # died while idle
            service.cv.notify_all()
            self._scale(service)

    def _housekeeping(self) -> None:
        """Starts what backoff delayed, and scales idle web containers down."""
        while not self._stopping.wait(0.25):
            with self._lock:
                for service in self._services.values():
                    self._scale(service)
                    if service.spec.web:
                        self._scale_down_web(service)

    def _schedule(self, tag: str, period_s: float) -> None:
        while not self._stopping.wait(period_s):
            self.count("scheduled_runs")
            self._enqueue(tag, None, fake_modal.dumps(((), {})))

    # -- the web function ------------------------------------------------------------------

    def web_service(self) -> Service | None:
        return next((s for s in self._services.values() if s.spec.web), None)

    def acquire_web(self, service: Service) -> Container:
        """A ready web container with a free input slot (`@modal.concurrent(max_inputs)`)."""
        limit = service.spec.max_inputs or 1  # without @modal.concurrent: one at a time
        with self._lock:
            self.counters["web.requests"] += 1
            while not self._stopping.is_set():
                for container in service.alive:
                    if container.ready and container.inflight < limit:
                        container.inflight += 1
                        stats = self.per_function[service.spec.tag]
                        total = sum(c.inflight for c in service.alive)
                        stats["peak_running"] = max(stats["peak_running"], total)
                        return container
                starting = sum(1 for c in service.alive if not c.ready)
                room = self._cap(service)
                wanted = starting * limit < service.web_waiters + 1 and room > 0
                if wanted and time.monotonic() >= service.start_after:
                    self._start(service)
                service.web_waiters += 1
                service.cv.wait(0.5)
                service.web_waiters -= 1
        raise exception.ExecutionError("the rehearsal is stopping")

    def release_web(self, container: Container) -> None:
        with self._lock:
            container.inflight -= 1
            if container.inflight == 0:
                container.idle_since = time.monotonic()
            self._services[container.tag].cv.notify_all()

    def _scale_down_web(self, service: Service) -> None:
        now = time.monotonic()
        for container in service.alive:
            idle = container.ready and container.inflight == 0
            if idle and now - container.idle_since > service.spec.scaledown_window:
                if len(service.alive) <= service.spec.min_containers:
                    return
                container.state = "stopping"
                if container.peer is not None:
                    container.peer.send((None, "stop", None))

    # -- looking in (clients, tests, benchmarks) ---------------------------------------------

    def op_counters(self, peer: Peer | None = None) -> dict[str, Any]:
        with self._lock:
            return {
                "totals": dict(self.counters),
                "functions": {tag: dict(c) for tag, c in self.per_function.items()},
                "failures": {tag: reasons[-5:] for tag, reasons in self.failures.items()},
            }

    def op_containers(self, peer: Peer) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "id": c.id,
                    "function": c.tag,
                    "pid": c.proc.pid if c.proc else None,
                    "state": c.state,
                    "ready": c.ready,
                    "batch": [i.id for i in c.batch.inputs] if c.batch else [],
                    "failure": c.failure,
                }
                for c in self._containers.values()
            ]

    def op_timings(self, peer: Peer, tag: str) -> dict[str, list[Any]]:
        """A function's completed batches as (size, seconds from its user code starting to
        its outputs), and its containers' seconds from start to ready."""
        with self._lock:
            service = self._services[tag]
            return {"batches": list(service.batch_times), "starts": list(service.start_times)}

    def op_input(self, peer: Peer, call_id: str) -> dict[str, Any]:
        item = self._input(call_id)
        with self._lock:
            batch = item.batch
            return {
                "state": item.state,
                "attempts": item.attempts,
                "retries": item.retries,
                "batch": [i.id for i in batch.inputs] if batch else [],
                "container": batch.container.id if batch else None,
                "pid": batch.container.proc.pid if batch and batch.container.proc else None,
                "started": batch is not None and batch.started_at is not None,
            }

    def op_wait_input(
        self, peer: Peer, call_id: str, states: list[str], timeout: float
    ) -> dict[str, Any]:
        """Wait until the input is in one of `states` (and its user code has started, for
        "running"); tests wait on this instead of the clock."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.op_input(peer, call_id)
            ready = seen["state"] in states and (seen["state"] != "running" or seen["started"])
            if ready or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)


def write_control_file(path: Path, plane: ControlPlane) -> None:
    """Where and how a client connects (`rehearsal.client.connect`); only the owner reads it."""
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(f"{plane.address}\n{plane.authkey_hex}\n")
