"""One emulated container: `python -m rehearsal.container APP_MODULE TAG [--snapshot]`.

Started by the control plane, one process per container, so a kill -9 is real. It
follows a Modal container's life (modal/_container_entrypoint.py and
modal/_runtime/user_code_imports.py, `lifecycle_context`): import the app module (as
Modal imports it in every container), run the class's `@enter(snap=True)` methods, take
the memory snapshot, run the `@enter(snap=False)` methods, then take inputs (or, for an
`@asgi_app`, build the app and serve it), and run the `@exit` methods last.

A function with `enable_memory_snapshot=True` is snapshotted once, as on Modal
(https://modal.com/docs/guide/memory-snapshots): with `--snapshot` this process imports,
runs the `snap=True` methods, checks that no connection is open, and then stays as the
snapshot, forking one child per container the control plane asks for (`serve_snapshot`);
each child is a restore and goes on from `snap=False`. Without snapshots every container
imports afresh.

Cancelling an input of the running batch interrupts the user code as Modal does
(`_container_entrypoint.py`): SIGUSR1 raises `InputCancellation` in the main thread for
a sync function; an async one has its task cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

import uvicorn  # the rehearsal's own web serving: loaded before the image's import guard

from rehearsal import LOG_FORMAT, fake_modal, hooks, images, wire
from rehearsal.fake_modal import FunctionSpec, dumps, exception, loads

log = logging.getLogger("rehearsal.container")
Delivered = tuple[str, str | None, bytes]  # an input as delivered: call id, method, arguments
ENV_SNAPSHOT_FDS = "REHEARSAL_SNAPSHOT_FDS"  # "COMMANDS,EVENTS": the snapshot's pipes
# GNU OpenMP cannot run in a child forked after the parent ran a parallel region (the
# child hangs), so the snapshot process computes on one thread, and a restored container
# gets this machine's threads back (torch's default, or OMP_NUM_THREADS as it was).
OMP_THREADS = "OMP_NUM_THREADS"
THREADS_ASKED = os.environ.get(OMP_THREADS)  # as the control plane started this process
PR_SET_PDEATHSIG = 1  # prctl(2): a restored container dies with its snapshot process


class StartFailed(Exception):
    """The container cannot start (a failed import, enter method, snapshot check)."""


@dataclass
class UserCode:
    """The app's function or class instance, up to the memory snapshot."""

    spec: FunctionSpec
    instance: Any

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call user code; a coroutine runs to its end on a loop of its own."""
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return asyncio.run(result)
        return result


def load(module_name: str, tag: str) -> UserCode:
    """Import the app, run the `snap=True` methods, check the snapshot (when enabled)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        traceback.print_exc()
        raise StartFailed(f"importing {module_name} failed: {exc!r}") from exc
    spec = fake_modal.app_of(module).specs[tag]
    if spec.image.inside_exceptions:  # raised in a container of that image only
        error = spec.image.inside_exceptions[0]
        traceback.print_exception(error)
        raise StartFailed(f"an import of {tag}'s image failed: {error!r}")
    try:
        code = UserCode(spec, spec.user_cls() if spec.user_cls is not None else None)
        for name in spec.lifecycle(snap=True):
            code.run(getattr(code.instance, name))
    except Exception as exc:
        traceback.print_exc()
        raise StartFailed(f"starting {tag} failed: {exc!r}") from exc
    if spec.enable_memory_snapshot:
        open_now = hooks.open_connections(wire.fds())
        if open_now:
            raise StartFailed(
                f"{len(open_now)} network connection(s) open when Modal would take the memory"
                " snapshot (after the import and the @modal.enter(snap=True) methods); it"
                " would be captured in the snapshot and dead in every restored container."
                " Open connections in @modal.enter(snap=False) instead: " + "; ".join(open_now)
            )
    return code


