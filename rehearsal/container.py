"""One emulated container: `python -m rehearsal.container APP_MODULE TAG`.

Started by the control plane, one process per container, so a kill -9 is real. It
follows a Modal container's life (modal/_container_entrypoint.py and
modal/_runtime/user_code_imports.py, `lifecycle_context`): import the app module (as
Modal imports it in every container), run the class's `@enter(snap=True)` methods, take
the memory snapshot (here: check that no connection is open, when
`enable_memory_snapshot`), run the `@enter(snap=False)` methods, then take inputs (or,
for an `@asgi_app`, build the app and serve it), and run the `@exit` methods last.

Cancelling an input of the running batch interrupts the user code as Modal does
(`_container_entrypoint.py`): SIGUSR1 raises `InputCancellation` in the main thread for
a sync function; an async one has its task cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from rehearsal import LOG_FORMAT, fake_modal, hooks, wire
from rehearsal.fake_modal import FunctionSpec, dumps, exception, loads

log = logging.getLogger("rehearsal.container")
Delivered = tuple[str, str | None, bytes]  # an input as delivered: call id, method, arguments


class Container:
    """The user code of one function or class, and the input loop around it."""

    def __init__(self, link: wire.Wire, spec: FunctionSpec, stats: hooks.Stats) -> None:
        self.link = link
        self.spec = spec
        self.stats = stats
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.instance = spec.user_cls() if spec.user_cls is not None else None
        self.batch_id: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self.in_user_code = False
        self.server: Any = None  # uvicorn's, for a web function
        link.on_push = self.on_push
        signal.signal(signal.SIGUSR1, self.on_usr1)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.spec.lifecycle(snap=True):
            self.run(getattr(self.instance, name))
        if self.spec.enable_memory_snapshot:
            self.check_snapshot()
        for name in self.spec.lifecycle(snap=False):
            self.run(getattr(self.instance, name))

    def check_snapshot(self) -> None:
        open_now = hooks.open_connections({self.link.fileno()})
        if open_now:
            fail(
                f"{len(open_now)} network connection(s) open when Modal would take the memory"
                " snapshot (after the import and the @modal.enter(snap=True) methods); it"
                " would be captured in the snapshot and dead in every restored container."
                " Open connections in @modal.enter(snap=False) instead: " + "; ".join(open_now)
            )

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
        import uvicorn

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


_link: wire.Wire | None = None


def fail(reason: str) -> NoReturn:
    """Fail the container at start, loudly: in its log and in the control plane's."""
    print(f"rehearsal: container failed: {reason}", file=sys.stderr, flush=True)
    if _link is not None:
        _link.call("failed", reason)
    sys.exit(1)


def main(module_name: str, tag: str) -> None:
    global _link
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    fake_modal.install()
    stats = hooks.Stats()
    _link = link = wire.connect(("container", os.environ[fake_modal.ENV_CONTAINER]))
    hooks.install(link.latency_s, stats)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        traceback.print_exc()
        fail(f"importing {module_name} failed: {exc!r}")
    app = next(v for v in vars(module).values() if isinstance(v, fake_modal.App))
    spec = app.specs[tag]
    if spec.image.inside_exceptions:  # raised in a container of that image only
        error = spec.image.inside_exceptions[0]
        traceback.print_exception(error)
        fail(f"an import of {tag}'s image failed: {error!r}")
    try:
        container = Container(link, spec, stats)
        container.start()
    except Exception as exc:
        traceback.print_exc()
        fail(f"starting {tag} failed: {exc!r}")
    if not spec.web:  # uvicorn handles SIGTERM itself; elsewhere it ends the input loop
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        if spec.web:
            container.serve_web()
        else:
            container.serve_inputs()
    except wire.WireClosed:
        pass  # the rehearsal is stopping
    finally:
        container.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