class Container:
    """The user code of one function or class after the snapshot, and the input loop."""

    def __init__(self, link: wire.Wire, code: UserCode, stats: hooks.Stats) -> None:
        self.link = link
        self.spec = code.spec
        self.instance = code.instance
        self.stats = stats
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.batch_id: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self.in_user_code = False
        self.server: Any = None  # uvicorn's, for a web function
        link.on_push = self.on_push
        signal.signal(signal.SIGUSR1, self.on_usr1)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.spec.lifecycle(snap=False):
            self.run(getattr(self.instance, name))

    def stop(self) -> None:
        for name in self.spec.lifecycle(exit=True):
            self.run(getattr(self.instance, name))
        with contextlib.suppress(wire.WireClosed):
            self.link.call("stats", self.stats.take())

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return self.loop.run_until_complete(result)
        return result

    # -- inputs ---------------------------------------------------------------------------

    def serve_inputs(self) -> None:
        self.link.call("ready", None)
        threading.Thread(target=self.flush_stats, daemon=True).start()
        while (job := self.link.call("next")) is not None:
            batch_id, items = job
            self.batch_id = batch_id
            kind, payload = self.run_batch(batch_id, items)
            self.batch_id = None
            self.link.call("outputs", batch_id, kind, payload)

    def run_batch(self, batch_id: str, items: list[Delivered]) -> tuple[str, Any]:
        method = items[0][1]
        fn = getattr(self.instance, method) if method else self.spec.raw_f
        assert fn is not None
        calls = [loads(args) for _, _, args in items]
        if self.spec.batch:  # one list per argument, as @modal.batched functions take them
            args = [list(column) for column in zip(*(a for a, _ in calls), strict=True)]
            kwargs = {k: [kw[k] for _, kw in calls] for k in calls[0][1]}
        else:
            args, kwargs = list(calls[0][0]), calls[0][1]
        self.link.call("running", batch_id)
        try:
            self.in_user_code = True
            try:
                result = self.call_user(fn, args, kwargs)
            finally:
                self.in_user_code = False
        except (exception.InputCancellation, asyncio.CancelledError):
            log.warning("Successfully canceled input %s", [item_id for item_id, _, _ in items])
            return "terminated", None
        except Exception as exc:
            traceback.print_exc()
            return "failure", failure_blob(exc)
        if not self.spec.batch:
            return "success", [dumps(result)]
        if not isinstance(result, list) or len(result) != len(items):
            error = exception.InvalidError(
                f"Output of batched function {fn.__name__} must be a list of"
                f" {len(items)} values, one per input"
            )
            return "failure", failure_blob(error)
        return "success", [dumps(value) for value in result]

    def call_user(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if not asyncio.iscoroutinefunction(fn):
            return fn(*args, **kwargs)
        self.task = self.loop.create_task(fn(*args, **kwargs))
        try:
            return self.loop.run_until_complete(self.task)
        finally:
            self.task = None

    def on_usr1(self, signum: int, frame: FrameType | None) -> None:
        if self.in_user_code and self.task is None:
            raise exception.InputCancellation("Input was cancelled by user")

    def on_push(self, kind: str, payload: Any) -> None:
        if kind == "cancel" and payload == self.batch_id and self.in_user_code:
            task = self.task
            if task is not None:
                self.loop.call_soon_threadsafe(task.cancel)
            else:
                os.kill(os.getpid(), signal.SIGUSR1)
        elif kind == "stop" and self.server is not None:
            self.server.should_exit = True
        elif kind == "closed":  # the control plane is gone: so is this container
            os._exit(1)

    def flush_stats(self) -> None:
        """Every second, the counts since the last report (a kill loses at most a second)."""
        with contextlib.suppress(wire.WireClosed):
            while not threading.Event().wait(1.0):
                deltas = self.stats.take()
                if deltas:
                    self.link.call("stats", deltas)

    # -- a web function -------------------------------------------------------------------

    def serve_web(self) -> None:
        assert self.spec.raw_f is not None
        app = self.spec.raw_f()  # the factory runs after the snapshot, as on Modal
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="auto", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)

        def report_ready() -> None:
            while not self.server.started:
                threading.Event().wait(0.02)
            self.link.call("ready", port)

        threading.Thread(target=report_ready, daemon=True).start()
        threading.Thread(target=self.flush_stats, daemon=True).start()
        self.server.run(sockets=[listening])


def failure_blob(exc: BaseException) -> bytes:
    """The exception pickled, or an ExecutionError with its text if it does not round-trip."""
    try:
        blob = dumps(exc)
        loads(blob)
        return blob
    except Exception:
        text = "".join(traceback.format_exception(exc))
        return dumps(exception.ExecutionError(f"{exc!r} (not picklable)\n{text}"))


def fail(link: wire.Wire | None, reason: str) -> NoReturn:
    """Fail the container at start, loudly: in its log and in the control plane's."""
    print(f"rehearsal: container failed: {reason}", file=sys.stderr, flush=True)
    if link is not None:
        link.call("failed", reason)
    sys.exit(1)


def serve(link: wire.Wire, code: UserCode, stats: hooks.Stats) -> None:
    """From `snap=False` on: the container's inputs (or web requests) until it stops."""
    try:
        container = Container(link, code, stats)
        container.start()
    except Exception as exc:
        traceback.print_exc()
        fail(link, f"starting {code.spec.tag} failed: {exc!r}")
    if not code.spec.web:  # uvicorn handles SIGTERM itself; elsewhere it ends the input loop
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        if code.spec.web:
            container.serve_web()
        else:
            container.serve_inputs()
    except wire.WireClosed:
        pass  # the rehearsal is stopping
    finally:
        container.stop()


def serve_snapshot(code: UserCode, stats: hooks.Stats, commands: int, events: int) -> None:
    """The snapshot process: fork a restored container for each `fork ID` line on
    `commands`; report `ready`, `started ID PID` and `exit PID CODE` on `events`.
    Ends when `commands` closes (the control plane stopped or died)."""
    report = os.fdopen(events, "w", buffering=1)
    report.write("ready\n")
    unread = b""  # read from the raw descriptor: a buffered reader would hide lines from select
    while True:
        readable, _, _ = select.select([commands], [], [], 0.2)
        if readable:
            data = os.read(commands, 4096)
            if not data:
                return
            *lines, unread = (unread + data).split(b"\n")
            for line in lines:
                container_id = line.split()[1].decode()
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(commands)
                    report.close()
                    restored(container_id, code, stats)
                report.write(f"started {container_id} {pid}\n")
        with contextlib.suppress(ChildProcessError):
            while (ended := os.waitpid(-1, os.WNOHANG))[0]:
                report.write(f"exit {ended[0]} {os.waitstatus_to_exitcode(ended[1])}\n")


def threads_back(original: str | None) -> None:
    """A restored container computes on as many threads as it would have without a snapshot."""
    if original is None:
        os.environ.pop(OMP_THREADS, None)
    else:
        os.environ[OMP_THREADS] = original
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(original) if original else len(os.sched_getaffinity(0)))


def restored(container_id: str, code: UserCode, stats: hooks.Stats) -> NoReturn:
    """A child of the snapshot process: one container, from `snap=False` on."""
    exit_code = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.environ[fake_modal.ENV_CONTAINER] = container_id
        threads_back(THREADS_ASKED)
        stats.take()  # the snapshot's own counts are not this container's
        link = wire.connect(("container", container_id))
        serve(link, code, stats)
        exit_code = 0
    except SystemExit as done:
        exit_code = done.code if isinstance(done.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def main(module_name: str, tag: str, snapshot: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    fake_modal.install()
    stats = hooks.Stats()
    hooks.install(wire.latency_from_env(), stats)
    images.guard_container()
    if snapshot:
        os.environ[OMP_THREADS] = "1"  # before the app imports torch; see OMP_THREADS
        commands, events = (int(fd) for fd in os.environ[ENV_SNAPSHOT_FDS].split(","))
        try:
            code = load(module_name, tag)
        except StartFailed as failed:
            print(f"rehearsal: container failed: {failed}", file=sys.stderr, flush=True)
            reason = " ".join(str(failed).split())
            with os.fdopen(events, "w") as report:
                report.write(f"failed {reason}\n")
            sys.exit(1)
        serve_snapshot(code, stats, commands, events)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing of the snapshot's needs tearing down (torch's takes seconds)
    link = wire.connect(("container", os.environ[fake_modal.ENV_CONTAINER]))
    try:
        code = load(module_name, tag)
    except StartFailed as failed:
        fail(link, str(failed))
    serve(link, code, stats)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--snapshot" in sys.argv[3:])
